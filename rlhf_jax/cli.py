"""Console scripts ``rlhf-run`` and ``rlhf-pipeline`` (``pip install -e .``).

They run the repository's launchers, ``experiments/run.py`` and ``experiments/pipeline.py``, with
the command line as given, so ``rlhf-run --config=experiments/configs/sft_synthetic.py
--workdir=workdirs/sft`` is ``python experiments/run.py ...``. The launchers and the experiment
configs live in the checkout (``experiments/`` is not an installed package), hence an editable
install; a plain install reports that instead of a traceback.

The launchers' shared error handling lives here too: :func:`parse_flags` (absl flag parsing with
one-line errors; an unknown ``--config.<section>.<key>`` lists that section's allowed keys),
:func:`describe_failure` (one line for the project's errors, a full disk, an OS error; None for a
bug, which keeps its traceback) and :func:`debug_requested` (``--debug``, ``--verbosity>=1`` or
``RLHF_JAX_DEBUG=1``: tracebacks instead).
"""

from __future__ import annotations

import difflib
import errno
import importlib.util
import logging
import os
import re
import runpy
import shutil
import sys
import threading

from absl import flags

from rlhf_jax import fileio

# Errors that mean "fix the command or the inputs"; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, KeyError)

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(script: str) -> None:
  path = os.path.join(_REPO, "experiments", script)
  if not os.path.isfile(path):
    sys.exit(f"{os.path.basename(sys.argv[0])}: {path} not found; the console scripts run the "
             "repository's experiments/ launchers: install the checkout with `pip install -e .`")
  runpy.run_path(path, run_name="__main__")


def run() -> None:
  """``rlhf-run``: ``experiments/run.py`` (any method from its config)."""
  _launch("run.py")


def pipeline() -> None:
  """``rlhf-pipeline``: ``experiments/pipeline.py`` (SFT -> RM -> every offline method)."""
  _launch("pipeline.py")


def _debug_flag(argv) -> bool:
  return any(a in ("--debug", "--debug=true", "--debug=True") or
             a.startswith("--verbosity=") and a.split("=", 1)[1] not in ("0", "-1") for a in argv)


def short_message(err: BaseException) -> str:
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
  return env or _debug_flag(argv)


def parse_flags(argv):
  """absl's flag parsing, with one-line errors (``--debug`` keeps the traceback)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, *USER_ERRORS, AttributeError, TypeError) as err:
    if debug_requested(argv):
      raise
    what = short_message(err)
    if isinstance(err, (KeyError, AttributeError)):  # an override of a key the config lacks
      what = unknown_key_message(argv) or (
          f"no config key {what} (check the --config.<section>.<key>=<value> overrides)")
    print(
        f"{argv[0]}: flag error: {what}\n(--helpshort lists the flags; --debug shows the "
        "traceback, as does RLHF_JAX_DEBUG=1)", file=sys.stderr)
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


def _failed_path(err: BaseException) -> str | None:
  """The file an error names: ``OSError.filename``, else the first quoted absolute path in the
  message (tensorstore / orbax: ``Failed writing: "/w/checkpoints/40.orbax-checkpoint-tmp/..."``).
  """
  seen = err
  while seen is not None:
    if getattr(seen, "filename", None):
      return str(seen.filename)
    match = re.search(r'"(/[^"]+)"', str(seen))
    if match:
      return match.group(1)
    seen = seen.__cause__ or seen.__context__
  return None


def _size(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return ""


def _free_space(path: str) -> str:
  if fileio.is_remote(path):  # an object store: no local disk to report
    return "free space not known for a remote path"
  path = os.path.abspath(path)
  while path and not os.path.exists(path):
    path = os.path.dirname(path)
  mount = path
  while not os.path.ismount(mount):
    mount = os.path.dirname(mount)
  try:
    usage = shutil.disk_usage(path)
  except OSError:
    return "free space unknown"
  return f"{_size(usage.free)} free of {_size(usage.total)} on {mount}"


def quiet_exit(status: int) -> None:
  """Exits now, without the interpreter's shutdown: orbax's abandoned asyncio tasks would
  otherwise print a traceback each after the one-line error (every file was closed before)."""
  sys.stdout.flush()
  sys.stderr.flush()
  logging.shutdown()
  os._exit(status)  # pylint: disable=protected-access


def quiet_background_errors() -> None:
  """Background-thread and unraisable errors (orbax's writer threads after a failed write) print
  one line each, once per kind, and orbax's error log records lose their traceback; the main
  thread's one-line error follows. Installed by the launchers unless debugging."""
  seen = set()

  def one_line(kind: str, exc: BaseException | None) -> None:
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {first}"
    if (kind, type(exc)) not in seen:
      seen.add((kind, type(exc)))
      print(f"({kind}: {text})", file=sys.stderr)

  class _OneLine(logging.Filter):
    """orbax's own error records (each with the same failed write's traceback): message only."""

    def filter(self, record: logging.LogRecord) -> bool:
      if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.msg, record.args = str(record.getMessage()).splitlines()[0][:300], ()
      return True

  for handler in logging.getLogger().handlers:
    handler.addFilter(_OneLine())
  threading.excepthook = lambda args: one_line(f"thread {args.thread.name if args.thread else ''}",
                                               args.exc_value)
  sys.unraisablehook = lambda args: one_line("ignored", args.exc_value)


# What a collective or the coordination service says when a peer process died (kill -9, a lost
# node): gloo (CPU), NCCL (GPU), the coordination service's heartbeat and barriers.
_PEER_FAILURE_MARKERS = ("Gloo", "NCCL", "coordination service", "heartbeat timeout",
                         "Connection reset by peer", "Barrier timed out", "barrier has failed")


def peer_failure(err: BaseException) -> str | None:
  """The first line of ``err`` when it reports a dead peer process (multi-process jobs only)."""
  import jax  # pylint: disable=import-outside-toplevel

  if jax.process_count() == 1:
    return None
  seen = err
  while seen is not None:
    text = str(seen)
    if any(marker in text for marker in _PEER_FAILURE_MARKERS):
      return text.strip().splitlines()[0][:200]
    seen = seen.__cause__ or seen.__context__
  return None


def describe_failure(err: BaseException, workdir: str) -> tuple[str, int] | None:
  """``(one line, exit status)`` for an error a person can act on; None for a bug (traceback).

  The project's own errors (config values, inputs, records, a refused workdir, a NaN / divergence
  stop, a corrupt checkpoint), a full disk (the path and the free space) and other OS errors.
  """
  if _no_space(err):
    where = _failed_path(err) or workdir
    return (f"error: no space left on device writing {where} ({_free_space(where)}); the files "
            "written before are intact (atomic writes, committed checkpoints): free some space "
            "and rerun the same command to resume", 1)
  from rlhf_jax.train import guard  # pylint: disable=import-outside-toplevel

  peer = peer_failure(err)
  if peer is not None:
    return (f"error: another process of this job failed or stopped answering ({peer}); the files "
            "written before are intact (committed checkpoints): rerun the job to resume", 1)
  if isinstance(err, guard.NonFiniteLossError):
    return f"error: {type(err).__name__}: {short_message(err)}", 1
  if isinstance(err, USER_ERRORS):
    return f"error: {type(err).__name__}: {short_message(err)}", 2
  if isinstance(err, OSError):
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    return f"error: {type(err).__name__}{where}: {err.strerror or short_message(err)}", 1
  return None


def define_stage_launcher_flags(config_file: str, workdir: str, what: str):
  """``--config`` (default ``config_file``) and ``--workdir`` (default ``workdir``) of a
  multi-stage launcher; call it under ``if __name__ == "__main__"`` so tests can import the
  launcher next to another one that defines the same absl flags. Returns the two flag holders.

  The default config file is put on the command line (``--config=<config_file>``) instead of
  being the flag's default: ml_collections parses a default at definition time, together with
  the ``--config.<key>`` overrides, so a mistyped override would escape :func:`parse_flags`'s
  one-line error as a traceback."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
    sys.argv.insert(1, f"--config={config_file}")
  config = config_flags.DEFINE_config_file("config", None,
                                           f"{what} config (default: {config_file}).",
                                           lock_config=False)
  flags.DEFINE_string(
      "compilation_cache", "auto", "JAX's persistent compilation cache folder: stages that "
      "compile the same programs (two reward models, two PPO runs, a resumed stage) read them "
      "back instead of compiling again. auto = <workdir>/jax_cache for a local workdir (off for "
      "a remote one), '' = off; JAX_COMPILATION_CACHE_DIR, when set, wins.")
  return config, flags.DEFINE_string("workdir", workdir, "Root folder of every stage's run.")


def enable_compilation_cache(setting: str, workdir: str) -> str:
  """Turns on JAX's persistent compilation cache (``--compilation_cache``); returns its folder,
  '' when off. The cache key covers the program, the compile options and the jax / jaxlib
  versions, so a hit is the executable a fresh compile builds; compiles shorter than a second
  are not stored (JAX's default threshold)."""
  import jax  # pylint: disable=import-outside-toplevel

  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # the user's own setting (JAX reads it)
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if setting == "auto":
    setting = "" if fileio.is_remote(workdir) else os.path.join(workdir, "jax_cache")
  if setting:
    jax.config.update("jax_compilation_cache_dir", setting)
  return setting


def stage_launcher_main(argv, run_fn, config, workdir: str, *, what: str) -> None:
  """The ``main`` of a multi-stage launcher (``experiments/pipeline.py``, ``rlaif.py``, ``cai.py``).

  SIGTERM / Ctrl-C from here on stop cleanly (exit 0); INFO logging without orbax's chatter; one
  process per host joins the job (a no-op on one host) and every process checks it runs the same
  ``config``; the compilation cache is turned on (:func:`enable_compilation_cache`);
  ``run_fn(config, workdir)`` runs the stages. A config / input error or a failure a
  person can act on is one line (exit 1 or 2; ``RLHF_JAX_DEBUG=1`` shows the traceback).
  """
  from absl import app  # pylint: disable=import-outside-toplevel

  from rlhf_jax import parallel  # pylint: disable=import-outside-toplevel
  from rlhf_jax.train import signals  # pylint: disable=import-outside-toplevel

  signals.install_process_handler()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger().setLevel(logging.INFO)
  debug = debug_requested(sys.argv)
  if not debug:
    quiet_background_errors()
  try:
    # One process per host: join the job before any device is touched.
    parallel.initialize_distributed()
    parallel.check_same_config(config, f"{what} config")
    if "compilation_cache" in flags.FLAGS:
      enable_compilation_cache(flags.FLAGS.compilation_cache, workdir)
    run_fn(config, workdir)
  except signals.Interrupted as err:
    print(
        f"{argv[0]}: {err}; everything on disk is complete (atomic writes, committed "
        "checkpoints): rerun the same command to resume", file=sys.stderr, flush=True)
    sys.exit(0)
  except Exception as err:  # pylint: disable=broad-except
    failure = None if debug else describe_failure(err, workdir)
    if failure is None:
      raise
    print(f"{argv[0]}: {failure[0]}\n(RLHF_JAX_DEBUG=1 shows the traceback)", file=sys.stderr)
    quiet_exit(failure[1])
