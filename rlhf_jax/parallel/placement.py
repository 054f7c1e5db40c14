"""Where a trainer's arrays live: a mesh built from a config section, plus the rules table.

* :func:`mesh_from_config` — the ``config.mesh`` section (``MeshConfig`` fields) → ``Mesh``; a mesh
  smaller than the host's devices uses the first ones (``-1`` on an axis: all of them). Every
  method builds its mesh through it.
* :class:`Placement` — mesh + rules, with the shardings of rows, replicated values and a module's
  params, and ``jit`` with explicit in/out shardings traced and called inside ``use_mesh``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.parallel.mesh import MESH_AXES, MeshConfig, make_mesh
from rlhf_jax.parallel.rules import DEFAULT_RULES
from rlhf_jax.parallel.sharding import data_sharding, logical_shardings, use_mesh


def mesh_from_config(section: Mapping[str, int] | None) -> Mesh:
  """``config.mesh`` (``MeshConfig`` fields; empty / None = one device) → a ``Mesh``."""
  if not section:
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  from rlhf_jax.train import config_dicts  # pylint: disable=import-outside-toplevel
  mesh_cfg = config_dicts.to_dataclass(MeshConfig, section, "mesh")
  sizes = [getattr(mesh_cfg, a) for a in MESH_AXES]
  devices = jax.devices() if -1 in sizes else jax.devices()[:int(np.prod(sizes))]
  return make_mesh(mesh_cfg, devices=devices)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the trainer's arrays live: a (data, fsdp, tensor) mesh and the logical-axis rules.

  Hashable, so it is part of the cache key of every phase builder.
  """

  mesh: Mesh
  rules: tuple = DEFAULT_RULES

  @property
  def rows(self) -> NamedSharding:
    """Rollout arrays: the leading (row) dimension over the batch axes, the rest replicated."""
    return data_sharding(self.mesh, self.rules)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def params(self, module) -> Any:
    """``NamedSharding`` tree of ``module``'s params (its logical axes through the rules)."""
    return _param_shardings(module, self)

  def jit(self, fn: Callable, in_shardings, out_shardings, **kwargs) -> Callable:
    """``jax.jit`` with explicit shardings, traced and called inside ``use_mesh``."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, **kwargs)

    def call(*args):
      with use_mesh(self.mesh, self.rules):
        return jitted(*args)

    call.jitted = jitted  # for inspection (``call.jitted._cache_size()``)
    return call


@functools.lru_cache(maxsize=32)
def _param_shardings(module, placement: Placement) -> Any:
  from rlhf_jax import models  # pylint: disable=import-outside-toplevel  (models imports parallel)
  from rlhf_jax.models import lora  # pylint: disable=import-outside-toplevel
  base = logical_shardings(models.abstract_variables(lora.unwrap(module)), placement.mesh,
                           placement.rules)["params"]
  # A LoRA policy's params are LoraParams(base, adapters): both get their shardings.
  return lora.param_shardings(module, placement.mesh, placement.rules, base)
