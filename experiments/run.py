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

Re-running the same command in the same workdir resumes the run (SIGTERM checkpoints and exits 0).
A bad config value or a missing input is reported in one line (exit status 2); ``--debug`` (or
``--verbosity=1``) shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax import parallel
from rlhf_jax.algorithms import registry

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/configs/<name>.py[:<arg>]); its `method` "
    "key names the method.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config, checkpoints, metrics, "
    "final_metrics.json; rerunning resumes it.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of a config / input error.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors that mean "fix the command or the inputs"; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, KeyError)


def method_of(config) -> str:
  """``config.method``, checked against the registry (the error lists the allowed names)."""
  if "method" not in config:
    raise ValueError(f"the config has no `method` key; allowed: {' | '.join(registry.METHODS)}")
  registry.get(config.method)  # raises naming the allowed methods
  return config.method


def run(config, workdir: str):
  return registry.get(method_of(config))(config, workdir)


def _summary(result) -> str:
  if isinstance(result, dict):
    keep = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}
    return json.dumps(keep, sort_keys=True)[:2000]
  return str(result)[:2000]


def _debugging(argv) -> bool:
  return any(a in ("--debug", "--debug=true", "--debug=True") or
             a.startswith("--verbosity=") and a.split("=", 1)[1] not in ("0", "-1") for a in argv)


def _short(err: BaseException) -> str:
  """The message of a flag / config-file error without the traceback absl embeds in it."""
  text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  if "Traceback (most recent call last):" in lines:  # config_flags quotes the file's traceback
    return f"{lines[0]} {lines[-1]}"
  return " ".join(lines)


def parse_flags(argv):
  """absl's flag parsing, with one-line errors (``--debug`` keeps the traceback)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, *USER_ERRORS, AttributeError, TypeError) as err:
    if _debugging(argv):
      raise
    what = _short(err)
    if isinstance(err, (KeyError, AttributeError)):  # an override of a key the config lacks
      what = f"no config key {what} (check the --config.<section>.<key>=<value> overrides)"
    print(
        f"{argv[0]}: flag error: {what}\n(--helpshort lists the flags; --debug shows the "
        "traceback)", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint op at INFO
  try:
    config = _CONFIG.value
    config.keys()  # the lazy error object raises here
  except OSError as err:  # config_flags defers "no such config file" to the first access
    if _DEBUG.value:
      raise
    print(f"{argv[0]}: flag error: {_short(err)}\n(--debug shows the traceback)", file=sys.stderr)
    sys.exit(2)
  # One process per host: join the job before any device is touched (a no-op on one host;
  # the JAX_COORDINATOR_ADDRESS / cluster environment launch/*.sh set up decides).
  parallel.initialize_distributed()
  try:
    result = run(config, _WORKDIR.value)
  except USER_ERRORS as err:
    if _DEBUG.value or flags.FLAGS.verbosity >= 1:
      raise
    print(f"{argv[0]}: error: {type(err).__name__}: {_short(err)}\n(--debug shows the traceback)",
          file=sys.stderr)
    sys.exit(2)
  print(f"finished: {_summary(result)}", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
