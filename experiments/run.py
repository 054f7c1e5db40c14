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
SIGTERM or Ctrl-C at any point (from the first line of ``main``) stops cleanly with exit status 0:
during training the step is checkpointed; before or after it nothing is half-written. A finished
run rerun with the same config is a no-op that says so.

A bad config value or a missing input is reported in one line (exit status 2): an unknown
``--config.<section>.<key>`` lists the allowed keys of that section; a NaN / divergence stop, a
full disk (the path and the free space) or another OS error is one line too (exit status 1).
``--debug`` (or ``--verbosity=1``, or ``RLHF_JAX_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import difflib
import errno
import importlib.util
import json
import logging
import os
import shutil
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax import parallel, train
from rlhf_jax.algorithms import registry
from rlhf_jax.train import signals

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/configs/<name>.py[:<arg>]); its `method` "
    "key names the method.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config, checkpoints, metrics, "
    "final_metrics.json; rerunning resumes it.")
_DEBUG = flags.DEFINE_bool(
    "debug", False, "Show the traceback of a config / input error "
    "(also RLHF_JAX_DEBUG=1).")
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


def _load_config_file(spec: str):
  """``get_config(<arg>)`` of ``path.py[:arg]`` (what ``config_flags`` loads), or None."""
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_rlhf_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except  # the config file's own error is shown instead
    return None


def unknown_key_message(argv, flag: str = "config") -> str | None:
  """``config.optim has no key 'lrr'; allowed keys of config.optim: [...]`` for the first
  ``--config.<a>.<b>=`` override whose key the config file lacks (None if every key exists)."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{flag}=")), None)
  config = _load_config_file(spec) if spec else None
  if config is None:
    return None
  for arg in argv:
    if not arg.startswith(f"--{flag}."):
      continue
    path = arg[len(f"--{flag}."):].split("=", 1)[0].split(".")
    node, where = config, flag
    for key in path:
      keys = list(node.keys()) if hasattr(node, "keys") else None
      if keys is None:
        return f"{where} is a value, not a section: --{flag}.{'.'.join(path)} cannot be set"
      if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (f"{where} has no key {key!r}{hint}; allowed keys of {where}: "
                f"{', '.join(sorted(keys))}")
      node, where = node[key], f"{where}.{key}"
  return None


def debug_requested(argv=()) -> bool:
  """``--debug`` / ``--verbosity>=1`` on the command line, or ``RLHF_JAX_DEBUG=1``."""
  env = os.environ.get("RLHF_JAX_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
  return env or _debugging(argv)


def parse_flags(argv):
  """absl's flag parsing, with one-line errors (``--debug`` keeps the traceback)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, *USER_ERRORS, AttributeError, TypeError) as err:
    if debug_requested(argv):
      raise
    what = _short(err)
    if isinstance(err, (KeyError, AttributeError)):  # an override of a key the config lacks
      what = unknown_key_message(argv) or (
          f"no config key {what} (check the --config.<section>.<key>=<value> overrides)")
    print(
        f"{argv[0]}: flag error: {what}\n(--helpshort lists the flags; --debug shows the "
        "traceback)", file=sys.stderr)
    sys.exit(2)


def _no_space(err: BaseException) -> bool:
  seen = err
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(seen):
      return True
    seen = seen.__cause__ or seen.__context__
  return False


def _free_space(path: str) -> str:
  path = os.path.abspath(path)
  while path and not os.path.exists(path):
    path = os.path.dirname(path)
  try:
    usage = shutil.disk_usage(path)
  except OSError:
    return "unknown"
  return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**30:.2f} GiB on {path}"


def describe_failure(err: BaseException, workdir: str) -> tuple[str, int] | None:
  """``(one line, exit status)`` for an error a person can act on; None for a bug (traceback).

  The project's own errors (config values, inputs, records, a refused workdir, a NaN / divergence
  stop, a corrupt checkpoint), a full disk (the path and the free space) and other OS errors.
  """
  if _no_space(err):
    where = getattr(err, "filename", None) or workdir
    return (f"error: no space left on device writing {where} ({_free_space(where)}); the files "
            "written before are intact (atomic writes, committed checkpoints): free some space "
            "and rerun the same command to resume", 1)
  if isinstance(err, train.NonFiniteLossError):
    return f"error: {type(err).__name__}: {_short(err)}", 1
  if isinstance(err, USER_ERRORS):
    return f"error: {type(err).__name__}: {_short(err)}", 2
  if isinstance(err, OSError):
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    return f"error: {type(err).__name__}{where}: {err.strerror or _short(err)}", 1
  return None


def finished_earlier(config, workdir: str) -> dict | None:
  """``final_metrics.json`` of a finished run in ``workdir`` with this same config, else None."""
  config_path = os.path.join(workdir, "config.json")
  if not (train.is_finished(workdir) and os.path.isfile(config_path)):
    return None
  try:
    stored = train.read_json(config_path)
    current = json.loads(json.dumps(config.to_dict(), default=str))
    if stored != current:
      return None  # another config (e.g. more steps): the method decides what to redo
    return train.read_json(os.path.join(workdir, train.FINAL_METRICS_FILE))
  except (OSError, ValueError):
    return None


def main(argv):
  signals.install_process_handler()  # SIGTERM / Ctrl-C from here on: a clean stop, exit 0
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint op at INFO
  debug = _DEBUG.value or flags.FLAGS.verbosity >= 1 or debug_requested()
  try:
    config = _CONFIG.value
    config.keys()  # the lazy error object raises here
  except OSError as err:  # config_flags defers "no such config file" to the first access
    if debug:
      raise
    print(f"{argv[0]}: flag error: {_short(err)}\n(--debug shows the traceback)", file=sys.stderr)
    sys.exit(2)
  workdir = _WORKDIR.value
  done = finished_earlier(config, workdir)
  if done is not None:
    print(
        f"{workdir} holds this run, finished: nothing to do (delete "
        f"{os.path.join(workdir, train.FINAL_METRICS_FILE)} to evaluate it again); "
        f"final: {_summary(done)}", flush=True)
    return
  try:
    # One process per host: join the job before any device is touched (a no-op on one host;
    # the JAX_COORDINATOR_ADDRESS / cluster environment launch/*.sh set up decides).
    parallel.initialize_distributed()
    result = run(config, workdir)
  except signals.Interrupted as err:
    print(
        f"{argv[0]}: {err} before training started or after it ended; everything on disk is "
        "complete (atomic writes, committed checkpoints): rerun the same command to resume",
        file=sys.stderr, flush=True)
    sys.exit(0)
  except Exception as err:  # pylint: disable=broad-except
    failure = None if debug else describe_failure(err, workdir)
    if failure is None:
      raise
    print(f"{argv[0]}: {failure[0]}\n(--debug or RLHF_JAX_DEBUG=1 shows the traceback)",
          file=sys.stderr)
    sys.exit(failure[1])
  signum = signals.stop_requested()
  if signum is not None:
    print(
        f"stopped by {signal.Signals(signum).name}: the last step is checkpointed; rerun the "
        f"same command to resume: {_summary(result)}", flush=True)
    return
  print(f"finished: {_summary(result)}", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
