"""Key/value cache for incremental decoding.

Layout: one cache for the whole stack, keys and values stacked over layers,

  k_LxBxSxKxH, v_LxBxSxKxH   S = cache slots (prompt length + new tokens), K = kv heads
  mask_BxS                   1 where a slot holds a real token, 0 for padding / empty slots
  index                      int32 scalar: slots [0, index) are filled, the next chunk goes at index

Slots are filled left to right in time order, so causality is a comparison of slot numbers: the
query written at slot `index + t` may attend to slot j iff j <= index + t and mask_BxS[:, j] == 1.
Left-padded prompts therefore need no special casing: the padding slots are simply masked.
Positions (for rope / learned tables) are counted in real tokens, not slots:
`position = (real tokens already in the cache) + cumsum(chunk_mask) - 1`.

The layer-stacked layout serves both the scanned and the unrolled stack, and lets the transformer
write a whole chunk for every layer with one `dynamic_update_slice` on the loop-carried buffer (which
XLA performs in place inside `lax.while_loop`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig


class KVCache(NamedTuple):
  k_LxBxSxKxH: jax.Array
  v_LxBxSxKxH: jax.Array
  mask_BxS: jax.Array
  index: jax.Array

  @property
  def num_slots(self) -> int:
    return self.mask_BxS.shape[1]


def init_cache(config: ModelConfig, batch_size: int, num_slots: int, dtype=None) -> KVCache:
  """An empty cache with `num_slots` slots per row (keys/values in `dtype`, default config.dtype)."""
  dtype = config.compute_dtype if dtype is None else dtype
  shape = (config.n_layers, batch_size, num_slots, config.num_kv_heads, config.head_size)
  return KVCache(
      k_LxBxSxKxH=jnp.zeros(shape, dtype),
      v_LxBxSxKxH=jnp.zeros(shape, dtype),
      mask_BxS=jnp.zeros((batch_size, num_slots), jnp.int32),
      index=jnp.zeros((), jnp.int32),
  )


def write_chunk(cache: KVCache, k_LxBxTxKxH: jax.Array, v_LxBxTxKxH: jax.Array,
                mask_BxT: jax.Array) -> KVCache:
  """Writes a chunk of T new slots for every layer at `cache.index` and advances the index."""
  i = cache.index
  k = jax.lax.dynamic_update_slice(cache.k_LxBxSxKxH, k_LxBxTxKxH.astype(cache.k_LxBxSxKxH.dtype),
                                   (0, 0, i, 0, 0))
  v = jax.lax.dynamic_update_slice(cache.v_LxBxSxKxH, v_LxBxTxKxH.astype(cache.v_LxBxSxKxH.dtype),
                                   (0, 0, i, 0, 0))
  mask = jax.lax.dynamic_update_slice(cache.mask_BxS, mask_BxT.astype(jnp.int32), (0, i))
  return KVCache(k, v, mask, i + mask_BxT.shape[1])
