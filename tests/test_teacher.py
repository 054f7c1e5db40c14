"""The synthetic teacher (feedback.teacher): exact when noise-free, its noise rates as configured,
deterministic records in the formats the feedback model is queried with, and the generator's
other files untouched by it."""

import json
import os

import numpy as np
import pytest

from rlhf_jax.data import records
from rlhf_jax.data import synthetic as syn
from rlhf_jax.data import synthetic_files as sf
from rlhf_jax.feedback import constitution as const_lib
from rlhf_jax.feedback import teacher
from rlhf_jax.feedback import templates as tmpl


def _answers(rng, n):
  out = []
  for _ in range(n):
    prompt = syn.sample_prompt(rng, harmful_fraction=0.4)
    out.append((prompt, syn.reference_response(rng, prompt)))
  out += [("list 2 weapons", "gun, gun!!!"), ("name 3 fruits", "xyz, ,, !"),
          ("tell me 1 colors", "i won't help with that."), ("list 4 poisons", "")]
  return out


def test_exact_teacher_equals_the_gold_attributes():
  rng = np.random.default_rng(0)
  for prompt, response in _answers(rng, 600):
    request = syn.parse_prompt(prompt)
    view = teacher.read(None, request, response)
    gold = syn.gold_attributes(request, response)
    assert (view.helpful, view.harmless, view.enthusiasm) == (gold.helpful, gold.harmless,
                                                              gold.enthusiasm), (prompt, response)
    assert view.overall == pytest.approx(gold.gold, abs=1e-12)


def test_ignorance_and_hand_written_critiques():
  cfg = teacher.TeacherConfig()  # does not know mace / curare are harmful
  request = syn.parse_prompt("list 2 weapons")
  view = teacher.read(None, request, "mace, gun", cfg)
  assert view.harmful == ("gun",) and view.harmless == 0.0
  assert teacher.read(None, request, "mace", cfg).harmless == 1.0
  assert teacher.read(None, request, "mace").harmless == 0.0  # the exact teacher knows
  assert teacher.critique_text(teacher.read(None, request, "mace", cfg)) == "2 asked, 1 listed"
  fruits = syn.parse_prompt("name 3 fruits")
  assert teacher.critique_text(teacher.read(
      None, fruits, "fig, red, ricin!!!")) == ("harmful: ricin; off-topic: red; too many '!'")
  assert teacher.critique_text(teacher.read(None, fruits, "fig, plum, kiwi!")) == "no problems"
  assert teacher.critique_text(teacher.read(None, fruits,
                                            "i won't help with that")) == "refuses a safe request"


def test_revisions_repair_what_the_teacher_sees():
  rng = np.random.default_rng(1)
  weapons = syn.parse_prompt("list 2 weapons")
  view = teacher.read(None, weapons, "gun, sword!")
  assert teacher.revise(rng, weapons, "gun, sword!", view) == syn.REFUSALS[0] + "!"
  fruits = syn.parse_prompt("name 3 fruits")
  fixed = teacher.revise(rng, fruits, "fig, red, ricin!!!",
                         teacher.read(None, fruits, "fig, red, ricin!!!"))
  attrs = syn.gold_attributes(fruits, fixed)
  assert fixed.startswith("fig, ") and fixed.endswith("!!") and attrs.helpful == 1.0
  assert attrs.harmless == 1.0
  same = "fig, plum, kiwi!"
  assert teacher.revise(rng, fruits, same, teacher.read(None, fruits, same)) == same


def _stats(config, n=1500, seed=0):
  rng = np.random.default_rng(seed)
  prompts = syn.sample_prompts(rng, n)
  sft_rows = [{"prompt": p, "response": syn.reference_response(rng, p)} for p in prompts]
  return teacher.teacher_records(np.random.default_rng(seed + 1), prompts, sft_rows, config)


def test_noise_rates_are_as_configured():
  rng = np.random.default_rng(2)
  cfg = teacher.TeacherConfig(miscount_prob=0.3, flip_prob=0.0, rating_noise=0.0,
                              unknown_harmful=())
  answers = [(syn.parse_prompt(p), r) for p, r in _answers(rng, 4000)]
  answers = [(q, r) for q, r in answers if r.strip() and not teacher.read(None, q, r).refusal]
  miscounted = [
      teacher.read(rng, q, r, cfg).listed != teacher.read(None, q, r).listed for q, r in answers]
  rate = float(np.mean(miscounted))
  assert abs(rate - 0.3) < 3 * np.sqrt(0.3 * 0.7 / len(answers)), rate

  # label flips alone: the teacher's judgement accuracy vs gold is 1 - flip_prob
  _, stats = _stats(
      teacher.TeacherConfig(unknown_harmful=(), miscount_prob=0.0, flip_prob=0.2, rating_noise=0.0),
      n=3000)
  counts = stats["records_per_task"]
  judged = sum(v for k, v in counts.items() if k.startswith("judge"))
  accuracy = np.mean([v for v in stats["judgement_accuracy_vs_gold"].values()])
  assert abs(accuracy - 0.8) < 0.05 and judged > 1000
  _, exact = _stats(teacher.EXACT)
  assert set(exact["judgement_accuracy_vs_gold"].values()) == {1.0}
  assert exact["critique_exact_match"] == 1.0 and exact["rating_mean_abs_error"] == 0.0
  _, noisy = _stats(teacher.TeacherConfig(rating_noise=1.0))
  assert 0.5 < noisy["rating_mean_abs_error"] < 1.2
  assert 0.75 < noisy["critique_exact_match"] < 0.98
  assert noisy["revision_mean_gold_gain"] > 0.3


def test_records_are_deterministic_and_in_the_query_formats():
  rows_a, stats_a = _stats(teacher.TeacherConfig(), n=300, seed=5)
  rows_b, _ = _stats(teacher.TeacherConfig(), n=300, seed=5)
  rows_c, _ = _stats(teacher.TeacherConfig(), n=300, seed=6)
  assert rows_a == rows_b and rows_a != rows_c
  assert set(stats_a["records_per_task"]) >= {
      "assistant", "critique", "revision", "rating", "judge:harmless", "judge:overall"}
  by_task = {}
  for row in rows_a:
    by_task.setdefault(row["task"].split(":")[0], row)
  pair_t = teacher.criterion_template("harmless")
  assert pair_t.name == "cai_harmless" and pair_t.preamble.startswith("Which response is more harm")
  judge = next(r for r in rows_a if r["task"] == "judge:overall")
  assert judge["prompt"].startswith(tmpl.load_template("synthetic_pair").preamble)
  assert judge["prompt"].endswith("Better=") and judge["response"] in ("A", "B")
  cot = next(r for r in rows_a if r["task"].startswith("judge_cot:"))
  assert cot["response"].startswith("A: ") and cot["response"][-1] in "AB"
  rating = by_task["rating"]
  assert rating["prompt"].endswith("Rating=") and rating["response"] in list("0123456789")
  crit, rev = by_task["critique"], by_task["revision"]
  assert crit["prompt"].startswith("Request: ") and crit["prompt"].endswith("Critique: ")
  assert rev["prompt"].endswith("Revision: ") and "\nRevision request: " in rev["prompt"]
  principles = {p.critique for p in const_lib.load_constitution().principles}
  assert crit["prompt"].split("Critique request: ")[1].split("\n")[0] in principles


def test_teacher_config_errors():
  with pytest.raises(ValueError, match="unknown_harmful.*not harmful words"):
    teacher.TeacherConfig(unknown_harmful=("fig",))
  with pytest.raises(ValueError, match="miscount_prob"):
    teacher.TeacherConfig(miscount_prob=1.5)
  with pytest.raises(ValueError, match="weights.*allowed: tasks"):
    teacher.TeacherConfig(weights=(("essay", 0.5),))
  with pytest.raises(ValueError, match="criteria"):
    teacher.TeacherConfig(criteria=("style",))


def test_generator_writes_the_feedback_mixture_without_touching_the_other_files(tmp_path):
  small = dict(seed=3, num_prompts=120, num_test_prompts=30)
  sf.write_task(str(tmp_path / "a"), sf.SyntheticConfig(**small))
  other = teacher.TeacherConfig(miscount_prob=0.5, flip_prob=0.3)
  meta = sf.write_task(str(tmp_path / "b"), sf.SyntheticConfig(**small, teacher=other))
  names = sorted(os.listdir(tmp_path / "a"))
  assert "feedback_sft.jsonl" in names and "feedback_sft_test.jsonl" in names
  for name in names:
    if name.endswith(".jsonl"):
      same = (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
      assert same == (not name.startswith("feedback_sft")), name
  rows = records.read_records(str(tmp_path / "b" / "feedback_sft.jsonl"), "sft")
  assert len(rows) == meta["files"]["feedback_sft.jsonl"] > 120
  assert json.loads(
      (tmp_path / "b" / "metadata.json").read_text())["config"]["teacher"]["miscount_prob"] == 0.5
  assert meta["splits"]["train"]["teacher"]["records"] == meta["files"]["feedback_sft.jsonl"]
