"""Device meshes with the three axes every rlhf_jax program uses: ``data``, ``fsdp``, ``tensor``.

* ``data``   — pure data parallelism: each group holds a full replica of the (fsdp/tensor-sharded)
  parameters and a slice of the batch; gradients are all-reduced over it.
* ``fsdp``   — fully-sharded data parallelism (ZeRO-3): the batch is also split over it, and the
  ``embed`` dimension of every parameter and optimiser moment is sharded over it, so parameters are
  all-gathered just before use and gradients reduce-scattered.
* ``tensor`` — Megatron-style tensor parallelism: heads, MLP hidden units and the vocabulary are
  split over it; activations are reduced across it inside each block.

The mesh is ordered (data, fsdp, tensor) from least to most communication-hungry, which is the
order ``jax.make_mesh`` / ``mesh_utils.create_device_mesh`` expect to lay physical rings out well.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the (data, fsdp, tensor) mesh axes.

    Exactly one field may be ``-1``, meaning "all devices left over by the other two"; the product of
    the resolved sizes must equal the number of devices (checked in :meth:`resolve`, which needs the
    device count). The default ``MeshConfig()`` is pure data parallelism over every device, which on a
    single device is the trivial 1x1x1 mesh.

    ``device_memory_gb`` is not a mesh axis: the memory (GiB) of one device. When > 0, a launcher
    plans the run's per-device memory first (``rlhf_jax.algorithms.plan``) and refuses, printing
    the plan, when the planned peak exceeds it; 0 (the default) runs without a plan.
    """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  device_memory_gb: float = 0.0

  def __post_init__(self):
    for name in MESH_AXES:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"MeshConfig.{name} must be an int (a positive size or -1), "
                        f"got {value!r} of type {type(value).__name__}")
      if value == 0 or value < -1:
        raise ValueError(f"MeshConfig.{name} must be a positive size or -1 (the rest of the "
                         f"devices), got {value}")
    if isinstance(self.device_memory_gb, bool) or not (isinstance(
        self.device_memory_gb, (int, float)) and self.device_memory_gb >= 0):
      raise ValueError(f"MeshConfig.device_memory_gb={self.device_memory_gb!r} is invalid; allowed: "
                       "a number >= 0 (GiB per device; 0 = no memory plan)")
    wildcards = [name for name in MESH_AXES if getattr(self, name) == -1]
    if len(wildcards) > 1:
      raise ValueError(f"MeshConfig: at most one axis may be -1 (the rest of the devices), got "
                       f"{', '.join(f'{n}=-1' for n in wildcards)}")

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    """Returns concrete (data, fsdp, tensor) sizes whose product is ``num_devices``."""
    sizes = {name: getattr(self, name) for name in MESH_AXES}
    known = math.prod(v for v in sizes.values() if v != -1)
    wildcard = next((name for name, v in sizes.items() if v == -1), None)
    if wildcard is not None:
      if num_devices % known:
        raise ValueError(
            f"MeshConfig.{wildcard}=-1 cannot be resolved: the other axes use {known} devices, "
            f"which does not divide the {num_devices} available devices")
      sizes[wildcard] = num_devices // known
    elif known != num_devices:
      raise ValueError(
          f"MeshConfig(data={sizes['data']}, fsdp={sizes['fsdp']}, tensor={sizes['tensor']}) "
          f"uses {known} devices but {num_devices} are available; set one field to -1 or "
          f"make the product equal {num_devices}")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(config: MeshConfig = MeshConfig(),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ("data", "fsdp", "tensor") mesh over ``devices`` (default: all global devices).

    Uses ``jax.make_mesh``, which picks a topology-aware device order on TPU/GPU and the plain order
    on CPU. All axes are ``AxisType.Auto``: the model steers GSPMD with ``nn.with_logical_constraint``
    (which lowers to ``lax.with_sharding_constraint``) rather than carrying explicit shardings in its
    types, and Auto is the axis type that contract is defined for (``jax.make_mesh`` defaults to
    Explicit since jax 0.7).
    """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh: `devices` is empty")
  shape = config.resolve(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)
