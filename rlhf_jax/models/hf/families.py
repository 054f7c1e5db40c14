"""config.json <-> `ModelConfig` for the supported Hugging Face causal-LM families.

Each family reads the keys it understands through a `_Keys` tracker; every key of the file must be
either read by the family or listed in `HARMLESS_KEYS` (bookkeeping, tokenizer ids, training-only
dropout). Anything else changes the math in a way we do not implement, so `config_from_hf` refuses
it with an error naming the key: a checkpoint is never loaded silently wrong.

The math each family needs (checked against transformers 5.24's modeling_<family>.py):

  GPT2LMHeadModel     learned positions, LayerNorm, fused c_attn Conv1D, GELU (tanh), biases, tied
  LlamaForCausalLM    rope (+ "linear" / "llama3" rope scaling), RMSNorm, SwiGLU, GQA,
                      attention_bias / mlp_bias, explicit head_dim
  MistralForCausalLM  Llama + sliding-window attention on every layer
  Qwen2ForCausalLM    q/k/v bias (o without), sliding window above max_window_layers / layer_types
  Qwen3ForCausalLM    q/k RMSNorm over head_dim before rope, explicit head_dim
  GemmaForCausalLM    RMSNorm x_hat (1 + w), sqrt(d) embedding scale, GeGLU, tied
  Gemma2ForCausalLM   Gemma + attention / final logit soft-capping, alternating sliding / full
                      layers, pre + post norms, query_pre_attn_scalar
"""

from __future__ import annotations

from typing import Any, Callable

from rlhf_jax.models.config import ModelConfig


class HFConfigError(ValueError):
  """A config.json that does not describe a model we can load exactly."""


# Keys that never change the forward pass of a causal LM (or only its training-time dropout,
# which a loaded model does not use: ModelConfig.dropout_rate stays 0).
HARMLESS_KEYS = frozenset({
    "_name_or_path",
    "architectures",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "use_cache",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "initializer_range",
    "tokenizer_class",
    "attention_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    "n_ctx",
    "pretraining_tp",
    "torchscript",
    "use_return_dict",
    "task_specific_params",
    "prefix",
    "finetuning_task",
    "tf_legacy_loss",
    "pruned_heads",
    "cross_attention_hidden_size",
    "add_cross_attention",
    "tie_encoder_decoder",
    "max_length",
    "min_length",
    "do_sample",
    "num_beams",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "early_stopping",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "typical_p",
    "diversity_penalty",
    "num_beam_groups",
    "encoder_no_repeat_ngram_size",
    "bias",
    "cache_implementation",
    "reorder_and_upcast_attn",  # GPT-2: the same math, only upcast for fp16 stability
})


class _Keys:
  """Reads config.json keys, remembering which ones a family consumed."""

  def __init__(self, d: dict[str, Any], arch: str, source: str):
    self.d, self.arch, self.source, self.used = d, arch, source, set()

  def get(self, key: str, default: Any = None) -> Any:
    self.used.add(key)
    value = self.d.get(key, default)
    return default if value is None else value

  def need(self, key: str) -> Any:
    self.used.add(key)
    if self.d.get(key) is None:
      raise _key_error(self.source, self.arch, key, "is required")
    return self.d[key]

  def only(self, key: str, allowed: tuple, default: Any = None) -> Any:
    """A key whose other values change the math we do not implement."""
    value = self.get(key, default)
    if value not in allowed:
      raise _key_error(self.source, self.arch, key,
                       f"={value!r} is not supported (supported: {list(allowed)})")
    return value

  def check_rest(self) -> None:
    # A key set to null is an option left unset (transformers writes every field of its config
    # class, e.g. sliding_window=None), never a change of the math.
    rest = sorted(k for k in self.d
                  if k not in self.used and k not in HARMLESS_KEYS and self.d[k] is not None)
    if rest:
      raise HFConfigError(
          f"{self.source}: key {rest[0]!r}={self.d[rest[0]]!r} changes the model in a way "
          f"rlhf_jax does not implement for {self.arch} (unsupported keys: {rest}); remove it only "
          "if you know it does not change the forward pass")


def _key_error(source: str, arch: str, key: str, what: str) -> HFConfigError:
  return HFConfigError(f"{source}: {arch} key {key!r}{' ' if what[0] != '=' else ''}{what}")


_GELU = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True, "gelu": False}


def _rope(k: _Keys, out: dict[str, Any]) -> None:
  """rope_theta / rope scaling from transformers 5's `rope_parameters` or the older top-level
  `rope_theta` + `rope_scaling` keys that hub checkpoints carry."""
  params = dict(k.get("rope_parameters", {}) or {})
  old = k.get("rope_scaling", None)
  if old:
    params = {**dict(old), **params}
  theta = params.get("rope_theta", k.get("rope_theta", 10_000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  where = "rope_parameters" if "rope_parameters" in k.d else "rope_scaling"
  if rope_type not in ("default", "linear", "llama3"):
    raise _key_error(k.source, k.arch, f"{where}.rope_type",
                     f"={rope_type!r} is not supported (supported: default, linear, "
                     "llama3)")
  if float(params.get("partial_rotary_factor", k.get("partial_rotary_factor", 1.0))) != 1.0:
    raise _key_error(k.source, k.arch, "partial_rotary_factor",
                     "!= 1.0 is not supported (rope over the whole head only)")
  known = {
      "rope_theta", "rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
      "original_max_position_embeddings", "partial_rotary_factor"}
  extra = sorted(set(params) - known)
  if extra:
    raise _key_error(k.source, k.arch, f"{where}.{extra[0]}", "is not supported")
  out["rope_theta"] = float(theta)
  if rope_type == "linear":
    out.update(rope_scaling="linear", rope_scaling_factor=float(params["factor"]))
  elif rope_type == "llama3":
    out.update(
        rope_scaling="llama3", rope_scaling_factor=float(params["factor"]),
        rope_low_freq_factor=float(params["low_freq_factor"]),
        rope_high_freq_factor=float(params["high_freq_factor"]), rope_original_max_len=int(
            params.get("original_max_position_embeddings",
                       k.get("original_max_position_embeddings",
                             k.get("max_position_embeddings")))))
  k.used.add("original_max_position_embeddings")


def _decoder_common(k: _Keys, *, act_key: str = "hidden_act") -> dict[str, Any]:
  """The keys every rope / RMSNorm / gated-MLP family shares."""
  n_heads = int(k.need("num_attention_heads"))
  out = dict(vocab_size=int(k.need("vocab_size")), d_model=int(k.need("hidden_size")),
             n_layers=int(k.need("num_hidden_layers")), n_heads=n_heads,
             n_kv_heads=int(k.get("num_key_value_heads",
                                  n_heads)), d_ff=int(k.need("intermediate_size")),
             max_seq_len=int(k.get("max_position_embeddings",
                                   2048)), position="rope", norm="rmsnorm",
             norm_eps=float(k.get("rms_norm_eps",
                                  1e-6)), tie_embeddings=bool(k.get("tie_word_embeddings", False)))
  head_dim = k.get("head_dim", None)
  # Canonical form: an explicit head_dim equal to the derived one is the derived one (None), so a
  # config read back from our own export compares equal.
  if head_dim is not None and (out["d_model"] % n_heads or
                               int(head_dim) != out["d_model"] // n_heads):
    out["head_dim"] = int(head_dim)
  _rope(k, out)
  k.only("use_bidirectional_attention", (None, False))
  return out


def _sliding(k: _Keys, out: dict[str, Any], window: Any, default_types: list[str] | None) -> None:
  types = k.get("layer_types", None) or default_types
  if types is not None:
    types = tuple(types)
    bad = sorted(set(types) - {"full_attention", "sliding_attention"})
    if bad:
      raise _key_error(
          k.source, k.arch, "layer_types", f"entry {bad[0]!r} is not "
          "supported (supported: full_attention, sliding_attention)")
    if "sliding_attention" not in types:
      window, types = None, None
  if window is not None:
    out["sliding_window"] = int(window)
    if types is not None and "full_attention" in types:
      out["layer_types"] = types


def _gpt2(k: _Keys) -> dict[str, Any]:
  d = int(k.need("n_embd"))
  act = k.only("activation_function", tuple(_GELU), "gelu_new")
  k.only("scale_attn_weights", (True,), True)
  k.only("scale_attn_by_inverse_layer_idx", (False,), False)
  k.only("add_cross_attention", (False,), False)
  k.only("tie_word_embeddings", (True,), True)
  return dict(vocab_size=int(k.need("vocab_size")), d_model=d, n_layers=int(k.need("n_layer")),
              n_heads=int(k.need("n_head")), d_ff=int(k.get("n_inner", 4 * d)),
              max_seq_len=int(k.need("n_positions")), position="learned", norm="layernorm",
              norm_eps=float(k.get("layer_norm_epsilon",
                                   1e-5)), mlp="gelu", gelu_approximate=_GELU[act],
              tie_embeddings=True, qkv_bias=True, out_bias=True, mlp_bias=True)


def _llama(k: _Keys) -> dict[str, Any]:
  out = _decoder_common(k)
  k.only("hidden_act", ("silu",), "silu")
  bias = bool(k.get("attention_bias", False))
  out.update(mlp="gated_silu", qkv_bias=bias, out_bias=bias, mlp_bias=bool(k.get("mlp_bias",
                                                                                 False)))
  return out


def _mistral(k: _Keys) -> dict[str, Any]:
  out = _llama_like(k)
  _sliding(k, out, k.get("sliding_window", None), None)
  return out


def _llama_like(k: _Keys) -> dict[str, Any]:
  out = _decoder_common(k)
  k.only("hidden_act", ("silu",), "silu")
  out.update(mlp="gated_silu")
  return out


def _qwen_sliding(k: _Keys, out: dict[str, Any]) -> None:
  use = bool(k.get("use_sliding_window", False))
  window = k.get("sliding_window", None) if use else None
  k.used.add("sliding_window")
  first = int(k.get("max_window_layers", out["n_layers"]))
  default = None
  if window is not None:
    default = [
        "sliding_attention" if i >= first else "full_attention" for i in range(out["n_layers"])]
  if not use:  # transformers sets sliding_window = None: every layer is full whatever layer_types
    k.used.add("layer_types")
    return
  _sliding(k, out, window, default)


def _qwen2(k: _Keys) -> dict[str, Any]:
  out = _llama_like(k)
  out.update(qkv_bias=True, out_bias=False)
  _qwen_sliding(k, out)
  return out


def _qwen3(k: _Keys) -> dict[str, Any]:
  out = _llama_like(k)
  bias = bool(k.get("attention_bias", False))
  out.update(qkv_bias=bias, out_bias=bias, qk_norm=True)
  _qwen_sliding(k, out)
  return out


def _gemma_common(k: _Keys, act_keys: tuple[str, ...]) -> dict[str, Any]:
  out = _decoder_common(k)
  act = None
  for key in act_keys:
    value = k.get(key, None)
    if value is not None:
      act = act or value
      if value not in _GELU:
        raise _key_error(k.source, k.arch, key, f"={value!r} is not supported "
                         f"(supported: {sorted(_GELU)})")
  bias = bool(k.get("attention_bias", False))
  out.update(mlp="gated_gelu", gelu_approximate=_GELU[act or "gelu_pytorch_tanh"],
             norm_scale_plus_one=True, scale_embeddings=True, qkv_bias=bias, out_bias=bias,
             tie_embeddings=bool(k.get("tie_word_embeddings", True)))
  return out


def _gemma(k: _Keys) -> dict[str, Any]:
  # GemmaMLP uses hidden_act (transformers 5; older configs also carry hidden_activation).
  return _gemma_common(k, ("hidden_act", "hidden_activation"))


def _gemma2(k: _Keys) -> dict[str, Any]:
  out = _gemma_common(k, ("hidden_activation", "hidden_act"))
  n = out["n_layers"]
  out.update(post_norms=True, query_pre_attn_scalar=float(k.need("query_pre_attn_scalar")),
             attn_logit_softcap=k.get("attn_logit_softcapping", None),
             final_logit_softcap=k.get("final_logit_softcapping", None))
  for key in ("attn_logit_softcap", "final_logit_softcap"):
    if out[key] is not None:
      out[key] = float(out[key])
  default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
  _sliding(k, out, k.get("sliding_window", None), default)
  k.only("cache_implementation", (None, "hybrid"))
  return out


FAMILIES: dict[str, tuple[str, Callable[[_Keys], dict[str, Any]]]] = {
    "GPT2LMHeadModel": ("gpt2", _gpt2),
    "LlamaForCausalLM": ("llama", _llama),
    "MistralForCausalLM": ("mistral", _mistral),
    "Qwen2ForCausalLM": ("qwen2", _qwen2),
    "Qwen3ForCausalLM": ("qwen3", _qwen3),
    "GemmaForCausalLM": ("gemma", _gemma),
    "Gemma2ForCausalLM": ("gemma2", _gemma2),}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
_BY_MODEL_TYPE = {model_type: arch for arch, (model_type, _) in FAMILIES.items()}


def architecture_of(d: dict[str, Any], source: str = "config.json") -> str:
  """The supported architecture a config.json names (`architectures[0]`, else its model_type)."""
  archs = d.get("architectures") or []
  if archs:
    arch = archs[0]
  elif d.get("model_type") in _BY_MODEL_TYPE:
    arch = _BY_MODEL_TYPE[d["model_type"]]
  else:
    arch = d.get("model_type")
  if arch not in FAMILIES:
    raise HFConfigError(f"{source}: architecture {arch!r} is not supported; supported "
                        f"architectures: {list(SUPPORTED_ARCHITECTURES)}")
  return arch


def config_from_hf(d: dict[str, Any], *, source: str = "config.json",
                   **overrides: Any) -> ModelConfig:
  """`ModelConfig` for a Hugging Face config.json dict, or an `HFConfigError` naming the key.

  `overrides` (e.g. dtype, param_dtype, scan_layers) are applied on top."""
  arch = architecture_of(d, source)
  keys = _Keys(d, arch, source)
  fields = FAMILIES[arch][1](keys)
  keys.check_rest()
  try:
    return ModelConfig(**{**fields, **overrides})
  except ValueError as e:
    raise HFConfigError(f"{source}: {arch} config gives an invalid model: {e}") from e


def infer_architecture(config: ModelConfig) -> str:
  """The family whose math is exactly `config` (for export), or an error naming the option."""
  c = config
  if c.position == "learned":
    ok = (c.norm == "layernorm" and c.mlp == "gelu" and c.tie_embeddings and c.qkv_bias and
          c.out_bias and c.mlp_bias and c.num_kv_heads == c.n_heads and
          c.head_size * c.n_heads == c.d_model and
          not (c.norm_scale_plus_one or c.qk_norm or c.post_norms or c.scale_embeddings or
               c.sliding_window))
    if not ok:
      raise HFConfigError("ModelConfig with position='learned' exports only as GPT2LMHeadModel, "
                          "which needs layernorm, mlp='gelu', tied embeddings, biases everywhere "
                          f"and multi-head attention; got {config}")
    return "GPT2LMHeadModel"
  if c.norm != "rmsnorm":
    raise HFConfigError(f"ModelConfig.norm={c.norm!r} with rope positions matches no supported "
                        f"Hugging Face family; supported: {list(SUPPORTED_ARCHITECTURES)}")
  if c.post_norms or c.attn_logit_softcap or c.final_logit_softcap or c.query_pre_attn_scalar:
    return "Gemma2ForCausalLM"
  if c.norm_scale_plus_one or c.scale_embeddings:
    return "GemmaForCausalLM"
  if c.qk_norm:
    return "Qwen3ForCausalLM"
  if c.qkv_bias and not c.out_bias:
    return "Qwen2ForCausalLM"
  if c.sliding_window is not None and c.layer_types is None:
    return "MistralForCausalLM"
  return "LlamaForCausalLM"


def config_to_hf(config: ModelConfig, architecture: str | None = None) -> dict[str, Any]:
  """config.json dict for `config` (the inverse of `config_from_hf`), with `architectures`."""
  c = config
  arch = architecture or infer_architecture(c)
  if arch not in FAMILIES:
    raise HFConfigError(f"architecture {arch!r} is not supported; supported architectures: "
                        f"{list(SUPPORTED_ARCHITECTURES)}")
  model_type = FAMILIES[arch][0]
  out: dict[str, Any] = {"architectures": [arch], "model_type": model_type}
  if arch == "GPT2LMHeadModel":
    out.update(vocab_size=c.vocab_size, n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads,
               n_inner=c.d_ff, n_positions=c.max_seq_len, layer_norm_epsilon=c.norm_eps,
               activation_function="gelu_new" if c.gelu_approximate else "gelu",
               tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
               scale_attn_weights=True)
  else:
    out.update(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
               num_attention_heads=c.n_heads, num_key_value_heads=c.num_kv_heads,
               head_dim=c.head_size, intermediate_size=c.d_ff,
               max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
               tie_word_embeddings=c.tie_embeddings, attention_dropout=0.0)
    rope: dict[str, Any] = {"rope_theta": c.rope_theta, "rope_type": "default"}
    if c.rope_scaling == "linear":
      rope.update(rope_type="linear", factor=c.rope_scaling_factor)
    elif c.rope_scaling == "llama3":
      rope.update(rope_type="llama3", factor=c.rope_scaling_factor,
                  low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
                  original_max_position_embeddings=c.rope_original_max_len)
    # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta / rope_scaling.
    out["rope_parameters"] = rope
    if arch.startswith("Gemma"):
      act = "gelu_pytorch_tanh" if c.gelu_approximate else "gelu"
      out["hidden_activation" if arch == "Gemma2ForCausalLM" else "hidden_act"] = act
      out["attention_bias"] = c.qkv_bias
      if arch == "Gemma2ForCausalLM":
        types = c.layer_types or (["sliding_attention"] * c.n_layers
                                  if c.sliding_window else ["full_attention"] * c.n_layers)
        scalar = c.query_pre_attn_scalar or c.head_size
        out.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                   attn_logit_softcapping=c.attn_logit_softcap,
                   final_logit_softcapping=c.final_logit_softcap, sliding_window=c.sliding_window or
                   c.max_seq_len, layer_types=list(types))
    else:
      out["hidden_act"] = "silu"
    if arch == "LlamaForCausalLM":
      out.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    if arch == "MistralForCausalLM":
      out["sliding_window"] = c.sliding_window
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
      types = c.layer_types or ["sliding_attention" if c.sliding_window else "full_attention"] * \
          c.n_layers
      out.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
                 max_window_layers=c.n_layers, layer_types=list(types))
      if arch == "Qwen3ForCausalLM":
        out["attention_bias"] = c.qkv_bias
  _check_exported(c, out, arch)
  return out


def _check_exported(config: ModelConfig, out: dict[str, Any], arch: str) -> None:
  """The exported config must read back as the same math (a guard against an export that
  transformers would run differently, e.g. an option the chosen family cannot express)."""
  fields = ("vocab_size", "d_model", "n_layers", "n_heads", "num_kv_heads", "head_size", "d_ff",
            "position", "rope_theta", "norm", "mlp", "gelu_approximate", "tie_embeddings",
            "qkv_bias", "out_bias", "mlp_bias", "scale_embeddings", "norm_scale_plus_one",
            "qk_norm", "post_norms", "attn_logit_softcap", "final_logit_softcap", "attn_scale",
            "rope_scaling", "sliding_window")
  back = config_from_hf(out, source=f"exported {arch} config")
  for f in fields:
    if getattr(back, f) != getattr(config, f):
      raise HFConfigError(f"ModelConfig.{f}={getattr(config, f)!r} cannot be expressed by "
                          f"{arch} (it would read back as {getattr(back, f)!r})")
  for i in range(config.n_layers):
    if back.layer_is_sliding(i) != config.layer_is_sliding(i):
      raise HFConfigError(f"ModelConfig.layer_types={config.layer_types!r} cannot be expressed "
                          f"by {arch}")
