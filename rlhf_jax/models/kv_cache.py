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

The layer-stacked layout serves both the scanned stack (the chunk is written for every layer with
one `dynamic_update_slice` after the scan) and the unrolled one (layer i writes its chunk into the
stacked buffer just before reading its own slice; see `layers.Attention`). Either way XLA updates
the loop-carried buffer in place inside the sampler's `lax.while_loop`: the compiled decode step
contains no copy of the cache.
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
  """An empty cache of `num_slots` slots per row; k/v in `dtype` (default: config.dtype)."""
  dtype = config.compute_dtype if dtype is None else dtype
  shape = (config.n_layers, batch_size, num_slots, config.num_kv_heads, config.head_size)
  return KVCache(
      k_LxBxSxKxH=jnp.zeros(shape, dtype),
      v_LxBxSxKxH=jnp.zeros(shape, dtype),
      mask_BxS=jnp.zeros((batch_size, num_slots), jnp.int32),
      index=jnp.zeros((), jnp.int32),
  )


def write_layer(buf_LxBxSxKxH: jax.Array, layer: int, chunk_BxTxKxH: jax.Array,
                index: jax.Array) -> jax.Array:
  """Writes one layer's chunk of T keys (or values) at slots [index, index + T)."""
  chunk_1xBxTxKxH = chunk_BxTxKxH[None].astype(buf_LxBxSxKxH.dtype)
  return jax.lax.dynamic_update_slice(buf_LxBxSxKxH, chunk_1xBxTxKxH, (layer, 0, index, 0, 0))


def advance(cache: KVCache, mask_BxT: jax.Array) -> KVCache:
  """Records the chunk's padding mask at [index, index + T) and moves the index past it."""
  mask = jax.lax.dynamic_update_slice(cache.mask_BxS, mask_BxT.astype(jnp.int32),
                                      (0, cache.index))
  return cache._replace(mask_BxS=mask, index=cache.index + mask_BxT.shape[1])


def write_chunk(cache: KVCache, k_LxBxTxKxH: jax.Array, v_LxBxTxKxH: jax.Array,
                mask_BxT: jax.Array) -> KVCache:
  """Writes a chunk of T new slots for every layer at `cache.index` and advances the index."""
  i = cache.index
  k = jax.lax.dynamic_update_slice(cache.k_LxBxSxKxH, k_LxBxTxKxH.astype(cache.k_LxBxSxKxH.dtype),
                                   (0, 0, i, 0, 0))
  v = jax.lax.dynamic_update_slice(cache.v_LxBxSxKxH, v_LxBxTxKxH.astype(cache.v_LxBxSxKxH.dtype),
                                   (0, 0, i, 0, 0))
  return advance(cache._replace(k_LxBxSxKxH=k, v_LxBxSxKxH=v), mask_BxT)
