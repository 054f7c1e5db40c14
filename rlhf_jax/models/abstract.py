"""Shapes, dtypes and logical axes of a model's variables, without running it (`jax.eval_shape`).

Every place that needs a param tree's structure before the params exist (sharding a restore target,
placing loaded params on a mesh, the optimiser state's shardings) starts from this one function.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=64)
def abstract_variables(module: nn.Module) -> Any:
  """`{"params": ...}` of `module.init` as `ShapeDtypeStruct`s, still boxed with their logical axes
  (`nn.LogicallyPartitioned`, what `parallel.logical_shardings` reads). Works for `Transformer`,
  `RewardModel` and `ValueModel` (all called as `module(tokens_BxT, mask_BxT)`); no FLOPs run."""
  dummy_1x8 = jnp.ones((1, 8), jnp.int32)
  return jax.eval_shape(functools.partial(module.init, jax.random.PRNGKey(0), dummy_1x8, dummy_1x8))


def abstract_params(module: nn.Module) -> Any:
  """The unboxed `params` tree of :func:`abstract_variables` (plain `ShapeDtypeStruct` leaves)."""
  return nn.meta.unbox(abstract_variables(module))["params"]
