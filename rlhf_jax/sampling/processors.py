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
  """Nucleus filter: the smallest prefix of the tokens, in descending order, whose mass reaches p.

  With the tokens sorted by probability (ties broken by the lower index first, a stable sort),
  token j of the order is kept iff the mass of the tokens before it is < p:

      keep_j = Σ_{i<j} π_(i) < p            (the most likely token is always kept)

  Membership is decided per *position* in the order, not per logit value, so a tie group that
  straddles the boundary is cut: (.4, .2, .2, .2) with p = 0.5 keeps the .4 and the first .2,
  as Hugging Face's ``TopPLogitsWarper`` does (a threshold on the logit would keep all four).
  """
  if p >= 1.0:
    return logits_BxV
  order_BxV = jnp.argsort(-logits_BxV, axis=-1, stable=True)
  sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  keep_sorted_BxV = mass_before_BxV < p
  # Back to vocabulary order: the inverse permutation of a sort is the argsort of the order.
  keep_BxV = jnp.take_along_axis(keep_sorted_BxV, jnp.argsort(order_BxV, axis=-1), axis=-1)
  return jnp.where(keep_BxV, logits_BxV, -jnp.inf)


def process_logits(logits_BxV: jax.Array, config: SamplingConfig) -> jax.Array:
  """temperature -> top-k -> top-p, in float32."""
  logits_BxV = logits_BxV.astype(jnp.float32) / config.temperature
  logits_BxV = apply_top_k(logits_BxV, config.top_k)
  return apply_top_p(logits_BxV, config.top_p)
