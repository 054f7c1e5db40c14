"""Key/value cache for incremental decoding.

Layout: one cache for the whole stack,

  k_LxBxKxSxH, v_LxBxKxSxH   S = cache slots (prompt length + new tokens), K = kv heads; either one
                             array stacked over layers, or a tuple of L per-layer [B, K, S, H]
                             arrays (`split_layers`, what the sampler carries for the unrolled stack)
  mask_BxS                   1 where a slot holds a real token, 0 for padding / empty slots
  index                      int32 scalar: slots [0, index) are filled, the next chunk goes at index

Slots are filled left to right in time order, so causality is a comparison of slot numbers: the
query written at slot `index + t` may attend to slot j iff j <= index + t and mask_BxS[:, j] == 1.
Left-padded prompts therefore need no special casing: the padding slots are simply masked.
Positions (for rope / learned tables) are counted in real tokens, not slots:
`position = (real tokens already in the cache) + cumsum(chunk_mask) - 1`.

Why [.., B, K, S, H] (kv heads before slots): the attention einsums batch over (B, K), so each
layer's keys and values are already in the operand layout XLA's batched matmul wants. With the
earlier [L, B, S, K, H] layout XLA:CPU wrote a transposed copy of every layer's keys and values in
every decode step (20% of a gpt2 decode step). `k_LxBxSxKxH` / `v_LxBxSxKxH` remain as read-only
properties giving the old layout.

Why per-layer arrays for the unrolled stack: reading layer i of a stacked buffer is a slice, and
XLA:CPU materialises the slice before the attention matmul reads it, i.e. copies the whole cache
once per decode step (another ~12% of a gpt2 decode step). Separate per-layer buffers are read in
place. The scanned stack keeps the stacked form (scan `xs`; the chunk is written for every layer
with one `dynamic_update_slice` after the scan). Either way XLA updates the loop-carried buffers in
place inside the sampler's `lax.while_loop`: the compiled decode step contains no copy of the cache
(checked on the HLO in tests/test_sampling.py).
"""

from __future__ import annotations

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig

Buffers = Union[jax.Array, tuple]  # [L, B, K, S, H], or L arrays [B, K, S, H]


class KVCache(NamedTuple):
  k_LxBxKxSxH: Buffers
  v_LxBxKxSxH: Buffers
  mask_BxS: jax.Array
  index: jax.Array

  @property
  def num_slots(self) -> int:
    return self.mask_BxS.shape[1]

  @property
  def is_split(self) -> bool:
    return isinstance(self.k_LxBxKxSxH, (tuple, list))

  @property
  def k_LxBxSxKxH(self) -> jax.Array:
    """Keys in the pre-2026-11-22 [L, B, S, K, H] layout (a transposed copy, for reading only)."""
    return jnp.swapaxes(stack_layers(self).k_LxBxKxSxH, 2, 3)

  @property
  def v_LxBxSxKxH(self) -> jax.Array:
    """Values in the pre-2026-11-22 [L, B, S, K, H] layout (a transposed copy, for reading only)."""
    return jnp.swapaxes(stack_layers(self).v_LxBxKxSxH, 2, 3)


def init_cache(config: ModelConfig, batch_size: int, num_slots: int, dtype=None) -> KVCache:
  """An empty (stacked) cache of `num_slots` slots per row; k/v in `dtype` (default: config.dtype)."""
  dtype = config.compute_dtype if dtype is None else dtype
  shape = (config.n_layers, batch_size, config.num_kv_heads, num_slots, config.head_size)
  return KVCache(
      k_LxBxKxSxH=jnp.zeros(shape, dtype),
      v_LxBxKxSxH=jnp.zeros(shape, dtype),
      mask_BxS=jnp.zeros((batch_size, num_slots), jnp.int32),
      index=jnp.zeros((), jnp.int32),
  )


def split_layers(cache: KVCache) -> KVCache:
  """The same cache with k and v as tuples of per-layer [B, K, S, H] arrays (no-op if split)."""
  if cache.is_split:
    return cache
  split = lambda buf: tuple(buf[i] for i in range(buf.shape[0]))
  return cache._replace(k_LxBxKxSxH=split(cache.k_LxBxKxSxH), v_LxBxKxSxH=split(cache.v_LxBxKxSxH))


def stack_layers(cache: KVCache) -> KVCache:
  """The same cache with k and v stacked into [L, B, K, S, H] arrays (no-op if stacked)."""
  if not cache.is_split:
    return cache
  return cache._replace(k_LxBxKxSxH=jnp.stack(cache.k_LxBxKxSxH),
                        v_LxBxKxSxH=jnp.stack(cache.v_LxBxKxSxH))


def write_layer(buffers: Buffers, layer: int, chunk_BxTxKxH: jax.Array,
                index: jax.Array) -> Buffers:
  """Writes one layer's chunk of T keys (or values) at slots [index, index + T)."""
  chunk_BxKxTxH = jnp.swapaxes(chunk_BxTxKxH, 1, 2)
  if isinstance(buffers, (tuple, list)):
    buf_BxKxSxH = buffers[layer]
    new = jax.lax.dynamic_update_slice(buf_BxKxSxH, chunk_BxKxTxH.astype(buf_BxKxSxH.dtype),
                                       (0, 0, index, 0))
    return tuple(new if i == layer else b for i, b in enumerate(buffers))
  chunk_1xBxKxTxH = chunk_BxKxTxH[None].astype(buffers.dtype)
  return jax.lax.dynamic_update_slice(buffers, chunk_1xBxKxTxH, (layer, 0, 0, index, 0))


def advance(cache: KVCache, mask_BxT: jax.Array) -> KVCache:
  """Records the chunk's padding mask at [index, index + T) and moves the index past it."""
  mask = jax.lax.dynamic_update_slice(cache.mask_BxS, mask_BxT.astype(jnp.int32), (0, cache.index))
  return cache._replace(mask_BxS=mask, index=cache.index + mask_BxT.shape[1])


def write_chunk(cache: KVCache, k_LxBxTxKxH: jax.Array, v_LxBxTxKxH: jax.Array,
                mask_BxT: jax.Array) -> KVCache:
  """Writes a chunk of T new slots for every layer at `cache.index` and advances the index.

  (Used by the scanned stack, whose cache is stacked.)"""
  cache = stack_layers(cache)
  i = cache.index
  k_LxBxKxTxH = jnp.swapaxes(k_LxBxTxKxH, 2, 3).astype(cache.k_LxBxKxSxH.dtype)
  v_LxBxKxTxH = jnp.swapaxes(v_LxBxTxKxH, 2, 3).astype(cache.v_LxBxKxSxH.dtype)
  k = jax.lax.dynamic_update_slice(cache.k_LxBxKxSxH, k_LxBxKxTxH, (0, 0, 0, i, 0))
  v = jax.lax.dynamic_update_slice(cache.v_LxBxKxSxH, v_LxBxKxTxH, (0, 0, 0, i, 0))
  return advance(cache._replace(k_LxBxKxSxH=k, v_LxBxKxSxH=v), mask_BxT)
