"""Low-level ops with hand-written gradients that the decoder's layers are built from.

* `matmul`: an einsum whose bf16 / f16 forward and backward matmuls accumulate in float32.
* `materialize_cotangent`: an identity whose gradient is written to memory once on XLA:CPU.

Both exist for XLA:CPU performance (BUILD_NOTES.md, bench_model section: "What the performance pass
changed, and the evidence"); numerically both are the plain op (tests/test_models.py).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def matmul(spec: str, a: jax.Array, b: jax.Array, out_dtype: Any = None) -> jax.Array:
  """`einsum(spec, a, b)` in the operands' dtype with float32 accumulation, returned in `out_dtype`
  (default: the operands' dtype).

  Plain einsum for float32 operands. For bf16 / f16 operands the forward and both backward
  matmuls take narrow operands and accumulate in float32 (`preferred_element_type`):

    c = a . b;  dL/da = dL/dc . b^T;  dL/db = a^T . dL/dc   (each an einsum, cotangent cast to the
    operand dtype).

  Why: XLA:CPU runs a bf16 x bf16 -> bf16 dot on a slow generic path (at [2048, 768] x [768, 50257]
  slower than float32), while bf16 x bf16 -> f32 reaches the AMX / AVX512-BF16 kernels (2.8x
  faster than float32 on this Sapphire Rapids). JAX's own transpose of an f32-output dot would make
  the backward matmuls float32 x bf16, i.e. upcast to float32.
  """
  if hasattr(b, "lora_matmul"):  # a kernel with its LoRA adapter (models.lora.Adapted)
    return b.lora_matmul(spec, a, out_dtype)
  out_dtype = a.dtype if out_dtype is None else out_dtype
  if a.dtype == jnp.float32 and b.dtype == jnp.float32:
    return jnp.einsum(spec, a, b).astype(out_dtype)
  return _narrow_matmul(spec, jnp.dtype(out_dtype), a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _narrow_matmul(spec, out_dtype, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _narrow_matmul_fwd(spec, out_dtype, a, b):
  return _narrow_matmul(spec, out_dtype, a, b), (a, b)


def _narrow_matmul_bwd(spec, out_dtype, res, g):
  del out_dtype
  a, b = res
  inputs, out = spec.split("->")
  sa, sb = inputs.split(",")
  da = jnp.einsum(f"{out},{sb}->{sa}", g.astype(a.dtype), b, preferred_element_type=jnp.float32)
  db = jnp.einsum(f"{sa},{out}->{sb}", a, g.astype(b.dtype), preferred_element_type=jnp.float32)
  return da.astype(a.dtype), db.astype(b.dtype)


_narrow_matmul.defvjp(_narrow_matmul_fwd, _narrow_matmul_bwd)


@jax.custom_vjp
def materialize_cotangent(x: jax.Array) -> jax.Array:
  """Identity; on CPU its cotangent is written to memory once instead of being re-fused downstream.

  Why: in the unrolled stack the residual stream's gradient is a chain of adds (each block's norm
  and branch contributions). XLA:CPU fuses that elementwise chain into *every* consumer (each
  weight-gradient matmul's transposed operand), recomputing the sum from the top of the stack in
  every layer: O(L^2) memory passes, ~20% of a gpt2 train step. `lax.optimization_barrier` does not
  stop it (XLA:CPU expands barriers into control dependencies before fusion); a conditional does:
  fusion never crosses its boundary, so its result is one materialised buffer. Both branches are
  the identity (the second is taken only if the first element is NaN, and returns the same values),
  so numerics are untouched. Off on GPU/TPU, where a conditional can cost a device-host sync and
  the fusion heuristics differ. With `scan_layers` the cotangent is a loop carry and already
  materialised.
  """
  return x


def _materialize_cotangent_fwd(x):
  return x, None


def _materialize_cotangent_bwd(_, g):
  if jax.default_backend() != "cpu":
    return (g,)
  first = g.reshape(-1)[0]
  return (jax.lax.cond(first == first, lambda y: y, lambda y: -(-y), g),)


materialize_cotangent.defvjp(_materialize_cotangent_fwd, _materialize_cotangent_bwd)
