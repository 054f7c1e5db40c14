"""SFT and reward-model losses: hand values, NumPy references, gradients, jit, masks."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from rlhf_jax import losses
from test_losses_common import (
    SEEDS,
    SETTINGS,
    assert_close,
    check_grads_x64,
    check_jit_matches,
    check_mask_invariance,
    right_padded_mask,
)

B, T, K, A = 4, 7, 4, 3

_sft = {
    mode: jax.jit(lambda lp, m, mode=mode: losses.sft_loss(lp, m, aggregation=mode))
    for mode in losses.TOKEN_AGGREGATIONS}
_bt = jax.jit(losses.bradley_terry_loss, static_argnames=("center_coef",))
_all_pairs = jax.jit(losses.all_pairs_ranking_loss)
_multi = jax.jit(losses.multi_attribute_loss)


def _logsig(x):
  return -np.logaddexp(0.0, -x)


# ----------------------------------------------------------------------------------------------
# SFT


def test_sft_by_hand():
  logps = jnp.array([[-1.0, -2.0, -3.0], [-4.0, -100.0, -100.0]])
  mask = jnp.array([[1, 1, 1], [1, 0, 0]])
  out, m = losses.sft_loss(logps, mask)
  assert_close(out, [3.0, 2.0])  # token mean 10/4 = 2.5 = mean of (3, 2)
  assert_close(m["loss"], 2.5)
  assert_close(m["nll_per_token"], 2.5)
  assert_close(m["num_tokens"], 4.0)
  out, _ = losses.sft_loss(logps, mask, aggregation="seq_mean_token_mean")
  assert_close(out, [2.0, 4.0])


@SETTINGS
@given(seed=SEEDS)
def test_sft_matches_numpy(seed):
  rng = np.random.default_rng(seed)
  logps = -rng.exponential(2.0, (B, T))
  mask = right_padded_mask(rng, B, T)
  nll = -logps * mask
  want = {
      "token_mean": nll.sum(1) * B / mask.sum(),
      "seq_mean_token_mean": nll.sum(1) / mask.sum(1),
      "seq_mean_token_sum": nll.sum(1),
      "seq_mean_token_sum_norm": nll.sum(1) / T,}
  for mode, expected in want.items():
    got, m = _sft[mode](logps.astype(np.float32), mask)
    assert_close(got, expected)
    assert_close(m["nll_per_token"], nll.sum() / mask.sum())


def test_sft_grads_jit_masks():
  rng = np.random.default_rng(1)
  logps = -rng.exponential(2.0, (B, T))
  mask = right_padded_mask(rng, B, T)
  for mode in losses.TOKEN_AGGREGATIONS:
    check_grads_x64(lambda lp, mode=mode: jnp.sum(losses.sft_loss(lp, mask, aggregation=mode)[0]),
                    (logps,))
    check_jit_matches(losses.sft_loss, logps.astype(np.float32), mask, aggregation=mode)
    check_mask_invariance(losses.sft_loss, (logps.astype(np.float32), mask), mask, (0,),
                          aggregation=mode)


# ----------------------------------------------------------------------------------------------
# pairwise Bradley–Terry and its log-exp form


def test_bradley_terry_by_hand():
  out, m = losses.bradley_terry_loss(jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0]))
  assert_close(out, [math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0))])
  assert_close(m["accuracy"], 0.5)
  assert_close(m["reward_margin"], 0.0)
  # margin 1 turns the first pair's logit to 0; centering adds η (r_c + r_r)² = 0.1·9
  out, _ = losses.bradley_terry_loss(jnp.array([2.0]), jnp.array([1.0]), margin=jnp.array([1.0]),
                                     center_coef=0.1)
  assert_close(out, [math.log(2.0) + 0.9])


@SETTINGS
@given(seed=SEEDS)
def test_bradley_terry_matches_numpy_and_logexp_form(seed):
  rng = np.random.default_rng(seed)
  rc, rr, margin = rng.normal(0, 3, B), rng.normal(0, 3, B), rng.uniform(0, 2, B)
  f32 = lambda x: x.astype(np.float32)  # noqa: E731
  got, _ = _bt(f32(rc), f32(rr), margin=f32(margin), center_coef=0.01)
  assert_close(got, -_logsig(rc - rr - margin) + 0.01 * (rc + rr)**2)
  plain, _ = _bt(f32(rc), f32(rr))
  logexp, _ = losses.pairwise_logexp_loss(f32(rc), f32(rr))
  assert_close(logexp, np.log1p(np.exp(rr - rc)))
  assert_close(logexp, plain)


def test_pairwise_grads_and_jit():
  rng = np.random.default_rng(2)
  rc, rr, margin = rng.normal(size=B), rng.normal(size=B), rng.uniform(0, 1, B)
  check_grads_x64(
      lambda c, r: jnp.sum(
          losses.bradley_terry_loss(c, r, margin=jnp.asarray(margin), center_coef=0.1)[0]),
      (rc, rr))
  check_grads_x64(lambda c, r: jnp.sum(losses.pairwise_logexp_loss(c, r)[0]), (rc, rr))
  f32 = lambda x: x.astype(np.float32)  # noqa: E731
  check_jit_matches(losses.bradley_terry_loss, f32(rc), f32(rr), center_coef=0.1)
  check_jit_matches(losses.pairwise_logexp_loss, f32(rc), f32(rr))


# ----------------------------------------------------------------------------------------------
# InstructGPT all-pairs ranking loss


def all_pairs_reference(rewards, labels, mask):
  out = []
  for b in range(rewards.shape[0]):
    terms = [
        -_logsig(rewards[b, i] - rewards[b, j])
        for i, j in itertools.permutations(range(rewards.shape[1]), 2)
        if mask[b, i] and mask[b, j] and labels[b, i] > labels[b, j]]
    out.append(np.mean(terms) if terms else 0.0)
  return np.array(out)


def test_all_pairs_by_hand():
  # ranking 0 > 1 > 2, rewards (1, 0, 0): pairs (0,1), (0,2), (1,2) -> (2·log(1+e^-1) + log 2)/3
  out, m = losses.all_pairs_ranking_loss(jnp.array([[1.0, 0.0, 0.0]]), jnp.array([[3.0, 2.0, 1.0]]))
  assert_close(out, [(2 * math.log1p(math.exp(-1.0)) + math.log(2.0)) / 3])
  assert_close(m["num_pairs"], 3.0)  # C(3, 2)
  assert_close(m["pair_accuracy"], 2.0 / 3.0)


@SETTINGS
@given(seed=SEEDS)
def test_all_pairs_matches_numpy(seed):
  rng = np.random.default_rng(seed)
  rewards = rng.normal(0, 2, (B, K))
  labels = rng.integers(0, 3, (B, K)).astype(np.float64)  # ties happen and are skipped
  mask = right_padded_mask(rng, B, K, min_len=2)
  got, _ = _all_pairs(rewards.astype(np.float32), labels.astype(np.float32), candidate_mask=mask)
  assert_close(got, all_pairs_reference(rewards, labels, mask))


def test_all_pairs_grads_jit_masks():
  rng = np.random.default_rng(4)
  rewards, labels = rng.normal(size=(B, K)), rng.permutation(
      np.tile(np.arange(K, dtype=np.float64), (B, 1)).T).T
  mask = right_padded_mask(rng, B, K, min_len=2)
  check_grads_x64(
      lambda r: jnp.sum(
          losses.all_pairs_ranking_loss(r, jnp.asarray(labels), candidate_mask=mask)[0]),
      (rewards,))
  f32 = lambda x: x.astype(np.float32)  # noqa: E731
  check_jit_matches(losses.all_pairs_ranking_loss, f32(rewards), f32(labels), candidate_mask=mask)
  check_mask_invariance(lambda r, l: losses.all_pairs_ranking_loss(r, l, candidate_mask=mask),
                        (f32(rewards), f32(labels)), mask, (0, 1))


# ----------------------------------------------------------------------------------------------
# Likert and multi-attribute


def test_likert_and_attributes_by_hand():
  out, m = losses.likert_regression_loss(jnp.array([3.0, 1.0]), jnp.array([4.0, 1.0]))
  assert_close(out, [1.0, 0.0])
  assert_close(m["mae"], 0.5)
  pred = jnp.array([[1.0, 2.0, 3.0]])
  target = jnp.array([[0.0, 0.0, 3.0]])
  # weights (1, 3, 1), attribute 1 unrated: (1·1 + 1·0) / (1 + 1) = 0.5
  out, _ = losses.multi_attribute_loss(pred, target, weights=jnp.array([1.0, 3.0, 1.0]),
                                       attribute_mask=jnp.array([[1, 0, 1]]))
  assert_close(out, [0.5])
  assert_close(losses.weighted_attribute_reward(pred, jnp.array([0.5, 0.25, -1.0])),
               [0.5 + 0.5 - 3.0])


@SETTINGS
@given(seed=SEEDS)
def test_multi_attribute_matches_numpy(seed):
  rng = np.random.default_rng(seed)
  pred, target = rng.normal(size=(B, A)), rng.normal(size=(B, A))
  weights = rng.uniform(0.1, 2.0, A)
  mask = (rng.uniform(size=(B, A)) < 0.7).astype(np.float32)
  mask[:, 0] = 1.0
  f32 = lambda x: x.astype(np.float32)  # noqa: E731
  got, _ = _multi(f32(pred), f32(target), weights=f32(weights), attribute_mask=mask)
  wm = weights[None] * mask
  assert_close(got, (wm * (pred - target)**2).sum(1) / wm.sum(1))
  assert_close(losses.weighted_attribute_reward(f32(pred), f32(weights)), pred @ weights)
  got, _ = losses.likert_regression_loss(f32(pred[:, 0]), f32(target[:, 0]))
  assert_close(got, (pred[:, 0] - target[:, 0])**2)


def test_regression_grads_jit_masks():
  rng = np.random.default_rng(5)
  pred, target = rng.normal(size=(B, A)), rng.normal(size=(B, A))
  mask = np.array([[1, 0, 1], [1, 1, 1], [0, 1, 0], [1, 1, 0]], np.float32)
  w = jnp.array([1.0, 2.0, 0.5])
  check_grads_x64(
      lambda p: jnp.sum(
          losses.multi_attribute_loss(p, jnp.asarray(target), weights=w, attribute_mask=mask)[0]),
      (pred,))
  check_grads_x64(lambda p: jnp.sum(losses.likert_regression_loss(p, jnp.asarray(target[:, 0]))[0]),
                  (pred[:, 0],))
  f32 = lambda x: x.astype(np.float32)  # noqa: E731
  check_jit_matches(losses.multi_attribute_loss, f32(pred), f32(target), attribute_mask=mask)
  check_jit_matches(losses.likert_regression_loss, f32(pred[:, 0]), f32(target[:, 0]))
  check_mask_invariance(
      lambda p, t: losses.multi_attribute_loss(p, t, weights=w, attribute_mask=mask),
      (f32(pred), f32(target)), mask, (0, 1))


def test_shape_errors():
  with pytest.raises(ValueError, match="shapes must match"):
    losses.bradley_terry_loss(jnp.zeros(3), jnp.zeros(4))
  with pytest.raises(ValueError, match="weights must have shape"):
    losses.multi_attribute_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), weights=jnp.ones(2))


def test_logexp_by_hand_and_attribute_reward_grads_jit():
  out, _ = losses.pairwise_logexp_loss(jnp.array([1.0, 0.0]), jnp.array([1.0, math.log(3.0)]))
  assert_close(out, [math.log(2.0), math.log(4.0)])
  rng = np.random.default_rng(6)
  rewards, weights = rng.normal(size=(B, A)), jnp.array([0.5, -1.0, 2.0])
  check_grads_x64(lambda r: jnp.sum(losses.weighted_attribute_reward(r, weights)**2), (rewards,))
  check_jit_matches(losses.weighted_attribute_reward, rewards.astype(np.float32), weights)
