"""Where a trainer's arrays live: a mesh built from a config section, plus the rules table.

* :func:`mesh_from_config` — the ``config.mesh`` section (``MeshConfig`` fields) → ``Mesh``; on one
  process a mesh smaller than the host's devices uses the first ones (``-1`` on an axis: all of
  them); in a multi-process job the mesh spans every device of every process. Every method builds
  its mesh through it.
* :class:`Placement` — mesh + rules, with the shardings of rows, replicated values and a module's
  params, and ``jit`` with explicit in/out shardings traced and called inside ``use_mesh``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.parallel.mesh import MESH_AXES, MeshConfig, make_mesh
from rlhf_jax.parallel.rules import DEFAULT_RULES
from rlhf_jax.parallel.sharding import data_sharding, logical_shardings, use_mesh

logger = logging.getLogger(__name__)


def mesh_from_config(section: Mapping[str, int] | None) -> Mesh:
  """``config.mesh`` (``MeshConfig`` fields; empty / None = one device) → a ``Mesh``.

  One process: the mesh takes the first ``data * fsdp * tensor`` devices (``-1`` on an axis: all of
  them), so the shipped configs' ``data=1, fsdp=1, tensor=1`` is one device, as it always was.

  Several processes (``jax.distributed``): every process must own devices of the mesh, so it spans
  all devices of all processes. The one-device default (1 x 1 x 1) becomes pure data parallelism
  over all of them (``data=-1``); any other layout must use every device (one axis ``-1``, or sizes
  whose product is the global device count), else a ``ValueError`` says so.
  """
  from rlhf_jax.train import config_dicts  # pylint: disable=import-outside-toplevel
  mesh_cfg = (config_dicts.to_dataclass(MeshConfig, section, "mesh") if section else MeshConfig(
      data=1, fsdp=1, tensor=1))
  sizes = [getattr(mesh_cfg, a) for a in MESH_AXES]
  if jax.process_count() > 1:
    if sizes == [1, 1, 1]:
      mesh_cfg = dataclasses.replace(mesh_cfg, data=-1)
      logger.info("%d processes: the default one-device mesh becomes data=%d (every device)",
                  jax.process_count(), jax.device_count())
    elif -1 not in sizes and int(np.prod(sizes)) != jax.device_count():
      raise ValueError(
          f"config.mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) uses "
          f"{int(np.prod(sizes))} devices but this {jax.process_count()}-process job has "
          f"{jax.device_count()}: a multi-process mesh spans every device of every process; set "
          "one axis to -1 or make the product equal the global device count")
    return make_mesh(mesh_cfg, devices=jax.devices())
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
