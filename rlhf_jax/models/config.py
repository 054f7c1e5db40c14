"""`ModelConfig`: one frozen, validated description of every decoder the library builds.

The same `Transformer` expresses GPT-2 (learned positions, LayerNorm, tanh-GELU MLP, biases
everywhere, tied embeddings) and the Llama / Qwen2 / Gemma family (rotary positions, RMSNorm,
gated SiLU/GELU MLP, grouped-query attention, optional QKV bias, optional sqrt(d_model) embedding
scale). Presets live in `PRESETS`; `get_model_config(preset, **overrides)` is the public entry.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

POSITION_TYPES = ("learned", "rope")
NORM_TYPES = ("layernorm", "rmsnorm")
MLP_TYPES = ("gelu", "gated_silu", "gated_gelu")
DTYPES = ("float32", "bfloat16", "float16")
# "none": no rematerialisation. "full": save only the block inputs, recompute everything in the
# backward pass. "dots_saveable": keep every matmul output, recompute the elementwise ops.
# "dots_with_no_batch_dims_saveable" (alias "minimal"): keep only matmuls without batch dims
# (the weight projections), recompute the attention score/value einsums too.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "minimal")
# Rotary frequency scalings (Hugging Face `rope_type`): "linear" divides every frequency by the
# factor; "llama3" (Llama 3.1+) divides only the low frequencies, interpolating the middle band.
ROPE_SCALINGS = ("none", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer hyper-parameters.

  Attributes:
    vocab_size: number of token ids (the byte tokenizer needs ~259).
    d_model: residual stream width D.
    n_layers: number of blocks L.
    n_heads: query heads N.
    n_kv_heads: key/value heads K (K == N: multi-head, 1 < K < N: grouped-query,
      K == 1: multi-query).
      `None` means K = N.
    head_dim: per-head width H; `None` derives it as d_model // n_heads (then d_model must divide).
    d_ff: MLP hidden width F.
    max_seq_len: longest sequence (size of the learned position table; a sanity bound for rope).
    position: "learned" (GPT-2 absolute table) or "rope" (rotary, applied to q and k).
    rope_theta: rotary base frequency.
    norm: "layernorm" (scale + bias) or "rmsnorm" (scale only). Pre-norm blocks plus a final norm.
    norm_eps: epsilon inside the norm's rsqrt.
    mlp: "gelu" (up -> GELU -> down), "gated_silu" (SwiGLU), "gated_gelu" (GeGLU).
    gelu_approximate: tanh-approximate GELU (GPT-2's "gelu_new", Gemma's gelu_pytorch_tanh).
    tie_embeddings: logits use the input embedding table (no separate `lm_head`).
    qkv_bias: biases on the q/k/v projections (GPT-2, Qwen2).
    out_bias: bias on the attention output projection (GPT-2).
    mlp_bias: biases on the MLP projections (GPT-2).
    scale_embeddings: multiply token embeddings by sqrt(d_model) (Gemma).
    dropout_rate: dropout on the embeddings and on each residual branch output (train only).
    dtype: activation / compute dtype. Softmax, norms and log-probs always run in float32.
    param_dtype: storage dtype of the parameters.
    init_std: stddev of the normal initialiser for embeddings and projection kernels.
    scan_layers: stack the blocks with `nn.scan` (params gain a leading `layers` axis; compile time
      independent of depth). Numerics are identical to the unrolled stack.
    remat_policy: one of REMAT_POLICIES; gradient checkpointing of each block.
    norm_scale_plus_one: RMSNorm as x_hat * (1 + w) with the stored w (Gemma 1/2); the parameter
      keeps the checkpoint's value, so a save is bit-exact and bf16 loses nothing near w = 0.
    qk_norm: RMSNorm over head_dim on q and k before rope (Qwen3), params `q_norm` / `k_norm`.
    post_norms: Gemma 2's sandwich norms: each branch output is normed again before the residual
      add (`post_attn_norm`, `post_mlp_norm`).
    attn_logit_softcap: scores = c * tanh(scores / c) before the mask (Gemma 2); None: off.
    final_logit_softcap: logits = c * tanh(logits / c) (Gemma 2); None: off.
    query_pre_attn_scalar: attention scale s**-0.5 instead of head_dim**-0.5 (Gemma 2); None: off.
    sliding_window: W: a query at position p sees keys at positions p - W < q <= p (positions
      count real tokens, as Hugging Face's `kv_idx > q_idx - W` on contiguous rows); None: off.
    layer_types: per-layer "full_attention" / "sliding_attention" (Gemma 2 alternates, Qwen2's
      max_window_layers); None: every layer slides when sliding_window is set.
    rope_scaling: one of ROPE_SCALINGS, with rope_scaling_factor, rope_low_freq_factor,
      rope_high_freq_factor and rope_original_max_len (Hugging Face's `factor`, `low_freq_factor`,
      `high_freq_factor`, `original_max_position_embeddings`).
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int
  max_seq_len: int
  n_kv_heads: int | None = None
  head_dim: int | None = None
  position: str = "rope"
  rope_theta: float = 10_000.0
  norm: str = "rmsnorm"
  norm_eps: float = 1e-6
  mlp: str = "gated_silu"
  gelu_approximate: bool = True
  tie_embeddings: bool = True
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  scale_embeddings: bool = False
  dropout_rate: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02
  scan_layers: bool = False
  remat_policy: str = "none"
  norm_scale_plus_one: bool = False
  qk_norm: bool = False
  post_norms: bool = False
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  query_pre_attn_scalar: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192

  def __post_init__(self):
    if isinstance(self.layer_types, list):  # configs from JSON / ml_collections: keep it hashable
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
      _check_positive_int(name, getattr(self, name))
    for name in ("n_kv_heads", "head_dim"):
      if getattr(self, name) is not None:
        _check_positive_int(name, getattr(self, name))
    for name, allowed in (("position", POSITION_TYPES), ("norm", NORM_TYPES), ("mlp", MLP_TYPES),
                          ("dtype", DTYPES), ("param_dtype", DTYPES), ("remat_policy",
                                                                       REMAT_POLICIES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is not one of {allowed}")
    if self.head_dim is None and self.d_model % self.n_heads != 0:
      raise ValueError(
          f"ModelConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads} when "
          "head_dim is derived (head_dim=None); set head_dim explicitly or change d_model/n_heads")
    if self.n_heads % self.num_kv_heads != 0:
      raise ValueError(f"ModelConfig.n_heads={self.n_heads} must be a multiple of n_kv_heads="
                       f"{self.num_kv_heads}; allowed n_kv_heads are the divisors of n_heads: "
                       f"{[k for k in range(1, self.n_heads + 1) if self.n_heads % k == 0]}")
    if self.position == "rope" and self.head_size % 2 != 0:
      raise ValueError(f"ModelConfig.head_dim={self.head_size} must be even for rope positions")
    if not self.rope_theta > 0:
      raise ValueError(f"ModelConfig.rope_theta={self.rope_theta} must be > 0")
    if not self.norm_eps > 0:
      raise ValueError(f"ModelConfig.norm_eps={self.norm_eps} must be > 0")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"ModelConfig.dropout_rate={self.dropout_rate} must be in [0, 1)")
    if not self.init_std > 0:
      raise ValueError(f"ModelConfig.init_std={self.init_std} must be > 0")
    for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
      value = getattr(self, name)
      if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"ModelConfig.{name}={value!r} must be None (off) or a number > 0")
    if self.sliding_window is not None:
      _check_positive_int("sliding_window", self.sliding_window)
    if self.layer_types is not None:
      if len(self.layer_types) != self.n_layers or any(
          t not in LAYER_TYPES for t in self.layer_types):
        raise ValueError(f"ModelConfig.layer_types={self.layer_types!r} must list n_layers="
                         f"{self.n_layers} entries, each one of {LAYER_TYPES}")
      if "sliding_attention" in self.layer_types and self.sliding_window is None:
        raise ValueError("ModelConfig.layer_types has sliding_attention layers but "
                         "sliding_window=None; set sliding_window")
    for name in ("norm_scale_plus_one", "qk_norm", "post_norms"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} must be a bool")
    if self.norm_scale_plus_one and self.norm != "rmsnorm":
      raise ValueError("ModelConfig.norm_scale_plus_one=True needs norm='rmsnorm', got "
                       f"{self.norm!r}")
    if self.rope_scaling not in ROPE_SCALINGS:
      raise ValueError(f"ModelConfig.rope_scaling={self.rope_scaling!r} is not one of "
                       f"{ROPE_SCALINGS}")
    if self.rope_scaling != "none":
      if self.position != "rope":
        raise ValueError(f"ModelConfig.rope_scaling={self.rope_scaling!r} needs position='rope'")
      if not self.rope_scaling_factor > 0:
        raise ValueError(f"ModelConfig.rope_scaling_factor={self.rope_scaling_factor} must be > 0")
    if self.rope_scaling == "llama3":
      if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
        raise ValueError(
            f"ModelConfig.rope_low_freq_factor={self.rope_low_freq_factor} and "
            f"rope_high_freq_factor={self.rope_high_freq_factor} must satisfy 0 < low < high")
      _check_positive_int("rope_original_max_len", self.rope_original_max_len)

  def layer_is_sliding(self, layer: int) -> bool:
    """Whether block `layer` uses the sliding-window mask."""
    if self.sliding_window is None:
      return False
    return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

  @property
  def attn_scale(self) -> float:
    """Multiplier of q.k: query_pre_attn_scalar**-0.5 if set, else head_dim**-0.5."""
    return (self.query_pre_attn_scalar or self.head_size)**-0.5

  def rope_inv_freq(self) -> np.ndarray:
    """Rotary inverse frequencies [H/2] (float32), as Hugging Face's ROPE_INIT_FUNCTIONS give them:

      inv_freq_i = 1 / theta^(2i/H);  "linear": inv_freq / factor;
      "llama3": wavelen = 2 pi / inv_freq; wavelen > L / low: inv_freq / factor; wavelen < L / high:
      unchanged; between: (1 - s) inv_freq / factor + s inv_freq, s = (L / wavelen - low) /
      (high - low), L = rope_original_max_len.
    """
    h = self.head_size
    inv = 1.0 / (self.rope_theta**(np.arange(0, h, 2, dtype=np.float32) / np.float32(h)))
    inv = inv.astype(np.float32)
    factor = self.rope_scaling_factor
    if self.rope_scaling == "linear":
      inv = inv / np.float32(factor)
    elif self.rope_scaling == "llama3":
      old, low, high = self.rope_original_max_len, self.rope_low_freq_factor, \
          self.rope_high_freq_factor
      wavelen = 2 * math.pi / inv
      scaled = np.where(wavelen > old / low, inv / factor, inv)
      smooth = (old / wavelen - low) / (high - low)
      smoothed = (1 - smooth) * scaled / factor + smooth * scaled
      medium = ~(wavelen < old / high) & ~(wavelen > old / low)
      inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)

  @property
  def num_kv_heads(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def head_size(self) -> int:
    return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> Any:
    return jnp.dtype(self.param_dtype)

  def replace(self, **overrides) -> "ModelConfig":
    return dataclasses.replace(self, **overrides)

  def num_params(self) -> int:
    """Parameter count (embeddings included), computed from the shapes alone."""
    d, f, n, k, h = self.d_model, self.d_ff, self.n_heads, self.num_kv_heads, self.head_size
    norm = 2 * d if self.norm == "layernorm" else d
    attn = d * n * h + 2 * d * k * h + n * h * d + (2 * h if self.qk_norm else 0)
    if self.qkv_bias:
      attn += n * h + 2 * k * h
    if self.out_bias:
      attn += d
    n_up = 2 if self.mlp.startswith("gated") else 1
    mlp = n_up * d * f + f * d + ((n_up * f + d) if self.mlp_bias else 0)
    block_norms = 4 if self.post_norms else 2
    total = self.n_layers * (attn + mlp + block_norms * norm) + norm + self.vocab_size * d
    if self.position == "learned":
      total += self.max_seq_len * d
    if not self.tie_embeddings:
      total += d * self.vocab_size
    return total


def _check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"ModelConfig.{name}={value!r} must be a positive int")


PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: every code path (rope, rmsnorm, gated MLP, GQA) at the smallest useful size.
    "tiny": dict(vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                 max_seq_len=256, position="rope", norm="rmsnorm", mlp="gated_silu",
                 tie_embeddings=True),
    # The synthetic-task default: ~1.6M params with the byte tokenizer, trains on 2 CPU cores in
    # minutes.
    "small": dict(vocab_size=259, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, d_ff=512,
                  max_seq_len=512, position="rope", norm="rmsnorm", mlp="gated_silu",
                  tie_embeddings=True),
    # Hugging Face GPT-2 (124M) exactly: learned positions, LayerNorm eps 1e-5, tanh GELU, biases on
    # every projection, tied embeddings. Dropout off (the HF checkpoint uses 0.1 in training mode).
    "gpt2": dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                 max_seq_len=1024, position="learned", norm="layernorm", norm_eps=1e-5, mlp="gelu",
                 gelu_approximate=True, tie_embeddings=True, qkv_bias=True, out_bias=True,
                 mlp_bias=True),
    # Llama-3.2-1B shapes for benchmarks (no llama3 rope-frequency scaling: shapes/timing only).
    "llama_1b": dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                     head_dim=64, d_ff=8192, max_seq_len=131072, position="rope",
                     rope_theta=500_000.0, norm="rmsnorm", norm_eps=1e-5, mlp="gated_silu",
                     tie_embeddings=True, dtype="bfloat16", param_dtype="float32"),}


def get_model_config(preset: str, **overrides: Any) -> ModelConfig:
  """Returns the `preset` config with `overrides` applied (and validated)."""
  if preset not in PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; allowed presets: {sorted(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown ModelConfig field(s) {unknown}; allowed fields: {sorted(fields)}")
  return ModelConfig(**{**PRESETS[preset], **overrides})
