"""KL to the reference policy: per-token estimators, KL-penalised reward shaping, KL controllers.

Tokens are sampled from the policy π, so with the per-token log-ratio x = log π_ref(a) - log π(a)
and r = e^x the three estimators of KL(π ‖ π_ref) (Schulman, 2020, "Approximating KL Divergence",
http://joschu.net/blog/kl-approx.html) are

    k1 = -x                 unbiased, high variance, can be negative
    k2 = ½ x²               biased (exact to second order), ≥ 0
    k3 = (r - 1) - x        unbiased, ≥ 0 (since e^x ≥ 1 + x), low variance
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from rlhf_jax.losses._common import as_float, as_mask, check_choice, check_rank, compute_dtype

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logps, ref_logps, *, estimator: str = "k1", mask=None):
  """Per-token KL estimate (k1 | k2 | k3, see the module docstring), same shape as ``logps``.

    ``mask`` (optional) zeroes padding; k3 is clamped at 0 so rounding can never make it negative.
    """
  check_choice("estimator", estimator, KL_ESTIMATORS)
  dtype = compute_dtype(logps, ref_logps)
  x = as_float(ref_logps, dtype) - as_float(logps, dtype)
  m = as_mask(mask, jnp.shape(x), dtype)
  x = jnp.where(m > 0, x, 0.0)
  if estimator == "k1":
    kl = -x
  elif estimator == "k2":
    kl = 0.5 * x**2
  else:
    kl = jnp.maximum(jnp.expm1(x) - x, 0.0)
  return jnp.where(m > 0, kl, 0.0)


def last_token_index(mask_BxT):
  """Index ``[B]`` of the last real token of each row (left- or right-padded); 0 for empty rows."""
  mask = jnp.asarray(mask_BxT) != 0
  num_t = mask.shape[1]
  return jnp.where(jnp.any(mask, axis=1), num_t - 1 - jnp.argmax(mask[:, ::-1], axis=1), 0)


def kl_penalized_rewards(scores, logps, ref_logps, mask, *, kl_coef, estimator: str = "k1"):
  """Per-token rewards for PPO-RLHF (Ziegler et al., 2019, arXiv:1909.08593; Stiennon et al., 2020;
    Ouyang et al., 2022):

        R_t = -β · KL_t + [t = last real token] · score

    ``scores`` ``[B]`` are the reward-model outputs for the whole response, ``logps``/``ref_logps``
    ``[B, T]`` per-token log-probs of the sampled tokens, ``mask`` ``[B, T]`` the response mask.
    ``kl_coef`` β may be a traced scalar (from ``AdaptiveKLController``).

    Returns ``(rewards_BxT, metrics)``: ``kl`` (mean per-sequence summed KL), ``non_score_reward``
    (mean per-sequence -β·KL), ``score``.
    """
  check_rank("logps", logps, 2)
  dtype = compute_dtype(logps, ref_logps, scores)
  mask_BxT = as_mask(mask, logps.shape, dtype)
  kl_BxT = kl_estimate(logps, ref_logps, estimator=estimator, mask=mask_BxT)
  non_score_BxT = -as_float(kl_coef, dtype) * kl_BxT
  scores_B = as_float(scores, dtype)
  has_token_B = jnp.any(mask_BxT > 0, axis=1)
  last_BxT = jnp.arange(logps.shape[1])[None, :] == last_token_index(mask_BxT)[:, None]
  score_BxT = jnp.where(last_BxT & has_token_B[:, None], scores_B[:, None], 0.0)
  rewards_BxT = non_score_BxT + score_BxT
  metrics = {
      "kl": jnp.mean(jnp.sum(kl_BxT, axis=1)),
      "non_score_reward": jnp.mean(jnp.sum(non_score_BxT, axis=1)),
      "score": jnp.mean(scores_B),}
  return rewards_BxT, metrics


@dataclasses.dataclass(frozen=True)
class FixedKLController:
  """β stays ``kl_coef``. Same interface as ``AdaptiveKLController``."""

  kl_coef: float = 0.05

  def __post_init__(self):
    if self.kl_coef < 0:
      raise ValueError(f"FixedKLController.kl_coef must be >= 0, got {self.kl_coef}")

  def initial(self):
    return jnp.asarray(self.kl_coef, jnp.float32)

  def update(self, kl_coef, observed_kl, n_steps):
    del observed_kl, n_steps
    return jnp.asarray(kl_coef, jnp.float32)


@dataclasses.dataclass(frozen=True)
class AdaptiveKLController:
  """Proportional controller towards a target KL (Ziegler et al., 2019, arXiv:1909.08593, §2.2):

        e   = clip(KL / KL_target - 1, -0.2, 0.2)
        β  ← β · (1 + e · n_steps / horizon)

    (the paper's K_β = n_steps / horizon, TRL's parameterisation). ``update`` is pure and jit-able;
    keep β in the train state.
    """

  init_kl_coef: float = 0.2
  target: float = 6.0
  horizon: float = 10000.0

  def __post_init__(self):
    for name in ("init_kl_coef", "target", "horizon"):
      if not getattr(self, name) > 0:
        raise ValueError(f"AdaptiveKLController.{name} must be > 0, got {getattr(self, name)}")

  def initial(self):
    return jnp.asarray(self.init_kl_coef, jnp.float32)

  def update(self, kl_coef, observed_kl, n_steps):
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / self.target - 1.0, -0.2, 0.2)
    return jnp.asarray(kl_coef, jnp.float32) * (1.0 + error * n_steps / self.horizon)
