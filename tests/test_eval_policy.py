"""rlhf_jax.eval.policy on a tiny random model: exact identities and the KL estimator."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from rlhf_jax import models
from rlhf_jax.data import synthetic
from rlhf_jax.data import tokenizers as tok_lib
from rlhf_jax.eval import policy as policy_eval

PROMPTS = ["name 2 fruits", "please list 3 weapons", "tell me 1 colors", "give me 4 tools"]


@pytest.fixture(scope="module")
def setup():
  tokenizer = tok_lib.ByteTokenizer()
  model = models.Transformer(models.get_model_config("tiny"))
  dummy = jnp.ones((1, 8), jnp.int32)
  ref_params = meta.unbox(model.init(jax.random.PRNGKey(0), dummy, dummy))["params"]
  noise = jax.tree.map(lambda x: 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype),
                       ref_params)
  other_params = jax.tree.map(jnp.add, ref_params, noise)
  prompts = policy_eval.make_eval_prompts(tokenizer, PROMPTS, max_prompt_len=32)
  return tokenizer, model, ref_params, other_params, prompts


def _evaluator(setup, **kwargs):
  tokenizer, model, ref_params, _, prompts = setup
  config = policy_eval.PolicyEvalConfig(num_prompts=4, max_new_tokens=8, print_samples=0)
  return policy_eval.PolicyEvaluator(model, ref_params, tokenizer, prompts, config, **kwargs)


def test_policy_equal_to_reference_gives_zero_kl_and_half_win_rate(setup, tmp_path):
  calls = []

  def fake_rm(prompt_tokens, prompt_mask, response_tokens, response_mask):
    calls.append(np.asarray(response_tokens)[np.asarray(response_mask) > 0].tolist())
    assert prompt_tokens.shape[0] == prompt_mask.shape[0] == response_tokens.shape[0]
    return np.arange(len(response_tokens), dtype=np.float32)

  path = str(tmp_path / "samples.jsonl")
  evaluator = _evaluator(setup, reward_fn=fake_rm, sample_path=path)
  metrics = evaluator(setup[2], step=3)
  assert metrics["kl_to_sft"] == 0.0
  assert metrics["win_rate_vs_sft"] == 0.5
  assert metrics["gold_reward"] == metrics["sft_gold_reward"]
  assert metrics["gold_reward_gain"] == 0.0
  assert metrics["rm_reward"] == pytest.approx(1.5) and metrics["sft_rm_reward"] == pytest.approx(
      1.5)
  assert 1.0 <= metrics["response_length"] <= 8.0
  rows = [json.loads(line) for line in open(path)]
  assert len(rows) == 4 and rows[0]["step"] == 3 and {"gold", "rm", "kl"} <= set(rows[0])
  # the gold reward is the synthetic task's, on the decoded responses
  expected = synthetic.gold_rewards(PROMPTS, [r["response"] for r in rows])
  assert metrics["gold_reward"] == pytest.approx(float(np.mean(expected)), abs=1e-6)
  assert calls[0] == calls[1]  # reference and policy sampled the same response tokens


def test_kl_matches_sampler_logprobs_and_is_positive_on_average(setup):
  tokenizer, model, ref_params, other_params, prompts = setup
  evaluator = _evaluator(setup)
  out = evaluator.sample(other_params)
  kl_S = evaluator.kl_to_reference(other_params, out)
  # the policy's raw log-probs recomputed by a full forward match the sampler's cached ones
  tokens, mask, loss_mask = out.full_sequences()
  ref_logps = models.sequence_logprobs(model, ref_params, tokens, mask, loss_mask).sum(-1)
  sampler_kl = np.asarray(out.response_logps_BxR.sum(-1) - ref_logps)
  np.testing.assert_allclose(kl_S, sampler_kl, atol=2e-3)
  metrics = evaluator(other_params)
  assert metrics["kl_to_sft"] == pytest.approx(float(np.mean(kl_S)), rel=1e-5)
  assert 0.0 <= metrics["win_rate_vs_sft"] <= 1.0
  assert "rm_reward" not in metrics


def test_win_rate_and_best_of_n_kl():
  assert policy_eval.win_rate(np.array([1.0, 0.0, 2.0, 3.0]), np.array([0.0, 0.0, 3.0, 3.0])) == 0.5
  assert policy_eval.win_rate(np.array([1.0]), np.array([0.0])) == 1.0
  with pytest.raises(ValueError, match="shapes"):
    policy_eval.win_rate(np.zeros(2), np.zeros(3))
  assert policy_eval.best_of_n_kl(1) == 0.0
  assert policy_eval.best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
  with pytest.raises(ValueError, match="n=0"):
    policy_eval.best_of_n_kl(0)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="PolicyEvalConfig.num_prompts"):
    policy_eval.PolicyEvalConfig(num_prompts=0)
  with pytest.raises(ValueError, match="temperature"):
    policy_eval.PolicyEvalConfig(temperature=0.0)
  with pytest.raises(ValueError, match="no prompts"):
    policy_eval.make_eval_prompts(tok_lib.ByteTokenizer(), [], max_prompt_len=32)
