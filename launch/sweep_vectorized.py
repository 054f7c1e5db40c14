"""``launch/sweep.py --vectorize``: the grid's runs trained in this process as one jitted program.

Each grid point's config is parsed exactly as ``experiments/run.py --config=<config>
--config.<key>=<value> ...`` would parse it (ml_collections' own flag parser), then
``rlhf_jax.algorithms.offline.vectorized.train_sweep`` trains them together; each run lands in
``<sweep_dir>/<run>`` as the sequential sweep writes it, so the results table, CSV and frontier
plot are built by the same code. A run that diverged is frozen (``<run>/nonfinite.json``) and
listed as such; a rerun skips finished and frozen runs and resumes the rest. A grid that cannot be
vectorised (PPO / GRPO, a key that changes shapes, RM early stopping) exits with one line naming
why, before anything is trained.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from absl import flags
from ml_collections import config_flags

FROZEN_FILE = "nonfinite.json"  # train.vectorized.FROZEN_FILE (not imported: keeps --help fast)


def parse_config(config: str, overrides: dict[str, str]):
  """The ConfigDict ``experiments/run.py --config=<config> --config.<k>=<v>...`` would get."""
  argv = ["sweep", f"--config={config}", *[f"--config.{k}={v}" for k, v in overrides.items()]]
  values = flags.FlagValues()
  # sys_argv: the override flags are defined from these args (by default from sys.argv, which
  # holds the sweep's own arguments, so no --config.<k> override was known)
  config_flags.DEFINE_config_file("config", None, "config", flag_values=values, lock_config=False,
                                  sys_argv=argv)
  values(argv)
  return values.config


def frozen_status(workdir: str) -> str | None:
  """``frozen: ...`` for a run a vectorised sweep froze (its ``nonfinite.json``), else None."""
  path = os.path.join(workdir, FROZEN_FILE)
  if not os.path.isfile(path):
    return None
  import json  # pylint: disable=import-outside-toplevel
  record = json.load(open(path))
  return (f"frozen: non-finite {record['cause']} at step {record['step']} {record['detail']} "
          f"(latest checkpoint: {record['last_checkpoint']}; delete {FROZEN_FILE} to retry)")


def run_vectorized(todo: list[tuple[str, dict, str]], *, config: str, fixed: dict[str, str],
                   run_devices: int = 1, log: Callable[[str], None] = print) -> dict[str, dict]:
  """Trains the ``(name, point, workdir)`` runs of ``todo`` together; ``{name: row}``."""
  from rlhf_jax.algorithms.offline import vectorized  # pylint: disable=import-outside-toplevel

  if not config:
    raise ValueError("--vectorize needs --config (the grid points' shared config file)")
  rows, runs = {}, []
  for name, point, workdir in todo:
    status = frozen_status(workdir)
    if status is not None:
      rows[name] = {"status": status, "seconds": None}
    else:
      runs.append((name, point, workdir))
  if not runs:
    return rows
  configs = [parse_config(config, {**fixed, **point}) for _, point, _ in runs]
  try:
    vectorized.check_sweep(configs)
  except ValueError as err:  # refused before anything trains: one line, no traceback
    raise SystemExit(f"sweep: {err}") from None
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  log(f"sweep: training {len(runs)} runs as one vectorised program "
      f"(run_devices={run_devices})")
  start = time.time()
  outcomes = vectorized.train_sweep(configs, [w for _, _, w in runs], [n for n, _, _ in runs],
                                    run_devices=run_devices)
  seconds = time.time() - start
  log(f"sweep: vectorised program done in {seconds:.0f}s")
  for outcome in outcomes:
    if outcome.frozen is not None:
      status = frozen_status(dict((n, w) for n, _, w in runs)[outcome.name])
    elif outcome.preempted:
      status = f"preempted at step {outcome.step} (rerun to resume)"
    else:
      status = "ok (vectorised)"
    # seconds: this run's share of the one program's wall time
    rows[outcome.name] = {"status": status, "seconds": round(seconds / len(runs), 1)}
  return rows
