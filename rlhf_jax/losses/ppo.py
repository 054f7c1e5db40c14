"""PPO objectives over per-token arrays: clipped surrogate, clipped value loss, entropy bonus.

All take ``[B, T]`` arrays aligned with a 0/1 ``mask`` (1 on response tokens the policy produced)
and reduce tokens with ``aggregation`` (see ``_common.aggregate_tokens``): per-example outputs are
``[B]`` and their mean is the batch loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses._common import (
    aggregate_tokens,
    as_float,
    as_mask,
    check_rank,
    compute_dtype,
    masked_mean,
    zero_masked,
)


def ppo_policy_loss(
    logps,
    old_logps,
    advantages,
    mask,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "token_mean",
):
  """Clipped surrogate objective, as a loss (Schulman et al., 2017, arXiv:1707.06347, Eq. 7):

        ρ_t = exp(log π(a_t) - log π_old(a_t))
        v_t = max(-A_t ρ_t, -A_t clip(ρ_t, 1 - ε_low, 1 + ε_high))
        v_t ← min(v_t, -c A_t)   where A_t < 0, if ``dual_clip`` c is given (c > 1)

    - ε_low = ``clip_eps``, ε_high = ``clip_eps_high`` (default ε_low): the asymmetric
      "clip-higher" of DAPO (Yu et al., 2025, arXiv:2503.14476), e.g. ε_low 0.2, ε_high 0.28.
    - ``dual_clip``: Ye et al., 2020, arXiv:1912.09729 — bounds the loss of negative-advantage tokens
      whose ratio has exploded.
    - ``advantages`` is ``[B, T]`` (per token, e.g. GAE) or ``[B]`` (one per sequence, e.g. GRPO;
      broadcast over tokens).

    Returns ``(per_example_loss [B], metrics)``: ``clipfrac`` (tokens where the clip is active),
    ``dual_clipfrac``, ``approx_kl`` = mean ½(log ρ)² (as TRL logs), ``ratio_mean``.
    """
  check_rank("logps", logps, 2)
  if clip_eps <= 0 or (clip_eps_high is not None and clip_eps_high <= 0):
    raise ValueError(f"clip_eps/clip_eps_high must be > 0, got {clip_eps}/{clip_eps_high}")
  if dual_clip is not None and dual_clip <= 1.0:
    raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
  eps_high = clip_eps if clip_eps_high is None else clip_eps_high
  dtype = compute_dtype(logps, old_logps, advantages)
  mask_BxT = as_mask(mask, logps.shape, dtype)
  adv = as_float(advantages, dtype)
  if adv.ndim == 1:
    adv = jnp.broadcast_to(adv[:, None], logps.shape)
  adv_BxT = zero_masked(adv, mask_BxT)
  log_ratio_BxT = zero_masked(as_float(logps, dtype) - as_float(old_logps, dtype), mask_BxT)
  ratio_BxT = jnp.exp(log_ratio_BxT)
  unclipped_BxT = -adv_BxT * ratio_BxT
  clipped_BxT = -adv_BxT * jnp.clip(ratio_BxT, 1.0 - clip_eps, 1.0 + eps_high)
  loss_BxT = jnp.maximum(unclipped_BxT, clipped_BxT)
  dual_active_BxT = jnp.zeros_like(loss_BxT, dtype=bool)
  if dual_clip is not None:
    bound_BxT = -dual_clip * adv_BxT
    dual_active_BxT = (adv_BxT < 0) & (loss_BxT > bound_BxT)
    loss_BxT = jnp.where(dual_active_BxT, bound_BxT, loss_BxT)
  per_example_B = aggregate_tokens(loss_BxT, mask_BxT, aggregation)
  metrics = {
      "loss": jnp.mean(per_example_B),
      "clipfrac": masked_mean((clipped_BxT > unclipped_BxT).astype(dtype), mask_BxT),
      "dual_clipfrac": masked_mean(dual_active_BxT.astype(dtype), mask_BxT),
      "approx_kl": masked_mean(0.5 * log_ratio_BxT**2, mask_BxT),
      "ratio_mean": masked_mean(ratio_BxT, mask_BxT),}
  return per_example_B, metrics


def ppo_value_loss(
    values,
    old_values,
    returns,
    mask,
    *,
    clip_eps: float | None = 0.2,
    aggregation: str = "token_mean",
):
  """Clipped value loss (PPO2 in OpenAI baselines; used by Ziegler et al., 2019,
    arXiv:1909.08593, and TRL):

        V^clip_t = V_old,t + clip(V_t - V_old,t, -ε, ε)
        v_t      = ½ max((V_t - R_t)², (V^clip_t - R_t)²)

    ``clip_eps=None`` gives the plain ½(V - R)². Returns ``(per_example_loss [B], metrics)`` with
    ``vf_clipfrac`` (tokens where the clipped error is the larger one), ``values_mean`` and
    ``explained_variance`` = 1 - Var(R - V)/Var(R) over unmasked tokens.
    """
  check_rank("values", values, 2)
  dtype = compute_dtype(values, old_values, returns)
  mask_BxT = as_mask(mask, values.shape, dtype)
  v_BxT = zero_masked(as_float(values, dtype), mask_BxT)
  v_old_BxT = zero_masked(as_float(old_values, dtype), mask_BxT)
  ret_BxT = zero_masked(as_float(returns, dtype), mask_BxT)
  err_BxT = (v_BxT - ret_BxT)**2
  if clip_eps is None:
    loss_BxT = 0.5 * err_BxT
    clip_active_BxT = jnp.zeros_like(err_BxT)
  else:
    if clip_eps <= 0:
      raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps}")
    v_clip_BxT = v_old_BxT + jnp.clip(v_BxT - v_old_BxT, -clip_eps, clip_eps)
    err_clip_BxT = (v_clip_BxT - ret_BxT)**2
    loss_BxT = 0.5 * jnp.maximum(err_BxT, err_clip_BxT)
    clip_active_BxT = (err_clip_BxT > err_BxT).astype(dtype)
  per_example_B = aggregate_tokens(loss_BxT, mask_BxT, aggregation)
  ret_mean = masked_mean(ret_BxT, mask_BxT)
  var_ret = masked_mean((ret_BxT - ret_mean)**2, mask_BxT)
  resid = ret_BxT - v_BxT
  var_resid = masked_mean((resid - masked_mean(resid, mask_BxT))**2, mask_BxT)
  metrics = {
      "loss": jnp.mean(per_example_B),
      "vf_clipfrac": masked_mean(clip_active_BxT, mask_BxT),
      "values_mean": masked_mean(v_BxT, mask_BxT),
      "explained_variance": 1.0 - var_resid / jnp.maximum(var_ret,
                                                          jnp.finfo(dtype).tiny),}
  return per_example_B, metrics


def entropy_from_logits(logits_BxTxV):
  """Per-token entropy H = logsumexp(l) - Σ_v softmax(l)_v l_v, in (at least) float32. ``[B, T]``."""
  logits = as_float(logits_BxTxV)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def entropy_loss(token_entropy, mask, *, aggregation: str = "token_mean"):
  """Entropy bonus as a loss to *add* with a coefficient (Mnih et al., 2016, arXiv:1602.01783;
    PPO's c₂ S[π] term, Schulman et al., 2017): ℓ_b = -aggregate(H, m), so minimising
    ``loss + c · ℓ`` raises the entropy. ``token_entropy`` ``[B, T]`` (``entropy_from_logits``).
    Returns ``(per_example_loss [B], metrics)`` with ``entropy`` = token-mean entropy."""
  check_rank("token_entropy", token_entropy, 2)
  dtype = compute_dtype(token_entropy)
  mask_BxT = as_mask(mask, token_entropy.shape, dtype)
  ent_BxT = as_float(token_entropy, dtype)
  per_example_B = -aggregate_tokens(ent_BxT, mask_BxT, aggregation)
  return per_example_B, {"loss": jnp.mean(per_example_B), "entropy": masked_mean(ent_BxT, mask_BxT)}
