r"""Grid sweeps over config overrides of any method's config, with one results table and plot.

  python launch/sweep.py --config=experiments/configs/dpo_synthetic.py \
      --grid=loss.loss_type=sigmoid,ipo,hinge --grid=loss.beta=0.05,0.1,0.3 --grid=seed=0,1 \
      --set=sources.sft_workdir=workdirs/sft_synthetic --sweep_dir=workdirs/sweep_dpo --parallel=2

* ``--grid key=v1,v2,...`` (repeatable) spans the Cartesian product, in the order given; use ``;``
  between values when a value itself holds commas (``--grid='loss.loss_type=sigmoid,bco_pair;ipo'``).
  ``--set key=value`` applies to every run.
* Each run is ``python <launcher> --config=<config> --workdir=<sweep_dir>/<run> --config.<key>=<v>``
  (``--launcher`` defaults to the one launcher, ``experiments/run.py``) in its own workdir
  (``<run>`` is built from the grid values), its output in ``<run>/sweep.log``.
  Runs go sequentially, or ``--parallel N`` at a time as local subprocesses.
* A run whose workdir holds ``final_metrics.json`` is finished and skipped on a rerun; a failed or
  interrupted one is run again (the launchers resume from their checkpoints).
* ``--vectorize``: the runs train in this process as one jitted program instead
  (``launch/sweep_vectorized.py``, ``rlhf_jax.train.vectorized``; DPO family incl. SimPO / ORPO,
  PRO / RRHF, KTO: the grid may vary the loss's hyperparameters and ``loss.*`` keys; SFT and the
  reward model; all: ``optim.lr``, ``seed`` and ``data.shuffle_seed``). PPO / GRPO and the other
  rollout methods are refused (their step is a host loop). ``--run_devices N`` shards the runs
  over N device groups (mesh axis ``run``). Each run's outputs are the same files in the same
  place (plus ``vectorized.json``: where it ran); a diverging run is frozen, not fatal.
* ``--backend=slurm``: the runs go to a SLURM job array instead, array task i = grid point i
  (``launch/sweep_slurm.py``: ``--sbatch_arg``, ``--dry_run``, ``--slurm_wait``); rerun with
  ``--gather`` once the array has finished to build the results below from the runs' workdirs.
* Afterwards ``results.csv``, ``results.md`` (one row per run; a failed run is listed with its exit
  status and last log line, never dropped) and ``frontier.png`` (gold reward vs KL to SFT) are
  written to ``--sweep_dir``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from rlhf_jax import fileio  # noqa: E402  pylint: disable=wrong-import-position

FINAL = "final_metrics.json"
METRIC_COLUMNS = ("gold_reward", "gold_reward_gain", "kl_to_sft", "win_rate_vs_sft", "rm_reward",
                  "response_length", "pairs/rewards/accuracies", "pairs/rewards/margins", "step")


def parse_assignment(text: str) -> tuple[str, str]:
  if "=" not in text:
    raise ValueError(f"{text!r} is not key=value")
  key, value = text.split("=", 1)
  key = key.strip().removeprefix("config.")
  if not re.fullmatch(r"[A-Za-z_][\w.]*", key):
    raise ValueError(f"{text!r}: {key!r} is not a config key (section.name)")
  return key, value


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
  grid = []
  for spec in specs:
    key, values = parse_assignment(spec)
    parts = [v.strip() for v in values.split(";" if ";" in values else ",")]
    if not parts or any(p == "" for p in parts):
      raise ValueError(f"--grid {spec!r}: empty value")
    grid.append((key, parts))
  return grid


def expand(grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
  """Every combination, as ordered ``{key: value}`` dicts (one empty dict for an empty grid)."""
  keys = [k for k, _ in grid]
  return [dict(zip(keys, combo)) for combo in itertools.product(*[v for _, v in grid])]


def run_name(overrides: dict[str, str]) -> str:
  if not overrides:
    return "run"
  parts = [f"{k.split('.')[-1]}-{v}" for k, v in overrides.items()]
  return re.sub(r"[^\w.\-+]", "_", "__".join(parts))


def launch(launcher: str, config: str, workdir: str, overrides: dict[str, str],
           fixed: dict[str, str], python: str = sys.executable) -> tuple[int, float]:
  """Runs one launcher subprocess; returns (exit status, seconds). Output -> ``<workdir>/sweep.log``."""
  fileio.makedirs(workdir)
  cmd = [python, launcher, f"--workdir={workdir}"]
  if config:
    cmd.append(f"--config={config}")
  cmd += [f"--config.{k}={v}" for k, v in {**fixed, **overrides}.items()]
  start = time.time()
  log_path = fileio.join(workdir, "sweep.log")
  remote = fileio.is_remote(log_path)  # the child writes a local file; a URL gets it afterwards
  with (tempfile.NamedTemporaryFile("w+", suffix=".log") if remote else open(log_path, "a")) as log:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if remote:
      log.seek(0)
      fileio.append_text(log_path, log.read())
  return rc, time.time() - start


def last_line(path: str) -> str:
  try:
    text = fileio.read_bytes(path).decode("utf-8", errors="replace")
    lines = [l.strip() for l in text.splitlines() if l.strip()]
  except (OSError, FileNotFoundError):
    return ""
  return lines[-1][:160] if lines else ""


def run_sweep(*, launcher: str, config: str, grid: list[tuple[str, list[str]]],
              fixed: dict[str, str], sweep_dir: str, parallel: int = 1, log=print,
              vectorize: bool = False, run_devices: int = 1) -> list[dict]:
  """Runs (or skips) every grid point and returns one row per run (see :func:`write_results`)."""
  if parallel < 1:
    raise ValueError(f"--parallel={parallel}; allowed: an int >= 1")
  points = expand(grid)
  names = [run_name(p) for p in points]
  if len(set(names)) != len(names):
    raise ValueError(f"grid values give clashing run names: {names}")
  fileio.makedirs(sweep_dir)
  rows: dict[str, dict] = {}
  todo = []
  for name, point in zip(names, points):
    workdir = fileio.join(sweep_dir, name)
    if fileio.exists(fileio.join(workdir, FINAL)):
      rows[name] = {"status": "finished earlier (skipped)", "seconds": None}
    else:
      todo.append((name, point, workdir))
  log(f"sweep: {len(points)} runs, {len(points) - len(todo)} already finished, {len(todo)} to run "
      f"({parallel} at a time) in {sweep_dir}")

  def one(item):
    name, point, workdir = item
    log(f"sweep: start {name}")
    rc, seconds = launch(launcher, config, workdir, point, fixed)
    ok = rc == 0 and fileio.exists(fileio.join(workdir, FINAL))
    status = "ok" if ok else (f"failed (exit {rc}): {last_line(fileio.join(workdir, 'sweep.log'))}"
                              if rc else "failed: exited 0 without final_metrics.json")
    log(f"sweep: {'done' if ok else 'FAILED'} {name} in {seconds:.0f}s")
    return name, {"status": status, "seconds": round(seconds, 1)}

  if vectorize:
    from launch import sweep_vectorized  # pylint: disable=import-outside-toplevel
    rows.update(
        sweep_vectorized.run_vectorized(todo, config=config, fixed=fixed, run_devices=run_devices,
                                        log=log))
    todo = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    for name, row in pool.map(one, todo):
      rows[name] = row
  out = []
  for name, point in zip(names, points):
    out.append(
        with_final_metrics({"run": name, **point, **rows[name]}, fileio.join(sweep_dir, name)))
  return out


def with_final_metrics(row: dict, run_dir: str) -> dict:
  """``row`` plus the scalar entries of ``<run_dir>/final_metrics.json`` (if the run finished)
  that ``row`` does not already hold: one results-table row (both backends)."""
  final_path = fileio.join(run_dir, FINAL)
  if fileio.exists(final_path):
    final = fileio.read_json(final_path)
    row.update({
        k: v for k, v in final.items() if isinstance(v, (int, float, str)) and k not in row})
  return row


def write_results(rows: list[dict], grid_keys: Sequence[str], sweep_dir: str, command: str) -> str:
  from rlhf_jax.eval import frontier  # pylint: disable=import-outside-toplevel

  present = [c for c in METRIC_COLUMNS if any(c in r for r in rows)]
  columns = ["run", *grid_keys, "status", *present, "seconds"]
  table = frontier.write_table(
      rows, columns, csv_path=fileio.join(sweep_dir, "results.csv"),
      md_path=fileio.join(sweep_dir, "results.md"), title="Sweep results",
      preamble=f"Command: `{command}`  \nDate: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
  )
  sft = next((r["sft_gold_reward"] for r in rows if isinstance(r.get("sft_gold_reward"), float)),
             None)
  frontier.plot_frontier([{**r, "label": r["run"]} for r in rows],
                         fileio.join(sweep_dir, "frontier.png"), sft_gold=sft,
                         title="Sweep: gold reward vs KL to SFT")
  return table


def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(prog="launch/sweep.py", description=__doc__.split("\n\n")[0])
  parser.add_argument("--launcher", default=os.path.join(REPO, "experiments", "run.py"),
                      help="the launcher script (default: experiments/run.py)")
  parser.add_argument("--config", default="", help="config file passed as --config (optional)")
  parser.add_argument("--grid", action="append", default=[], help="key=v1,v2,... (repeatable)")
  parser.add_argument("--set", action="append", default=[], dest="fixed",
                      help="key=value applied to every run (repeatable)")
  parser.add_argument("--sweep_dir", required=True, help="root of the runs' workdirs and results")
  parser.add_argument("--parallel", type=int, default=1, help="runs at a time (local subprocesses)")
  parser.add_argument("--vectorize", action="store_true",
                      help="train the runs in this process as one jitted program")
  parser.add_argument("--run_devices", type=int, default=1,
                      help="--vectorize: device groups the runs are sharded over (mesh axis run)")
  parser.add_argument("--backend", choices=("local", "slurm"), default="local",
                      help="local subprocesses, or one SLURM job array (launch/sweep_slurm.py)")
  parser.add_argument("--gather", action="store_true",
                      help="run nothing: build the results from the runs' workdirs (slurm)")
  parser.add_argument("--dry_run", action="store_true",
                      help="--backend=slurm: print the sbatch script and command, submit nothing")
  parser.add_argument("--sbatch_arg", action="append", default=[],
                      help="--backend=slurm: an #SBATCH option for every task (repeatable)")
  parser.add_argument("--slurm_wait", action="store_true",
                      help="--backend=slurm: sbatch --wait, then gather the results")
  args = parser.parse_args(argv)
  grid = parse_grid(args.grid)
  fixed = dict(parse_assignment(s) for s in args.fixed)
  clash = sorted(set(fixed) & {k for k, _ in grid})
  if clash:
    parser.error(f"{clash} are both --set and --grid keys")
  if not os.path.isfile(args.launcher):
    parser.error(f"--launcher={args.launcher!r}: no such file")
  if args.backend == "slurm" or args.gather:
    from launch import sweep_slurm  # pylint: disable=import-outside-toplevel
    rows = sweep_slurm.run(args, grid, fixed, launcher=os.path.abspath(args.launcher),
                           config=os.path.abspath(args.config) if args.config else "",
                           sweep_dir=fileio.absolute(args.sweep_dir),
                           log=lambda msg: print(msg, flush=True))
    if rows is None:  # submitted (or a dry run): the results come with --gather
      return []
  else:
    rows = run_sweep(launcher=os.path.abspath(args.launcher),
                     config=os.path.abspath(args.config) if args.config else "", grid=grid,
                     fixed=fixed, sweep_dir=fileio.absolute(args.sweep_dir), parallel=args.parallel,
                     log=lambda msg: print(msg, flush=True), vectorize=args.vectorize,
                     run_devices=args.run_devices)
  command = "python launch/sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
  print(write_results(rows, [k for k, _ in grid], args.sweep_dir, command), flush=True)
  failed = [r["run"] for r in rows if str(r["status"]).startswith(("failed", "frozen"))]
  if failed:
    print(f"sweep: {len(failed)} run(s) failed: {failed} (see <run>/sweep.log)", flush=True)
  return rows


if __name__ == "__main__":
  rows_ = main()
  sys.exit(1 if any(str(r["status"]).startswith(("failed", "frozen")) for r in rows_) else 0)
