"""`Transformer`: the one decoder every method uses (policy, reference, reward and value backbones).

  model = Transformer(get_model_config("tiny"))
  variables = model.init(rng, tokens_BxT, mask_BxT)            # boxed (logically partitioned)
  out = model.apply(variables, tokens_BxT, mask_BxT)           # TransformerOutput
  out.logits_BxTxV, out.hidden_BxTxD, out.cache

Masks and positions. `mask_BxT` is 1 for real tokens and 0 for padding, on either side (or both: a
left-padded prompt followed by a right-padded response). Token t may attend to token s iff s <= t
and mask[s] == 1. Positions count real tokens: `positions = clip(cumsum(mask) - 1, 0)`, so a
left-padded row gets exactly the positions (and log-probs) of the same row right-padded. With a
cache, the real tokens already in it are added to the count (see `kv_cache.py`).

Parameter tree: `embedding [V, D]`, `pos_embedding [max_seq_len, D]` (learned positions only),
`layers_0 .. layers_{L-1}` (or one `layers` subtree with a leading L axis when `scan_layers`),
`final_norm`, `lm_head [D, V]` (untied only).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models import kv_cache as kv_lib
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import BTD, Block, Norm, constrain, matmul, remat_policy, softcap


class TransformerOutput(NamedTuple):
  logits_BxTxV: jax.Array | None  # in config.dtype; None when return_logits=False
  hidden_BxTxD: jax.Array  # after the final norm
  cache: kv_lib.KVCache | None  # the updated cache when one was passed in


def default_positions(mask_BxT: jax.Array, cache: kv_lib.KVCache | None = None) -> jax.Array:
  """positions = clip(prior + cumsum(mask) - 1, 0), prior = real tokens already in the cache."""
  mask_BxT = mask_BxT.astype(jnp.int32)
  prior_Bx1 = 0 if cache is None else jnp.sum(cache.mask_BxS, axis=1, keepdims=True)
  return jnp.maximum(prior_Bx1 + jnp.cumsum(mask_BxT, axis=1) - 1, 0)


def attention_masks(mask_BxT: jax.Array, cache: kv_lib.KVCache | None = None,
                    positions_BxT: jax.Array | None = None,
                    sliding_window: int | None = None) -> tuple[Any, Any, Any, Any]:
  """Boolean masks of the keys each query may attend to:
  (chunk_allowed_BxTxT, cache_allowed_BxTxS, chunk_window_BxTxT, cache_window_BxTxS).

  chunk_allowed_BxTxT[b, t, s] = (s <= t) & mask[b, s], or s == t;
  cache_allowed_BxTxS[b, t, j] = (j < cache.index) & cache.mask[b, j]  (None without a cache).
  The window masks (None without `sliding_window` W) also need pos[b, t] - pos_key < W, where a
  key's position is counted in real tokens like the queries' (`default_positions`), so padding
  never uses up the window.

  The diagonal term only changes padding queries (a real query's own token is real): they attend to
  themselves instead of having an all-masked row, so every row stays causal and finite.
  """
  t = mask_BxT.shape[1]
  pos_T = jnp.arange(t)
  causal_TxT = pos_T[None, :] <= pos_T[:, None]
  diag_1xTxT = (pos_T[None, :] == pos_T[:, None])[None]
  chunk_allowed_BxTxT = (causal_TxT[None] & (mask_BxT[:, None, :] > 0)) | diag_1xTxT
  chunk_window_BxTxT = cache_window_BxTxS = None
  if sliding_window is not None:
    if positions_BxT is None:
      positions_BxT = default_positions(mask_BxT, cache)
    near_BxTxT = positions_BxT[:, :, None] - positions_BxT[:, None, :] < sliding_window
    chunk_window_BxTxT = (chunk_allowed_BxTxT & near_BxTxT) | diag_1xTxT
  if cache is None:
    return chunk_allowed_BxTxT, None, chunk_window_BxTxT, None
  filled_S = jnp.arange(cache.num_slots) < cache.index
  cache_allowed_BxS = filled_S[None, :] & (cache.mask_BxS > 0)
  shape = (mask_BxT.shape[0], t, cache.num_slots)
  cache_allowed_BxTxS = jnp.broadcast_to(cache_allowed_BxS[:, None, :], shape)
  if sliding_window is not None:
    key_pos_BxS = jnp.cumsum(cache.mask_BxS, axis=1) - 1
    near_BxTxS = positions_BxT[:, :, None] - key_pos_BxS[:, None, :] < sliding_window
    cache_window_BxTxS = cache_allowed_BxTxS & near_BxTxS
  return chunk_allowed_BxTxT, cache_allowed_BxTxS, chunk_window_BxTxT, cache_window_BxTxS


class Transformer(nn.Module):
  """Decoder-only transformer configured by `ModelConfig` (see config.py for the options)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, mask_BxT: jax.Array | None = None, *,
               positions_BxT: jax.Array | None = None, cache: kv_lib.KVCache | None = None,
               prefill: bool = False, return_logits: bool = True, last_logits_only: bool = False,
               deterministic: bool = True) -> TransformerOutput:
    """Runs the decoder.

    Args:
      tokens_BxT: int token ids.
      mask_BxT: 1 real / 0 padding; defaults to all ones.
      positions_BxT: overrides the mask-derived positions.
      cache: a `KVCache`; the chunk is written at `cache.index` and attends to everything before.
      prefill: promise that `cache` is empty (index 0): the chunk is written but the cache is not
        read, saving the attention over S empty slots (and XLA's constant folding of it).
      return_logits: False skips the [B, T, V] projection (reward / value heads use hidden states).
      last_logits_only: logits for the last column only ([B, 1, V]); the sampler's prefill.
      deterministic: False enables dropout (needs a "dropout" rng).
    """
    cfg = self.config
    if mask_BxT is None:
      mask_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
    mask_BxT = mask_BxT.astype(jnp.int32)
    if positions_BxT is None:
      positions_BxT = default_positions(mask_BxT, cache)

    embedding_VxD = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), cfg.weight_dtype)
    x_BxTxD = jnp.take(embedding_VxD, tokens_BxT, axis=0).astype(cfg.compute_dtype)
    if cfg.scale_embeddings:
      x_BxTxD = x_BxTxD * jnp.asarray(math.sqrt(cfg.d_model), cfg.compute_dtype)
    if cfg.position == "learned":
      pos_table_PxD = self.param(
          "pos_embedding",
          nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), (None, "embed")),
          (cfg.max_seq_len, cfg.d_model), cfg.weight_dtype)
      x_BxTxD = x_BxTxD + jnp.take(pos_table_PxD, positions_BxT, axis=0).astype(cfg.compute_dtype)
    x_BxTxD = nn.Dropout(cfg.dropout_rate)(x_BxTxD, deterministic=deterministic)
    x_BxTxD = constrain(x_BxTxD, BTD)

    cache_index = None if cache is None else cache.index
    masks = attention_masks(mask_BxT, cache, positions_BxT, cfg.sliding_window)
    if prefill:  # nothing to read: Attention skips the cache part
      masks = (masks[0], None, masks[2], None)
    side = (positions_BxT, masks, cache_index)
    sliding_L = [cfg.layer_is_sliding(i) for i in range(cfg.n_layers)]
    block_cls = Block
    if cfg.remat_policy != "none":
      # prevent_cse only matters outside scan (scan already blocks CSE across iterations).
      block_cls = nn.remat(Block, policy=remat_policy(cfg.remat_policy),
                           prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      cache = None if cache is None else kv_lib.stack_layers(cache)
      layer_caches = None if cache is None or prefill else (cache.k_LxBxKxSxH, cache.v_LxBxKxSxH)
      # One layer type for all: a static flag; mixed (Gemma 2): a scanned per-layer bool.
      mixed = len(set(sliding_L)) > 1
      flags = jnp.asarray(sliding_L) if mixed else sliding_L[0]
      blocks = nn.scan(block_cls, variable_axes={"params": 0, "lora": 0},
                       split_rngs={"params": True, "dropout": True, "lora_dropout": True},
                       in_axes=(0, nn.broadcast, 0 if mixed else nn.broadcast), out_axes=0,
                       length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxTxD, new_kv_LxBxTxKxH = blocks(cfg, deterministic, name="layers")(x_BxTxD, layer_caches,
                                                                            side, flags)
    else:
      buffers = None if cache is None else (cache.k_LxBxKxSxH, cache.v_LxBxKxSxH)
      for i in range(cfg.n_layers):
        x_BxTxD, new_kv = block_cls(cfg, deterministic, None if cache is None else i,
                                    name=f"layers_{i}")(x_BxTxD, buffers, side, sliding_L[i])
        buffers = None if cache is None else new_kv  # written in place, layer by layer
    hidden_BxTxD = Norm(cfg, name="final_norm")(x_BxTxD)

    new_cache = None
    if cache is not None and cfg.scan_layers:
      new_cache = kv_lib.write_chunk(cache, *new_kv_LxBxTxKxH, mask_BxT)
    elif cache is not None:
      new_cache = kv_lib.advance(cache._replace(k_LxBxKxSxH=buffers[0], v_LxBxKxSxH=buffers[1]),
                                 mask_BxT)

    logits_BxTxV = None
    if return_logits:
      h_BxTxD = hidden_BxTxD[:, -1:] if last_logits_only else hidden_BxTxD
      if cfg.tie_embeddings:
        logits_BxTxV = matmul("BTD,VD->BTV", h_BxTxD, embedding_VxD.astype(cfg.compute_dtype))
      else:
        lm_head_DxV = self.param(
            "lm_head",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
            (cfg.d_model, cfg.vocab_size), cfg.weight_dtype)
        logits_BxTxV = matmul("BTD,DV->BTV", h_BxTxD, lm_head_DxV.astype(cfg.compute_dtype))
      logits_BxTxV = softcap(logits_BxTxV, cfg.final_logit_softcap)
      logits_BxTxV = constrain(logits_BxTxV,
                               ("activation_batch", "activation_length", "activation_vocab"))
    return TransformerOutput(logits_BxTxV, hidden_BxTxD, new_cache)


def stack_layer_params(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
  """Unrolled tree (`layers_0..layers_{L-1}`) -> scanned tree (`layers` with a leading L axis).

  Works on unboxed trees (plain arrays)."""
  params = dict(params)
  per_layer = [params.pop(f"layers_{i}") for i in range(n_layers)]
  params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  return params


def unstack_layer_params(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
  """Scanned tree -> unrolled tree (inverse of `stack_layer_params`)."""
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(n_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params
