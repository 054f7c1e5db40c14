r"""The SLURM backend of ``launch/sweep.py``: a grid as one job array, task i = grid point i.

  python launch/sweep.py --backend=slurm --config=experiments/configs/dpo_synthetic.py \
      --grid=loss.beta=0.05,0.1,0.3 --set=sources.sft_workdir=/shared/runs/sft \
      --sweep_dir=/shared/sweeps/dpo_beta --sbatch_arg=--gpus-per-node=1 \
      --sbatch_arg=--time=02:00:00
  # ... when the array job has finished (squeue -j JOB shows nothing):
  python launch/sweep.py --backend=slurm <the same flags> --gather

* ``<sweep_dir>/sweep_array.json`` lists every grid point (run name, workdir, overrides) in grid
  order, and ``<sweep_dir>/sweep_array.sbatch`` is one script with ``#SBATCH --array=<indices>``:
  the indices of the points not finished yet (``0-(N-1)`` for a fresh sweep), so array task i
  always runs grid point i. Each task runs
  ``python launch/sweep_slurm.py --task_file=... --index=$SLURM_ARRAY_TASK_ID``, which starts the
  same launcher command as the local backend (``sweep.launch``: same run name, same workdir, output
  in ``<run>/sweep.log``) and records its exit status and wall time in ``<run>/sweep_task.json``.
* ``--sbatch_arg`` (repeatable) adds ``#SBATCH`` lines (partition, GPUs, time); SLURM's output of
  task i goes to ``<sweep_dir>/slurm-<job>_<i>.out``. ``--dry_run`` prints the script and the
  ``sbatch`` command and submits nothing; ``--slurm_wait`` submits with ``sbatch --wait`` and
  gathers once the array has finished.
* ``--gather`` (no submission) builds ``results.csv`` / ``results.md`` / ``frontier.png`` from the
  runs' workdirs exactly as the local backend does; a point without ``final_metrics.json`` is
  listed as failed (with its exit status and last log line) or as not finished yet.
* A task runs one launcher process (one node). Rerunning the submit command submits only the
  unfinished points; the launchers resume them from their checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from launch import sweep  # noqa: E402  pylint: disable=wrong-import-position
from rlhf_jax import fileio  # noqa: E402  pylint: disable=wrong-import-position

TASK_FILE = "sweep_array.json"
SCRIPT_FILE = "sweep_array.sbatch"
TASK_RECORD = "sweep_task.json"  # <run>/sweep_task.json: exit status and seconds of its task


def _atomic_write(path: str, text: str) -> None:
  fileio.atomic_write_text(path, text)


def array_spec(indices: Sequence[int]) -> str:
  """``0-3`` for a contiguous range, else ``1,3,5`` (sbatch's ``--array`` syntax)."""
  indices = sorted(indices)
  if indices == list(range(indices[0], indices[-1] + 1)):
    return f"{indices[0]}-{indices[-1]}" if len(indices) > 1 else str(indices[0])
  return ",".join(map(str, indices))


def points_of(grid, sweep_dir: str) -> list[dict]:
  """Every grid point in grid order, ``{"name", "workdir", "overrides"}``, as the local backend."""
  points = sweep.expand(grid)
  names = [sweep.run_name(p) for p in points]
  if len(set(names)) != len(names):
    raise ValueError(f"grid values give clashing run names: {names}")
  return [{"name": n, "workdir": fileio.join(sweep_dir, n), "overrides": p}
          for n, p in zip(names, points)]


def write_array(*, launcher: str, config: str, grid, fixed: dict, sweep_dir: str,
                sbatch_args: Sequence[str] = (), python: str = sys.executable,
                job_name: str = "") -> tuple[str, list[int]]:
  """Writes the task file and the array script; returns (script path, indices to run)."""
  if fileio.is_remote(sweep_dir):  # sbatch reads the script, SLURM writes the task logs there
    raise ValueError(f"--sweep_dir={sweep_dir!r}: the SLURM backend needs a shared filesystem path "
                     "(sbatch reads the array script and SLURM writes the task logs there); the "
                     "runs can still write gs:// paths their configs name")
  fileio.makedirs(sweep_dir)
  points = points_of(grid, sweep_dir)
  todo = [
      i for i, p in enumerate(points) if not fileio.exists(fileio.join(p["workdir"], sweep.FINAL))]
  task_file = os.path.join(sweep_dir, TASK_FILE)
  _atomic_write(
      task_file,
      json.dumps(
          {
              "launcher": launcher, "config": config, "fixed": fixed, "python": python,
              "points": points}, indent=2) + "\n")
  lines = [
      "#!/usr/bin/env bash",
      f"#SBATCH --job-name={job_name or 'sweep_' + os.path.basename(sweep_dir)}",
      f"#SBATCH --array={array_spec(todo) if todo else '0'}",
      f"#SBATCH --output={os.path.join(sweep_dir, 'slurm-%A_%a.out')}"]
  lines += [f"#SBATCH {arg}" for arg in sbatch_args]
  lines += [
      "# Array task i runs grid point i of sweep_array.json (written by launch/sweep.py).",
      "set -euo pipefail", f"cd {shlex.quote(REPO)}",
      f"exec {shlex.quote(python)} {shlex.quote(os.path.abspath(__file__))} "
      f"--task_file={shlex.quote(task_file)} --index=\"$SLURM_ARRAY_TASK_ID\""]
  script = os.path.join(sweep_dir, SCRIPT_FILE)
  _atomic_write(script, "\n".join(lines) + "\n")
  return script, todo


def submit(script: str, *, wait: bool = False, dry_run: bool = False, log=print) -> str | None:
  """``sbatch --parsable [--wait] SCRIPT``; returns the job id (None for a dry run)."""
  cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), script]
  if dry_run:
    log(open(script).read().rstrip())
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    return None
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if result.returncode != 0 and not (wait and result.stdout.strip()):
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {result.returncode}): "
                       f"{(result.stderr or result.stdout).strip()[-500:]}")
  return result.stdout.strip().splitlines()[0].split(";")[0] if result.stdout.strip() else ""


def gather(grid, sweep_dir: str) -> list[dict]:
  """One row per grid point from the runs' workdirs (the columns the local backend writes)."""
  rows = []
  for point in points_of(grid, sweep_dir):
    workdir, record = point["workdir"], {}
    record_path = fileio.join(workdir, TASK_RECORD)
    if fileio.exists(record_path):
      record = fileio.read_json(record_path)
    final_path = fileio.join(workdir, sweep.FINAL)
    if fileio.exists(final_path):
      status = "ok"
    elif record.get("rc"):
      last = sweep.last_line(fileio.join(workdir, "sweep.log"))
      status = f"failed (exit {record['rc']}): {last}"
    elif record:
      status = "failed: exited 0 without final_metrics.json"
    else:
      status = "failed: not finished (array task pending, running or lost)"
    rows.append(
        sweep.with_final_metrics(
            {
                "run": point["name"], **point["overrides"], "status": status,
                "seconds": record.get("seconds")}, workdir))
  return rows


def run(args: argparse.Namespace, grid, fixed: dict, *, launcher: str, config: str, sweep_dir: str,
        log=print) -> list[dict] | None:
  """``launch/sweep.py --backend=slurm``: submit (or print, or gather); rows when gathered."""
  if args.gather:
    return gather(grid, sweep_dir)
  script, todo = write_array(launcher=launcher, config=config, grid=grid, fixed=fixed,
                             sweep_dir=sweep_dir, sbatch_args=args.sbatch_arg)
  if not todo:
    log(f"sweep: every run in {sweep_dir} has finished; gathering")
    return gather(grid, sweep_dir)
  job = submit(script, wait=args.slurm_wait, dry_run=args.dry_run, log=log)
  if args.dry_run:
    return None
  log(f"sweep: submitted array job {job} ({len(todo)} task(s): grid points {array_spec(todo)}) "
      f"from {script}")
  if args.slurm_wait:
    return gather(grid, sweep_dir)
  log("sweep: when it has finished, rerun this command with --gather for results.md / .csv")
  return None


def run_task(task_file: str, index: int) -> int:
  """One array task: grid point ``index`` through the local backend's ``sweep.launch``."""
  spec = fileio.read_json(task_file)
  point = spec["points"][index]
  workdir = point["workdir"]
  if fileio.exists(fileio.join(workdir, sweep.FINAL)):
    print(f"sweep task {index}: {point['name']} finished earlier", flush=True)
    return 0
  print(f"sweep task {index}: {point['name']} in {workdir}", flush=True)
  rc, seconds = sweep.launch(spec["launcher"], spec["config"], workdir, point["overrides"],
                             spec["fixed"], python=spec.get("python") or sys.executable)
  _atomic_write(
      fileio.join(workdir, TASK_RECORD),
      json.dumps({
          "rc": rc, "seconds": round(seconds, 1), "index": index, "array_job": os.environ.get(
              "SLURM_ARRAY_JOB_ID", "")}) + "\n")
  print(f"sweep task {index}: {point['name']} exit {rc} after {seconds:.0f}s", flush=True)
  return rc


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="launch/sweep_slurm.py",
                                   description="Run one array task of a launch/sweep.py sweep.")
  parser.add_argument("--task_file", required=True, help=f"<sweep_dir>/{TASK_FILE}")
  parser.add_argument("--index", type=int, required=True, help="the grid point (array task id)")
  args = parser.parse_args(argv)
  return run_task(args.task_file, args.index)


if __name__ == "__main__":
  sys.exit(main())
