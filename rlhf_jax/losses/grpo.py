"""The GRPO loss family with TRL's ``loss_type`` names, GSPO's sequence-level ratio, and DAPO's
reward-side pieces (soft overlong punishment, dynamic-sampling group filter).

Notation (per row b, response token t, mask m_bt = 1 on tokens the policy produced, n_b = Σ_t m_bt):

    log w_bt = log π(y_bt) - log π_old(y_bt)               importance_sampling_level="token"
    log w_b  = Σ_t m_bt (log π - log π_old) / n_b         importance_sampling_level="sequence"

(the sequence level is GSPO, Zheng et al. 2025, arXiv:2507.18071: the length-normalised sequence
ratio exp(mean token log-ratio), broadcast over the row's tokens).

Per-token losses (A = advantage, ε_low = ``epsilon``, ε_high = ``epsilon_high``, default ε_low):

    clipped (grpo, bnpo, dr_grpo, dapo)  ℓ_bt = -min(w A, clip(w, 1 - ε_low, 1 + ε_high) A)
    cispo                                ℓ_bt = -sg(min(w, ε_high)) · A · log π(y_bt)
                                         (MiniMax-M1, arXiv:2506.13585: the clipped importance
                                         weight, no gradient, on the REINFORCE term; every token
                                         keeps a gradient, unlike the clipped surrogate; TRL uses
                                         ``epsilon_high`` as the absolute cap ε_max, ScaleRL
                                         recommends 5.0)

Aggregation over the batch (what TRL's ``GRPOTrainer._compute_loss`` does with each ``loss_type``):

    grpo     mean_b Σ_t m ℓ / n_b                   (sequence mean of token means; DeepSeekMath)
    bnpo     Σ_bt m ℓ / Σ_bt m                      (tokens of this batch)
    dr_grpo  Σ_bt m ℓ / (B · L_max)                 (Dr. GRPO, arXiv:2503.20783; L_max =
                                                    ``max_completion_length``, default T)
    dapo     Σ_bt m ℓ / N                           (DAPO, arXiv:2503.14476: N = tokens of the
    cispo                                           whole generation batch, ``num_items_in_batch``;
                                                    default Σ_bt m, which makes it bnpo)

Every function returns per-example values ``[B]`` whose mean is the batch loss (as every loss here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses._common import (
    as_float,
    as_mask,
    check_choice,
    check_rank,
    compute_dtype,
    masked_mean,
    masked_sum,
    zero_masked,
)

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def sequence_log_ratio(logps, old_logps, mask):
  """GSPO's length-normalised sequence log-ratio ``[B]``: Σ_t m (log π - log π_old) / max(n, 1)
  (so the sequence ratio is exp(mean token log-ratio), TRL's ``importance_sampling_level=
  "sequence"``)."""
  check_rank("logps", logps, 2)
  dtype = compute_dtype(logps, old_logps)
  mask_BxT = as_mask(mask, logps.shape, dtype)
  log_ratio_BxT = zero_masked(as_float(logps, dtype) - as_float(old_logps, dtype), mask_BxT)
  return jnp.sum(log_ratio_BxT, axis=-1) / jnp.maximum(jnp.sum(mask_BxT, axis=-1), 1.0)


def grpo_aggregate(values_BxT, mask, loss_type: str, *, num_items_in_batch=None,
                   max_completion_length: int | None = None):
  """Per-example ``[B]`` values whose mean is TRL's ``loss_type`` reduction of per-token values
  (module docstring); also used for the KL term so both parts are normalised alike."""
  check_choice("loss_type", loss_type, GRPO_LOSS_TYPES)
  check_rank("values_BxT", values_BxT, 2)
  dtype = compute_dtype(values_BxT)
  mask_BxT = as_mask(mask, values_BxT.shape, dtype)
  sum_B = masked_sum(as_float(values_BxT, dtype), mask_BxT, axis=-1)
  batch = values_BxT.shape[0]
  if loss_type == "grpo":
    return sum_B / jnp.maximum(jnp.sum(mask_BxT, axis=-1), 1.0)
  if loss_type == "dr_grpo":
    length = values_BxT.shape[-1] if max_completion_length is None else max_completion_length
    return sum_B / length
  if loss_type == "bnpo" or num_items_in_batch is None:
    normaliser = jnp.sum(mask_BxT)
  else:
    normaliser = as_float(num_items_in_batch, dtype)
  return sum_B * batch / jnp.maximum(normaliser, 1.0)


def grpo_policy_loss(
    logps,
    old_logps,
    advantages,
    mask,
    *,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    num_items_in_batch=None,
    max_completion_length: int | None = None,
):
  """GRPO-family policy loss (module docstring): TRL's ``loss_type`` and
    ``importance_sampling_level`` with its defaults (``loss_type="dapo"``, ``epsilon=0.2``,
    ``epsilon_high`` = ``epsilon``).

    ``logps``, ``old_logps``, ``mask``: ``[B, T]`` response-aligned; ``advantages``: ``[B]``
    (one per sequence, broadcast over tokens) or ``[B, T]``. Masked positions are inert (any value there,
    inf or nan included, changes neither the loss nor its gradient).

    Returns ``(per_example_loss [B], metrics)``: ``clipfrac`` (tokens where the clip or, for cispo,
    the cap is active), ``approx_kl`` = mean ½(log w_token)², ``ratio_mean`` (mean importance weight
    as used: per token, or the sequence weight broadcast).
    """
  check_rank("logps", logps, 2)
  check_choice("loss_type", loss_type, GRPO_LOSS_TYPES)
  check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
  eps_high = epsilon if epsilon_high is None else epsilon_high
  if not epsilon > 0 or not eps_high > 0:
    raise ValueError(f"epsilon/epsilon_high must be > 0, got {epsilon}/{epsilon_high}")
  dtype = compute_dtype(logps, old_logps, advantages)
  mask_BxT = as_mask(mask, logps.shape, dtype)
  logps_BxT = zero_masked(as_float(logps, dtype), mask_BxT)
  old_BxT = zero_masked(as_float(old_logps, dtype), mask_BxT)
  adv = as_float(advantages, dtype)
  if adv.ndim == 1:
    adv = jnp.broadcast_to(adv[:, None], logps.shape)
  adv_BxT = zero_masked(adv, mask_BxT)
  token_log_ratio_BxT = logps_BxT - old_BxT
  if importance_sampling_level == "token":
    log_w_BxT = token_log_ratio_BxT
  else:
    log_w_BxT = jnp.broadcast_to(
        sequence_log_ratio(logps_BxT, old_BxT, mask_BxT)[:, None], logps.shape)
  # exp of a masked (zeroed) log-ratio is 1: padding never produces inf.
  w_BxT = jnp.exp(zero_masked(log_w_BxT, mask_BxT))
  if loss_type == "cispo":
    capped_BxT = jax.lax.stop_gradient(jnp.minimum(w_BxT, eps_high))
    loss_BxT = -capped_BxT * adv_BxT * logps_BxT
    clip_active_BxT = w_BxT > eps_high
  else:
    unclipped_BxT = w_BxT * adv_BxT
    clipped_BxT = jnp.clip(w_BxT, 1.0 - epsilon, 1.0 + eps_high) * adv_BxT
    loss_BxT = -jnp.minimum(unclipped_BxT, clipped_BxT)
    clip_active_BxT = clipped_BxT < unclipped_BxT
  per_example_B = grpo_aggregate(loss_BxT, mask_BxT, loss_type,
                                 num_items_in_batch=num_items_in_batch,
                                 max_completion_length=max_completion_length)
  metrics = {
      "loss": jnp.mean(per_example_B),
      "clipfrac": masked_mean(clip_active_BxT.astype(dtype), mask_BxT),
      "approx_kl": masked_mean(0.5 * token_log_ratio_BxT**2, mask_BxT),
      "ratio_mean": masked_mean(w_BxT, mask_BxT),}
  return per_example_B, metrics


def overlong_penalty(response_lengths, *, max_new_tokens: int, buffer_len: int,
                     penalty_factor: float = 1.0):
  """DAPO's soft overlong punishment (Yu et al., 2025, arXiv:2503.14476, Eq. 13), as OpenRLHF's
    ``--reward.overlong_buffer_len`` / ``--reward.overlong_penalty_factor`` apply it: with
    L_exp = L_max - L_buffer,

        R_length(y) = -min(|y| - L_exp, L_buffer) / L_buffer · factor   if |y| > L_exp, else 0

    (TRL's ``get_soft_overlong_punishment`` with factor 1: 0 up to L_exp, linear down to -1 at
    L_max).
    ``response_lengths`` ``[B]`` (tokens, EOS included); returns the penalty ``[B]`` (≤ 0) to add to
    the reward."""
  if not 0 < buffer_len <= max_new_tokens:
    raise ValueError(f"overlong buffer_len={buffer_len}; allowed: 0 < buffer_len <= "
                     f"max_new_tokens={max_new_tokens}")
  lengths = as_float(response_lengths)
  expected = max_new_tokens - buffer_len
  exceed = jnp.minimum(lengths - expected, buffer_len)
  return jnp.where(exceed > 0, -exceed / buffer_len * penalty_factor, 0.0)


def degenerate_groups(rewards_BxG, *, tol: float = 0.0) -> np.ndarray:
  """DAPO's dynamic-sampling filter on the host: True for groups whose rewards are all equal
    (max - min ≤ ``tol``), whose group-relative advantages are all zero and so carry no policy
    gradient. ``rewards_BxG``: B prompts × G responses. Returns a bool array ``[B]``."""
  r = np.asarray(rewards_BxG, np.float64)
  if r.ndim != 2:
    raise ValueError(f"rewards_BxG must have rank 2, got shape {r.shape}")
  return (r.max(axis=1) - r.min(axis=1)) <= tol
