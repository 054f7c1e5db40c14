"""rlhf_jax.scoring: one sequence rule (a response is scored as given), one attribute reduction, one
sample-and-score loop, and every caller (PPO's jitted scoring, the evaluator) agreeing with it.
Tiny preset, random heads, one 12 + 40 token layout."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, scoring
from rlhf_jax.algorithms.online import rollout
from rlhf_jax.data import batching
from rlhf_jax.data import tokenizers as tok_lib
from rlhf_jax.eval import policy as policy_eval

TOK = tok_lib.ByteTokenizer()
CFG = models.get_model_config("tiny")
P, R = 12, 40
PROMPTS = ["name 2 fruits", "list 3 colors", "tell me 1 tool"]
RESPONSES = ["fig, kiwi!!", "red and a very long tail of words", "saw"]


def _handle(num_outputs=1, seed=0, attribute_weights=None, mean=None, std=None):
  model = models.RewardModel(CFG, num_outputs=num_outputs)
  dummy = jnp.ones((1, 8), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), dummy, dummy))["params"]
  names = ("reward",) if num_outputs == 1 else tuple(f"a{k}" for k in range(num_outputs))
  info = scoring.RewardModelInfo(model=dataclasses.asdict(CFG), output_names=names,
                                 tokenizer_spec="byte", tokenizer_fingerprint=TOK.fingerprint(),
                                 max_prompt_len=P, max_response_len=R, mean=mean or
                                 tuple(0.1 * k for k in range(num_outputs)), std=std or
                                 tuple(1.0 + k for k in range(num_outputs)), objective="test")
  return scoring.make_handle(info, params, attribute_weights=attribute_weights)


def _token_batch(responses, with_eos):
  """The sampler's layout: left-padded [BOS] prompt | right-padded response (EOS iff emitted)."""
  prompts = batching.encode_prompts(TOK, PROMPTS, max_prompt_len=P, buckets=(P,))
  r_tokens = np.zeros((len(responses), R), np.int32)
  r_mask = np.zeros((len(responses), R), np.int32)
  for i, (text, eos) in enumerate(zip(responses, with_eos)):
    ids = TOK.encode(text)[:R - 1 if eos else R] + ([TOK.eos_id] if eos else [])
    r_tokens[i, :len(ids)], r_mask[i, :len(ids)] = ids, 1
  return prompts["prompt_tokens"], prompts["prompt_mask"], r_tokens, r_mask


# -- bug 2: one rule, token path == text path ------------------------------------------------------


def test_a_response_without_eos_scores_the_same_on_the_token_and_the_text_path():
  handle = _handle()
  finished = [False, True, False]
  tokens = _token_batch(RESPONSES, finished)
  token_B = np.asarray(scoring.score(handle, *tokens))
  text_B = scoring.score_texts(handle, TOK, PROMPTS, RESPONSES, finished=finished)
  chex.assert_shape([token_B, text_B], (3,))
  chex.assert_trees_all_close(text_B, token_B, atol=1e-5)
  # Appending the EOS the policy never emitted scores another sequence (the old text-path rule).
  appended_B = scoring.score_texts(handle, TOK, PROMPTS, RESPONSES)
  assert not np.allclose(appended_B[[0, 2]], token_B[[0, 2]], atol=1e-3)
  chex.assert_trees_all_close(appended_B[1], token_B[1], atol=1e-5)  # finished: the same sequence


def test_an_unfinished_text_keeps_the_whole_budget_and_a_finished_one_makes_room_for_eos():
  long = "x" * (R + 5)
  fin, _ = scoring.encode_pairs(TOK, ["p"], [long], max_prompt_len=P, max_response_len=R)
  cut, _ = scoring.encode_pairs(TOK, ["p"], [long], max_prompt_len=P, max_response_len=R,
                                finished=[False])
  assert fin.shape[1] == cut.shape[1] == 2 + R  # BOS + "p" + R response positions
  assert fin[0, -1] == TOK.eos_id and cut[0, -1] != TOK.eos_id
  with pytest.raises(ValueError, match="finished flags"):
    scoring.encode_pairs(TOK, ["p"], ["a"], max_prompt_len=P, max_response_len=R, finished=[])


def test_the_evaluator_scores_sampled_tokens_like_training_and_selection():
  handle = _handle()
  policy = models.Transformer(CFG)
  dummy = jnp.ones((1, 8), jnp.int32)
  params = nn.meta.unbox(policy.init(jax.random.PRNGKey(3), dummy, dummy))["params"]
  prompts = policy_eval.make_eval_prompts(TOK, PROMPTS, max_prompt_len=P)
  config = policy_eval.PolicyEvalConfig(num_prompts=3, max_new_tokens=6, print_samples=0)
  evaluator = policy_eval.PolicyEvaluator(policy, params, TOK, prompts, config,
                                          reward_fn=scoring.sample_reward_fn(handle),
                                          gold_reward_fn=None)
  ref = evaluator.reference()
  out = evaluator.sample(params)  # the same key: the same samples
  expect = scoring.score(handle, out.prompt_tokens, out.prompt_mask, out.response_tokens_BxR,
                         out.response_mask_BxR)
  chex.assert_trees_all_close(ref.rm, np.asarray(expect), atol=1e-6)
  assert evaluator(params)["rm_reward"] == pytest.approx(float(np.mean(expect)), abs=1e-5)


# -- bug 5: one explicit reduction of K outputs ----------------------------------------------------


def test_a_multi_output_model_needs_explicit_weights_and_applies_them_everywhere():
  bare = _handle(num_outputs=2, seed=1)
  tokens = _token_batch(RESPONSES, [True, False, True])
  with pytest.raises(ValueError, match=r"K=2 outputs \('a0', 'a1'\).*attribute_weights"):
    scoring.score(bare, *tokens)
  with pytest.raises(ValueError, match="attribute_weights"):
    scoring.score_texts(bare, TOK, PROMPTS, RESPONSES)
  per_BxK = np.asarray(scoring.score(bare, *tokens, per_attribute=True))
  chex.assert_shape(per_BxK, (3, 2))
  handle = _handle(num_outputs=2, seed=1, attribute_weights="a0:1,a1:2")
  assert handle.attribute_weights == (1.0, 2.0)
  combined_B = np.asarray(scoring.score(handle, *tokens))
  chex.assert_trees_all_close(combined_B, per_BxK[:, 0] + 2 * per_BxK[:, 1], atol=1e-5)
  # a mapping, a sequence and a per-call override mean the same weights
  chex.assert_trees_all_close(
      np.asarray(scoring.score(bare, *tokens, attribute_weights={"a1": 2, "a0": 1})), combined_B,
      atol=1e-6)
  mean = _handle(num_outputs=2, seed=1, attribute_weights="mean")
  chex.assert_trees_all_close(np.asarray(scoring.score(mean, *tokens)), per_BxK.mean(1), atol=1e-5)
  # PPO's jitted scoring phase reduces with the same weights (it used to take head 0 silently)
  score_fn = rollout.make_score_fn(handle.model, eos_id=TOK.eos_id, missing_eos_penalty=0.0,
                                   attribute_weights=handle.attribute_weights)
  full = np.concatenate([tokens[0], tokens[2]], 1), np.concatenate([tokens[1], tokens[3]], 1)
  _, rm_B = score_fn(handle.params, jnp.asarray(handle.info.mean), jnp.asarray(handle.info.std),
                     full[0], full[1], tokens[3])
  chex.assert_trees_all_close(np.asarray(rm_B), combined_B, atol=1e-5)
  with pytest.raises(ValueError, match="K=2 outputs"):
    rollout.make_score_fn(bare.model, eos_id=TOK.eos_id, missing_eos_penalty=0.0)


@pytest.mark.parametrize("spec, message", [
    ("a0:1,a0:2", "each output name once"),
    ("a0=1", "invalid at"),
    ("a0:x", "invalid at"),
    ("a0:1", "exactly the reward model's outputs"),
    ((1.0,), "2 entries|1 entries"),])
def test_bad_attribute_weights_name_what_is_allowed(spec, message):
  with pytest.raises(ValueError, match=message):
    _handle(num_outputs=2, attribute_weights=spec)


def test_single_output_model_needs_no_weights():
  handle = _handle()
  assert handle.attribute_weights == (1.0,)
  tokens = _token_batch(RESPONSES, [True] * 3)
  per = np.asarray(scoring.score(handle, *tokens, per_attribute=True))
  chex.assert_shape(per, (3, 1))
  chex.assert_trees_all_close(np.asarray(scoring.score(handle, *tokens)), per[:, 0], atol=1e-6)


# -- the one sample-and-score loop -----------------------------------------------------------------


def test_sample_candidates_rows_are_prompt_major_and_scored_as_sampled():
  handle = _handle(num_outputs=2, seed=1, attribute_weights="a0:0.5,a1:1")
  policy = models.Transformer(CFG)
  dummy = jnp.ones((1, 8), jnp.int32)
  params = nn.meta.unbox(policy.init(jax.random.PRNGKey(4), dummy, dummy))["params"]
  prompts = PROMPTS + ["give me 2 cats"]
  cands = scoring.sample_candidates(policy, params, TOK, prompts, reward=handle, num_samples=2,
                                    max_prompt_len=P, max_new_tokens=6, temperature=1.0,
                                    rng=jax.random.PRNGKey(0), chunk_prompts=3)  # 3 + 1 padded
  n = len(prompts) * 2
  chex.assert_shape([cands.rewards_N, cands.finished_N], (n,))
  chex.assert_shape([cands.response_tokens, cands.response_mask], (n, 6))
  chex.assert_shape(cands.grid(cands.rewards_N), (len(prompts), 2))
  assert len(cands.texts) == n
  # row i*K + j is prompt i: its (left-padded) prompt tokens decode to prompts[i]
  for row in range(n):
    ids = cands.prompt_tokens[row][cands.prompt_mask[row] > 0]
    assert TOK.decode(ids) == prompts[row // 2][-(P - 1):]  # cut from the left, BOS dropped
  expect = scoring.score(handle, cands.prompt_tokens, cands.prompt_mask, cands.response_tokens,
                         cands.response_mask)
  chex.assert_trees_all_close(cands.rewards_N, np.asarray(expect), atol=1e-5)
  eos = np.any((cands.response_tokens == TOK.eos_id) & (cands.response_mask > 0), 1)
  np.testing.assert_array_equal(cands.finished_N, eos)
  tokens, mask, loss_mask = cands.full_sequences()
  chex.assert_shape([tokens, mask, loss_mask], (n, P + 6))
  np.testing.assert_array_equal(loss_mask[:, :P], 0)


def test_sources_attribute_weights_are_checked_when_the_config_is_parsed():
  from rlhf_jax.algorithms import sections
  assert sections.Sources(attribute_weights="helpful:1,harmless:0.5").attribute_weights
  with pytest.raises(ValueError, match="Sources.attribute_weights='helpful=1'"):
    sections.Sources(attribute_weights="helpful=1")
