"""PPO family: clipped surrogate (asymmetric, dual clip), value loss, entropy, KL estimators and
reward shaping, KL controllers, GAE, whitening and group baselines."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

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

B, T, G = 4, 6, 5

_policy = jax.jit(losses.ppo_policy_loss,
                  static_argnames=("clip_eps", "clip_eps_high", "dual_clip", "aggregation"))
_value = jax.jit(losses.ppo_value_loss, static_argnames=("clip_eps", "aggregation"))
_gae = jax.jit(losses.gae, static_argnames=("gamma", "lam"))
_kl = jax.jit(losses.kl_estimate, static_argnames=("estimator",))


def _rollout(seed):
  rng = np.random.default_rng(seed)
  logps = -rng.exponential(1.0, (B, T))
  old = logps + rng.normal(0, 0.3, (B, T))
  adv = rng.normal(0, 1, (B, T))
  mask = right_padded_mask(rng, B, T)
  return logps, old, adv, mask


def policy_reference(logps, old, adv, mask, eps_low, eps_high, dual):
  ratio = np.exp(logps - old)
  loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps_low, 1 + eps_high))
  if dual is not None:
    loss = np.where(adv < 0, np.minimum(loss, -dual * adv), loss)
  return (loss * mask).sum(1) * mask.shape[0] / mask.sum()  # token_mean


# ----------------------------------------------------------------------------------------------
# policy loss


def test_policy_loss_by_hand():
  # one token each; ratios e^{0.5} ≈ 1.6487 and e^{-1} ≈ 0.3679
  logps = jnp.array([[0.5], [-1.0], [2.0]])
  old = jnp.zeros((3, 1))
  adv = jnp.array([[1.0], [-2.0], [-1.0]])
  mask = jnp.ones((3, 1))
  out, m = losses.ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2)
  # A>0, ratio above 1.2 → clipped: -1.2; A<0, ratio below 0.8 → clipped: 2·0.8; A<0 ratio e²: e²
  assert_close(out, [-1.2, 1.6, math.exp(2.0)])
  assert_close(m["clipfrac"], 2.0 / 3.0)
  out, _ = losses.ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2, clip_eps_high=0.5,
                                  dual_clip=3.0)
  # ε_high = 0.5 clips ratio 1.6487 at 1.5; the dual clip bounds e² by c·|A| = 3
  assert_close(out, [-1.5, 1.6, 3.0])


@pytest.mark.parametrize("config", [(0.2, None, None), (0.2, 0.28, None), (0.1, 0.3, 2.0),
                                    (0.3, None, 3.0)])
@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=SEEDS)
def test_policy_loss_matches_numpy(config, seed):
  eps_low, eps_high, dual = config
  logps, old, adv, mask = _rollout(seed)
  f32 = lambda x: x.astype(np.float32)  # noqa: E731
  got, _ = _policy(f32(logps), f32(old), f32(adv), mask, clip_eps=eps_low, clip_eps_high=eps_high,
                   dual_clip=dual)
  want = policy_reference(logps, old, adv, mask, eps_low, eps_high if eps_high else eps_low, dual)
  assert_close(got, want)


def test_policy_loss_sequence_advantages_broadcast():
  logps, old, adv, mask = _rollout(3)
  seq_adv = adv[:, 0]
  a, _ = losses.ppo_policy_loss(logps, old, seq_adv, mask)
  b, _ = losses.ppo_policy_loss(logps, old, np.repeat(seq_adv[:, None], T, 1), mask)
  assert_close(a, b)


def test_policy_and_value_grads_jit_masks():
  logps, old, adv, mask = _rollout(8)
  f32 = lambda x: x.astype(np.float32)  # noqa: E731
  kw = dict(clip_eps=0.2, clip_eps_high=0.3, dual_clip=3.0, aggregation="seq_mean_token_mean")
  check_grads_x64(lambda lp: jnp.sum(losses.ppo_policy_loss(lp, old, adv, mask, **kw)[0]), (logps,))
  check_jit_matches(losses.ppo_policy_loss, f32(logps), f32(old), f32(adv), mask, **kw)
  check_mask_invariance(losses.ppo_policy_loss, (f32(logps), f32(old), f32(adv), mask), mask,
                        (0, 1, 2), **kw)
  values, old_values, returns = logps, old, adv  # any [B, T] arrays
  check_grads_x64(lambda v: jnp.sum(losses.ppo_value_loss(v, old_values, returns, mask)[0]),
                  (values,))
  check_jit_matches(losses.ppo_value_loss, f32(values), f32(old_values), f32(returns), mask)
  check_mask_invariance(losses.ppo_value_loss, (f32(values), f32(old_values), f32(returns), mask),
                        mask, (0, 1, 2))


# ----------------------------------------------------------------------------------------------
# value loss and entropy


def test_value_loss_by_hand():
  values = jnp.array([[1.0, 0.0]])
  old = jnp.array([[0.0, 0.0]])
  returns = jnp.array([[0.0, 2.0]])
  out, m = losses.ppo_value_loss(values, old, returns, jnp.ones((1, 2)), clip_eps=0.2,
                                 aggregation="seq_mean_token_sum")
  # token 0: max((1-0)², (0.2-0)²)/2 = 0.5; token 1: max(4, 4)/2 = 2
  assert_close(out, [2.5])
  assert_close(m["vf_clipfrac"], 0.0)
  out, _ = losses.ppo_value_loss(values, old, returns, jnp.ones((1, 2)), clip_eps=None,
                                 aggregation="seq_mean_token_sum")
  assert_close(out, [2.5])


@SETTINGS
@given(seed=SEEDS)
def test_value_loss_and_entropy_match_numpy(seed):
  rng = np.random.default_rng(seed)
  v, v_old, ret = rng.normal(size=(B, T)), rng.normal(size=(B, T)), rng.normal(size=(B, T))
  mask = right_padded_mask(rng, B, T)
  f32 = lambda x: x.astype(np.float32)  # noqa: E731
  got, _ = _value(f32(v), f32(v_old), f32(ret), mask, clip_eps=0.2)
  v_clip = v_old + np.clip(v - v_old, -0.2, 0.2)
  per_tok = 0.5 * np.maximum((v - ret)**2, (v_clip - ret)**2)
  assert_close(got, (per_tok * mask).sum(1) * B / mask.sum())
  logits = rng.normal(0, 2, (B, T, 7))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ent = -(p * np.log(p)).sum(-1)
  assert_close(losses.entropy_from_logits(f32(logits)), ent)
  got, m = losses.entropy_loss(f32(ent), mask, aggregation="seq_mean_token_mean")
  assert_close(got, -(ent * mask).sum(1) / mask.sum(1))
  assert_close(m["entropy"], (ent * mask).sum() / mask.sum())


def test_entropy_grads_jit_masks():
  rng = np.random.default_rng(9)
  ent, mask = rng.uniform(0, 2, (B, T)), right_padded_mask(rng, B, T)
  check_grads_x64(lambda e: jnp.sum(losses.entropy_loss(e, mask)[0]), (ent,))
  check_grads_x64(lambda lg: jnp.sum(losses.entropy_from_logits(lg)), (rng.normal(size=(2, 3, 5)),))
  check_jit_matches(losses.entropy_loss, ent.astype(np.float32), mask)
  check_mask_invariance(losses.entropy_loss, (ent.astype(np.float32), mask), mask, (0,))


# ----------------------------------------------------------------------------------------------
# KL estimators, reward shaping, controllers


def test_kl_estimators_by_hand():
  logps, ref = jnp.array([[-1.0]]), jnp.array([[-2.0]])  # x = ref - logp = -1
  assert_close(losses.kl_estimate(logps, ref, estimator="k1"), [[1.0]])
  assert_close(losses.kl_estimate(logps, ref, estimator="k2"), [[0.5]])
  assert_close(losses.kl_estimate(logps, ref, estimator="k3"), [[math.exp(-1.0) - 1.0 + 1.0]])
  with pytest.raises(ValueError, match="estimator='k4'.*k1"):
    losses.kl_estimate(logps, ref, estimator="k4")


@pytest.mark.parametrize("scale", [1e-4, 0.1, 3.0, 30.0])
@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=SEEDS)
def test_kl_estimators_match_numpy_and_k3_nonnegative(scale, seed):
  rng = np.random.default_rng(seed)
  logps = rng.normal(0, scale, (B, T)) - 1.0
  ref = rng.normal(0, scale, (B, T)) - 1.0
  x = ref - logps
  f32 = lambda a: a.astype(np.float32)  # noqa: E731
  k3 = np.asarray(_kl(f32(logps), f32(ref), estimator="k3"))
  assert np.all(k3 >= 0.0)
  if scale <= 3.0:  # at scale 30, e^x overflows float64 comparisons' usefulness; only the sign matters
    assert_close(_kl(f32(logps), f32(ref), estimator="k1"), -x, rtol=1e-5, atol=1e-5)
    assert_close(_kl(f32(logps), f32(ref), estimator="k2"), 0.5 * x**2, rtol=1e-5, atol=1e-5)
    assert_close(k3, np.expm1(x) - x, rtol=1e-4, atol=1e-5)


def test_kl_grads_jit_masks():
  rng = np.random.default_rng(10)
  logps, ref = -rng.exponential(1, (B, T)), -rng.exponential(1, (B, T))
  mask = right_padded_mask(rng, B, T)
  for est in losses.KL_ESTIMATORS:
    check_grads_x64(lambda lp, est=est: jnp.sum(losses.kl_estimate(lp, ref, estimator=est)),
                    (logps,))
    check_jit_matches(losses.kl_estimate, logps.astype(np.float32), ref.astype(np.float32),
                      estimator=est)
    check_mask_invariance(
        lambda lp, r, est=est: (losses.kl_estimate(lp, r, estimator=est, mask=mask),),
        (logps.astype(np.float32), ref.astype(np.float32)),
        mask,
        (0, 1),
    )


def test_kl_penalized_rewards_right_and_left_padding():
  logps = jnp.array([[-1.0, -1.0, -1.0, 0.0], [0.0, -1.0, -2.0, -1.0]])
  ref = jnp.array([[-2.0, -1.0, -1.5, 0.0], [0.0, -1.0, -1.0, -1.0]])
  mask = jnp.array([[1, 1, 1, 0], [0, 1, 1, 1]])  # right-padded row, left-padded row
  scores = jnp.array([10.0, 20.0])
  rewards, m = losses.kl_penalized_rewards(scores, logps, ref, mask, kl_coef=0.5)
  # k1 = logp - ref: row 0 (1, 0, 0.5, ·); row 1 (·, 0, -1, 0)
  assert_close(rewards, [[-0.5, 0.0, -0.25 + 10.0, 0.0], [0.0, 0.0, 0.5, 20.0]])
  assert_close(m["kl"], (1.5 - 1.0) / 2)
  assert_close(m["non_score_reward"], -0.5 * 0.25)
  check_grads_x64(
      lambda lp: jnp.sum(losses.kl_penalized_rewards(scores, lp, ref, mask, kl_coef=0.5)[0]),
      (logps,))
  check_jit_matches(losses.kl_penalized_rewards, scores, logps, ref, mask, kl_coef=0.5)
  check_mask_invariance(lambda lp, r: losses.kl_penalized_rewards(scores, lp, r, mask, kl_coef=0.5),
                        (logps, ref), mask, (0, 1))


def test_kl_controllers():
  fixed = losses.FixedKLController(kl_coef=0.1)
  assert_close(fixed.update(fixed.initial(), 100.0, 64), 0.1)
  adaptive = losses.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000.0)
  beta = adaptive.initial()
  # KL 12 → error clipped to 0.2: β · (1 + 0.2 · 100/10000)
  assert_close(adaptive.update(beta, 12.0, 100), 0.2 * (1 + 0.2 * 0.01))
  # KL 5.4 → error -0.1: β · (1 - 0.1 · 1000/10000)
  assert_close(adaptive.update(beta, 5.4, 1000), 0.2 * (1 - 0.01))
  assert_close(jax.jit(adaptive.update)(beta, jnp.float32(5.4), 1000), 0.2 * 0.99)
  with pytest.raises(ValueError, match="AdaptiveKLController.target"):
    losses.AdaptiveKLController(target=0.0)
  with pytest.raises(ValueError, match="FixedKLController.kl_coef"):
    losses.FixedKLController(kl_coef=-1.0)


# ----------------------------------------------------------------------------------------------
# GAE and whitening


def gae_reference(rewards, values, mask, gamma, lam):
  adv = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
    next_adv = next_v = 0.0
    for t in reversed(idx):
      delta = rewards[b, t] + gamma * next_v - values[b, t]
      next_adv = delta + gamma * lam * next_adv
      next_v = values[b, t]
      adv[b, t] = next_adv
  return adv, (adv + values) * mask


def test_gae_by_hand():
  # two tokens, γ = 0.5, λ = 0.5, rewards (0, 1), values (1, 2):
  # δ_1 = 1 - 2 = -1, A_1 = -1; δ_0 = 0 + 0.5·2 - 1 = 0, A_0 = 0 + 0.25·(-1) = -0.25
  adv, ret = losses.gae(jnp.array([[0.0, 1.0, 7.0]]), jnp.array([[1.0, 2.0, 7.0]]),
                        jnp.array([[1, 1, 0]]), gamma=0.5, lam=0.5)
  assert_close(adv, [[-0.25, -1.0, 0.0]])
  assert_close(ret, [[0.75, 1.0, 0.0]])


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0), (1.0, 0.95)])
@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=SEEDS)
def test_gae_matches_numpy_with_gaps(gamma, lam, seed):
  rng = np.random.default_rng(seed)
  rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
  mask = (rng.uniform(size=(B, T)) < 0.7).astype(np.float32)  # arbitrary gaps, left/right padding
  adv, ret = _gae(rewards.astype(np.float32), values.astype(np.float32), mask, gamma=gamma, lam=lam)
  want_adv, want_ret = gae_reference(rewards, values, mask, gamma, lam)
  assert_close(adv, want_adv)
  assert_close(ret, want_ret)


@SETTINGS
@given(seed=SEEDS)
def test_gae_gamma_lambda_one_is_reward_to_go_minus_values(seed):
  rng = np.random.default_rng(seed)
  rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
  mask = right_padded_mask(rng, B, T)
  adv, ret = _gae(rewards.astype(np.float32), values.astype(np.float32), mask, gamma=1.0, lam=1.0)
  reward_to_go = np.cumsum((rewards * mask)[:, ::-1], axis=1)[:, ::-1]
  assert_close(adv, (reward_to_go - values) * mask)
  assert_close(ret, reward_to_go * mask)


def test_gae_grads_jit_masks():
  rng = np.random.default_rng(12)
  rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
  mask = right_padded_mask(rng, B, T)
  check_grads_x64(lambda r, v: jnp.sum(losses.gae(r, v, mask, gamma=0.9, lam=0.8)[0]**2),
                  (rewards, values))
  f32 = lambda x: x.astype(np.float32)  # noqa: E731
  check_jit_matches(losses.gae, f32(rewards), f32(values), mask, gamma=0.9, lam=0.8)
  check_mask_invariance(losses.gae, (f32(rewards), f32(values), mask), mask, (0, 1), gamma=0.9,
                        lam=0.8)


@SETTINGS
@given(seed=SEEDS)
def test_masked_whiten_matches_numpy(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(3.0, 2.0, (B, T))
  mask = right_padded_mask(rng, B, T, min_len=2)
  sel = x[mask > 0]
  want = (x - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8) * mask
  assert_close(losses.masked_whiten(x.astype(np.float32), mask), want, rtol=1e-4, atol=1e-5)
  want_scale = ((x - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8) + sel.mean()) * mask
  assert_close(losses.masked_whiten(x.astype(np.float32), mask, shift_mean=False), want_scale,
               rtol=1e-4, atol=1e-5)


def test_whiten_grads_jit_masks():
  rng = np.random.default_rng(13)
  x, mask = rng.normal(size=(B, T)), right_padded_mask(rng, B, T, min_len=2)
  check_grads_x64(lambda a: jnp.sum(losses.masked_whiten(a, mask) * jnp.arange(T)), (x,))
  check_jit_matches(losses.masked_whiten, x.astype(np.float32), mask)
  check_mask_invariance(lambda a: (losses.masked_whiten(a, mask),), (x.astype(np.float32),), mask,
                        (0,))


# ----------------------------------------------------------------------------------------------
# group baselines


def test_group_baselines_by_hand():
  r = jnp.array([[1.0, 2.0, 3.0, 9.0]])
  mask = jnp.array([[1, 1, 1, 0]])
  assert_close(losses.rloo_advantages(r, mask=mask), [[1 - 2.5, 2 - 2.0, 3 - 1.5, 0.0]])
  assert_close(losses.dr_grpo_advantages(r, mask=mask), [[-1.0, 0.0, 1.0, 0.0]])
  assert_close(losses.grpo_advantages(r, mask=mask),
               [[-1 / 1.0001, 0.0, 1 / 1.0001, 0.0]])  # std = 1
  single = jnp.array([[5.0, 0.0]])
  assert_close(losses.rloo_advantages(single, mask=jnp.array([[1, 0]])), [[0.0, 0.0]])


@SETTINGS
@given(seed=SEEDS)
def test_group_baselines_match_numpy(seed):
  rng = np.random.default_rng(seed)
  r = rng.normal(size=(B, G))
  f32 = r.astype(np.float32)
  loo = (r.sum(1, keepdims=True) - r) / (G - 1)
  assert_close(losses.rloo_advantages(f32), r - loo)
  assert_close(losses.grpo_advantages(f32),
               (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4), rtol=1e-4)
  assert_close(losses.dr_grpo_advantages(f32), r - r.mean(1, keepdims=True))


def test_group_baselines_grads_jit_masks():
  rng = np.random.default_rng(14)
  r = rng.normal(size=(B, G))
  mask = right_padded_mask(rng, B, G, min_len=2)
  w = jnp.arange(G, dtype=jnp.float32)
  for fn in (losses.rloo_advantages, losses.grpo_advantages, losses.dr_grpo_advantages):
    check_grads_x64(lambda x, fn=fn: jnp.sum(fn(x, mask=mask) * w), (r,))
    check_jit_matches(fn, r.astype(np.float32), mask=mask)
    check_mask_invariance(lambda x, fn=fn: (fn(x, mask=mask),), (r.astype(np.float32),), mask, (0,))


def test_dr_grpo_aggregation_uses_constant_normaliser():
  logps, old, adv, mask = _rollout(15)
  a, _ = losses.ppo_policy_loss(logps, old, adv, mask, aggregation="seq_mean_token_sum_norm")
  b, _ = losses.ppo_policy_loss(logps, old, adv, mask, aggregation="seq_mean_token_sum")
  assert_close(a, np.asarray(b) / T)


def test_entropy_and_whiten_by_hand():
  assert_close(losses.entropy_from_logits(jnp.zeros((1, 2, 8))), [[math.log(8.0)] * 2])
  # x = (1, 3, pad): mean 2, unbiased var 2 → (∓1)/√2
  out = losses.masked_whiten(jnp.array([[1.0, 3.0, 50.0]]), jnp.array([[1, 1, 0]]))
  assert_close(out, [[-1 / math.sqrt(2.0), 1 / math.sqrt(2.0), 0.0]])


@SETTINGS
@given(seed=SEEDS)
def test_kl_penalized_rewards_match_numpy(seed):
  rng = np.random.default_rng(seed)
  logps, ref = -rng.exponential(1, (B, T)), -rng.exponential(1, (B, T))
  mask = right_padded_mask(rng, B, T)
  scores = rng.normal(size=B)
  f32 = lambda x: x.astype(np.float32)  # noqa: E731
  got, _ = _shaped(f32(scores), f32(logps), f32(ref), mask, kl_coef=0.2)
  want = -0.2 * (logps - ref) * mask
  last = mask.sum(1).astype(int) - 1
  want[np.arange(B), last] += scores
  assert_close(got, want)


_shaped = jax.jit(losses.kl_penalized_rewards, static_argnames=("estimator",))
