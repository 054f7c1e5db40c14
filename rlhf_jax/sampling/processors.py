"""Logit processors, applied in Hugging Face's order: temperature, then top-k, then top-p.

All work on float32 [B, V] logits and return logits where removed tokens are -inf, so
`log_softmax` of the result is the log-probability under the distribution actually sampled from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.sampling.config import SamplingConfig


def apply_top_k(logits_BxV: jax.Array, k: int) -> jax.Array:
  """Keeps logits >= the k-th largest of each row (ties at the boundary are all kept)."""
  if k <= 0 or k >= logits_BxV.shape[-1]:
    return logits_BxV
  kth_Bx1 = jax.lax.top_k(logits_BxV, k)[0][:, -1:]
  return jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)


def apply_top_p(logits_BxV: jax.Array, p: float) -> jax.Array:
  """Nucleus filter: in descending order, keep token i iff the mass of the tokens before it is < p.

  That is the smallest prefix whose mass reaches p (the most likely token is always kept).
  """
  if p >= 1.0:
    return logits_BxV
  sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  keep_BxV = mass_before_BxV < p
  threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)


def process_logits(logits_BxV: jax.Array, config: SamplingConfig) -> jax.Array:
  """temperature -> top-k -> top-p, in float32."""
  logits_BxV = logits_BxV.astype(jnp.float32) / config.temperature
  logits_BxV = apply_top_k(logits_BxV, config.top_k)
  return apply_top_p(logits_BxV, config.top_p)
