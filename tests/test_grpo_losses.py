"""GRPO loss family (TRL's loss types, GSPO's sequence ratio, CISPO), DAPO's overlong penalty and
dynamic-sampling filter, REINFORCE++-baseline advantages; each against a hand value, a float64 NumPy
reference, finite differences, jit and garbage in masked positions, and the peers' own code
transcribed into NumPy."""

from __future__ import annotations

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

B, T = 4, 6
LOSS_TYPES = losses.GRPO_LOSS_TYPES


def _batch(seed, scale=0.3):
  rng = np.random.default_rng(seed)
  logps = -rng.exponential(1.0, (B, T))
  old = logps + rng.normal(0, scale, (B, T))
  adv = rng.normal(0, 1, (B,))
  mask = right_padded_mask(rng, B, T)
  return logps, old, adv, mask


# ----------------------------------------------------------------------------------------------
# independent float64 reference (written from the papers' formulas, not from the code under test)


def reference(logps, old, adv, mask, loss_type, level, eps_low, eps_high, num_items=None,
              max_len=None):
  logps, old, adv, mask = (np.asarray(x, np.float64) for x in (logps, old, adv, mask))
  adv = adv[:, None] * np.ones_like(logps) if adv.ndim == 1 else adv
  b, t = logps.shape
  loss = np.zeros((b, t))
  for i in range(b):
    n = mask[i].sum()
    seq_ratio = np.exp(sum((logps[i, j] - old[i, j]) for j in range(t) if mask[i, j]) / n)
    for j in range(t):
      if not mask[i, j]:
        continue
      w = np.exp(logps[i, j] - old[i, j]) if level == "token" else seq_ratio
      a = adv[i, j]
      if loss_type == "cispo":
        loss[i, j] = -min(w, eps_high) * a * logps[i, j]
      else:
        loss[i, j] = -min(w * a, np.clip(w, 1 - eps_low, 1 + eps_high) * a)
  sums = loss.sum(1)
  if loss_type == "grpo":
    total = np.mean(sums / mask.sum(1))
  elif loss_type == "dr_grpo":
    total = sums.sum() / (b * (max_len or t))
  elif loss_type == "bnpo" or num_items is None:
    total = sums.sum() / mask.sum()
  else:
    total = sums.sum() / num_items
  return total


def _loss(*args, **kw):
  return jnp.mean(losses.grpo_policy_loss(*args, **kw)[0])


# ----------------------------------------------------------------------------------------------
# hand-computed values


def test_by_hand_token_level():
  # row 0: two tokens with ratios e^{0.5} ≈ 1.6487 (clipped at 1.2 for A=+1) and e^{-0.5} ≈ 0.6065
  # (A=+1: min(0.6065, 0.8) = 0.6065); row 1: one token, ratio 1, A = -2.
  logps = np.array([[0.5, -0.5], [0.0, 9.0]], np.float32)
  old = np.zeros((2, 2), np.float32)
  adv = np.array([1.0, -2.0], np.float32)
  mask = np.array([[1, 1], [1, 0]], np.float32)
  tok0, tok1, tok2 = -1.2, -np.exp(-0.5), 2.0
  want = {
      "grpo": ((tok0 + tok1) / 2 + tok2) / 2,
      "bnpo": (tok0 + tok1 + tok2) / 3,
      "dapo": (tok0 + tok1 + tok2) / 3,
      "dr_grpo": (tok0 + tok1 + tok2) / (2 * 2),}
  for loss_type, value in want.items():
    assert_close(_loss(logps, old, adv, mask, loss_type=loss_type), value)
  # dapo with the whole generation batch's token count (e.g. 6 tokens over 2 minibatches of 3)
  assert_close(_loss(logps, old, adv, mask, loss_type="dapo", num_items_in_batch=6.0),
               (tok0 + tok1 + tok2) / 6)
  # clip-higher: ε_high = 0.28 caps the first token's ratio at 1.28 instead of 1.2
  assert_close(_loss(logps, old, adv, mask, loss_type="bnpo", epsilon_high=0.28),
               (-1.28 + tok1 + tok2) / 3)


def test_by_hand_cispo_and_sequence_level():
  logps = np.array([[0.5, -0.5], [0.0, 9.0]], np.float32)
  old = np.zeros((2, 2), np.float32)
  adv = np.array([1.0, -2.0], np.float32)
  mask = np.array([[1, 1], [1, 0]], np.float32)
  # cispo, cap 1.5: weights min(e^{.5}, 1.5) = 1.5, e^{-.5}; ℓ = -w A log π
  want = (-1.5 * 0.5 - np.exp(-0.5) * 1.0 * (-0.5) + 0.0) / 3
  assert_close(_loss(logps, old, adv, mask, loss_type="cispo", epsilon_high=1.5), want)
  # GSPO: row 0's sequence ratio is exp((0.5 - 0.5) / 2) = 1, so no clipping: ℓ = -A per token
  assert_close(_loss(logps, old, adv, mask, loss_type="grpo", importance_sampling_level="sequence"),
               (-1.0 + 2.0) / 2)
  out, metrics = losses.grpo_policy_loss(logps, old, adv, mask, loss_type="grpo",
                                         importance_sampling_level="sequence")
  assert_close(metrics["ratio_mean"], 1.0)


def test_gspo_sequence_ratio_is_exp_mean_token_log_ratio():
  logps, old, _, mask = _batch(3)
  got = np.exp(np.asarray(losses.sequence_log_ratio(logps, old, mask)))
  for i in range(B):
    m = mask[i] > 0
    assert_close(got[i], np.exp(np.mean(logps[i][m] - old[i][m])))
  # and the loss uses it: one row, A = 1, weight w inside the clip range -> ℓ = -w on every token
  lp = np.array([[-1.0, -2.0, -3.0]])
  od = np.array([[-1.1, -1.9, -3.05]])
  w = np.exp(np.mean(lp - od))
  assert_close(
      _loss(lp, od, np.ones(1), np.ones((1, 3)), loss_type="grpo",
            importance_sampling_level="sequence"), -w)


# ----------------------------------------------------------------------------------------------
# NumPy reference, gradients, jit, masks


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", losses.IMPORTANCE_SAMPLING_LEVELS)
@SETTINGS
@given(seed=SEEDS)
def test_matches_numpy_reference(loss_type, level, seed):
  logps, old, adv, mask = _batch(seed)
  eps_high = 1.3 if loss_type == "cispo" else 0.28
  got = _loss(logps.astype(np.float32), old.astype(np.float32), adv.astype(np.float32), mask,
              loss_type=loss_type, importance_sampling_level=level, epsilon=0.2,
              epsilon_high=eps_high, num_items_in_batch=2.0 * mask.sum(), max_completion_length=8)
  want = reference(logps, old, adv, mask, loss_type, level, 0.2, eps_high,
                   num_items=2.0 * mask.sum(), max_len=8)
  assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("level", losses.IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_clipped_types_gradient_check_jit_masks(loss_type, level):
  logps, old, adv, mask = _batch(11)
  kw = dict(loss_type=loss_type, importance_sampling_level=level, epsilon=0.2, epsilon_high=0.28)
  check_grads_x64(lambda lp: _loss(lp, old, adv, mask, **kw), (logps,))
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  check_jit_matches(losses.grpo_policy_loss, f32(logps), f32(old), f32(adv), mask, **kw)
  check_mask_invariance(losses.grpo_policy_loss, (f32(logps), f32(old), f32(adv), mask), mask,
                        (0, 1), **kw)


def _garbage(x, mask):
  junk = np.random.default_rng(0).choice(np.array([1e6, -1e6, np.inf, -np.inf, np.nan]),
                                         size=x.shape)
  return np.where(mask > 0, x, junk).astype(np.float32)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_masked_positions_inert_in_the_gradient(loss_type):
  logps, old, adv, mask = (np.asarray(x, np.float32) for x in _batch(5))
  kw = dict(loss_type=loss_type, epsilon_high=1.5 if loss_type == "cispo" else None)
  grad = jax.grad(lambda lp, od: _loss(lp, od, adv, mask, **kw), argnums=(0, 1))
  base = grad(logps, old)
  noisy = grad(_garbage(logps, mask), _garbage(old, mask))
  for a, b in zip(base, noisy):
    assert np.all(np.isfinite(np.asarray(b)))
    assert_close(b, a)
    assert np.all(np.asarray(b)[mask == 0] == 0)


def test_cispo_gradient_is_the_stopped_weight_reinforce_term():
  # d/dlogπ [-sg(min(w, ε)) A logπ] = -min(w, ε) A (the weight carries no gradient), / N tokens;
  # finite differences would differentiate through w, so the check is against the closed form.
  logps, old, adv, mask = _batch(7, scale=0.6)
  with jax.enable_x64(True):
    grad = jax.grad(lambda lp: _loss(lp, old, adv, mask, loss_type="cispo", epsilon_high=1.2))(
        jnp.asarray(logps))
  w = np.exp(logps - old)
  want = -np.minimum(w, 1.2) * adv[:, None] * mask / mask.sum()
  assert_close(grad, want, rtol=1e-9, atol=1e-12)
  check_jit_matches(losses.grpo_policy_loss, logps.astype(np.float32), old.astype(np.float32),
                    adv.astype(np.float32), mask, loss_type="cispo", epsilon_high=1.2)
  # the cap is active somewhere (so the test exercises it) and reported as clipfrac
  _, m = losses.grpo_policy_loss(logps, old, adv, mask, loss_type="cispo", epsilon_high=1.2)
  assert 0 < float(m["clipfrac"]) < 1


def test_bad_arguments_name_the_field():
  x = np.zeros((1, 2))
  with pytest.raises(ValueError, match="loss_type='sapo'"):
    losses.grpo_policy_loss(x, x, np.zeros(1), None, loss_type="sapo")
  with pytest.raises(ValueError, match="importance_sampling_level='seq'"):
    losses.grpo_policy_loss(x, x, np.zeros(1), None, importance_sampling_level="seq")


# ----------------------------------------------------------------------------------------------
# TRL's own loss code, transcribed faithfully into NumPy.
# huggingface/trl @ f2cd57710ae345ea6428ae95363267fcf38a3dc8, trl/trainer/grpo_trainer.py,
# GRPOTrainer._compute_loss (lines 3054-3150): log_ratio -> log_importance_weights -> coef_1,
# per_token_kl (k3), the per-loss-type per_token_loss and normalisation; one process, no
# gradient accumulation (current_gradient_accumulation_steps = 1), delta=None, no vLLM, no
# entropy / off-policy masks.


def trl_compute_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, mask, *,
                     loss_type, importance_sampling_level, epsilon_low, epsilon_high, beta,
                     max_completion_length, num_items_in_batch, num_processes=1):
  advantages = advantages[:, None] if advantages.ndim == 1 else advantages
  log_ratio = per_token_logps - old_per_token_logps
  if importance_sampling_level == "token":
    log_importance_weights = log_ratio
  elif importance_sampling_level == "sequence":
    log_importance_weights = (log_ratio * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)
    log_importance_weights = log_importance_weights[:, None]
  coef_1 = np.exp(log_importance_weights)
  if beta != 0.0:
    per_token_kl = (np.exp(ref_per_token_logps - per_token_logps) -
                    (ref_per_token_logps - per_token_logps) - 1)
  if loss_type == "cispo":
    clamped_ratios = np.minimum(coef_1, epsilon_high)  # .detach()
    per_token_loss = -clamped_ratios * advantages * per_token_logps
  elif loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
    coef_2 = np.clip(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -np.minimum(per_token_loss1, per_token_loss2)
  if beta != 0.0:
    per_token_loss = per_token_loss + beta * per_token_kl
  if loss_type in ["grpo", "sapo"]:
    loss = ((per_token_loss * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)).mean()
  elif loss_type == "bnpo":
    loss = (per_token_loss * mask).sum() / np.maximum(mask.sum(), 1.0)
  elif loss_type == "dr_grpo":
    loss = (per_token_loss * mask).sum() / (per_token_loss.shape[0] * max_completion_length)
  elif loss_type in ["cispo", "dapo", "vespo"]:
    normalizer = np.maximum(num_items_in_batch, 1.0) / num_processes
    loss = (per_token_loss * mask).sum() / normalizer
  return loss


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", losses.IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_matches_trl_compute_loss(loss_type, level, beta):
  # The trainer adds β · (the k3 KL aggregated the same way) to the policy loss
  # (online/update.py); TRL adds β·k3 per token before aggregating: the same by linearity.
  rng = np.random.default_rng(0)
  logps, old, adv, mask = _batch(21, scale=0.4)
  ref = logps + rng.normal(0, 0.5, logps.shape)
  eps_high = 3.0 if loss_type == "cispo" else 0.28
  num_items = mask.sum() * 1.5
  want = trl_compute_loss(logps, old, ref, adv, mask, loss_type=loss_type,
                          importance_sampling_level=level, epsilon_low=0.2, epsilon_high=eps_high,
                          beta=beta, max_completion_length=T, num_items_in_batch=num_items)
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  policy = _loss(f32(logps), f32(old), f32(adv), mask, loss_type=loss_type,
                 importance_sampling_level=level, epsilon=0.2, epsilon_high=eps_high,
                 num_items_in_batch=num_items, max_completion_length=T)
  kl = losses.kl_estimate(f32(logps), f32(ref), estimator="k3", mask=mask)
  kl_term = jnp.mean(
      losses.grpo_aggregate(kl, mask, loss_type, num_items_in_batch=num_items,
                            max_completion_length=T))
  assert_close(policy + beta * kl_term, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# DAPO's soft overlong punishment: by hand, TRL's and OpenRLHF's code


def test_overlong_penalty_by_hand_and_peers():
  lengths = np.array([10, 80, 81, 90, 100])
  got = np.asarray(losses.overlong_penalty(lengths, max_new_tokens=100, buffer_len=20))
  assert_close(got, [0.0, 0.0, -0.05, -0.5, -1.0])  # TRL's docstring example: 90 -> -0.5
  # huggingface/trl @ f2cd577..., trl/rewards/other_rewards.py, _SoftOverlongPunishment.__call__
  trl = []
  for completion_length in lengths:
    if completion_length <= 100 - 20:
      trl.append(0.0)
    elif 100 - 20 < completion_length <= 100:
      trl.append((100 - 20 - completion_length) / 20)
    else:
      trl.append(-1.0)
  assert_close(got, trl)
  # OpenRLHF/OpenRLHF @ 3c3be6234e0cb353e76bb8019947db9dfe99fca7,
  # openrlhf/trainer/ppo_utils/length_penalty.py, apply_overlong_penalty (factor 0.5)
  rewards = np.zeros(len(lengths))
  expected_len = 100 - 20
  for j, valid_response_length in enumerate(lengths):
    exceed_len = min(valid_response_length - expected_len, 20)
    if exceed_len > 0:
      rewards[j] += -exceed_len / 20 * 0.5
  assert_close(
      losses.overlong_penalty(lengths, max_new_tokens=100, buffer_len=20, penalty_factor=0.5),
      rewards)
  with pytest.raises(ValueError, match="buffer_len=0"):
    losses.overlong_penalty(lengths, max_new_tokens=100, buffer_len=0)


def test_degenerate_groups():
  r = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5 + 1e-9, 0.5]])
  assert losses.degenerate_groups(r).tolist() == [True, False, False]
  assert losses.degenerate_groups(r, tol=1e-6).tolist() == [True, False, True]


# ----------------------------------------------------------------------------------------------
# REINFORCE++-baseline advantages


def openrlhf_reinforce_baseline(scores_BxG, kl_NxR, mask_NxR, kl_coef):
  """OpenRLHF/OpenRLHF @ 3c3be6234e0cb353e76bb8019947db9dfe99fca7, transcribed:
  openrlhf/trainer/ppo_utils/experience_maker.py compute_advantages_and_returns (reinforce_baseline
  branch: group-mean baseline, get_cumulative_returns with γ = 1, then the normalisation over all
  action tokens) and openrlhf/models/utils.py compute_reward (score at the last action token)."""
  rewards = scores_BxG - scores_BxG.mean(-1, keepdims=True)
  r = rewards.reshape(-1)
  kl_reward = -kl_coef * kl_NxR
  eos_indices = mask_NxR.shape[1] - 1 - np.argmax(mask_NxR[:, ::-1], axis=1)
  last_reward = np.zeros_like(kl_NxR)
  last_reward[np.arange(len(r)), eos_indices] = r
  reward = last_reward + kl_reward
  reward = mask_NxR * reward
  returns = np.zeros_like(reward)
  cumulative_return = np.zeros(reward.shape[0])
  for t in reversed(range(reward.shape[1])):
    cumulative_return = reward[:, t] + 1.0 * cumulative_return
    returns[:, t] = cumulative_return
  advantages = returns
  num_actions = mask_NxR.sum()
  mean = (advantages * mask_NxR).sum() / num_actions
  var = (((advantages - mean)**2) * mask_NxR).sum() / num_actions
  rstd = 1 / np.sqrt(max(var, 1e-8))
  return (advantages - mean) * rstd


def test_reinforce_baseline_matches_openrlhf_and_hand_value():
  rng = np.random.default_rng(4)
  n_groups, g, r = 3, 4, 5
  scores = rng.normal(size=(n_groups, g))
  mask = right_padded_mask(rng, n_groups * g, r)
  kl = rng.normal(0, 0.2, (n_groups * g, r)) * mask
  got = losses.reinforce_baseline_advantages(scores, kl.reshape(n_groups, g, r),
                                             mask.reshape(n_groups, g, r), kl_coef=0.1)
  want = openrlhf_reinforce_baseline(scores, kl, mask, 0.1)
  assert_close(np.asarray(got).reshape(-1, r) * mask, want * mask, rtol=1e-5, atol=1e-5)
  check_jit_matches(losses.reinforce_baseline_advantages, scores.astype(np.float32),
                    kl.reshape(n_groups, g, r).astype(np.float32), mask.reshape(n_groups, g, r))
  # by hand: one group of two one-token responses, scores 1 and 3, no KL: centred -1, +1;
  # mean 0, biased std 1 -> advantages -1, +1
  hand = losses.reinforce_baseline_advantages(np.array([[1.0, 3.0]]), np.zeros((1, 2, 1)),
                                              np.ones((1, 2, 1)))
  assert_close(np.asarray(hand).reshape(-1), [-1.0, 1.0])
