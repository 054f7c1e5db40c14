"""Per-token log-probabilities and entropies from logits, in float32.

Alignment (the contract every loss relies on): column t holds the quantity for *predicting* token t,

  logps_BxT[:, t] = log p(tokens[:, t] | tokens[:, :t]) = logits[:, t-1, tokens[:, t]]
                                                          - logsumexp(logits[:, t-1, :]),

column 0 (nothing predicts the first token) and positions with loss_mask == 0 are 0.

Why logsumexp + gather: `log_softmax(logits)[..., y]` would build a second float32 [B, T, V] tensor
(the normalised log-probs) only to read one entry per row. Instead the logits are cast to float32
once, the normaliser is a reduction over V (`logsumexp`, which XLA fuses with the cast) and the
target logit is a gather, so memory beyond the logits is O(B*T).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _shift_right(x_BxT: jax.Array) -> jax.Array:
  """Column t of the result is column t-1 of x; column 0 is 0."""
  return jnp.pad(x_BxT[:, :-1], ((0, 0), (1, 0)))


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array,
                   loss_mask_BxT: jax.Array | None = None) -> jax.Array:
  """float32 [B, T] log-probs of `tokens` under `logits` (aligned as in the module docstring)."""
  logits_f32_BxTxV = logits_BxTxV.astype(jnp.float32)
  # next_BxT[:, t] = tokens[:, t+1]: the target predicted by logits column t (last column: dummy).
  next_BxT = jnp.pad(tokens_BxT[:, 1:], ((0, 0), (0, 1)))
  lse_BxT = jax.nn.logsumexp(logits_f32_BxTxV, axis=-1)
  target_BxT = jnp.take_along_axis(logits_f32_BxTxV, next_BxT[:, :, None].astype(jnp.int32),
                                   axis=-1)[..., 0]
  logps_BxT = _shift_right(target_BxT - lse_BxT)
  if loss_mask_BxT is not None:
    logps_BxT = jnp.where(loss_mask_BxT > 0, logps_BxT, 0.0)
  return logps_BxT


def token_entropy(logits_BxTxV: jax.Array, loss_mask_BxT: jax.Array | None = None) -> jax.Array:
  """float32 [B, T] entropy of the next-token distribution that predicts token t (same alignment).

    H = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v z_v.
  """
  logits_f32_BxTxV = logits_BxTxV.astype(jnp.float32)
  lse_BxT = jax.nn.logsumexp(logits_f32_BxTxV, axis=-1)
  probs_BxTxV = jnp.exp(logits_f32_BxTxV - lse_BxT[..., None])
  entropy_BxT = _shift_right(lse_BxT - jnp.sum(probs_BxTxV * logits_f32_BxTxV, axis=-1))
  if loss_mask_BxT is not None:
    entropy_BxT = jnp.where(loss_mask_BxT > 0, entropy_BxT, 0.0)
  return entropy_BxT


def as_variables(params: Any) -> dict[str, Any]:
  """Accepts a param tree or a full variables dict ({"params": ...}); returns the variables."""
  if isinstance(params, dict) and set(params) == {"params"}:
    return params
  return {"params": params}


def sequence_logprobs(model: Any, params: Any, tokens_BxT: jax.Array, mask_BxT: jax.Array,
                      loss_mask_BxT: jax.Array | None = None) -> jax.Array:
  """Runs `model` (a `Transformer`) on the batch and returns `token_logprobs` [B, T] float32.

  `params` is the model's param tree (boxed or unboxed), or `{"params": tree}`. Sum over T for the
  sequence log-likelihood of the completion: `sequence_logprobs(...).sum(-1)`.
  """
  out = model.apply(as_variables(params), tokens_BxT, mask_BxT)
  return token_logprobs(out.logits_BxTxV, tokens_BxT, loss_mask_BxT)
