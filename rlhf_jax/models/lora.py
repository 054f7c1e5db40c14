"""LoRA (Hu et al. 2021): low-rank adapters over one frozen base shared by policy and reference.

For a matmul kernel W (input dims I, output dims O) chosen by ``LoraConfig.targets`` (a regex over
"/"-joined parameter paths), the adapted layer computes

    y = x W + (drop(x) A) B · s,   A: [I.., r],  B: [r, O..],  s = alpha / r,

with A drawn at random (``init="kaiming"``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PEFT's default;
``"gaussian"``: N(0, 1/r)) and B = 0, so the adapted model equals the base at step 0.

Two ways to compute it (``LoraConfig.mode``), the same function and the same gradients:

* factorised: ``y = x W + ((x A) B)·s``. The backward pass forms no [I, O] weight gradient,
  only rank-r ones: ``dA = xᵀ (dy (B s)ᵀ)``, ``dB = (x A)ᵀ dy · s``. It costs ~6·N·r·(I+O)
  extra flops over N tokens, in thin, memory-bound matmuls (N·r intermediates).
* merged: ``W_eff = W + A (B s)`` built on the fly, ``y = x W_eff`` (one matmul), and the backward
  pass ``dW_eff = xᵀ dy`` (the full step's weight gradient), then ``dA = dW_eff (B s)ᵀ``,
  ``dB = Aᵀ dW_eff · s``; no gradient flows into W (it is behind ``stop_gradient``), no moments for
  it. It costs 2·N·I·O flops for ``dW_eff`` plus 6·I·O·r, independent of N beyond that.

``auto`` (the default) picks per kernel and per call shape from a flop + byte count
(:func:`choose_mode`): merged where the kernels are small next to the token count (the ``small``
preset's DPO step), factorised where they are large (``gpt2``) and for one-token decode steps.
Adapter dropout needs the factorised form (it drops the adapter's input only).

Pieces:

* :class:`LoraParams` ``(base, lora, trained)`` — the policy's params: ``base`` is the frozen tree
  (the reference's params are *the same arrays*), ``lora`` mirrors its module paths with
  ``{"a", "b"}`` per adapted kernel, ``trained`` holds the top-level subtrees trained in full
  (a reward / value model's ``head``; PEFT's ``modules_to_save``), ``None`` for a policy. It exposes ``split_frozen`` / ``join_frozen``, which the train stack
  (``train.optim``, ``train.loop``) uses to keep the base out of the optimizer state, the donated
  step arguments and the checkpoints.
* :class:`LoraModel` ``(inner, lora)`` — duck-types ``Transformer`` / ``RewardModel``: ``apply``
  with a ``LoraParams`` runs ``inner`` on ``{"params": stop_gradient(base), "lora": adapters}``
  (the layers read the ``lora`` collection, ``layers.param`` → :func:`adapt`), with plain params it
  is ``inner.apply``: the base model, bit for bit.
* :func:`init_adapters` (sharded like their base kernels: A takes the kernel's input axes, B its
  output axes), :func:`merge` (W + A·B·s, for export), :func:`base_fingerprint` (checkpoints
  refuse another base).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# Attention q/k/v/o and MLP up/gate/down kernels (GPT-2 / Llama layouts of this decoder).
DEFAULT_TARGETS = r"(^|/)(attn/[qkvo]_kernel|mlp/(up|gate|down)_kernel)$"
INITS = ("kaiming", "gaussian")
MODES = ("auto", "factorised", "merged")
COLLECTION = "lora"
DROPOUT_RNG = "lora_dropout"
# Kernels whose leading two dims are inputs (the attention output [N, H, D]); all others: one.
_INPUT_DIMS = {"o_kernel": 2}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyperparameters.

  Attributes:
    rank: r, the adapters' inner dimension (an int >= 1).
    alpha: the scale numerator: the update is (x A) B · alpha / r (a float > 0).
    dropout: dropout on the adapter's input x, in [0, 1) (applied when the train step passes a
      dropout rng; evaluation and sampling are deterministic).
    targets: regex searched in each parameter's "/"-joined path (e.g.
      ``layers_0/attn/q_kernel``, scanned: ``layers/attn/q_kernel``); only matmul kernels
      (``*_kernel``) can be adapted. Default: attention q/k/v/o and MLP up/gate/down.
    init: A's init, ``kaiming`` (PEFT default) | ``gaussian`` (N(0, 1/r)); B is always 0.
    seed: seed of A's init.
    mode: ``auto`` | ``factorised`` | ``merged`` — how an adapted matmul is computed (module
      docstring; same values and gradients to float rounding). ``merged`` needs ``dropout=0``.
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = DEFAULT_TARGETS
  init: str = "kaiming"
  seed: int = 0
  mode: str = "auto"

  def __post_init__(self):
    owner = type(self).__name__

    def bad(field, allowed):
      raise ValueError(f"{owner}.{field}={getattr(self, field)!r} is invalid; allowed: {allowed}")

    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      bad("rank", "an int >= 1")
    if isinstance(self.alpha, bool) or not isinstance(self.alpha,
                                                      (int, float)) or not self.alpha > 0:
      bad("alpha", "a float > 0")
    if isinstance(self.dropout, bool) or not isinstance(self.dropout,
                                                        (int, float)) or not 0 <= self.dropout < 1:
      bad("dropout", "a float in [0, 1)")
    if not isinstance(self.targets, str) or not self.targets:
      bad("targets", "a non-empty regex over parameter paths")
    try:
      re.compile(self.targets)
    except re.error as err:
      bad("targets", f"a valid Python regex ({err})")
    if self.init not in INITS:
      bad("init", " | ".join(INITS))
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
      bad("seed", "an int >= 0")
    if self.mode not in MODES:
      bad("mode", " | ".join(MODES))
    if self.mode == "merged" and self.dropout > 0:
      bad(
          "mode", "'auto' | 'factorised' with dropout > 0 (merged W + A·B·s cannot drop the "
          "adapter's input alone)")

  @property
  def scale(self) -> float:
    return float(self.alpha) / self.rank


@flax.struct.dataclass
class LoraParams:
  """A LoRA model's params: the frozen ``base`` tree, the trainable ``lora`` adapters and the
  top-level subtrees ``trained`` in full (a head; ``None`` for a policy)."""

  base: Any
  lora: Any
  trained: Any = None

  def full_tree(self) -> Any:
    """The model's param tree: ``base`` with the ``trained`` subtrees in place."""
    return {**self.base, **(self.trained or {})}

  def split_frozen(self) -> tuple["LoraParams", Any]:
    """(these params without the base, the base): the train stack never donates, updates or
    checkpoints the base."""
    return self.replace(base=None), self.base

  def join_frozen(self, base: Any) -> "LoraParams":
    return self.replace(base=base)


def is_lora(params: Any) -> bool:
  return isinstance(params, LoraParams)


def path_str(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


# ----------------------------------------------------------------------------------------------------
# Inside the model: a kernel with its adapter
# ----------------------------------------------------------------------------------------------------

# Machine balance of the cost model (flops that cost as much as one byte of memory traffic): the
# 2-core Xeon this project benchmarks on, 58.9 GFLOP/s f32 matmul over 1.73 GB/s streamed
# (experiments/bench_lora.py --kernels, BUILD_NOTES.md) = 34, rounded. With it ``auto`` merges
# every kernel of the ``small`` DPO step (0.98 x a full step, measured; factorised 1.10 x) and
# factorises every ``gpt2`` one (0.82 x; merged 0.91 x), and one-token decode steps stay factorised.
FLOPS_PER_BYTE = 32.0


def mode_cost(mode: str, n: int, i: int, o: int, r: int, itemsize: int) -> float:
  """Extra cost (flops + FLOPS_PER_BYTE · bytes) of one adapted matmul, forward + backward, over
  the base kernel's forward and input gradient, for N tokens, I inputs, O outputs, rank r."""
  if mode == "factorised":
    # u = x A, delta = u B, y += delta; backward du, dB, dA, dx += du Aᵀ (reads / writes of the
    # N-row operands; the r-wide ones are tiny but still streamed).
    flops = 6.0 * n * r * (i + o)
    nbytes = itemsize * n * (6.0 * i + 6.0 * r + 7.0 * o)
  else:  # merged: W_eff = W + A B, dW_eff = xᵀ dy, dA = dW_eff Bᵀ, dB = Aᵀ dW_eff
    flops = 2.0 * n * i * o + 6.0 * i * o * r
    nbytes = itemsize * n * (i + o) + 4.0 * 6.0 * i * o
  return flops + FLOPS_PER_BYTE * nbytes


def choose_mode(n: int, i: int, o: int, r: int, itemsize: int) -> str:
  """``factorised`` or ``merged``, whichever :func:`mode_cost` says is cheaper."""
  merged = mode_cost("merged", n, i, o, r, itemsize)
  return "merged" if merged < mode_cost("factorised", n, i, o, r, itemsize) else "factorised"


class Adapted:
  """A kernel W and its adapter (A, B·s), handed from ``layers.param`` to ``ops.matmul``."""

  def __init__(self, w, a, b, rate=None, rng=None, mode="auto"):
    self.w, self.a, self.b, self.rate, self.rng, self.mode = w, a, b, rate, rng, mode
    self.dtype, self.shape = w.dtype, w.shape

  def lora_matmul(self, spec: str, x: jax.Array, out_dtype: Any = None) -> jax.Array:
    """einsum(spec, x, W + A·(B·s)), computed factorised or merged (module docstring)."""
    from rlhf_jax.models import ops  # pylint: disable=import-outside-toplevel  (ops dispatches here)
    inputs, out = spec.split("->")
    sx, sw = inputs.split(",")
    k = self.a.ndim - 1
    contracted, outs = sw[:k], sw[k:]
    if set(contracted) != set(sx) & set(sw) or set(outs) & set(sx):
      raise ValueError(f"LoRA: matmul {spec!r} does not contract the kernel's first {k} dim(s); "
                       "allowed targets: kernels laid out [inputs.., outputs..]")
    dropout = self.rate is not None and self.rng is not None
    mode = self.mode
    if mode == "auto":
      n_in = int(np.prod(self.w.shape[:k]))
      n_tok = int(np.prod(x.shape)) // max(n_in, 1)
      mode = "factorised" if dropout else choose_mode(n_tok, n_in, int(np.prod(self.w.shape[k:])),
                                                      self.a.shape[-1],
                                                      jnp.dtype(x.dtype).itemsize)
    if mode == "merged" and not dropout:
      # W_eff = W + A (B s) in W's dtype; autodiff of this sum gives dA = dW_eff (B s)ᵀ and
      # d(B s) = Aᵀ dW_eff from ops.matmul's one weight gradient (W itself is stop_gradient).
      letters = "".join(c for c in "abcdefghijklmnopqrstuvwxyz" if c not in "r")
      ins_l, outs_l = letters[:k], letters[k:self.w.ndim]
      delta = jnp.einsum(f"{ins_l}r,r{outs_l}->{ins_l}{outs_l}", self.a.astype(jnp.float32),
                         self.b.astype(jnp.float32))
      return ops.matmul(spec, x, self.w + delta.astype(self.w.dtype), out_dtype)
    y = ops.matmul(spec, x, self.w, out_dtype)
    if dropout:
      keep = jax.random.bernoulli(self.rng, 1.0 - self.rate, x.shape)
      x = jnp.where(keep, x / (1.0 - self.rate).astype(x.dtype), jnp.zeros((), x.dtype))
    rest = "".join(c for c in sx if c not in contracted)
    u = ops.matmul(f"{sx},{contracted}r->{rest}r", x, self.a.astype(x.dtype))
    delta = ops.matmul(f"{rest}r,r{outs}->{out}", u, self.b.astype(x.dtype), y.dtype)
    return y + delta


def adapt(module: nn.Module, name: str, w: jax.Array) -> Any:
  """``w`` itself, or an :class:`Adapted` kernel when ``module`` has a LoRA adapter named ``name``."""
  if not module.has_variable(COLLECTION, name):
    return w
  adapter = module.get_variable(COLLECTION, name)
  rate = adapter.get("dropout")
  rng = module.make_rng(DROPOUT_RNG) if rate is not None and module.has_rng(DROPOUT_RNG) else None
  # A forced mode travels as the last dim's size of an empty marker array (static under jit and
  # sliced like the adapters by a layer scan): 1 = factorised, 2 = merged; absent = auto.
  marker = adapter.get("mode")
  mode = "auto" if marker is None else MODES[marker.shape[-1]]
  return Adapted(w, adapter["a"], adapter["b"], rate, rng, mode)


# ----------------------------------------------------------------------------------------------------
# The model wrapper
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoraModel:
  """``inner`` (a ``Transformer`` / ``RewardModel`` / ``ValueModel``) with LoRA adapters.

  ``apply({"params": LoraParams(base, lora)}, ...)`` is the adapted model (gradients reach the
  adapters only: the base is behind ``stop_gradient``); ``apply({"params": base}, ...)`` is the
  base model, the same computation as ``inner.apply`` (the reference). Hashable, so it can be the
  static model argument of the jitted log-prob and sampling functions.
  """

  inner: Any
  lora: LoraConfig
  # Top-level param subtrees trained in full next to the adapters (a reward / value model's
  # ("head",)); they live in ``LoraParams.trained``, out of the frozen base.
  trained: tuple[str, ...] = ()

  @property
  def config(self):
    return self.inner.config

  @property
  def adapter_dropout(self) -> float:
    return float(self.lora.dropout)

  def init(self, *args, **kwargs):
    return self.inner.init(*args, **kwargs)

  def variables(self, params: LoraParams, dropout: bool = False) -> dict[str, Any]:
    """``{"params": stop_gradient(base), "lora": adapters with B scaled by alpha / r}``."""
    scale = self.lora.scale

    def scaled(path, node):
      out = {"a": node["a"], "b": node["b"] * jnp.asarray(scale, node["b"].dtype)}
      lead = node["a"].shape[:_stack_dims(path_str(path), node["a"])]
      if dropout:  # one rate per scanned layer: the stacked dims lead A
        out["dropout"] = jnp.full(lead, self.lora.dropout, jnp.float32)
      if self.lora.mode != "auto":
        out["mode"] = jnp.zeros(lead + (0, MODES.index(self.lora.mode)), jnp.float32)
      return out

    lora = jax.tree_util.tree_map_with_path(scaled, params.lora, is_leaf=_is_adapter)
    base = jax.lax.stop_gradient(params.base)
    return {"params": {**base, **(params.trained or {})}, COLLECTION: lora}

  def apply(self, variables: Any, *args, rngs: Any = None, **kwargs):
    params = variables["params"]
    if not is_lora(params):
      return self.inner.apply(variables, *args, rngs=rngs, **kwargs)
    dropout = (self.lora.dropout > 0 and kwargs.get("deterministic") is False and
               rngs is not None and "dropout" in rngs)
    new_vars = {
        **{k: v for k, v in variables.items() if k != "params"}, **self.variables(params, dropout)}
    if dropout:
      rngs = {**rngs, DROPOUT_RNG: jax.random.fold_in(rngs["dropout"], 0x10AA)}
    return self.inner.apply(new_vars, *args, rngs=rngs, **kwargs)


def _is_adapter(node) -> bool:
  return isinstance(node, dict) and set(node) >= {"a", "b"} and not isinstance(node["a"], dict)


def _stack_dims(name: str, a: Any) -> int:
  """Leading stacked (scanned-layer) dims of adapter A [L.., I.., r] of the kernel at ``name``."""
  return len(a.shape) - 1 - _INPUT_DIMS.get(name.rsplit("/", 1)[-1], 1)


def unwrap(model: Any) -> Any:
  """The base module of a :class:`LoraModel` (``model`` itself otherwise)."""
  return model.inner if isinstance(model, LoraModel) else model


def uses_dropout(model: Any) -> bool:
  """Whether a train step should pass a dropout rng: model dropout or LoRA dropout is on."""
  return model.config.dropout_rate > 0 or getattr(model, "adapter_dropout", 0.0) > 0


# ----------------------------------------------------------------------------------------------------
# Creating, merging, fingerprinting
# ----------------------------------------------------------------------------------------------------


def _targets(boxed_params: Any, config: LoraConfig) -> list[tuple[tuple, str, Any]]:
  """(path, path string, boxed leaf) of every parameter ``config.targets`` selects."""
  pattern = re.compile(config.targets)
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  found, names = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=is_box)[0]:
    name = path_str(path)
    names.append(name)
    if pattern.search(name):
      if not name.rsplit("/", 1)[-1].endswith("kernel"):
        raise ValueError(f"LoraConfig.targets={config.targets!r} matches {name!r}, which is not a "
                         "matmul kernel; allowed: a regex selecting *_kernel parameters only")
      found.append((path, name, leaf))
  if not found:
    shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
    raise ValueError(f"LoraConfig.targets={config.targets!r} matches no parameter; allowed: a "
                     f"regex over the parameter paths ({shown})")
  return found


def abstract_adapters(model: Any, config: LoraConfig) -> Any:
  """The adapters' boxed ``ShapeDtypeStruct`` tree (logical axes from the base kernels)."""
  from rlhf_jax.models import abstract  # pylint: disable=import-outside-toplevel
  boxed = abstract.abstract_variables(unwrap(model))["params"]
  tree: dict = {}
  for path, name, leaf in _targets(boxed, config):
    value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
    axes = tuple(leaf.names) if isinstance(leaf,
                                           nn.LogicallyPartitioned) else (None,) * len(value.shape)
    stack = 1 if axes and axes[0] == "layers" else 0
    k = _INPUT_DIMS.get(name.rsplit("/", 1)[-1], 1)
    shape = value.shape
    if len(shape) - stack <= k:
      raise ValueError(f"LoRA: parameter {name!r} of shape {shape} has no output dims to adapt")
    in_shape, out_shape = shape[stack:stack + k], shape[stack + k:]
    lead, lead_axes = shape[:stack], axes[:stack]
    # Adapters train in float32 whatever the base's storage dtype.
    a = jax.ShapeDtypeStruct(lead + in_shape + (config.rank,), jnp.float32)
    b = jax.ShapeDtypeStruct(lead + (config.rank,) + out_shape, jnp.float32)
    node = {
        "a": nn.LogicallyPartitioned(a, lead_axes + axes[stack:stack + k] + (None,)),
        "b": nn.LogicallyPartitioned(b, lead_axes + (None,) + axes[stack + k:])}
    cursor = tree
    keys = name.split("/")
    for key in keys[:-1]:
      cursor = cursor.setdefault(key, {})
    cursor[keys[-1]] = node
  return tree


def init_adapters(model: Any, config: LoraConfig, mesh: jax.sharding.Mesh | None = None,
                  rules: Any = None) -> Any:
  """Adapters for ``model``'s kernels selected by ``config.targets``: A random, B = 0.

  On ``mesh`` they are created sharded like their base kernels (A: the kernel's input axes and
  a replicated rank axis; B: a replicated rank axis and the kernel's output axes).
  """
  boxed = abstract_adapters(model, config)
  unboxed = nn.meta.unbox(boxed)

  def init():
    leaves, treedef = jax.tree_util.tree_flatten_with_path(unboxed)
    key = jax.random.PRNGKey(config.seed)
    out = []
    for i, (path, leaf) in enumerate(leaves):
      if path_str(path).endswith("/b"):
        out.append(jnp.zeros(leaf.shape, leaf.dtype))
        continue
      sub = jax.random.fold_in(key, i)
      kernel = path_str(path).rsplit("/", 1)[0]
      fan_in = int(np.prod(leaf.shape[_stack_dims(kernel, leaf):-1]))
      if config.init == "kaiming":
        bound = 1.0 / np.sqrt(fan_in)
        out.append(jax.random.uniform(sub, leaf.shape, leaf.dtype, -bound, bound))
      else:
        out.append(jax.random.normal(sub, leaf.shape, leaf.dtype) / config.rank)
    return jax.tree_util.tree_unflatten(treedef, out)

  if mesh is None:
    return jax.jit(init)()
  from rlhf_jax import parallel  # pylint: disable=import-outside-toplevel  (parallel imports models)
  rules = parallel.DEFAULT_RULES if rules is None else rules
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  return jax.jit(init, out_shardings=shardings)()


def split_trained(model: Any, tree: Any) -> tuple[Any, Any]:
  """(``tree`` without ``model.trained``'s top-level subtrees, those subtrees or None)."""
  names = getattr(model, "trained", ())
  if not names:
    return tree, None
  missing = [k for k in names if k not in tree]
  if missing:
    raise ValueError(f"LoRA: the params have no {missing} to train in full; top-level keys: "
                     f"{sorted(tree)}")
  return {k: v for k, v in tree.items() if k not in names}, {k: tree[k] for k in names}


def make_params(model: Any, base: Any, config: LoraConfig, mesh=None, rules=None) -> LoraParams:
  """``LoraParams(base, fresh adapters, model.trained's subtrees of base)`` (``base`` is used as
  is: no copy; for a reward / value model pass the full tree, head included)."""
  frozen, trained = split_trained(model, base)
  return LoraParams(base=frozen, lora=init_adapters(model, config, mesh, rules), trained=trained)


def _delta(node, scale: float, name: str) -> jax.Array:
  """A·B·s as a kernel-shaped [L.., I.., O..] float32 array."""
  a, b = node["a"].astype(jnp.float32), node["b"].astype(jnp.float32)
  stack = _stack_dims(name, a)
  k = a.ndim - 1 - stack
  letters = "abcdefghijklmnopq"
  lead, ins = letters[:stack], letters[stack:stack + k]
  outs = letters[stack + k:stack + k + b.ndim - 1 - stack]
  return jnp.einsum(f"{lead}{ins}z,{lead}z{outs}->{lead}{ins}{outs}", a, b) * scale


def merge(params: LoraParams, config: LoraConfig) -> Any:
  """The plain param tree W + A·B·alpha/r (computed in float32, stored in each W's dtype)."""
  flat = {
      path_str(p): v
      for p, v in jax.tree_util.tree_flatten_with_path(params.lora, is_leaf=_is_adapter)[0]}

  def combine(path, w):
    name = path_str(path)
    node = flat.get(name)
    if node is None:
      return w
    return (w.astype(jnp.float32) + _delta(node, config.scale, name)).astype(w.dtype)

  merged = jax.jit(lambda base: jax.tree_util.tree_map_with_path(combine, base))(params.base)
  return {**merged, **(params.trained or {})}


def base_fingerprint(base: Any) -> str:
  """A short hash of the base params' paths, shapes, dtypes and exact bits.

  The bits enter as a sum mod 2^32 of (bits · position weight) per leaf, computed on device in
  uint32: exact and independent of the summation order, so the same base gives the same hash on
  any mesh, without gathering it to the host.
  """
  leaves = jax.tree_util.tree_flatten_with_path(base)[0]

  def checksum(x):
    x = jnp.asarray(x)
    if x.dtype.itemsize == 4:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:
      bits = x.astype(jnp.uint32)
    idx = jax.lax.iota(jnp.uint32, bits.size).reshape(bits.shape)
    weight = idx * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(bits * weight, dtype=jnp.uint32)

  sums = jax.device_get(jax.jit(lambda xs: [checksum(x) for x in xs])([v for _, v in leaves]))
  h = hashlib.sha256()
  for (path, v), s in zip(leaves, sums):
    h.update(f"{path_str(path)}:{tuple(v.shape)}:{jnp.dtype(v.dtype).name}:{int(s)};".encode())
  return h.hexdigest()[:16]


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def abstract_params(model: Any) -> Any:
  """``models.abstract_params`` of ``model``; for a :class:`LoraModel` a ``LoraParams`` of the
  base's and the adapters' unboxed ``ShapeDtypeStruct`` trees."""
  from rlhf_jax.models import abstract  # pylint: disable=import-outside-toplevel
  if not isinstance(model, LoraModel):
    return abstract.abstract_params(model)
  base, trained = split_trained(model, abstract.abstract_params(model.inner))
  return LoraParams(base=base, lora=nn.meta.unbox(abstract_adapters(model, model.lora)),
                    trained=trained)


def param_shardings(model: Any, mesh: jax.sharding.Mesh, rules: Any, base_shardings: Any) -> Any:
  """``base_shardings`` for a plain model; ``LoraParams(base_shardings, adapter shardings)`` for a
  :class:`LoraModel` (adapters sharded like their base kernels, :func:`init_adapters`)."""
  if not isinstance(model, LoraModel):
    return base_shardings
  from rlhf_jax import parallel  # pylint: disable=import-outside-toplevel  (parallel imports models)
  base, trained = split_trained(model, base_shardings)
  return LoraParams(
      base=base, lora=parallel.logical_shardings(abstract_adapters(model, model.lora), mesh, rules),
      trained=trained)
