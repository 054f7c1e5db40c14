"""Multi-host (multi-process) helpers: start-up, process identity, global batches, host reads,
coordinator-only writes and agreement checks.

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

The rules every method follows once the processes are connected (each is one helper here):

* **host reads** — :func:`to_host` turns (possibly multi-host) global arrays into NumPy on every
  process (``process_allgather`` where a process does not hold the whole value). It is a
  collective: every process calls it, in the same order, never inside ``if is_coordinator()``.
* **shared files** — written by process 0 only: :func:`write_on_coordinator` (or
  ``if is_coordinator():``), followed by :func:`sync` where other processes read the file next.
* **one config** — :func:`check_same_config`: every process hashes its config and all fail, naming
  the processes, when one differs (different flags or files per host).
* **what ran** — :func:`topology` (process and device count, mesh shape) for ``final_metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

logger = logging.getLogger(__name__)


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
                           initialization_timeout: int = 300,
                           heartbeat_timeout_seconds: int | None = None) -> bool:
  """Connects this process to the others; returns True if running multi-process.

    ``heartbeat_timeout_seconds`` (default ``RLHF_JAX_HEARTBEAT_TIMEOUT_S``, else jax's 100): a
    process that stops answering (``kill -9``, a dead node) is declared failed after this long
    and every other process is terminated with an error instead of waiting in a collective.

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
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
      local_device_ids=local_device_ids, initialization_timeout=initialization_timeout,
      heartbeat_timeout_seconds=heartbeat_timeout_seconds or
      _env_int("RLHF_JAX_HEARTBEAT_TIMEOUT_S") or 100)
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


def to_host(tree: Any) -> Any:
  """NumPy copies of a pytree of arrays on every process, whichever processes hold the shards.

    A leaf this process holds in full (fully addressable, e.g. single-host; or fully replicated)
    is read with ``np.asarray``; a global array whose shards live on other processes is gathered
    with ``multihost_utils.process_allgather(tiled=True)`` (every process gets the global value).
    Other leaves (NumPy, Python scalars) pass through ``np.asarray``. Gathering is a collective:
    call it on every process in the same order (never only on the coordinator).
    """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  remote = [
      i for i, x in enumerate(leaves)
      if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated)]
  out = [np.asarray(x) if i not in remote else None for i, x in enumerate(leaves)]
  if remote:  # one collective for all of them
    gathered = multihost_utils.process_allgather([leaves[i] for i in remote], tiled=True)
    for i, x in zip(remote, gathered):
      out[i] = np.asarray(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def allgather_rows(tree: Any) -> Any:
  """Each process's host NumPy rows concatenated in process order, on every process.

    Leaves must have the same shape on every process (e.g. each host's slice of a batch); a
    collective like :func:`to_host`. One process: the leaves as NumPy.
    """
  if jax.process_count() == 1:
    return jax.tree_util.tree_map(np.asarray, tree)
  return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def device_put_global(tree: Any, shardings: Any) -> Any:
  """``jax.device_put(tree, shardings)`` that also works when ``shardings`` span several processes.

    Multi-process: a leaf held by this process alone (e.g. params restored onto one local device)
    goes through host NumPy first, so every process places its own shards (a device-to-device copy
    across hosts is not supported by every backend). One process: plain ``jax.device_put``.
    """
  if jax.process_count() > 1:
    tree = jax.tree_util.tree_map(
        lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x, tree)
  return jax.device_put(tree, shardings)


def sync(name: str) -> None:
  """Barrier across processes (no-op on one): e.g. after process 0 wrote a file the others read."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def write_on_coordinator(fn: Callable[..., Any], *args: Any, barrier: str | None = None,
                         **kwargs: Any) -> Any:
  """``fn(*args, **kwargs)`` on process 0 only (shared files: configs, metrics, tables, plots).

    Returns ``fn``'s result on process 0 and ``None`` elsewhere. With ``barrier`` the processes
    then meet in :func:`sync` (``barrier`` names it), so a file process 0 just wrote can be read by
    every process after the call.
    """
  result = fn(*args, **kwargs) if is_coordinator() else None
  if barrier is not None:
    sync(barrier)
  return result


def agree(value: bool | int | float) -> bool | int | float:
  """Process 0's ``value`` on every process (``broadcast_one_to_all``; identity on one process).

    For decisions taken from files that process 0 may be writing meanwhile (does the task exist?
    is the stage finished?): every process must take the same branch, or one of them waits in a
    collective the others never enter.
    """
  if jax.process_count() == 1:
    return value
  kind = type(value)
  dtype = np.float32 if kind is float else np.int32
  return kind(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value, dtype))).item())


def local_rows(x: Any) -> np.ndarray:
  """This process's rows of a global array whose dim 0 is split over the batch axes, as NumPy.

    The inverse of :func:`make_global_batch`: the addressable shards, one per distinct row block
    (replicas over the other axes dropped), in row order. Single process: the whole array.
    """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  blocks = {}
  for shard in x.addressable_shards:
    rows = shard.index[0] if shard.index else slice(None)
    start = rows.start or 0
    if start not in blocks:
      blocks[start] = np.asarray(shard.data)
  return np.concatenate([blocks[k] for k in sorted(blocks)], axis=0)


def config_hash(config: Any) -> str:
  """SHA-256 of a config (``ConfigDict`` / dict / dataclass-free tree) as sorted JSON."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  text = json.dumps(config, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()


def check_same_config(config: Any, what: str = "config") -> None:
  """Raises ``ValueError`` on every process if any process's ``config`` differs from the others'.

    Each process hashes its config (:func:`config_hash`); the 64-bit prefixes are all-gathered, so
    all processes fail together (none waits in a collective for a peer that stopped) and the message
    names the processes that disagree with process 0. No-op on one process.
    """
  if jax.process_count() == 1:
    return
  digest = config_hash(config)
  words = np.frombuffer(bytes.fromhex(digest[:16]), dtype=np.int32)  # int32: x64 may be off
  all_words = np.asarray(multihost_utils.process_allgather(words)).reshape(jax.process_count(), -1)
  differ = [p for p in range(jax.process_count()) if not np.array_equal(all_words[p], all_words[0])]
  if differ:
    raise ValueError(
        f"the {what} of process(es) {differ} differs from process 0's (this process: "
        f"{jax.process_index()}, hash {digest[:16]}): every process must run the same command with "
        "the same flags and config files")


def topology(mesh: Mesh | None = None) -> dict:
  """``{"process_count", "device_count", "mesh_shape"}``: what a run ran on (``final_metrics.json``).

    ``device_count`` is the global mesh's size (all devices when ``mesh`` is None) and
    ``mesh_shape`` its ``{axis: size}``.
    """
  if mesh is None:
    return {
        "process_count": jax.process_count(), "device_count": jax.device_count(), "mesh_shape": {}}
  return {
      "process_count": jax.process_count(), "device_count": int(mesh.devices.size),
      "mesh_shape": {str(k): int(v) for k, v in mesh.shape.items()}}


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
