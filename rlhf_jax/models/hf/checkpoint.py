"""`load_pretrained` / `save_pretrained`: Hugging Face safetensors checkpoints <-> our param trees.

Loading is lazy and born sharded. The safetensors headers are read first (names, shapes, dtypes,
byte ranges: a truncated shard, a missing shard, a missing / unexpected weight or a shape that
disagrees with config.json fails here, before any weight is read). Then every parameter is created
with `jax.make_array_from_callback` and its target `NamedSharding`; the callback copies only the
block of the HF tensor that one device holds out of a memory-mapped view of the tensor's bytes
(into a 64-byte aligned buffer, which jax's CPU client adopts without a second copy). Transposed
layouts ([out, in] Linear weights) are handed to the devices as stored and transposed there
(`weights.DEVICE_KINDS`). A tensor is mapped only while its parameter is read, so the mapped pages
never add up to a second copy of the model in the process's resident memory.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import json
import os
import re
import shutil
import struct
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from rlhf_jax.models.config import DTYPES, ModelConfig
from rlhf_jax.models.hf import families, weights

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "tokenizer.model", "vocab.json",
                   "merges.txt", "added_tokens.json")
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_ST_NUMPY = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F64": np.float64}
_NP_TO_ST = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# Host copies of the next parameters overlap the devices' transposes (False: one after the other;
# experiments/bench_hf_load.py times both).
OVERLAP = True
# The on-device transposes are compiled on their own threads before the first host copy (False:
# each is compiled when its first parameter reaches the devices); side by side in the same bench.
PRECOMPILE = True
# Tensors a checkpoint may carry that are not parameters (buffers older transformers saved).
_IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"), re.compile(r".*\.attn\.(masked_)?bias$"))


class HFCheckpointError(ValueError):
  """A checkpoint folder that cannot be loaded as its config.json says (names file / tensor)."""


def _strip(path: str) -> str:
  path = os.fspath(path)
  return path[3:] if path.startswith("hf:") else path


def read_config(path: str) -> dict[str, Any]:
  file = os.path.join(_strip(path), "config.json")
  if not os.path.isfile(file):
    raise HFCheckpointError(f"{file}: not found; a Hugging Face checkpoint folder needs "
                            "config.json next to its safetensors files")
  try:
    with open(file) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise HFCheckpointError(f"{file}: line {e.lineno}: not valid JSON ({e.msg})") from e


def _header(file: str) -> tuple[dict[str, Any], int]:
  """The safetensors header of `file` (checked against the file's size: truncation) and the byte
  offset its tensors' data_offsets count from."""
  size = os.path.getsize(file)
  with open(file, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise HFCheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", raw)
    if 8 + n > size:
      raise HFCheckpointError(f"{file}: truncated safetensors file (header of {n} bytes, file "
                              f"of {size})")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise HFCheckpointError(f"{file}: corrupt safetensors header ({e})") from e
  header.pop("__metadata__", None)
  end = max((t["data_offsets"][1] for t in header.values()), default=0)
  if 8 + n + end > size:
    raise HFCheckpointError(f"{file}: truncated safetensors file: its header needs "
                            f"{8 + n + end} bytes, the file has {size} (an interrupted copy?)")
  return header, 8 + n


def tensor_index(path: str) -> dict[str, tuple[str, list[int], str]]:
  """name -> (file, shape, stored dtype) over the checkpoint's safetensors files."""
  return {name: entry[:3] for name, entry in _tensor_table(path).items()}


def _tensor_table(path: str) -> dict[str, tuple[str, list[int], str, int, int]]:
  """name -> (file, shape, stored dtype, first byte, end byte) over the safetensors files."""
  path = _strip(path)
  index_file, single = os.path.join(path, INDEX_FILE), os.path.join(path, SINGLE_FILE)
  if os.path.isfile(index_file):
    with open(index_file) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise HFCheckpointError(f"{index_file}: no 'weight_map' object")
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(single):
    weight_map, files = None, [SINGLE_FILE]
  else:
    present = sorted(os.listdir(path)) if os.path.isdir(path) else []
    raise HFCheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (found: {present}); only "
                            "safetensors checkpoints are read (convert a pytorch_model.bin with "
                            "transformers' save_pretrained(safe_serialization=True))")
  out: dict[str, tuple[str, list[int], str, int, int]] = {}
  for name in files:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
      raise HFCheckpointError(f"{file}: missing shard (listed in {INDEX_FILE})")
    header, data_start = _header(file)
    for tensor, info in header.items():
      if weight_map is not None and weight_map.get(tensor) != name:
        continue  # the index is authoritative for which shard holds a tensor
      start, stop = info["data_offsets"]
      out[tensor] = (file, list(info["shape"]), info["dtype"], data_start + start,
                     data_start + stop)
  if weight_map is not None:
    missing = sorted(t for t, f in weight_map.items() if t not in out)
    if missing:
      raise HFCheckpointError(f"{os.path.join(path, weight_map[missing[0]])}: tensor "
                              f"{missing[0]!r} listed in {INDEX_FILE} is not in the file")
  return out


def _stored_dtype(d: dict[str, Any], index: dict[str, tuple]) -> str:
  for key in ("dtype", "torch_dtype"):
    if d.get(key) in DTYPES:
      return d[key]
  for _, _, st, *_ in index.values():
    if _ST_DTYPES.get(st) in DTYPES:
      return _ST_DTYPES[st]
  return "float32"


def _abstract(config: ModelConfig):
  from rlhf_jax.models.abstract import abstract_variables  # pylint: disable=import-outside-toplevel
  from rlhf_jax.models.transformer import Transformer  # pylint: disable=import-outside-toplevel
  return abstract_variables(Transformer(config))


def _leaf_paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(tuple(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in flat]


def _unroll_path(path: tuple[str, ...], layer: int) -> tuple[str, ...]:
  return (f"layers_{layer}",) + path[1:]


def _resolve_names(config: ModelConfig, arch: str, index: dict, leaves: list, source: str):
  """Per leaf: its list of Sources (one, or L for a scanned leaf) and the file tensor names each
  Source reads; raises on missing / unexpected / mis-shaped tensors."""
  plan = weights.plan(config, arch)
  prefix = "transformer." if arch == "GPT2LMHeadModel" else "model."
  canonical_of = {}
  for name in index:
    canonical = name if name.startswith(prefix) or name == "lm_head.weight" else prefix + name
    canonical_of[canonical] = name
  per_leaf, needed = [], {}
  for path, leaf in leaves:
    if config.scan_layers and path[0] == "layers":
      srcs = [plan[_unroll_path(path, i)] for i in range(config.n_layers)]
      shape = tuple(leaf.shape[1:])
    else:
      srcs = [plan[path]]
      shape = tuple(leaf.shape)
    per_leaf.append((path, leaf, srcs, shape))
    for s in srcs:
      needed.setdefault(s.name, []).append((s, shape))
  missing = sorted(n for n in needed if n not in canonical_of)
  if missing:
    raise HFCheckpointError(
        f"{source}: weight {missing[0]!r} missing from the safetensors files ({len(missing)} "
        f"missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}); config.json describes "
        f"a {arch} these files do not hold")
  unexpected = sorted(n for c, n in canonical_of.items() if c not in needed and not any(
      r.match(c) for r in _IGNORED) and not (c == "lm_head.weight" and config.tie_embeddings))
  if unexpected:
    file = index[unexpected[0]][0]
    raise HFCheckpointError(
        f"{file}: unexpected weight {unexpected[0]!r} ({len(unexpected)} unexpected: "
        f"{unexpected[:5]}); config.json's {arch} has no such parameter (a different "
        "architecture, or an option config.json does not declare)")
  for name, uses in needed.items():
    file, shape, st = index[canonical_of[name]][:3]
    if _ST_DTYPES.get(st) is None:
      raise HFCheckpointError(f"{file}: tensor {canonical_of[name]!r} is stored as {st}; "
                              f"supported: {sorted(_ST_DTYPES)}")
    fused = 0
    if uses[0][0].kind in weights.FUSED_KINDS:
      fused = max(u.offset + u.heads * u.head_dim for u, _ in uses)
    want = weights.hf_shape(uses[0][0], uses[0][1], fused)
    if tuple(shape) != tuple(want):
      raise HFCheckpointError(
          f"{file}: tensor {canonical_of[name]!r} has shape {list(shape)} but config.json "
          f"({arch}: hidden_size / heads / head_dim / intermediate / vocab) implies {list(want)}")
  return per_leaf, canonical_of


def load_pretrained(path: str, *, mesh: Any = None, rules: Any = None, dtype: str | None = None,
                    param_dtype: str | None = None,
                    scan_layers: bool = False) -> tuple[ModelConfig, Any]:
  """Reads a Hugging Face checkpoint folder (config.json + safetensors) as (ModelConfig, params).

  Args:
    path: the folder (an "hf:" prefix is accepted).
    mesh: a `jax.sharding.Mesh`; each parameter is created with the sharding `rules` give its
      logical axes (`parallel.DEFAULT_RULES` by default). None: one device, unsharded.
    rules: logical-axis rules (see `rlhf_jax.parallel.rules`).
    dtype: compute dtype (default: param_dtype).
    param_dtype: storage dtype of the loaded params (default: the checkpoint's dtype).
    scan_layers: return the scanned tree (a leading layer axis under `layers`).
  Returns:
    (config, params): `params` is the plain tree `Transformer(config).apply({"params": params},
    tokens, mask)` takes.
  """
  path = _strip(path)
  d = read_config(path)
  index = _tensor_table(path)
  param_dtype = param_dtype or _stored_dtype(d, index)
  config = families.config_from_hf(d, source=os.path.join(path, "config.json"), dtype=dtype or
                                   param_dtype, param_dtype=param_dtype, scan_layers=scan_layers)
  arch = families.architecture_of(d)
  abstract = _abstract(config)
  leaves = _leaf_paths(nn.meta.unbox(abstract)["params"])
  per_leaf, canonical_of = _resolve_names(config, arch, index, leaves, path)
  if mesh is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = [sharding] * len(per_leaf)
  else:
    from rlhf_jax import parallel  # pylint: disable=import-outside-toplevel
    tree = parallel.logical_shardings(abstract, mesh, rules or parallel.DEFAULT_RULES)["params"]
    shardings = [s for _, s in _leaf_paths(tree)]
  np_dtype = np.dtype(config.weight_dtype)
  fds: dict[str, int] = {}

  def view(src):
    file, shape, st, start, stop = index[canonical_of[src.name]]
    if file not in fds:
      fds[file] = os.open(file, os.O_RDONLY)
    return weights.map_tensor(fds[file], start, stop, _ST_NUMPY[st], tuple(shape))

  # Two stages on two threads: a worker copies each parameter's device blocks out of the mapped
  # files (numpy releases the GIL while it copies), while this thread has the devices transpose
  # the previous [out, in] parameters (XLA; on CPU the call returns once the transpose ran). At
  # most `ahead` parameters wait for their transpose and at most `in_flight` transposes are
  # pending on the devices, so HF-layout copies never pile up; a tensor is mapped only inside its
  # own host stage. Measured side by side with OVERLAP=False in experiments/bench_hf_load.py.
  ahead, in_flight, out = 2, 4, {}
  pending = collections.deque()

  def scanned(item):
    return config.scan_layers and item[0][0][0] == "layers"

  # The on-device transposes are compiled up front, on their own threads, while the first host
  # copies run: in a fresh process they cost ~1.8 s on the llama_1b bench (6 shapes), which would
  # otherwise halve the first load's GB/s (XLA releases the GIL while it compiles).
  layouts = _LayoutCompiler(np_dtype)
  for item in zip(per_leaf, shardings) if PRECOMPILE else ():
    (_, leaf, srcs, shape), sharding = item
    layouts.submit(
        _transpose_plan(leaf, srcs[0], index[canonical_of[srcs[0].name]][1], sharding,
                        len(srcs) if scanned(item) else None))

  def host_stage(item):
    (_, leaf, srcs, shape), sharding = item
    return _load_leaf(leaf, srcs, shape, sharding, [view(s) for s in srcs], scanned(item), np_dtype)

  def finish(path_, host_result):
    array, plan_ = host_result
    if plan_ is not None:
      array = layouts.get(plan_)(array)
      pending.append(array)
      if len(pending) > in_flight:
        pending.popleft().block_until_ready()
    _insert(out, path_, array)

  items = iter(zip(per_leaf, shardings))
  try:
    if not OVERLAP:
      for item in items:
        finish(item[0][0], host_stage(item))
    else:
      with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hf_load") as pool:
        futures = collections.deque(
            (item[0][0], pool.submit(host_stage, item)) for item in itertools.islice(items, ahead))
        while futures:
          path_, future = futures.popleft()
          item = next(items, None)
          if item is not None:  # queued before this parameter is finished: the worker stays busy
            futures.append((item[0][0], pool.submit(host_stage, item)))
          finish(path_, future.result())
  finally:
    layouts.close()
    for fd in fds.values():
      os.close(fd)
  return config, out


def _insert(tree: dict, path: tuple[str, ...], value: Any) -> None:
  node = tree
  for key in path[:-1]:
    node = node.setdefault(key, {})
  node[path[-1]] = value


@dataclasses.dataclass(frozen=True)
class _TransposePlan:
  """A `DEVICE_KINDS` parameter handed to the devices in its HF layout (`hf_shape`, sharded as
  `hf_sharding`, so each device transposes its own block) and turned into ours (`shape`,
  `sharding`) there."""
  shape: tuple[int, ...]
  sharding: Any
  hf_shape: tuple[int, ...]
  hf_sharding: Any


def _transpose_plan(leaf: Any, src: Any, tensor_shape: tuple[int, ...], sharding: Any,
                    layers: int | None) -> _TransposePlan | None:
  """How the parameter `leaf` (HF tensor `src` of `tensor_shape`; `layers`: a scanned leaf's
  layer count) reaches the devices; None: read in our layout on the host (`weights.read_slice`)."""
  lead = (layers,) if layers is not None else ()
  spec = _spec(sharding, len(leaf.shape))
  if src.kind not in weights.DEVICE_KINDS:
    return None
  stored = weights.stored_spec(src, spec[len(lead):])
  if stored is None:  # a sharded head_dim: no per-device block of the HF layout is ours
    return None
  return _TransposePlan(tuple(leaf.shape), sharding, lead + tuple(tensor_shape),
                        _with_spec(sharding, spec[:len(lead)] + stored))


class _LayoutCompiler:
  """The compiled `weights.to_ours` of every distinct transpose plan, compiled on two threads."""

  def __init__(self, np_dtype: np.dtype):
    self._dtype = np_dtype
    self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="hf_compile")
    self._compiled: dict[_TransposePlan, concurrent.futures.Future] = {}

  def submit(self, plan_: _TransposePlan | None) -> None:
    if plan_ is not None and plan_ not in self._compiled:
      self._compiled[plan_] = self._pool.submit(self._compile, plan_)

  def get(self, plan_: _TransposePlan) -> Any:
    self.submit(plan_)
    return self._compiled[plan_].result()

  def close(self) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)

  def _compile(self, plan_: _TransposePlan) -> Any:
    fn = jax.jit(functools.partial(weights.to_ours, ours_shape=plan_.shape),
                 out_shardings=plan_.sharding)
    return fn.lower(jax.ShapeDtypeStruct(plan_.hf_shape, self._dtype,
                                         sharding=plan_.hf_sharding)).compile()


def _load_leaf(leaf: Any, srcs: list, shape: tuple[int, ...], sharding: Any, views: list,
               scanned: bool, np_dtype: np.dtype) -> tuple[jax.Array, _TransposePlan | None]:
  """The host stage of one parameter: (array, plan). `array` is made from its HF tensors'
  mapped `views` (one per layer of a scanned leaf), each device's block copied once out of the
  mapping; `plan` (None: `array` is the parameter) says how the devices turn it into the
  parameter (the transpose of a stored [out, in] layout)."""
  src = srcs[0]
  plan_ = _transpose_plan(leaf, src, tuple(views[0].shape), sharding,
                          len(srcs) if scanned else None)
  if plan_ is not None:
    hf_shape, hf_sharding = plan_.hf_shape, plan_.hf_sharding
    read = lambda view, _, idx: view[idx]
  else:
    hf_shape, hf_sharding = tuple(leaf.shape), sharding
    read = lambda view, src_, idx: weights.read_slice(view, src_, shape, idx)

  def block(idx):
    idx = _ranges(idx, hf_shape)
    if not scanned:
      return weights.owned_copy(read(views[0], src, idx), np_dtype)
    out = weights.aligned_empty(tuple(s.stop - s.start for s in idx), np_dtype)
    for layer in range(idx[0].start, idx[0].stop):
      weights.copy_into(out[layer - idx[0].start], read(views[layer], srcs[layer], idx[1:]))
    return out

  return jax.make_array_from_callback(hf_shape, hf_sharding, block), plan_


def _spec(sharding: Any, ndim: int) -> tuple:
  spec = tuple(getattr(sharding, "spec", ()))
  return spec + (None,) * (ndim - len(spec))


def _with_spec(sharding: Any, spec: tuple) -> Any:
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
  return sharding  # one device: every spec is the whole array


def _ranges(idx: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
  """`make_array_from_callback`'s index as one explicit slice(start, stop) per dimension."""
  idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
  return tuple(slice(*weights._range(i, n)) for i, n in zip(idx, shape))  # pylint: disable=W0212


def _parse_size(size: int | str) -> int:
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
  if not m:
    raise ValueError(f"max_shard_size={size!r}: expected an int (bytes) or e.g. '5GB' / '500MB'")
  unit = (m.group(2) or "B").upper()
  mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}[unit]
  return int(float(m.group(1)) * mult)


def _host(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _copy_tokenizer(tokenizer: Any, path: str) -> None:
  if hasattr(tokenizer, "save_pretrained"):
    tokenizer.save_pretrained(path)
    return
  src = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None
  for attr in ("path", "directory", "source"):
    if src is None and isinstance(getattr(tokenizer, attr, None), str):
      src = getattr(tokenizer, attr)
  if src is None:
    raise TypeError(f"save_pretrained(tokenizer=...): got {type(tokenizer).__name__}; pass a "
                    "tokenizer folder / tokenizer.json path, or an object with save_pretrained "
                    "or a .path attribute")
  src = _strip(os.fspath(src))
  if os.path.isfile(src):
    shutil.copyfile(src, os.path.join(path, "tokenizer.json"))
    return
  copied = 0
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(path, name))
      copied += 1
  if not copied:
    raise FileNotFoundError(f"{src}: no tokenizer files ({list(TOKENIZER_FILES)})")


def save_pretrained(path: str, config: ModelConfig, params: Any, *, tokenizer: Any = None,
                    dtype: str | None = "bfloat16", max_shard_size: int | str = "5GB",
                    architecture: str | None = None) -> str:
  """Writes `params` as a Hugging Face checkpoint folder `transformers` loads.

  config.json (the family `families.infer_architecture` picks, or `architecture`), safetensors in
  `dtype` (None: the params' own dtype) with metadata {"format": "pt"}, one file or shards of at
  most `max_shard_size` with model.safetensors.index.json, and the tokenizer's files when given.
  Each file is written under a temporary name and renamed, so a crash never leaves a half-written
  shard under a name a reader would open. Returns `path`.
  """
  path = _strip(path)
  if isinstance(params, dict) and set(params) == {"params"}:
    params = params["params"]
  params = nn.meta.unbox(params)
  arch = architecture or families.infer_architecture(config)
  hf_config = families.config_to_hf(config, arch)
  leaves = dict(_leaf_paths(params))
  plan = weights.plan(config, arch)
  stacked = any(p[0] == "layers" for p in leaves)

  def ours(path_):
    if stacked and path_[0].startswith("layers_"):
      layer = int(path_[0].split("_")[1])
      return leaves.get(("layers",) + path_[1:]), layer
    return leaves.get(path_), None

  # HF tensor name -> [(Source, our path)], in a stable order (the plan's).
  groups: dict[str, list] = {}
  for path_, src in plan.items():
    leaf, layer = ours(path_)
    if leaf is not None:
      groups.setdefault(src.name, []).append((src, leaf, layer))
  expected = {
      p for p, _ in _leaf_paths(
          nn.meta.unbox(_abstract(config.replace(scan_layers=stacked)))["params"])}
  if set(leaves) != expected:
    extra, lacking = sorted(set(leaves) - expected), sorted(expected - set(leaves))
    raise ValueError(f"save_pretrained: the params tree does not match the ModelConfig "
                     f"(unexpected: {['/'.join(p) for p in extra][:5]}, missing: "
                     f"{['/'.join(p) for p in lacking][:5]})")
  np_dtype = None if dtype is None else np.dtype(ml_dtypes.bfloat16 if dtype ==
                                                 "bfloat16" else dtype)
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"save_pretrained(dtype={dtype!r}): allowed {DTYPES} or None")

  def build(name):
    parts = []
    for src, leaf, layer in groups[name]:
      x = _host(leaf if layer is None else leaf[layer])
      parts.append((src.offset, weights.to_hf(src, x)))
    parts.sort(key=lambda p: p[0])
    x = parts[0][1] if len(parts) == 1 else np.concatenate([p for _, p in parts], axis=-1)
    return np.ascontiguousarray(x if np_dtype is None else x.astype(np_dtype))

  limit = _parse_size(max_shard_size)
  sizes = {}
  for name, uses in groups.items():
    leaf = uses[0][1]
    per = np.dtype(np_dtype or leaf.dtype).itemsize
    sizes[name] = sum(
        int(np.prod(u[1].shape[1:] if u[2] is not None else u[1].shape)) for u in uses) * per
  shards, current, current_size = [], [], 0
  for name in groups:
    if current and current_size + sizes[name] > limit:
      shards.append(current)
      current, current_size = [], 0
    current.append(name)
    current_size += sizes[name]
  shards.append(current)
  files = [SINGLE_FILE] if len(shards) == 1 else [
      f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

  os.makedirs(path, exist_ok=True)
  if jax.process_index() == 0:
    for stale in os.listdir(path):
      if (stale.startswith("model") and ".safetensors" in stale) and stale not in files:
        os.remove(os.path.join(path, stale))
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  weight_map = {}
  for file, names in zip(files, shards):
    tensors = {name: build(name) for name in names}
    if jax.process_index() == 0:
      tmp = os.path.join(path, file + ".tmp")
      save_file(tensors, tmp, metadata={"format": "pt"})
      os.replace(tmp, os.path.join(path, file))
    weight_map.update({name: file for name in names})
    del tensors
  if jax.process_index() != 0:
    return path
  saved_dtype = dtype or str(next(iter(leaves.values())).dtype)
  hf_config["dtype"] = saved_dtype
  _write_json(os.path.join(path, "config.json"), hf_config)
  if len(files) > 1:
    _write_json(os.path.join(path, INDEX_FILE),
                {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
  if tokenizer is not None:
    _copy_tokenizer(tokenizer, path)
  return path


def _write_json(file: str, obj: Any) -> None:
  tmp = file + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=False)
    f.write("\n")
  os.replace(tmp, file)
