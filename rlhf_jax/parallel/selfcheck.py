"""Checks that every process of a (multi-host) job sees the same global mesh and can reduce over it.

Run it through any launcher before a long job::

    launch/local.sh -m rlhf_jax.parallel.selfcheck
    NUM_PROCESSES=2 launch/multiprocess_local.sh -m rlhf_jax.parallel.selfcheck
    launch/tpu_pod.sh "python -m rlhf_jax.parallel.selfcheck"
    sbatch launch/slurm.sbatch -m rlhf_jax.parallel.selfcheck

Each process prints one line ``selfcheck process=i/n local_devices=.. global_devices=.. mesh=..
sum=.. expected=.. ok=True``. The sum is over a global array whose rows live on different
processes, so a wrong coordinator, a missing process or broken cross-host collectives show up as an
error, a hang (bounded by the initialization timeout) or ``ok=False``. Exit status 1 if not ok.

Optional flags (plain ``--key=value``; this module has no absl dependency): ``--data``, ``--fsdp``,
``--tensor`` mesh sizes (default: data=-1).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.parallel.mesh import MeshConfig, make_mesh
from rlhf_jax.parallel.multihost import initialize_distributed, process_count, process_index
from rlhf_jax.parallel.sharding import shard_batch, use_mesh

ROWS_PER_DEVICE = 2


def _parse(argv: list[str]) -> MeshConfig:
  sizes = {}
  for arg in argv:
    key, _, value = arg.removeprefix("--").partition("=")
    if key not in ("data", "fsdp", "tensor") or not value:
      raise SystemExit(f"selfcheck: unknown argument {arg!r}; use --data=N --fsdp=N --tensor=N")
    sizes[key] = int(value)
  return MeshConfig(**sizes)


def main(argv: list[str]) -> int:
  config = _parse(argv)
  initialize_distributed()
  mesh = make_mesh(config)
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  global_rows = ROWS_PER_DEVICE * batch_ways
  local_rows = global_rows // process_count()
  # Row r holds the value r + 1; each process contributes its own contiguous rows.
  start = process_index() * local_rows
  local = np.arange(start + 1, start + local_rows + 1, dtype=np.float32)[:, None] * np.ones(
      (1, 4), np.float32)
  batch = shard_batch({"x": local}, mesh)
  with use_mesh(mesh):
    total = float(jax.jit(lambda b: jnp.sum(b["x"]))(batch))
  expected = 4.0 * global_rows * (global_rows + 1) / 2
  ok = total == expected
  print(
      f"selfcheck process={process_index()}/{process_count()} "
      f"local_devices={jax.local_device_count()} global_devices={jax.device_count()} "
      f"mesh={dict(mesh.shape)} sum={total} expected={expected} ok={ok}", flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
