"""Annotators (``rlhf_jax.feedback``): label_fn(prompts, a, b) -> P(a ≻ b); the launchers' feedback
model config (``feedback.feedback_model``)."""

import json

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
