r"""The one launcher: any method, from its experiment config.

  python experiments/run.py --config=experiments/configs/<name>.py[:<arg>] --workdir=<run dir> \
      [--config.<section>.<key>=<value> ...]

``config.method`` names the method (``rlhf_jax.algorithms.registry``: sft, reward_model,
rm_learning_curve, dpo, listwise, raft, best_of_n, ppo, iterated_rlhf); this calls its
``train_and_evaluate(config, workdir)``. Installed with ``pip install -e .`` it is also the console
script ``rlhf-run``. Every config's docstring gives its command, e.g.

  python experiments/run.py --config=experiments/configs/sft_synthetic.py --workdir=workdirs/sft
  python experiments/run.py --config=experiments/configs/rm_synthetic.py --workdir=workdirs/rm
  python experiments/run.py --config=experiments/configs/dpo_synthetic.py --workdir=workdirs/dpo \
      --config.sources.sft_workdir=workdirs/sft_synthetic

``--config.num_seeds=N`` (or ``--num_seeds=N``) runs N replicates: seed k adds k to every seed of
the config except the task's (``rlhf_jax.algorithms.seeding``), seed 0 in ``--workdir`` (a finished
run there is reused), seed k in ``<workdir>/seed_<k>``; then ``<workdir>/seeds.md`` and
``seeds.json`` hold the mean ± standard error of every final metric over the seeds.

Re-running the same command in the same workdir resumes the run (SIGTERM checkpoints and exits 0).
SIGTERM or Ctrl-C at any point (from the first line of ``main``) stops cleanly with exit status 0:
during training the step is checkpointed; before or after it nothing is half-written. A finished
run rerun with the same config is a no-op that says so.

A bad config value or a missing input is reported in one line (exit status 2): an unknown
``--config.<section>.<key>`` lists the allowed keys of that section; a NaN / divergence stop, a
full disk (the path and the free space) or another OS error is one line too (exit status 1).
``--debug`` (or ``--verbosity=1``, or ``RLHF_JAX_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax import cli, fileio, parallel, train
from rlhf_jax.algorithms import registry, seeding
from rlhf_jax.train import config_dicts, signals

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/configs/<name>.py[:<arg>]); its `method` "
    "key names the method.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config, checkpoints, metrics, "
    "final_metrics.json; rerunning resumes it.")
_DEBUG = flags.DEFINE_bool(
    "debug", False, "Show the traceback of a config / input error "
    "(also RLHF_JAX_DEBUG=1).")
_NUM_SEEDS = flags.DEFINE_integer(
    "num_seeds", None, "Run N replicates (seed k adds k to every seed of the config; seed 0 in "
    "--workdir, seed k in <workdir>/seed_<k>) and write seeds.md / seeds.json (mean ± s.e. of "
    "every final metric) to --workdir. Also spelled --config.num_seeds=N. Default: the config's "
    "num_seeds, else 1.")
flags.mark_flags_as_required(["config", "workdir"])

USER_ERRORS = cli.USER_ERRORS
SEEDS_MD, SEEDS_JSON = "seeds.md", "seeds.json"


def parse_flags(argv):
  """:func:`cli.parse_flags`, reading ``--config.num_seeds=N`` as ``--num_seeds=N`` (the method
  configs have no such key: it is the launcher's, spelled as the pipeline spells it)."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config.num_seeds="):
      arg = "--num_seeds=" + arg.split("=", 1)[1]
    elif arg == "--config.num_seeds" and i + 1 < len(argv):
      arg, i = f"--num_seeds={argv[i + 1]}", i + 1
    out.append(arg)
    i += 1
  if argv is sys.argv or argv == sys.argv:  # config_flags reads its --config.* overrides there too
    sys.argv[:] = out
  return cli.parse_flags(out)


def method_of(config) -> str:
  """``config.method``, checked against the registry (the error lists the allowed names)."""
  if "method" not in config:
    raise ValueError(f"the config has no `method` key; allowed: {' | '.join(registry.METHODS)}")
  registry.get(config.method)  # raises naming the allowed methods
  return config.method


def run(config, workdir: str):
  return registry.run(method_of(config), config, workdir)  # plans memory first when asked


def _summary(result) -> str:
  if isinstance(result, dict):
    keep = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}
    return json.dumps(keep, sort_keys=True)[:2000]
  return str(result)[:2000]


def finished_earlier(config, workdir: str) -> dict | None:
  """``final_metrics.json`` of a finished run in ``workdir`` with this same config, else None."""
  config_path = fileio.join(workdir, "config.json")
  if not (train.is_finished(workdir) and fileio.isfile(config_path)):
    return None
  try:
    stored = train.read_json(config_path)
    current = json.loads(json.dumps(config.to_dict(), default=str))
    if stored != current:
      return None  # another config (e.g. more steps): the method decides what to redo
    return train.read_json(fileio.join(workdir, train.FINAL_METRICS_FILE))
  except (OSError, ValueError):
    return None


def main(argv):
  signals.install_process_handler()  # SIGTERM / Ctrl-C from here on: a clean stop, exit 0
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint op at INFO
  debug = _DEBUG.value or flags.FLAGS.verbosity >= 1 or cli.debug_requested()
  try:
    config = _CONFIG.value
    config.keys()  # the lazy error object raises here
  except OSError as err:  # config_flags defers "no such config file" to the first access
    if debug:
      raise
    print(f"{argv[0]}: flag error: {cli.short_message(err)}\n(--debug shows the traceback)",
          file=sys.stderr)
    sys.exit(2)
  if not debug:
    cli.quiet_background_errors()
  workdir = _WORKDIR.value
  try:
    num = _NUM_SEEDS.value if _NUM_SEEDS.value is not None else seeding.num_seeds(config)
    if num < 1:
      raise ValueError(f"--num_seeds={num} is invalid; allowed: an int >= 1")
  except ValueError as err:
    print(f"{argv[0]}: flag error: {err}", file=sys.stderr)
    sys.exit(2)
  if "num_seeds" in config:  # the launcher's key: each run's config.json stays the plain run's
    config = config_dicts.without_keys(config, ("num_seeds",))
  if num == 1:
    run_one(argv, config, workdir, debug)
    return
  finals = []
  for seed in range(num):
    seed_workdir = seeding.seed_root(workdir, seed)
    print(f"[seed {seed + 1}/{num}] {seed_workdir}", flush=True)
    final = run_one(argv, seeding.seed_config(config, seed), seed_workdir, debug)
    if final is None:  # stopped: the rerun resumes this seed and runs the rest
      return
    final_path = fileio.join(seed_workdir, train.FINAL_METRICS_FILE)
    finals.append(train.read_json(final_path) if fileio.isfile(final_path) else final)
  stats = seeding.summary(finals)
  table = seeding.summary_markdown(f"{method_of(config)}: {num} seeds ({workdir})", stats, num)
  if parallel.is_coordinator():
    fileio.atomic_write_json(
        fileio.join(workdir, SEEDS_JSON), {
            "num_seeds": num, "workdirs": [seeding.seed_root(workdir, k) for k in range(num)],
            "metrics": stats})
    fileio.atomic_write_text(fileio.join(workdir, SEEDS_MD), table)
  print(table, flush=True)


def run_one(argv, config, workdir: str, debug: bool) -> dict | None:
  """One run to its end: its final metrics, or None when it was stopped (SIGTERM / Ctrl-C: the
  step is checkpointed and a rerun resumes). A failure exits the process with one line."""
  done = finished_earlier(config, workdir)
  if done is not None:
    print(
        f"{workdir} holds this run, finished: nothing to do (delete "
        f"{fileio.join(workdir, train.FINAL_METRICS_FILE)} to evaluate it again); "
        f"final: {_summary(done)}", flush=True)
    return done
  try:
    # One process per host: join the job before any device is touched (a no-op on one host;
    # the JAX_COORDINATOR_ADDRESS / cluster environment launch/*.sh set up decides).
    parallel.initialize_distributed()
    parallel.check_same_config(config)  # every process must run the same config
    result = run(config, workdir)
  except signals.Interrupted as err:
    print(
        f"{argv[0]}: {err} before training started or after it ended; everything on disk is "
        "complete (atomic writes, committed checkpoints): rerun the same command to resume",
        file=sys.stderr, flush=True)
    sys.exit(0)
  except Exception as err:  # pylint: disable=broad-except
    failure = None if debug else cli.describe_failure(err, workdir)
    if failure is None:
      raise
    print(f"{argv[0]}: {failure[0]}\n(--debug or RLHF_JAX_DEBUG=1 shows the traceback)",
          file=sys.stderr)
    cli.quiet_exit(failure[1])
  signum = signals.stop_requested()
  if signum is not None:
    print(
        f"stopped by {signal.Signals(signum).name}: the last step is checkpointed; rerun the "
        f"same command to resume: {_summary(result)}", flush=True)
    return None
  print(f"finished: {_summary(result)}", flush=True)
  return result if isinstance(result, dict) else {}


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
