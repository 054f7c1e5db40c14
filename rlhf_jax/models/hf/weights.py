"""Where each of our parameters lives in a Hugging Face checkpoint, and how to read a slice of it.

`plan(config)` maps every leaf path of our (unrolled) parameter tree to a `Source`: the HF tensor
name and the layout change between the two. Layouts (D d_model, N / K heads, H head_dim):

  copy        ours == HF                               embeddings, norms, o/mlp biases, GPT-2 c_fc
  transpose   ours [in, out] == HF Linear [out, in].T  Llama-family MLP, lm_head
  heads_in    ours [D, n, H] <- HF Linear [n H, D]     q/k/v projections
  heads_in_c  ours [D, n, H] <- HF Conv1D [D, ..n H..] GPT-2's fused c_attn (column offset)
  heads_out   ours [N, H, D] <- HF Linear [D, N H]     o_proj
  heads_out_c ours [N, H, D] <- HF Conv1D [N H, D]     GPT-2's c_proj
  head_bias   ours [n, H]    <- HF [..n H..]           q/k/v biases (offset into GPT-2's fused bias)

`read_slice` returns one device's block of one of our parameters given the numpy index
`jax.make_array_from_callback` asks for, reading only the matching rows / columns of the HF tensor
(a memory-mapped view of it), so no host ever holds a full copy of a sharded parameter.
`to_hf` is the inverse on whole arrays (for saving).

The three transposed kinds (`DEVICE_KINDS`) are not transposed on the host when loading: the
device is handed the HF tensor sharded as `stored_spec` says (each device's block is the
transpose of its block of our parameter) and `to_ours` transposes it there, block by block, with
no data moving between devices. Why: numpy's 2-byte transposes run at 0.6-1.2 GB/s on one core,
XLA's on 8 CPU devices at 2.8 GB/s (and an accelerator's at its memory bandwidth), and the host
then makes exactly one copy of every byte (page cache -> a 64-byte aligned buffer that jax's CPU
client adopts without copying).
"""

from __future__ import annotations

import dataclasses
import mmap
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Source:
  name: str  # canonical HF tensor name (prefixed: "model." / "transformer.")
  kind: str
  heads: int = 0
  head_dim: int = 0
  offset: int = 0  # column offset into a fused tensor (GPT-2 c_attn)


FUSED_KINDS = ("heads_in_c", "head_bias")
DEVICE_KINDS = ("transpose", "heads_in", "heads_out")
ALIGN = 64  # bytes; jax's CPU client adopts a numpy buffer aligned to this instead of copying it


def plan(config: ModelConfig, architecture: str) -> dict[Path, Source]:
  """Our unrolled param path -> its HF source, for every parameter `config` can have."""
  c = config
  n, k, h, d = c.n_heads, c.num_kv_heads, c.head_size, c.d_model
  out: dict[Path, Source] = {}
  if architecture == "GPT2LMHeadModel":
    t = "transformer."
    out[("embedding",)] = Source(t + "wte.weight", "copy")
    out[("pos_embedding",)] = Source(t + "wpe.weight", "copy")
    out[("final_norm", "scale")] = Source(t + "ln_f.weight", "copy")
    out[("final_norm", "bias")] = Source(t + "ln_f.bias", "copy")
    for i in range(c.n_layers):
      p, L = f"{t}h.{i}.", f"layers_{i}"
      for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        out[(L, ours, "scale")] = Source(p + theirs + ".weight", "copy")
        out[(L, ours, "bias")] = Source(p + theirs + ".bias", "copy")
      for j, (proj, heads) in enumerate((("q", n), ("k", k), ("v", k))):
        off = [0, n * h, (n + k) * h][j]
        out[(L, "attn", f"{proj}_kernel")] = Source(p + "attn.c_attn.weight", "heads_in_c", heads,
                                                    h, off)
        out[(L, "attn", f"{proj}_bias")] = Source(p + "attn.c_attn.bias", "head_bias", heads, h,
                                                  off)
      out[(L, "attn", "o_kernel")] = Source(p + "attn.c_proj.weight", "heads_out_c", n, h)
      out[(L, "attn", "o_bias")] = Source(p + "attn.c_proj.bias", "copy")
      out[(L, "mlp", "up_kernel")] = Source(p + "mlp.c_fc.weight", "copy")
      out[(L, "mlp", "up_bias")] = Source(p + "mlp.c_fc.bias", "copy")
      out[(L, "mlp", "down_kernel")] = Source(p + "mlp.c_proj.weight", "copy")
      out[(L, "mlp", "down_bias")] = Source(p + "mlp.c_proj.bias", "copy")
    return out
  m = "model."
  out[("embedding",)] = Source(m + "embed_tokens.weight", "copy")
  out[("final_norm", "scale")] = Source(m + "norm.weight", "copy")
  out[("lm_head",)] = Source("lm_head.weight", "transpose")
  gemma2 = architecture == "Gemma2ForCausalLM"
  for i in range(c.n_layers):
    p, L = f"{m}layers.{i}.", f"layers_{i}"
    out[(L, "attn_norm", "scale")] = Source(p + "input_layernorm.weight", "copy")
    if gemma2:
      out[(L, "post_attn_norm", "scale")] = Source(p + "post_attention_layernorm.weight", "copy")
      out[(L, "mlp_norm", "scale")] = Source(p + "pre_feedforward_layernorm.weight", "copy")
      out[(L, "post_mlp_norm", "scale")] = Source(p + "post_feedforward_layernorm.weight", "copy")
    else:
      out[(L, "mlp_norm", "scale")] = Source(p + "post_attention_layernorm.weight", "copy")
    for proj, heads in (("q", n), ("k", k), ("v", k)):
      out[(L, "attn", f"{proj}_kernel")] = Source(p + f"self_attn.{proj}_proj.weight", "heads_in",
                                                  heads, h)
      out[(L, "attn", f"{proj}_bias")] = Source(p + f"self_attn.{proj}_proj.bias", "head_bias",
                                                heads, h)
    out[(L, "attn", "o_kernel")] = Source(p + "self_attn.o_proj.weight", "heads_out", n, h)
    out[(L, "attn", "o_bias")] = Source(p + "self_attn.o_proj.bias", "copy")
    out[(L, "attn", "q_norm", "scale")] = Source(p + "self_attn.q_norm.weight", "copy")
    out[(L, "attn", "k_norm", "scale")] = Source(p + "self_attn.k_norm.weight", "copy")
    for proj in ("gate", "up", "down"):
      out[(L, "mlp", f"{proj}_kernel")] = Source(p + f"mlp.{proj}_proj.weight", "transpose")
      out[(L, "mlp", f"{proj}_bias")] = Source(p + f"mlp.{proj}_proj.bias", "copy")
  del d
  return out


def hf_shape(src: Source, ours: tuple[int, ...], fused_width: int = 0) -> tuple[int, ...]:
  """The HF tensor's shape implied by our parameter's shape (`fused_width`: the fused tensor's
  last dimension, for GPT-2's c_attn)."""
  if src.kind == "copy":
    return tuple(ours)
  if src.kind == "transpose":
    return tuple(reversed(ours))
  if src.kind == "heads_in":
    return (ours[1] * ours[2], ours[0])
  if src.kind == "heads_in_c":
    return (ours[0], fused_width)
  if src.kind == "heads_out":
    return (ours[2], ours[0] * ours[1])
  if src.kind == "heads_out_c":
    return (ours[0] * ours[1], ours[2])
  if src.kind == "head_bias":
    return (fused_width or ours[0] * ours[1],)
  raise AssertionError(src.kind)


def _range(s: slice, size: int) -> tuple[int, int]:
  start, stop, step = s.indices(size)
  assert step == 1, s
  return start, stop


def transpose2d(x: np.ndarray, block: int = 64) -> np.ndarray:
  """x.T as a new C-contiguous array, copied in row blocks (and 2-byte dtypes as uint16).

  Why: `np.ascontiguousarray(x.T)` walks one side of the copy with a stride of a whole row; on a
  [8192, 2048] bf16 matrix that took 142 ms, the blocked copy 23 ms (2026-12-02, this machine).
  ml_dtypes' bfloat16 gets no native copy loop, hence the uint16 view (same bytes)."""
  src = x.view(np.uint16) if x.dtype.itemsize == 2 and x.dtype != np.uint16 else x
  out = np.empty(src.shape[::-1], src.dtype)
  for i in range(0, src.shape[0], block):
    out[:, i:i + block] = src[i:i + block].T
  return out.view(x.dtype)


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
  """An uninitialised C-contiguous array whose data starts on an `ALIGN`-byte boundary."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + ALIGN, np.uint8)
  start = -raw.ctypes.data % ALIGN
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def copy_into(out: np.ndarray, x: np.ndarray) -> None:
  """out[...] = x (a cast where the dtypes differ); equal 2-byte dtypes copied as uint16, since
  ml_dtypes' bfloat16 has no fast strided copy loop of its own."""
  if x.dtype == out.dtype and x.dtype.itemsize == 2:
    out, x = out.view(np.uint16), x.view(np.uint16)
  np.copyto(out, x, casting="unsafe")


def owned_copy(x: np.ndarray, dtype: Any) -> np.ndarray:
  """A fresh, aligned, C-contiguous `dtype` copy of `x`, which a device may adopt (a block handed
  to jax must never be a view of a memory-mapped file: the device array would alias the file)."""
  out = aligned_empty(x.shape, dtype)
  copy_into(out, x)
  return out


def map_tensor(fd: int, start: int, stop: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
  """A read-only numpy view of bytes [start, stop) of the open file `fd` (a safetensors tensor),
  mapped only for the view's lifetime: dropping the last reference unmaps it, so the file's
  pages never accumulate in the process's resident memory."""
  if stop == start:
    return np.empty(shape, dtype)
  base = start - start % mmap.ALLOCATIONGRANULARITY
  m = mmap.mmap(fd, stop - base, offset=base, access=mmap.ACCESS_READ)
  return np.frombuffer(m, dtype, count=(stop - start) // np.dtype(dtype).itemsize,
                       offset=start - base).reshape(shape)


def stored_spec(src: Source, spec: tuple) -> tuple | None:
  """The partition spec (one entry per dim, None = unsharded) of the HF tensor of a
  `DEVICE_KINDS` parameter whose sharding has `spec`, such that `to_ours` on each device's block
  gives that device's block of our parameter; None where no such spec exists (a sharded
  head_dim would interleave blocks of the fused n*H axis)."""
  kind = src.kind
  if kind == "transpose":  # ours [in, out] <- HF [out, in]
    return (spec[1], spec[0])
  if kind == "heads_in":  # ours [D, n, H] <- HF [n H, D]
    return None if spec[2] is not None else (spec[1], spec[0])
  if kind == "heads_out":  # ours [N, H, D] <- HF [D, N H]
    return None if spec[1] is not None else (spec[2], spec[0])
  raise AssertionError(kind)


def to_ours(x: jax.Array, ours_shape: tuple[int, ...]) -> jax.Array:
  """Our parameter (a `DEVICE_KINDS` one, any leading layer axis) from its HF-layout tensor `x`:
  the last two axes swapped, the fused n*H axis split into heads."""
  return jnp.swapaxes(x, -1, -2).reshape(ours_shape)


def read_slice(tensor: Any, src: Source, ours_shape: tuple[int, ...], index: tuple) -> np.ndarray:
  """Our parameter's block `index` (a tuple of slices) read from the HF tensor `tensor` (a
  `safe_open(...).get_slice(name)` object, or any array supporting numpy slicing)."""
  index = tuple(index) + (slice(None),) * (len(ours_shape) - len(index))
  r = [_range(s, n) for s, n in zip(index, ours_shape)]
  sl = [slice(a, b) for a, b in r]
  kind, hd, off = src.kind, src.head_dim, src.offset
  if kind == "copy":
    return np.asarray(tensor[tuple(sl)])
  if kind == "transpose":
    return transpose2d(np.asarray(tensor[sl[1], sl[0]]))
  if kind == "head_bias":
    (n0, n1), = r[:1]
    x = np.asarray(tensor[off + n0 * hd:off + n1 * hd]).reshape(n1 - n0, hd)
    return x[:, sl[1]]
  if kind in ("heads_in", "heads_in_c"):  # ours [D, n, H]
    (d0, d1), (n0, n1) = r[0], r[1]
    if kind == "heads_in":
      x = transpose2d(np.asarray(tensor[n0 * hd:n1 * hd, d0:d1])).reshape(d1 - d0, n1 - n0, hd)
    else:
      x = np.asarray(tensor[d0:d1, off + n0 * hd:off + n1 * hd]).reshape(d1 - d0, n1 - n0, hd)
    return x[:, :, sl[2]]
  if kind in ("heads_out", "heads_out_c"):  # ours [N, H, D]
    (n0, n1), (d0, d1) = r[0], r[2]
    if kind == "heads_out":
      x = transpose2d(np.asarray(tensor[d0:d1, n0 * hd:n1 * hd])).reshape(n1 - n0, hd, d1 - d0)
    else:
      x = np.asarray(tensor[n0 * hd:n1 * hd, d0:d1]).reshape(n1 - n0, hd, d1 - d0)
    return x[:, sl[1], :]
  raise AssertionError(kind)


def to_hf(src: Source, ours: np.ndarray) -> np.ndarray:
  """Our whole parameter in the HF tensor's layout (for fused kinds: this parameter's part)."""
  kind = src.kind
  if kind == "copy":
    return ours
  if kind == "transpose":
    return ours.T
  if kind == "heads_in":
    return ours.transpose(1, 2, 0).reshape(-1, ours.shape[0])
  if kind == "heads_in_c":
    return ours.reshape(ours.shape[0], -1)
  if kind == "heads_out":
    return ours.transpose(2, 0, 1).reshape(ours.shape[2], -1)
  if kind == "heads_out_c":
    return ours.reshape(-1, ours.shape[2])
  if kind == "head_bias":
    return ours.reshape(-1)
  raise AssertionError(kind)
