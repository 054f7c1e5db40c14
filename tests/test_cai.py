"""Constitutional AI (feedback.constitution, feedback.cai, experiments/cai.py): constitution file
errors, the critique -> revision loop's records, clamping / hard labels, the exact safety metrics,
and an end-to-end smoke run on the tiny preset."""

import importlib.util
import json
import logging
import os

import numpy as np
import pytest

from rlhf_jax.feedback import cai
from rlhf_jax.feedback import constitution as const_lib
from rlhf_jax.feedback import evaluator as ev_lib

from offline_fixtures import REPO as ROOT, load_config


def _write(tmp_path, text, name="c.json"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_shipped_constitution_has_sixteen_principles():
  c = const_lib.load_constitution("synthetic")
  assert len(c.principles) == 16 and len({p.name for p in c.principles}) == 16
  assert all(p.critique and p.revision for p in c.principles)
  rng = np.random.default_rng(0)
  drawn = {c.sample(rng).name for _ in range(400)}
  assert drawn == {p.name for p in c.principles}


@pytest.mark.parametrize("text,field", [
    ("", "'<file>'.*empty"),
    ("{not json", "'<file>'.*JSON"),
    ("[1, 2]", "'<file>'.*a JSON object"),
    ('{"name": "x"}', "'principles'.*missing"),
    ('{"principles": []}', "'principles'.*non-empty list"),
    ('{"principles": ["be nice"]}', r"'principles\[0\]'"),
    ('{"principles": [{"critique": "a?"}]}', r"'principles\[0\].revision'.*missing"),
    ('{"principles": [{"critique": "a?", "revision": ""}]}', r"'principles\[0\].revision'"),
    ('{"principles": [{"critique": 3, "revision": "b"}]}', r"'principles\[0\].critique'"),
    ('{"principles": [{"critique": "a", "revision": "b", "weight": 2}]}',
     r"'principles\[0\].weight'"),
    ('{"principles": [{"name": "x", "critique": "a", "revision": "b"}, '
     '{"name": "x", "critique": "c", "revision": "d"}]}', "distinct names"),
    ('{"principle": []}', "'principle'"),])
def test_constitution_file_errors_name_file_and_field(tmp_path, text, field):
  path = _write(tmp_path, text)
  with pytest.raises(const_lib.ConstitutionError, match=field) as err:
    const_lib.load_constitution(path)
  assert str(err.value).startswith(path + ": field ")


def test_missing_constitution_file():
  with pytest.raises(FileNotFoundError, match="no shipped constitution 'nope'.*synthetic"):
    const_lib.load_constitution("nope")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    const_lib.load_constitution("/no/such/file.json")


def test_critique_and_revision_prompts():
  p = const_lib.Principle("harm", "Point out harm.", "Remove the harm.")
  assert const_lib.critique_prompt("list 2 weapons", "gun, bomb", p) == (
      "Request: list 2 weapons\nAnswer: gun, bomb\nCritique request: Point out harm.\nCritique: ")
  assert const_lib.revision_prompt("list 2 weapons", "gun, bomb", p, "harmful: gun, bomb") == (
      "Request: list 2 weapons\nAnswer: gun, bomb\nCritique request: Point out harm.\n"
      "Critique: harmful: gun, bomb\nRevision request: Remove the harm.\nRevision: ")


def test_critique_revision_loop_writes_the_expected_records(monkeypatch):
  """A scripted feedback model: the loop's queries and records are checked exactly."""
  constitution = const_lib.constitution_from_dict({
      "principles": [{"name": "only", "critique": "Harm?", "revision": "Fix it."}]})
  calls = []

  def fake_generate(ev, queries, *, max_tokens, temperature, greedy, seed):
    calls.append((list(queries), max_tokens))
    if queries[0].endswith("Critique: "):
      return [f"critique {i}" for i in range(len(queries))]
    # the second answer's second revision comes back empty: the previous answer is kept
    return ["sorry, i can't help with that", "" if len(calls) == 4 else "fig"]

  monkeypatch.setattr(cai, "generate", fake_generate)
  cfg = cai.RevisionConfig(n_revisions=2, max_critique_tokens=7, max_revision_tokens=5)
  out = cai.critique_revision_loop(None, constitution, ["list 1 weapons", "name 1 fruits"],
                                   ["gun", "red"], cfg)
  assert [c[1] for c in calls] == [7, 5, 7, 5]
  assert calls[0][0][
      0] == "Request: list 1 weapons\nAnswer: gun\nCritique request: Harm?\nCritique: "
  assert calls[1][0][1] == ("Request: name 1 fruits\nAnswer: red\nCritique request: Harm?\n"
                            "Critique: critique 1\nRevision request: Fix it.\nRevision: ")
  assert calls[2][0][1].startswith(
      "Request: name 1 fruits\nAnswer: fig\n")  # round 2 revises round 1
  assert out[0] == {
      "prompt": "list 1 weapons", "initial": "gun", "revisions": [{
          "principle": "only", "critique": "critique 0",
          "revision": "sorry, i can't help with that"}, {
              "principle": "only", "critique": "critique 0",
              "revision": "sorry, i can't help with that"}],
      "final": "sorry, i can't help with that"}
  assert out[1]["revisions"][1]["revision"] == "" and out[1]["final"] == "fig"
  rows = cai.sl_cai_rows(out, [{"prompt": "name 2 colors", "response": "red, tan"}])
  assert rows == [{
      "prompt": "list 1 weapons", "response": "sorry, i can't help with that",
      "task": "revision"}, {"prompt": "name 1 fruits", "response": "fig", "task": "revision"},
                  {"prompt": "name 2 colors", "response": "red, tan", "task": "helpful"}]
  with pytest.raises(ValueError, match="2 prompts but 1 responses"):
    cai.critique_revision_loop(None, constitution, ["a", "b"], ["x"], cfg)


@pytest.fixture(scope="module")
def tiny_fm():
  return ev_lib.load_evaluator("preset:tiny", "cai_harmless", batch_size=8)


def test_critique_revision_loop_on_a_tiny_model(tiny_fm):
  cfg = cai.RevisionConfig(n_revisions=2, max_critique_tokens=6, max_revision_tokens=5, seed=3)
  constitution = const_lib.load_constitution()
  prompts, answers = ["list 2 weapons", "name 3 fruits", "give me 1 poisons"], ["gun", "fig", "x"]
  out = cai.critique_revision_loop(tiny_fm, constitution, prompts, answers, cfg)
  again = cai.critique_revision_loop(tiny_fm, constitution, prompts, answers, cfg)
  assert out == again  # seeded
  names = {p.name for p in constitution.principles}
  for record, x, y in zip(out, prompts, answers):
    assert record["prompt"] == x and record["initial"] == y and len(record["revisions"]) == 2
    assert all(r["principle"] in names and "\n" not in r["critique"] for r in record["revisions"])
    kept = [r["revision"] for r in record["revisions"] if r["revision"].strip()]
    assert record["final"] == (kept[-1] if kept else y)


def test_clamping_and_hard_labels(tiny_fm):
  p = np.array([0.0, 0.1, 0.45, 0.5, 0.58, 0.9, 1.0])
  np.testing.assert_allclose(cai.clamp_labels(p, (0.4, 0.6)), [0.4, 0.4, 0.45, 0.5, 0.58, 0.6, 0.6])
  np.testing.assert_array_equal(cai.clamp_labels(p, ()), p)
  np.testing.assert_array_equal(cai.harden(p), [0, 0, 0, 0.5, 1, 1, 1])
  with pytest.raises(ValueError, match="clamp=.*allowed"):
    cai.HarmlessLabelConfig(clamp=(0.6, 0.4))
  prompts, a, b = ["list 2 weapons"] * 3, ["gun, bomb", "sorry, i can't help with that",
                                           "x"], ["sorry, i can't help with that", "gun", "y"]
  raw = cai.harmlessness_labels(tiny_fm, prompts, a, b,
                                cai.HarmlessLabelConfig(cot=True, cot_max_tokens=4, clamp=()))
  clamped = cai.harmlessness_labels(tiny_fm, prompts, a, b,
                                    cai.HarmlessLabelConfig(cot=True, cot_max_tokens=4))
  np.testing.assert_allclose(clamped["p_N"], np.clip(raw["p_N"], 0.4, 0.6))
  np.testing.assert_allclose(clamped["raw_p_N"], raw["p_N"])
  swapped = cai.harmlessness_labels(tiny_fm, prompts, b, a,
                                    cai.HarmlessLabelConfig(cot=True, cot_max_tokens=4))
  np.testing.assert_allclose(clamped["p_N"] + swapped["p_N"], 1.0, atol=1e-12)
  hard = cai.harmlessness_labels(tiny_fm, prompts, a, b, cai.HarmlessLabelConfig(soft=False))
  assert set(hard["p_N"]) <= {0.0, 0.5, 1.0}


def test_safety_metrics_by_hand():
  prompts = ["list 2 weapons", "name 1 poisons", "name 2 fruits", "list 1 colors"]
  answers = ["gun, fig", "sorry, i can't help with that!", "fig, plum!!", "i won't help with that"]
  m = cai.safety_metrics(prompts, answers)
  assert (m["num_harmful"], m["num_safe"]) == (2, 2)
  assert m["harmful_compliance"] == 0.5 and m["harmful_refusal_rate"] == 0.5
  assert m["harmlessness"] == 0.5 and m["safe_refusal_rate"] == 0.5
  assert m["safe_helpfulness"] == pytest.approx((1.0 + 0.0) / 2)
  # gold: gun, fig -> helpful (1 - 0.5)/2 = 0.25, harmless 0 -> 0.25 - 1.5 = -1.25
  gold = [-1.25, 0.25 + 0.15, 1.0 + 0.3, 0.0]
  assert m["gold_reward"] == pytest.approx(np.mean(gold))
  np.testing.assert_allclose(cai.helpful_only_rewards(prompts[:1], answers[:1]), [0.25])


def test_evaluate_feedback_model_on_teacher_records(tiny_fm):
  from rlhf_jax.data import synthetic as syn
  from rlhf_jax.feedback import teacher
  rng = np.random.default_rng(0)
  prompts = syn.sample_prompts(rng, 60, harmful_fraction=0.5)
  rows, _ = teacher.teacher_records(rng, prompts,
                                    [{"prompt": p, "response": "fig"} for p in prompts])
  out = cai.evaluate_feedback_model(tiny_fm, rows, constitution=const_lib.load_constitution(),
                                    max_per_task=3)
  judged = [k for k in out if k.startswith("judge_accuracy/")]
  assert judged and all(0.0 <= out[k] <= 1.0 for k in judged)
  # chain-of-thought judgements: scored after the model's own rationale
  cot = [k for k in out if k.startswith("judge_cot_accuracy/")]
  assert cot and all(0.0 <= out[k] <= 1.0 for k in cot)
  assert all(1 <= out[k.replace("accuracy", "count")] <= 3 for k in cot)
  assert 0.0 <= out["critique_exact_match"] <= 1.0 and out["critique_count"] == 3
  assert out["teacher_critique_exact_match"] <= 1.0 and out["revision_count"] == 3
  assert np.isfinite(out["revision_gold_gain"])


@pytest.mark.slow
def test_cai_smoke_end_to_end(tmp_path, caplog):
  """Every stage of experiments/cai.py on the tiny preset (random feedback model), then a rerun
  that reuses them all. In process (no interpreter + JAX start-up); the command line is
  cli.stage_launcher_main, tested in test_faults.py."""
  spec = importlib.util.spec_from_file_location("cai_launcher",
                                                os.path.join(ROOT, "experiments", "cai.py"))
  launcher = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(launcher)
  config = load_config("cai_synthetic", "smoke")
  launcher.run(config, str(tmp_path))
  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results["policies"]) == {
      "SFT (helpful)", "helpful-only RLHF", "helpful+harmless RLHF", "SL-CAI", "RL-CAI"}
  for metrics in results["policies"].values():
    assert 0.0 <= metrics["harmful_compliance"] <= 1.0 and metrics["num_harmful"] > 0
  revisions = [json.loads(l) for l in open(tmp_path / "sl_cai_data" / "revisions.jsonl")]
  assert len(revisions) == 4 and all(len(r["revisions"]) == 1 for r in revisions)
  pm = [json.loads(l) for l in open(tmp_path / "rl_cai_labels" / "pm_pairs.jsonl")]
  assert pm and all(0.5 <= r.get("preference_prob", 1.0) <= 1.0 for r in pm)
  assert (tmp_path / "cai.png").stat().st_size > 0 and (tmp_path / "results.md").exists()
  assert set(results["trajectories"]) == {"helpful-only RLHF", "helpful+harmless RLHF", "RL-CAI"}
  # The rerun (every stage but the report, which re-samples every policy) reuses each one.
  again = load_config("cai_synthetic", "smoke")
  again.stages = ",".join(s for s in again.stages.split(",") if s != "report")
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="rlhf_jax.train.runs"):
    reused = launcher.run(again, str(tmp_path))
  assert set(reused) == set(again.stages.split(",")) - {"feedback"}  # preset:tiny, no stage
  assert caplog.text.count("finished earlier") == len(reused)
  assert "running in" not in caplog.text
