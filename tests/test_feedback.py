"""Annotators (``rlhf_jax.feedback``): label_fn(prompts, a, b) -> P(a ≻ b); the launchers' feedback
model config (``feedback.feedback_model``)."""

import json
import os

import ml_collections
import numpy as np
import pytest

from rlhf_jax import feedback
from rlhf_jax.algorithms import sft
from rlhf_jax.algorithms.online import config as ppo_config
from rlhf_jax.data import synthetic
from rlhf_jax.feedback import feedback_model as fm

from test_ppo import tiny_models  # noqa: E402  (tests/ is on sys.path under pytest)

PROMPTS = ["name 2 fruits", "list 4 tools", "tell me 1 animals", "please list 3 poisons"]
A = ["apple, fig!!", "saw, drill, hammer, axe", "cat", "gun"]
B = ["gun", "saw", "cat!", "arsenic, cyanide, lead"]


def test_synthetic_annotator_is_bradley_terry_over_the_gold_reward():
  label_fn = feedback.synthetic_annotator(0.25)
  p_N = label_fn(PROMPTS, A, B)
  expect = synthetic.preference_prob(synthetic.gold_rewards(PROMPTS, A),
                                     synthetic.gold_rewards(PROMPTS, B), 0.25)
  np.testing.assert_array_equal(p_N, expect)
  assert p_N.shape == (4,) and np.all((p_N >= 0) & (p_N <= 1))
  np.testing.assert_allclose(p_N + label_fn(PROMPTS, B, A), 1.0, rtol=0, atol=1e-15)


def test_reward_model_annotator_is_antisymmetric_sigmoid_of_normalised_scores():
  m = tiny_models(ppo_config.PPOConfig(rollout_batch_size=4, max_new_tokens=8, num_minibatches=2))
  label_fn = feedback.reward_model_annotator(m.reward, m.tokenizer, temperature=0.5)
  p_N = label_fn(PROMPTS, A, B)
  from rlhf_jax import scoring  # pylint: disable=import-outside-toplevel
  r_a = scoring.score_texts(m.reward, m.tokenizer, PROMPTS, A)
  r_b = scoring.score_texts(m.reward, m.tokenizer, PROMPTS, B)
  np.testing.assert_allclose(p_N, 1.0 / (1.0 + np.exp(-(r_a - r_b) / 0.5)), rtol=1e-6)
  np.testing.assert_allclose(p_N + label_fn(PROMPTS, B, A), 1.0, rtol=0, atol=1e-15)
  np.testing.assert_allclose(label_fn(PROMPTS, A, A), 0.5)


def test_labels_are_drawn_from_the_probability_and_bad_inputs_are_refused():
  rng = np.random.default_rng(0)
  assert feedback.sample_labels(rng, np.array([1.0, 0.0, 1.0])).tolist() == [True, False, True]
  draws = feedback.sample_labels(rng, np.full(20000, 0.3))
  assert abs(draws.mean() - 0.3) < 0.02
  with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
    feedback.sample_labels(rng, np.array([1.5]))
  with pytest.raises(ValueError, match="2 prompts, 1 responses_a"):
    feedback.synthetic_annotator(1.0)(PROMPTS[:2], A[:1], B[:2])
  with pytest.raises(ValueError, match="AnnotatorConfig.kind='gpt' is invalid"):
    feedback.AnnotatorConfig(kind="gpt")
  with pytest.raises(ValueError,
                     match="reward_model_workdir='' is invalid with kind='reward_model'"):
    feedback.AnnotatorConfig(kind="reward_model")
  assert feedback.make_label_fn(feedback.AnnotatorConfig(temperature=0.5))(
      PROMPTS, A, B).tolist() == feedback.synthetic_annotator(0.5)(PROMPTS, A, B).tolist()


def test_feedback_model_config_init_choices(tmp_path):
  # rlhf_jax.feedback.feedback_model: the launchers' feedback SFT config (the export path itself
  # runs in test_rlaif's smoke run, whose d-RLAIF stage needs the byte tokenizer back)
  base = sft.default_config()
  scratch = fm.feedback_config(base, "task", init="scratch", sft_dir="none", init_dir="x")
  assert scratch.data.train_jsonl == "task/feedback_sft.jsonl" and not scratch.sources.pretrained
  assert isinstance(scratch, ml_collections.ConfigDict) and base.data.train_jsonl == ""
  with pytest.raises(ValueError, match=r"config.feedback_init='warm' is invalid; allowed: sft"):
    fm.feedback_config(base, "task", init="warm", sft_dir="none", init_dir="x")
  with pytest.raises(FileNotFoundError, match="is not a finished SFT run"):
    fm.feedback_config(base, "task", init="sft", sft_dir=str(tmp_path), init_dir="x")
  # a remote workdir: the export (a Hugging Face folder of local files) is refused, never written
  # into a local folder named "gs:"
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(ValueError, match=r"feedback_init='sft' on a remote workdir \(gs://b/r/fi\)"):
    fm.feedback_config(base, "task", init="sft", sft_dir=str(tmp_path), init_dir="gs://b/r/fi")
  from rlhf_jax.models.hf import export  # pylint: disable=import-outside-toplevel
  with pytest.raises(export.ExportError, match="a Hugging Face folder is written as local files"):
    export.export_run(str(tmp_path), "gs://b/r/fi")
  assert not os.path.exists("gs:") and not (tmp_path / "gs:").exists()
  (tmp_path / "config.json").unlink()
  # exported_tokenizer: '' unless the run's pretrained folder is an export of a byte-tokenizer run
  assert fm.exported_tokenizer(str(tmp_path)) == ""
  export = tmp_path / "export"
  export.mkdir()
  (tmp_path / "config.json").write_text(json.dumps({"sources": {"pretrained": f"hf:{export}"}}))
  assert fm.exported_tokenizer(str(tmp_path)) == ""
  (export / fm.EXPORT_INFO).write_text(json.dumps({"tokenizer": "byte"}))
  assert fm.exported_tokenizer(str(tmp_path)) == "byte"
  (export / fm.EXPORT_INFO).write_text(json.dumps({"tokenizer": "hf:/some/tok"}))
  assert fm.exported_tokenizer(str(tmp_path)) == ""


def test_teacher_writes_every_judgement_in_both_orders():
  # swap_pairs: each judgement twice, positions exchanged and the answer flipped, so the answers
  # are exactly balanced and a constant answer scores log 2 per judgement
  from rlhf_jax.feedback import teacher  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  prompts = synthetic.sample_prompts(rng, 80)
  sft_rows = [{"prompt": p, "response": synthetic.reference_response(rng, p)} for p in prompts]
  rows, stats = teacher.teacher_records(np.random.default_rng(1), prompts, sft_rows)
  judged = [r for r in rows if r["task"].startswith("judge")]
  assert len(judged) >= 40 and len(judged) % 2 == 0
  answers = [r["response"][-1] for r in judged]
  assert answers.count("A") == answers.count("B") == len(judged) // 2
  for first, second in zip(judged[::2], judged[1::2]):
    assert first["task"] == second["task"] and first["prompt"] != second["prompt"]
    assert {first["response"][-1], second["response"][-1]} == {"A", "B"}
    if first["gold_label"] is not None:
      assert {first["gold_label"], second["gold_label"]} == {"A", "B"}
    # the swapped record's query is the original with the two responses exchanged
    for a_tag, b_tag in (("\nA: ", "\nB: "), ("\n(A) ", "\n(B) ")):
      if a_tag in first["prompt"]:
        head, rest = first["prompt"].split(a_tag)
        resp_a, tail = rest.split(b_tag)
        resp_b, end = tail.split("\n", 1)
        assert second["prompt"] == f"{head}{a_tag}{resp_b}{b_tag}{resp_a}\n{end}"
    if first["task"].startswith("judge_cot:"):  # the rationale's two critiques swap as well
      crit_a, crit_b = first["response"].split("\n")[0][3:-1].split(". B: ")
      assert second["response"].startswith(f"A: {crit_b}. B: {crit_a}.")
  # the teacher's accuracy counts each judgement once; without swaps, half as many records
  one, _ = teacher.teacher_records(np.random.default_rng(1), prompts, sft_rows,
                                   teacher.TeacherConfig(swap_pairs=False))
  assert [r for r in one if r["task"].startswith("judge")] == judged[::2]
  assert [r for r in one if not r["task"].startswith("judge")
         ] == [r for r in rows if not r["task"].startswith("judge")]
  assert stats["records"] == len(rows)


def test_feedback_task_subset(tmp_path):
  task = tmp_path / "task"
  task.mkdir()
  lines = [{"prompt": "p", "response": "r", "task": t}
           for t in ("assistant", "judge:overall", "rating", "critique", "judge_cot:count")]
  for name in ("feedback_sft.jsonl", "feedback_sft_test.jsonl"):
    (task / name).write_text("".join(json.dumps(x) + "\n" for x in lines))
  base = sft.default_config()
  cfg = fm.feedback_config(base, str(task), init="scratch", sft_dir="none", init_dir="x",
                           tasks="judge, rating", data_dir=str(tmp_path / "sub"))
  assert cfg.data.train_jsonl == str(tmp_path / "sub" / "feedback_sft.jsonl")
  assert cfg.data.eval_jsonl == str(tmp_path / "sub" / "feedback_sft_test.jsonl")
  kept = [json.loads(x)["task"] for x in open(cfg.data.train_jsonl)]
  assert kept == ["judge:overall", "rating"]  # judge_cot is a task of its own
  with pytest.raises(ValueError, match=r"\['judging'\] are not teacher tasks"):
    fm.feedback_config(base, str(task), init="scratch", sft_dir="none", init_dir="x",
                       tasks="judging", data_dir=str(tmp_path / "sub"))
  with pytest.raises(ValueError, match="no records of the tasks revision"):
    fm.task_subset(str(task / "feedback_sft.jsonl"), str(tmp_path / "r.jsonl"), ("revision",))
  everything = fm.feedback_config(base, str(task), init="scratch", sft_dir="none", init_dir="x")
  assert everything.data.train_jsonl == str(task / "feedback_sft.jsonl")


def test_teacher_mixture_writes_the_labellers_own_data(tmp_path):
  # feedback_model.teacher_mixture: the task's teacher (flaws from metadata.json), only the
  # weighted tasks and criteria, `passes` passes over the training prompts, one over the test ones
  from rlhf_jax.data import synthetic_files  # pylint: disable=import-outside-toplevel
  task = tmp_path / "task"
  synthetic_files.write_task(str(task),
                             synthetic_files.SyntheticConfig(num_prompts=60, num_test_prompts=20))
  spec = ml_collections.ConfigDict({
      "passes": 2, "weights": "judge_cot:1.0,rating:0.5", "criteria": "overall", "seed": 3})
  counts = fm.teacher_mixture(str(task), str(tmp_path / "mix"), spec)
  train_rows = [json.loads(x) for x in open(tmp_path / "mix" / "feedback_sft.jsonl")]
  test_rows = [json.loads(x) for x in open(tmp_path / "mix" / "feedback_sft_test.jsonl")]
  assert counts == {"records_train": len(train_rows), "records_test": len(test_rows)}
  assert {r["task"] for r in train_rows} == {"judge_cot:overall", "rating"}
  cot = [r for r in train_rows if r["task"] == "judge_cot:overall"]
  # weight 1: every prompt of each pass gets a judgement (both orders) unless the teacher sees a tie
  assert 0.6 * 2 * 2 * 60 <= len(cot) <= 2 * 2 * 60 and len(cot) % 2 == 0
  assert all(r["response"].endswith(("\nBetter=A", "\nBetter=B")) for r in cot)
  assert 0.5 * 20 <= sum(r["task"] == "rating" for r in test_rows) <= 20
  # deterministic, and an unchanged file is not rewritten
  mtime = os.stat(tmp_path / "mix" / "feedback_sft.jsonl").st_mtime_ns
  assert fm.teacher_mixture(str(task), str(tmp_path / "mix"), spec) == counts
  assert os.stat(tmp_path / "mix" / "feedback_sft.jsonl").st_mtime_ns == mtime
  # the second pass draws fresh pairs: its records differ from the first pass's
  one = fm.teacher_mixture(str(task), str(tmp_path / "one"), dict(spec, passes=1))
  first = open(tmp_path / "one" / "feedback_sft.jsonl").read()
  assert open(tmp_path / "mix" / "feedback_sft.jsonl").read().startswith(first)
  assert 1.5 * one["records_train"] <= counts["records_train"] <= 2.5 * one["records_train"]
  # the launcher path: feedback_config points the SFT at the mixture
  base = sft.default_config()
  cfg = fm.feedback_config(base, str(task), init="scratch", sft_dir="none", init_dir="x",
                           data_dir=str(tmp_path / "mix"), teacher=spec)
  assert cfg.data.train_jsonl == str(tmp_path / "mix" / "feedback_sft.jsonl")
  with pytest.raises(ValueError, match="feedback_tasks and config.feedback_teacher both given"):
    fm.feedback_config(base, str(task), init="scratch", sft_dir="none", init_dir="x", tasks="judge",
                       data_dir=str(tmp_path / "mix"), teacher=spec)
  with pytest.raises(ValueError, match=r"'judge_cot=1' is not task:weight"):
    fm.teacher_mixture(str(task), str(tmp_path / "bad"), dict(spec, weights="judge_cot=1"))
  with pytest.raises(ValueError, match="passes=0; allowed: an int >= 1"):
    fm.teacher_mixture(str(task), str(tmp_path / "bad"), dict(spec, passes=0))
  with pytest.raises(ValueError, match="config.feedback_teacher: TeacherConfig.weights"):
    fm.teacher_mixture(str(task), str(tmp_path / "bad"), dict(spec, weights="judging:1"))
  with pytest.raises(ValueError,
                     match=r"config.feedback_teacher: TeacherConfig.criteria=\('all',\)"):
    fm.teacher_mixture(str(task), str(tmp_path / "bad"), dict(spec, criteria="all"))
  assert not (tmp_path / "bad").exists()  # a refused mixture writes nothing


def test_teacher_mixture_added_to_the_shipped_mixture(tmp_path):
  # base="shipped" (CAI): the task's shipped feedback records (or a tasks subset) first, then the
  # teacher's own records; feedback_tasks may then be given with a teacher
  from rlhf_jax.data import synthetic_files  # pylint: disable=import-outside-toplevel
  task = tmp_path / "task"
  synthetic_files.write_task(str(task),
                             synthetic_files.SyntheticConfig(num_prompts=60, num_test_prompts=20))
  spec = {"passes": 1, "weights": "judge_cot:1.0", "criteria": "harmless", "seed": 3}
  alone = fm.teacher_mixture(str(task), str(tmp_path / "alone"), spec)
  added = fm.teacher_mixture(str(task), str(tmp_path / "added"), dict(spec, base="shipped"))
  for split in ("", "_test"):
    shipped = (task / f"feedback_sft{split}.jsonl").read_text()
    own = (tmp_path / "alone" / f"feedback_sft{split}.jsonl").read_text()
    assert (tmp_path / "added" / f"feedback_sft{split}.jsonl").read_text() == shipped + own
    key = f"records{split or '_train'}"
    assert added[key] == alone[key] + len(shipped.splitlines())
  cot = [json.loads(x) for x in own.splitlines()]
  assert {r["task"] for r in cot} == {"judge_cot:harmless"}
  assert all(r["response"].endswith(("\nThe answer is: A", "\nThe answer is: B")) for r in cot)
  base = sft.default_config()
  cfg = fm.feedback_config(base, str(task), init="scratch", sft_dir="none", init_dir="x",
                           tasks="critique,revision", data_dir=str(tmp_path / "sub"),
                           teacher=dict(spec, base="shipped"))
  tasks = [json.loads(x)["task"] for x in open(cfg.data.train_jsonl)]
  n_shipped = sum(t in ("critique", "revision") for t in tasks)
  assert set(tasks[:n_shipped]) == {"critique", "revision"}
  assert set(tasks[n_shipped:]) == {"judge_cot:harmless"} and n_shipped < len(tasks)
  with pytest.raises(ValueError, match="config.feedback_teacher.base='both'; allowed: none"):
    fm.teacher_mixture(str(task), str(tmp_path / "bad"), dict(spec, base="both"))
