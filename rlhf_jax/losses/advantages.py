"""Advantage estimators: GAE (with a critic), masked whitening, and critic-free group baselines.

Group baselines take rewards ``[B, G]``: B prompts × G sampled responses each. The sampler's
prompt-major output (row ``i * G + j``) becomes this layout with ``rewards.reshape(B, G)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses._common import as_float, as_mask, check_rank, check_same_shape, compute_dtype


def gae(rewards, values, mask, *, gamma: float = 1.0, lam: float = 0.95):
  """Generalised Advantage Estimation (Schulman et al., 2015, arXiv:1506.02438) as a reverse
    ``lax.scan`` over time:

        δ_t = r_t + γ V_{t'} - V_t,      A_t = δ_t + γ λ A_{t'},      R_t = A_t + V_t

    where t' is the next *unmasked* position (V_{t'} = A_{t'} = 0 past the last one: the episode ends
    at the last response token). Masked positions get A = R = 0 and are skipped by the recursion, so
    right padding, left padding and masked-out gaps (e.g. tool outputs the policy did not write)
    are all handled; for right padding this equals TRL's loop. With γ = λ = 1,
    A_t = Σ_{t' ≥ t} r_t' - V_t (reward-to-go minus value).

    ``rewards``, ``values``, ``mask``: ``[B, T]``. Returns ``(advantages_BxT, returns_BxT)``;
    returns are the value targets. It is a plain differentiable function: callers computing PPO
    targets from rollout values use it outside the gradient (or wrap it in ``stop_gradient``).
    """
  check_rank("rewards", rewards, 2)
  check_same_shape(rewards=rewards, values=values)
  if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
    raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
  dtype = compute_dtype(rewards, values)
  mask_BxT = as_mask(mask, rewards.shape, dtype)
  r_BxT = jnp.where(mask_BxT > 0, as_float(rewards, dtype), 0.0)
  v_BxT = jnp.where(mask_BxT > 0, as_float(values, dtype), 0.0)

  def step(carry, xs):
    next_adv_B, next_value_B = carry
    r_B, v_B, m_B = xs
    delta_B = r_B + gamma * next_value_B - v_B
    adv_B = delta_B + gamma * lam * next_adv_B
    keep = m_B > 0
    carry = (jnp.where(keep, adv_B, next_adv_B), jnp.where(keep, v_B, next_value_B))
    return carry, jnp.where(keep, adv_B, 0.0)

  batch = rewards.shape[0]
  init = (jnp.zeros((batch,), dtype), jnp.zeros((batch,), dtype))
  _, adv_TxB = jax.lax.scan(step, init, (r_BxT.T, v_BxT.T, mask_BxT.T), reverse=True)
  advantages_BxT = adv_TxB.T
  returns_BxT = jnp.where(mask_BxT > 0, advantages_BxT + v_BxT, 0.0)
  return advantages_BxT, returns_BxT


def masked_whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8):
  """(x - μ) / sqrt(σ² + eps) over unmasked entries, with the unbiased variance
    σ² = Σ m (x - μ)² / (Σ m - 1) as in TRL; ``shift_mean=False`` adds μ back (scale only).
    Masked entries come out 0. Used to normalise PPO advantages per batch (Ziegler et al., 2019)."""
  dtype = compute_dtype(x)
  x = as_float(x, dtype)
  m = as_mask(mask, x.shape, dtype)
  n = jnp.sum(m)
  mean = jnp.sum(jnp.where(m > 0, x, 0.0)) / jnp.maximum(n, 1.0)
  centred = jnp.where(m > 0, x - mean, 0.0)
  var = jnp.sum(centred**2) / jnp.maximum(n - 1.0, 1.0)
  out = centred * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(m > 0, out, 0.0)


def _group_stats(rewards_BxG, mask):
  check_rank("rewards_BxG", rewards_BxG, 2)
  dtype = compute_dtype(rewards_BxG)
  m = as_mask(mask, rewards_BxG.shape, dtype)
  r = jnp.where(m > 0, as_float(rewards_BxG, dtype), 0.0)
  n_B1 = jnp.sum(m, axis=1, keepdims=True)
  sum_B1 = jnp.sum(r, axis=1, keepdims=True)
  return r, m, n_B1, sum_B1


def rloo_advantages(rewards_BxG, *, mask=None):
  """REINFORCE leave-one-out (Kool et al., 2019; Ahmadian et al., 2024, arXiv:2402.14740):

        A_i = r_i - 1/(G-1) Σ_{j ≠ i} r_j

    over the valid samples of each group (``mask`` ``[B, G]``); groups with fewer than 2 valid samples
    have no baseline and get A = 0. Returns ``[B, G]``."""
  r, m, n_B1, sum_B1 = _group_stats(rewards_BxG, mask)
  baseline = (sum_B1 - r) / jnp.maximum(n_B1 - 1.0, 1.0)
  return jnp.where((m > 0) & (n_B1 >= 2), r - baseline, 0.0)


def grpo_advantages(rewards_BxG, *, mask=None, eps: float = 1e-4):
  """GRPO outcome advantages (Shao et al., 2024, DeepSeekMath, arXiv:2402.03300, §4.1.2):

        A_i = (r_i - mean(r)) / (std(r) + eps)

    per group, with the unbiased std and eps = 1e-4 as in TRL; groups of one sample get 0.
    Returns ``[B, G]`` (broadcast over tokens in ``ppo_policy_loss``)."""
  r, m, n_B1, sum_B1 = _group_stats(rewards_BxG, mask)
  mean = sum_B1 / jnp.maximum(n_B1, 1.0)
  centred = jnp.where(m > 0, r - mean, 0.0)
  std = jnp.sqrt(jnp.sum(centred**2, axis=1, keepdims=True) / jnp.maximum(n_B1 - 1.0, 1.0))
  return jnp.where((m > 0) & (n_B1 >= 2), centred / (std + eps), 0.0)


def dr_grpo_advantages(rewards_BxG, *, mask=None):
  """Dr. GRPO (Liu et al., 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783):
    A_i = r_i - mean(r), no division by the group std (which up-weights too-easy and too-hard
    prompts). The paper's other fix, a constant token normaliser instead of the response length,
    is ``aggregation="seq_mean_token_sum_norm"`` in ``ppo_policy_loss``. Returns ``[B, G]``."""
  r, m, n_B1, sum_B1 = _group_stats(rewards_BxG, mask)
  mean = sum_B1 / jnp.maximum(n_B1, 1.0)
  return jnp.where(m > 0, r - mean, 0.0)


def reinforce_baseline_advantages(scores_BxG, kl_BxGxR, mask_BxGxR, *, kl_coef=0.0,
                                  eps: float = 1e-8):
  """REINFORCE++-baseline (Hu et al., 2025, arXiv:2501.03262; OpenRLHF's
    ``--algo.advantage.estimator reinforce_baseline``, ``experience_maker.py``):

        r̃_i   = s_i - mean_j s_j                       group-mean baseline (no std)
        R_i,t = Σ_{t' ≥ t} (-β KL_i,t') + r̃_i           reward-to-go, γ = 1, r̃ at the last token
        A     = (R - μ) / sqrt(max(σ², eps))            whitened over every response token of the
                                                        batch (μ, σ² the masked mean and *biased*
                                                        variance, as OpenRLHF)

    ``scores_BxG``: B prompts × G responses; ``kl_BxGxR``, ``mask_BxGxR``: per-token KL estimates
    and response masks in the same layout (use ``kl_coef=0`` for a KL loss term instead).
    Returns advantages ``[B, G, R]`` (0 on masked tokens)."""
  check_rank("scores_BxG", scores_BxG, 2)
  check_rank("kl_BxGxR", kl_BxGxR, 3)
  dtype = compute_dtype(scores_BxG, kl_BxGxR)
  m = as_mask(mask_BxGxR, kl_BxGxR.shape, dtype)
  s = as_float(scores_BxG, dtype)
  centred_BxG = s - jnp.mean(s, axis=1, keepdims=True)
  kl_reward = jnp.where(m > 0, -kl_coef * as_float(kl_BxGxR, dtype), 0.0)
  # reward-to-go of the KL part: reverse cumulative sum over masked tokens.
  to_go = jnp.flip(jnp.cumsum(jnp.flip(kl_reward, -1), axis=-1), -1)
  returns = jnp.where(m > 0, to_go + centred_BxG[..., None], 0.0)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = jnp.sum(returns) / n
  var = jnp.sum(jnp.where(m > 0, (returns - mean)**2, 0.0)) / n
  return jnp.where(m > 0, (returns - mean) * jax.lax.rsqrt(jnp.maximum(var, eps)), 0.0)
