"""Building blocks of the decoder: norms, rotary embedding, attention, MLP.

Shapes: B batch, T query length, S key length (cache slots), D d_model, N query heads, K kv heads,
G = N // K query heads per kv head, H head_dim, F d_ff, V vocab. Every parameter is created with its
logical axis names (see BUILD_NOTES: `vocab embed mlp heads kv_heads head_dim layers`) and stored in
`param_dtype`; matmuls run in `dtype`; norms and softmax run in float32.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models import kv_cache as kv_lib
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.ops import materialize_cotangent, matmul

# A large finite negative instead of -inf: a fully masked row (a padding query) then softmaxes to a
# uniform distribution instead of NaN, and its output is ignored downstream anyway.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """`nn.with_logical_constraint`; a no-op unless logical-axis rules and a mesh are active."""
  return nn.with_logical_constraint(x, axes)


BTD = ("activation_batch", "activation_length", "activation_embed")


def param(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...],
          axes: tuple[str | None, ...], config: ModelConfig) -> jax.Array:
  """Creates a logically partitioned parameter and returns it cast to the compute dtype (with its
  LoRA adapter when the `lora` collection has one: `models.lora.adapt`)."""
  p = module.param(name, nn.with_logical_partitioning(init, axes), shape, config.weight_dtype)
  return lora_lib.adapt(module, name, jnp.asarray(p, config.compute_dtype))


class Norm(nn.Module):
  """LayerNorm  y = (x - mean) / sqrt(var + eps) * scale + bias,  or
  RMSNorm    y = x / sqrt(mean(x^2) + eps) * scale   (x_hat * (1 + scale) when
  `norm_scale_plus_one`, Gemma's stored form),  statistics in float32.

  `features`/`axis` default to the residual width ("embed"); the Qwen3 q/k norms pass head_dim.
  """

  config: ModelConfig
  features: int | None = None
  axis: str = "embed"

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.config
    features = cfg.d_model if self.features is None else self.features
    x = x_BxTxD.astype(jnp.float32)
    if cfg.norm == "layernorm":
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
    scale_init = nn.initializers.zeros if cfg.norm_scale_plus_one else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(scale_init, (self.axis,)), (features,),
                       cfg.weight_dtype)
    scale = jnp.asarray(scale, jnp.float32)
    y = y * (1.0 + scale if cfg.norm_scale_plus_one else scale)
    if cfg.norm == "layernorm":
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis,)),
                        (features,), cfg.weight_dtype)
      y = y + jnp.asarray(bias, jnp.float32)
    return y.astype(cfg.compute_dtype)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float = 10_000.0,
               inv_freq_H2: Any = None) -> jax.Array:
  """Rotary embedding, "rotate-half" convention (Hugging Face Llama / GPT-NeoX layout):

    x = [x1, x2] (halves of H),  angle_i = pos * inv_freq_i  (inv_freq_i = theta^(-2i/H) unless
    given, e.g. `ModelConfig.rope_inv_freq()` with llama3 scaling),
    rope(x) = [x1 cos - x2 sin,  x2 cos + x1 sin].
  """
  h = x_BxTxNxH.shape[-1]
  if inv_freq_H2 is None:
    inv_freq_H2 = theta**(-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  inv_freq_H2 = jnp.asarray(inv_freq_H2, jnp.float32)
  angle_BxTxH2 = positions_BxT.astype(jnp.float32)[:, :, None] * inv_freq_H2
  sin = jnp.sin(angle_BxTxH2)[:, :, None, :]
  cos = jnp.cos(angle_BxTxH2)[:, :, None, :]
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = x[..., :h // 2], x[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """c * tanh(x / c) (Gemma 2's soft-capping, in float32); the identity when cap is None."""
  if cap is None:
    return x
  return (cap * jnp.tanh(x.astype(jnp.float32) / cap)).astype(x.dtype)


def select_mask(sliding: Any, full: jax.Array | None, window: jax.Array | None) -> jax.Array:
  """The layer's mask: `window` for a sliding layer, else `full`; `sliding` is a Python bool or
  (scanned stack with mixed layer types) a traced per-layer bool."""
  if full is None or window is None or sliding is False or sliding is None:
    return full
  if sliding is True:
    return window
  return jnp.where(sliding, window, full)


class Attention(nn.Module):
  """Causal multi-head / grouped-query / multi-query attention.

    q = x Wq (+bq), k = x Wk (+bk), v = x Wv (+bv);  q, k = rmsnorm_H(q), rmsnorm_H(k) if qk_norm;
    rope(q), rope(k) if position == "rope";
    a = softmax(softcap(s * q k^T) + mask) v  (float32 softmax, s = attn_scale: 1/sqrt(H) or
    query_pre_attn_scalar**-0.5);  out = a Wo (+bo)

  With K < N kv heads, query head n uses kv head n // G (G = N // K), as in Llama / HF `repeat_kv`.

  The keys are the chunk's own T keys plus, when decoding, the S slots of the layer's cache. The
  softmax runs over the concatenated scores [.., T, S + T]; the cached keys/values enter through two
  value einsums, never through a [B, S + T, K, H] concatenation. `chunk_allowed_BxTxT` /
  `cache_allowed_BxTxS` are the causal + padding masks built once per call (the cache part only
  allows slots filled before this chunk). `masks` = (chunk, cache, chunk_window, cache_window): the
  last two are the sliding-window versions (None without a sliding window), `sliding` picks them.

  Two cache modes (both avoid copying the cache inside the sampler's loop, checked in the HLO):
  * `cache_layer is None` (scanned stack): `cache_k`/`cache_v` are this layer's [B, K, S, H] slices,
    only read; the chunk's (k, v) are returned and the transformer writes all layers after the scan.
  * `cache_layer = i` (unrolled stack): `cache_k`/`cache_v` are the whole [L, B, K, S, H] buffers,
    or tuples of L per-layer [B, K, S, H] buffers (what the sampler passes: no slice copy per read).
    The chunk is written at (i, :, :, cache_index) *before* layer i reads its part, so every read of
    a buffer version precedes the next in-place write by data dependency; the updated buffers are
    returned. (Writing after the read lets XLA reorder and forces a full cache copy per step.)
  """

  config: ModelConfig
  cache_layer: int | None = None

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, masks, cache_k=None, cache_v=None, cache_index=None,
               sliding=False):
    cfg = self.config
    chunk_allowed_BxTxT = select_mask(sliding, masks[0], masks[2])
    cache_allowed_BxTxS = select_mask(sliding, masks[1], masks[3])
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.head_size
    init = nn.initializers.normal(cfg.init_std)
    out_init = nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
    wq_DxNxH = param(self, "q_kernel", init, (d, n, h), ("embed", "heads", "head_dim"), cfg)
    wk_DxKxH = param(self, "k_kernel", init, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
    wv_DxKxH = param(self, "v_kernel", init, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
    wo_NxHxD = param(self, "o_kernel", out_init, (n, h, d), ("heads", "head_dim", "embed"), cfg)

    q_BxTxNxH = matmul("BTD,DNH->BTNH", x_BxTxD, wq_DxNxH)
    k_BxTxKxH = matmul("BTD,DKH->BTKH", x_BxTxD, wk_DxKxH)
    v_BxTxKxH = matmul("BTD,DKH->BTKH", x_BxTxD, wv_DxKxH)
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q_BxTxNxH += param(self, "q_bias", zeros, (n, h), ("heads", "head_dim"), cfg)
      k_BxTxKxH += param(self, "k_bias", zeros, (k, h), ("kv_heads", "head_dim"), cfg)
      v_BxTxKxH += param(self, "v_bias", zeros, (k, h), ("kv_heads", "head_dim"), cfg)
    if cfg.qk_norm:
      q_BxTxNxH = Norm(cfg, h, "head_dim", name="q_norm")(q_BxTxNxH)
      k_BxTxKxH = Norm(cfg, h, "head_dim", name="k_norm")(k_BxTxKxH)
    if cfg.position == "rope":
      # Unscaled rope keeps apply_rope's own f32 formula: the default path stays bit-identical to
      # the runs the README reports (rope_inv_freq's 1/theta^x differs from theta^-x in the last
      # ulp).
      inv_freq_H2 = None if cfg.rope_scaling == "none" else cfg.rope_inv_freq()
      q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, inv_freq_H2=inv_freq_H2)
      k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, inv_freq_H2=inv_freq_H2)
    q_BxTxNxH = constrain(q_BxTxNxH,
                          ("activation_batch", "activation_length", "activation_heads", None))
    kv_axes = ("activation_batch", "activation_length", "activation_kv_heads", None)
    k_BxTxKxH = constrain(k_BxTxKxH, kv_axes)
    v_BxTxKxH = constrain(v_BxTxKxH, kv_axes)

    b, t = x_BxTxD.shape[:2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, k, n // k, h)

    def masked_scores(spec, keys, allowed_BxTxS):
      scores = jnp.einsum(spec, q_BxTxKxGxH, keys.astype(cfg.compute_dtype),
                          preferred_element_type=jnp.float32)
      # Dividing by sqrt(H) (not multiplying by its inverse) unless Gemma's query_pre_attn_scalar
      # is set: same bits as before the HF families landed, so published results reproduce.
      scores = (scores / math.sqrt(h) if cfg.query_pre_attn_scalar is None else scores *
                cfg.attn_scale)
      scores = softcap(scores, cfg.attn_logit_softcap)
      return jnp.where(allowed_BxTxS[:, None, None, :, :], scores, _MASK_VALUE)

    scores_BxKxGxTxT = masked_scores("BTKGH,BSKH->BKGTS", k_BxTxKxH, chunk_allowed_BxTxT)
    new_kv = (k_BxTxKxH, v_BxTxKxH)
    if cache_k is not None and self.cache_layer is not None:
      cache_k = kv_lib.write_layer(cache_k, self.cache_layer, k_BxTxKxH, cache_index)
      cache_v = kv_lib.write_layer(cache_v, self.cache_layer, v_BxTxKxH, cache_index)
      new_kv = (cache_k, cache_v)
      cache_k_BxKxSxH, cache_v_BxKxSxH = cache_k[self.cache_layer], cache_v[self.cache_layer]
    else:
      cache_k_BxKxSxH, cache_v_BxKxSxH = cache_k, cache_v
    if cache_allowed_BxTxS is None:  # no cache, or an empty one being filled (prefill)
      probs_BxKxGxTxT = jax.nn.softmax(scores_BxKxGxTxT, axis=-1).astype(cfg.compute_dtype)
      attn_BxTxKxGxH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BxKxGxTxT, v_BxTxKxH)
    else:
      s = cache_k_BxKxSxH.shape[2]
      scores_cache = masked_scores("BTKGH,BKSH->BKGTS", cache_k_BxKxSxH, cache_allowed_BxTxS)
      probs = jax.nn.softmax(jnp.concatenate([scores_cache, scores_BxKxGxTxT], axis=-1), axis=-1)
      probs = probs.astype(cfg.compute_dtype)
      attn_BxTxKxGxH = (jnp.einsum("BKGTS,BKSH->BTKGH", probs[..., :s],
                                   cache_v_BxKxSxH.astype(cfg.compute_dtype)) +
                        jnp.einsum("BKGTS,BSKH->BTKGH", probs[..., s:], v_BxTxKxH))
    attn_BxTxNxH = attn_BxTxKxGxH.reshape(b, t, n, h)
    out_BxTxD = matmul("BTNH,NHD->BTD", attn_BxTxNxH, wo_NxHxD)
    if cfg.out_bias:
      out_BxTxD += param(self, "o_bias", nn.initializers.zeros, (d,), ("embed",), cfg)
    return out_BxTxD, new_kv


def _activation(cfg: ModelConfig) -> Callable[[jax.Array], jax.Array]:
  if cfg.mlp == "gated_silu":
    return jax.nn.silu
  return lambda x: jax.nn.gelu(x, approximate=cfg.gelu_approximate)


class MLP(nn.Module):
  """"gelu": down(act(up x));  "gated_*": down(act(gate x) * up x)  (SwiGLU / GeGLU)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.config
    d, f = cfg.d_model, cfg.d_ff
    init = nn.initializers.normal(cfg.init_std)
    out_init = nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
    zeros = nn.initializers.zeros
    act = _activation(cfg)
    mlp_axes = ("activation_batch", "activation_length", "activation_mlp")

    w_up_DxF = param(self, "up_kernel", init, (d, f), ("embed", "mlp"), cfg)
    up_BxTxF = matmul("BTD,DF->BTF", x_BxTxD, w_up_DxF)
    if cfg.mlp_bias:
      up_BxTxF += param(self, "up_bias", zeros, (f,), ("mlp",), cfg)
    if cfg.mlp.startswith("gated"):
      w_gate_DxF = param(self, "gate_kernel", init, (d, f), ("embed", "mlp"), cfg)
      gate_BxTxF = matmul("BTD,DF->BTF", x_BxTxD, w_gate_DxF)
      if cfg.mlp_bias:
        gate_BxTxF += param(self, "gate_bias", zeros, (f,), ("mlp",), cfg)
      hidden_BxTxF = act(gate_BxTxF) * up_BxTxF
    else:
      hidden_BxTxF = act(up_BxTxF)
    hidden_BxTxF = constrain(hidden_BxTxF, mlp_axes)
    w_down_FxD = param(self, "down_kernel", out_init, (f, d), ("mlp", "embed"), cfg)
    out_BxTxD = matmul("BTF,FD->BTD", hidden_BxTxF, w_down_FxD)
    if cfg.mlp_bias:
      out_BxTxD += param(self, "down_bias", zeros, (d,), ("embed",), cfg)
    return out_BxTxD


class Block(nn.Module):
  """Pre-norm residual block:  x += drop(attn(norm1 x));  x += drop(mlp(norm2 x)).
  With `post_norms` (Gemma 2): x += drop(post_norm1(attn(norm1 x))); x += drop(post_norm2(mlp(..))).

  Signature `(x, layer_cache, side, sliding) -> (x, new_kv)` so that `nn.scan` can carry `x`,
  scan the layer's cache slice (`layer_cache` = (k, v) or None) and its `sliding` flag, and
  broadcast `side` (positions, the masks and the cache index). With `cache_layer` set,
  `layer_cache` is the whole stacked cache (see `Attention`). `new_kv` is None without a cache.
  """

  config: ModelConfig
  deterministic: bool = True
  cache_layer: int | None = None

  @nn.compact
  def __call__(self, x_BxTxD, layer_cache, side, sliding=False):
    cfg = self.config
    positions_BxT, masks, cache_index = side
    cache_k, cache_v = (None, None) if layer_cache is None else layer_cache
    x_BxTxD = materialize_cotangent(constrain(x_BxTxD, BTD))
    attn_BxTxD, new_kv = Attention(cfg, self.cache_layer,
                                   name="attn")(Norm(cfg, name="attn_norm")(x_BxTxD), positions_BxT,
                                                masks, cache_k, cache_v, cache_index, sliding)
    if cfg.post_norms:
      attn_BxTxD = Norm(cfg, name="post_attn_norm")(attn_BxTxD)
    x_BxTxD = x_BxTxD + nn.Dropout(cfg.dropout_rate)(attn_BxTxD, deterministic=self.deterministic)
    mlp_BxTxD = MLP(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x_BxTxD))
    if cfg.post_norms:
      mlp_BxTxD = Norm(cfg, name="post_mlp_norm")(mlp_BxTxD)
    x_BxTxD = x_BxTxD + nn.Dropout(cfg.dropout_rate)(mlp_BxTxD, deterministic=self.deterministic)
    if cache_index is None:  # no cache (training / scoring): nothing to hand back
      new_kv = None
    return constrain(x_BxTxD, BTD), new_kv


def remat_policy(name: str) -> Any:
  """Maps ModelConfig.remat_policy to a `jax.checkpoint` policy (None: save nothing)."""
  return {
      "full": None,
      "dots_saveable": jax.checkpoint_policies.dots_saveable,
      "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
      "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,}[name]
