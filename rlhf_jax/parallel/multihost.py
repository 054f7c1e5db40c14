"""Multi-host (multi-process) helpers: start-up, process identity, and global batches.

JAX runs one process per host (or per GPU); every process runs the same program over the *global*
mesh and owns only its local devices' shards. :func:`initialize_distributed` connects the
processes; it must run before anything touches a JAX backend (even ``jax.devices()``).

Where the settings come from, in order:

1. explicit arguments;
2. the environment: ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES``,
   ``JAX_PROCESS_ID`` — what ``launch/multiprocess_local.sh`` exports;
3. cluster auto-detection by ``jax.distributed.initialize()`` itself: Cloud TPU pods, SLURM
   (``srun``), Open MPI. SLURM and Open MPI multi-task jobs are recognised from their environment
   variables; on TPU pods (where detection queries the metadata server) set
   ``RLHF_JAX_DISTRIBUTED=1``, as ``launch/tpu_pod.sh`` does.

Otherwise it is a no-op: a single-host run needs no coordinator. ``RLHF_JAX_DISTRIBUTED=0`` forces
the no-op (e.g. a one-task debugging job inside a SLURM allocation).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _cluster_detected() -> bool:
  """True under a multi-task SLURM step or Open MPI job (what jax auto-detects without network)."""
  slurm_tasks = _env_int("SLURM_NTASKS") if "SLURM_STEP_NODELIST" in os.environ else None
  ompi_size = _env_int("OMPI_COMM_WORLD_SIZE")
  return (slurm_tasks or 1) > 1 or (ompi_size or 1) > 1


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *,
                           local_device_ids: Sequence[int] | None = None,
                           initialization_timeout: int = 300) -> bool:
  """Connects this process to the others; returns True if running multi-process.

    Idempotent: a second call after a successful one returns True without doing anything.
    """
  if jax.distributed.is_initialized():
    return True
  mode = os.environ.get("RLHF_JAX_DISTRIBUTED", "auto").lower()
  if mode not in ("auto", "0", "1"):
    raise ValueError(f"RLHF_JAX_DISTRIBUTED must be 'auto', '0' or '1', got {mode!r}")
  if mode == "0":
    return False
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError(
          "initialize_distributed: coordinator_address, num_processes and process_id must be "
          f"given together (arguments or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
          f"JAX_PROCESS_ID), got coordinator_address={coordinator_address!r}, "
          f"num_processes={num_processes!r}, process_id={process_id!r}")
    if num_processes == 1:
      return False
  elif mode == "auto" and not _cluster_detected():
    return False
  # From here jax fills whatever is still None from the detected cluster (TPU / SLURM / MPI).
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             initialization_timeout=initialization_timeout)
  return True


def process_index() -> int:
  """Index of this process in ``[0, process_count())``."""
  return jax.process_index()


def process_count() -> int:
  """Number of processes in the job (1 on a single host)."""
  return jax.process_count()


def is_coordinator() -> bool:
  """True on process 0, the one that should write logs, configs and summaries."""
  return jax.process_index() == 0


def make_global_batch(local_batch: Any, sharding: NamedSharding) -> Any:
  """Assembles global arrays from each process's local slice of the batch.

    Every process calls this with its own ``local_batch`` (a pytree of NumPy arrays whose leading
    dim is ``global_batch / process_count()``, as sliced per host by the data pipeline); the result
    is a pytree of global ``jax.Array`` s with leading dim ``global_batch`` laid out by ``sharding``
    (usually :func:`rlhf_jax.parallel.data_sharding`). Process p's rows become global rows
    ``[p * local, (p + 1) * local)`` when the batch mesh axes are ordered by process, as
    ``make_mesh`` orders them.
    """
  ways = _local_batch_ways(sharding)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError("make_global_batch: batch leaves need a leading batch dimension")
    if x.shape[0] % ways:
      raise ValueError(f"make_global_batch: local batch of {x.shape[0]} rows cannot be split "
                       f"over this process's {ways} batch shards")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map(put, local_batch)


def _local_batch_ways(sharding: NamedSharding) -> int:
  """How many distinct batch slices this process's devices hold under ``sharding``."""
  mesh = sharding.mesh
  axes = tuple(sharding.spec)[0] if len(sharding.spec) else None
  axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  if not axes:
    return 1
  names = list(mesh.axis_names)
  local = set(sharding.addressable_devices)
  coords = {
      tuple(idx[names.index(a)]
            for a in axes)
      for idx, d in np.ndenumerate(mesh.devices)
      if d in local}
  return len(coords)
