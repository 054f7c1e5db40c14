"""Shared helpers for the loss library: dtype policy, masked reductions, token aggregation.

Dtype policy: every loss computes in ``compute_dtype(x)`` = the promotion of the input dtype with
float32, so bfloat16/float16 activations are upcast to float32 and float64 inputs (used by the
gradient checks under ``jax.enable_x64``) stay float64. Nothing is ever computed below float32.

Mask policy: masks are 1 for positions that count and 0 for padding. Values at masked positions are
replaced by zeros *before* any arithmetic (``jnp.where``, not a multiply), so padding that holds
garbage, ``inf`` or ``nan`` can neither change a result nor poison a gradient.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

# Large negative stand-in for -inf in masked log-sum-exps: exp(_NEG - max) underflows to exactly 0 in
# float32 and float64, while keeping every intermediate finite (an actual -inf makes 0 * inf = nan in
# the backward pass).
_NEG = -1e9

TOKEN_AGGREGATIONS = (
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
)


def is_concrete(x) -> bool:
  """Whether a hyperparameter is a Python / NumPy value (checked eagerly) rather than a traced
  array: a vectorised sweep (``rlhf_jax.train.vectorized``) passes β, ε, ... as per-run arrays
  under ``vmap``, already validated per run."""
  return not isinstance(x, jax.core.Tracer)


def compute_dtype(*xs) -> jnp.dtype:
  """At least float32: the dtype every loss computes in."""
  dtype = jnp.float32
  for x in xs:
    if x is not None:
      dtype = jnp.promote_types(dtype, jnp.asarray(x).dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.float32
  return dtype


def as_float(x, dtype=None) -> jnp.ndarray:
  """``x`` as an array in the compute dtype (``compute_dtype(x)`` unless ``dtype`` is given)."""
  x = jnp.asarray(x)
  return x.astype(dtype if dtype is not None else compute_dtype(x))


def as_mask(mask, shape, dtype) -> jnp.ndarray:
  """A 0/1 mask in ``dtype`` broadcast to ``shape``; ``None`` means everything counts."""
  if mask is None:
    return jnp.ones(shape, dtype)
  mask = jnp.asarray(mask)
  if mask.shape != tuple(shape):
    raise ValueError(f"mask has shape {mask.shape}, expected {tuple(shape)}")
  return (mask != 0).astype(dtype)


def zero_masked(x, mask) -> jnp.ndarray:
  """``x`` with masked positions set to 0 (a select, so nan/inf in padding never propagate)."""
  return jnp.where(mask > 0, x, jnp.zeros_like(x))


def masked_sum(x, mask, axis=None) -> jnp.ndarray:
  return jnp.sum(zero_masked(x, mask), axis=axis)


def masked_mean(x, mask, axis=None) -> jnp.ndarray:
  """Mean over positions where ``mask`` is 1; 0 where nothing is unmasked."""
  count = jnp.sum(mask, axis=axis)
  return masked_sum(x, mask, axis=axis) / jnp.maximum(count, 1.0)


def masked_logsumexp(x, mask, axis=-1) -> jnp.ndarray:
  """log Σ_{mask=1} exp(x) along ``axis``; returns ``_NEG`` where the masked set is empty."""
  x = jnp.where(mask > 0, x, _NEG)
  x_max = jnp.max(x, axis=axis, keepdims=True)
  # Max shift for stability; exact in value and gradient because the max cancels.
  shifted = jnp.where(mask > 0, jnp.exp(x - x_max), 0.0)
  return jnp.log(jnp.sum(shifted, axis=axis) +
                 (jnp.sum(mask, axis=axis) == 0)) + jnp.squeeze(x_max, axis)


def aggregate_tokens(values_BxT, mask_BxT, aggregation: str,
                     norm_len: int | None = None) -> jnp.ndarray:
  """Reduce per-token values to per-example values ``[B]`` whose batch mean is the batch loss.

    With ``n_b = Σ_t m_bt`` tokens in row b, ``N = Σ_b n_b`` and padded length T:

    - ``token_mean``:              ℓ_b = (B / N) Σ_t m_bt v_bt, so mean_b ℓ_b = Σ_bt m v / N
      (every token weighs the same; per-example values depend on the whole batch);
    - ``seq_mean_token_mean``:     ℓ_b = Σ_t m_bt v_bt / n_b (every sequence weighs the same);
    - ``seq_mean_token_sum``:      ℓ_b = Σ_t m_bt v_bt (longer sequences weigh more);
    - ``seq_mean_token_sum_norm``: ℓ_b = Σ_t m_bt v_bt / L with L = ``norm_len`` (default the
      padded length T; Dr. GRPO: a constant normaliser instead of the per-sequence length, which
      removes the length bias of ``seq_mean_token_mean``). Every token of every batch then weighs
      1 / (B L): with bucketed or length-grouped batches pass the fixed maximum as ``norm_len`` so
      the weight does not change with a batch's width.
    """
  check_choice("aggregation", aggregation, TOKEN_AGGREGATIONS)
  token_sum_B = masked_sum(values_BxT, mask_BxT, axis=-1)
  count_B = jnp.sum(mask_BxT, axis=-1)
  if aggregation == "token_mean":
    batch = values_BxT.shape[0]
    return token_sum_B * (batch / jnp.maximum(jnp.sum(count_B), 1.0))
  if aggregation == "seq_mean_token_mean":
    return token_sum_B / jnp.maximum(count_B, 1.0)
  if aggregation == "seq_mean_token_sum":
    return token_sum_B
  return token_sum_B / (norm_len or values_BxT.shape[-1])


def check_choice(field: str, value, allowed: Sequence[str]) -> None:
  """Raise a ValueError naming ``field`` and the allowed values."""
  if value not in allowed:
    raise ValueError(f"{field}={value!r} is not one of {sorted(allowed)}")


def check_rank(name: str, x, rank: int) -> None:
  if jnp.ndim(x) != rank:
    raise ValueError(f"{name} must have rank {rank}, got shape {jnp.shape(x)}")


def check_same_shape(**arrays) -> None:
  shapes = {k: jnp.shape(v) for k, v in arrays.items() if v is not None}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"shapes must match: {shapes}")
