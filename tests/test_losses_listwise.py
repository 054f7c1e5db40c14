"""Plackett–Luce, PRO and RRHF: hand values, NumPy references (PRO's written as the authors'
loop), gradients, jit, masks and invariances."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given

from rlhf_jax import losses
from test_losses_common import (
    SEEDS,
    SETTINGS,
    assert_close,
    check_grads_x64,
    check_jit_matches,
    check_mask_invariance,
)

B, N = 4, 5

# Jitted once per shape for the many-example property tests (eager dispatch is the slow part).
_pl = jax.jit(losses.plackett_luce_loss)
_pro = jax.jit(losses.pro_loss)
_pro_plain = jax.jit(functools.partial(losses.pro_loss, reward_temperature=False))
_rrhf = jax.jit(losses.rrhf_loss)
_bt = jax.jit(losses.bradley_terry_loss)


def _random_lists(seed):
  rng = np.random.default_rng(seed)
  scores = rng.uniform(-3.0, 0.0, (B, N))
  rewards = rng.normal(0.0, 2.0, (B, N))
  counts = rng.integers(2, N + 1, B)
  mask = np.zeros((B, N), np.float32)
  for b, c in enumerate(counts):  # real candidates at random slots, not just a prefix
    mask[b, rng.permutation(N)[:c]] = 1.0
  return scores, rewards, mask


def _valid_sorted(scores, rewards, mask, b):
  idx = [i for i in range(N) if mask[b, i] > 0]
  order = sorted(idx, key=lambda i: (-rewards[b, i], i))
  return np.array([scores[b, i] for i in order]), np.array([rewards[b, i] for i in order])


def pl_reference(scores, rewards, mask):
  out = []
  for b in range(scores.shape[0]):
    s, _ = _valid_sorted(scores, rewards, mask, b)
    out.append(sum(np.logaddexp.reduce(s[k:]) - s[k] for k in range(len(s) - 1)))
  return np.array(out)


def pro_reference(scores, rewards, mask):
  """The authors' loop (process_manager.compute_loss) per prompt, without their 1e-10 epsilon."""
  out = []
  for b in range(scores.shape[0]):
    s, r = _valid_sorted(scores, rewards, mask, b)
    total = 0.0
    for k in range(len(s) - 1):
      neg_temps = r[k] - r[k + 1:]
      pos_temp = np.max(neg_temps)
      total += np.log(np.exp(s[k] * pos_temp) +
                      np.sum(np.exp(s[k + 1:] * neg_temps))) - s[k] * pos_temp
    out.append(total)
  return np.array(out)


def rrhf_reference(scores, rewards, mask):
  out = []
  for b in range(scores.shape[0]):
    total = 0.0
    for i in range(N):
      for j in range(N):
        if mask[b, i] and mask[b, j] and rewards[b, i] < rewards[b, j]:
          total += max(0.0, scores[b, i] - scores[b, j])
    out.append(total)
  return np.array(out)


# ----------------------------------------------------------------------------------------------
# hand values


def test_plackett_luce_by_hand():
  # order by reward: c1 (s=0), c2 (s=log 2), c0 (s=0):
  # -[0 - log(1 + 2 + 1)] - [log 2 - log(2 + 1)] = log 4 + log 1.5 = log 6
  scores = jnp.array([[0.0, 0.0, math.log(2.0)]])
  rewards = jnp.array([[1.0, 3.0, 2.0]])
  out, _ = losses.plackett_luce_loss(scores, rewards)
  assert_close(out, [math.log(6.0)])


def test_pro_by_hand():
  # rewards sorted (2, 1, 0), scores (-1, -1, -2):
  # k=0: T = (1, 2), T_pos = 2: log(e^{-2} + e^{-1} + e^{-4}) + 2
  # k=1: T = (1,), T_pos = 1:  log(e^{-1} + e^{-2}) + 1
  scores = jnp.array([[-1.0, -1.0, -2.0]])
  rewards = jnp.array([[2.0, 1.0, 0.0]])
  want = math.log(math.exp(-2) + math.exp(-1) +
                  math.exp(-4)) + 2 + math.log(math.exp(-1) + math.exp(-2)) + 1
  out, m = losses.pro_loss(scores, rewards)
  assert_close(out, [want])
  assert_close(m["num_rank_terms"], 2.0)


def test_rrhf_by_hand():
  # rewards (0, 1, 2): pairs (0<1), (0<2), (1<2); scores (-1, -2, -0.5)
  # max(0, -1+2) + max(0, -1+0.5) + max(0, -2+0.5) = 1
  out, m = losses.rrhf_loss(jnp.array([[-1.0, -2.0, -0.5]]), jnp.array([[0.0, 1.0, 2.0]]))
  assert_close(out, [1.0])
  assert_close(m["violation_rate"], 1.0 / 3.0)


def test_length_normalized_scores_and_best_candidate():
  sums = jnp.array([[-8.0, -9.0, -4.0]])
  lengths = jnp.array([[4, 9, 0]])
  assert_close(losses.length_normalized_scores(sums, lengths), [[-2.0, -1.0, -4.0]])
  assert_close(losses.length_normalized_scores(sums, lengths, length_penalty=0.5),
               [[-4.0, -3.0, -4.0]])
  idx = losses.best_candidate_index(jnp.array([[1.0, 5.0, 9.0]]),
                                    candidate_mask=jnp.array([[1, 1, 0]]))
  assert int(idx[0]) == 1


# ----------------------------------------------------------------------------------------------
# NumPy references and invariances


@SETTINGS
@given(seed=SEEDS)
def test_listwise_losses_match_numpy(seed):
  scores, rewards, mask = _random_lists(seed)
  args = (scores.astype(np.float32), rewards.astype(np.float32))
  got, _ = _pl(*args, candidate_mask=mask)
  assert_close(got, pl_reference(scores, rewards, mask))
  got, _ = _pro(*args, candidate_mask=mask)
  assert_close(got, pro_reference(scores, rewards, mask))
  got, _ = _rrhf(*args, candidate_mask=mask)
  assert_close(got, rrhf_reference(scores, rewards, mask))


@SETTINGS
@given(seed=SEEDS)
def test_plackett_luce_with_two_candidates_is_bradley_terry(seed):
  rng = np.random.default_rng(seed)
  scores = rng.normal(0, 3, (B, 2)).astype(np.float32)
  rewards = rng.normal(0, 1, (B, 2)).astype(np.float32)
  pl, _ = _pl(scores, rewards)
  better = np.argmax(rewards, axis=1)
  chosen = scores[np.arange(B), better]
  rejected = scores[np.arange(B), 1 - better]
  bt, _ = _bt(chosen, rejected)
  assert_close(pl, bt)


@SETTINGS
@given(seed=SEEDS)
def test_pro_plain_softmax_is_plackett_luce(seed):
  scores, rewards, mask = _random_lists(seed)
  pro, _ = _pro_plain(scores, rewards, candidate_mask=mask)
  pl, _ = _pl(scores, rewards, candidate_mask=mask)
  assert_close(pro, pl)


@SETTINGS
@given(seed=SEEDS)
def test_rrhf_zero_when_scores_ordered_like_rewards(seed):
  rng = np.random.default_rng(seed)
  rewards = rng.normal(size=(B, N))
  # scores: any strictly increasing function of the rewards
  scores = -np.exp(-rewards) - 0.1
  out, m = _rrhf(scores.astype(np.float32), rewards.astype(np.float32))
  assert np.all(np.asarray(out) == 0.0)
  assert float(m["violation_rate"]) == 0.0
  flipped, _ = _rrhf((-scores).astype(np.float32), rewards.astype(np.float32))
  assert np.all(np.asarray(flipped) > 0.0)


def test_masked_candidates_never_change_results():
  scores, rewards, mask = _random_lists(3)
  args = (scores.astype(np.float32), rewards.astype(np.float32))
  for fn in (losses.plackett_luce_loss, losses.pro_loss, losses.rrhf_loss):
    check_mask_invariance(lambda s, r, fn=fn: fn(s, r, candidate_mask=mask), args, mask,
                          garbage_positions_of=(0, 1))


def test_grads_and_jit():
  scores, rewards, mask = _random_lists(21)
  for fn in (losses.plackett_luce_loss, losses.pro_loss, losses.rrhf_loss):
    check_grads_x64(lambda s, fn=fn: jnp.sum(fn(s, jnp.asarray(rewards), candidate_mask=mask)[0]),
                    (scores,))
    check_jit_matches(fn, scores.astype(np.float32), rewards.astype(np.float32),
                      candidate_mask=mask)
