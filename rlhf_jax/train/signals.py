"""Stop signals (SIGTERM, SIGINT): :class:`SigtermWatch` and the launchers' process handler.

The training loop (``train.train``) holds one watch for the whole run with ``handles=True``: a
SIGTERM or SIGINT (Ctrl-C) is recorded, the loop finishes the current step or iteration,
checkpoints it and returns ``preempted=True`` (a second Ctrl-C raises ``KeyboardInterrupt`` at
once). Work the loop calls between steps (a held-out evaluation that takes minutes on a CPU) can
hold its own watch inside: it sees the signal at once and can give up early, while the loop's
handler (chained) still records it and stops after the step.

Outside the loop (loading models, building datasets, compiling) the launchers'
:func:`install_process_handler`, installed on the first line of their ``main``, turns the signal
into :class:`Interrupted` (a ``BaseException``, like ``KeyboardInterrupt``): the launcher prints
one line and exits 0, since everything on disk is written atomically and a rerun resumes.
:func:`stop_requested` tells later stages (the pipeline's next stage, a loop about to start) that
a stop was asked for, so a handled signal is not forgotten once the loop that handled it returns.

Several processes (``jax.distributed``): a signal reaches one process, but every process must stop
at the same step, or the others block in the step's collectives and in orbax's collective save.
JAX's own preemption service does the agreeing: ``jax.distributed.initialize`` installs a SIGTERM
notifier (C++) in every process; a SIGTERM to any of them is propagated to all through the
coordination service, each reports its current step and all stop at ``max + 1``
(:func:`reached_stop_point` wraps ``multihost_utils.reached_preemption_sync_point``, called by the
loop at every step: a local flag read, no collective, until a notice arrives). So with more than
one process the watches leave SIGTERM to that notifier (a Python handler would replace it), the
loop's watch forwards a Ctrl-C as a SIGTERM to its own process (so it is agreed too), and a
``handles=False`` watch (an evaluation that would give up early) never fires: one process leaving
a collective evaluation early would hang the others.
"""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Stop signals seen by a watch or the process handler, recorded once a launcher installed the
# process handler (a library user / a test keeps its own signal semantics).
_received: list[int] = []
_launcher = {"installed": False}


class Interrupted(BaseException):
  """A stop signal arrived outside the training loop; nothing half-written was left behind."""

  def __init__(self, signum: int):
    self.signum = signum
    super().__init__(f"stopped by {signal.Signals(signum).name}")


def _process_handler(signum, frame):
  del frame
  _received.append(signum)
  raise Interrupted(signum)


def install_process_handler() -> None:
  """SIGTERM / SIGINT raise :class:`Interrupted` (main thread only; the launchers call it first)."""
  if threading.current_thread() is threading.main_thread():
    for sig in SIGNALS:
      signal.signal(sig, _process_handler)
    _launcher["installed"] = True


def jax_owns_sigterm() -> bool:
  """True when jax's preemption service (multi-process ``jax.distributed``) catches SIGTERM."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel

  state = distributed.global_state
  return state.client is not None and state.preemption_sync_manager is not None


def reached_stop_point(step: int, local: bool) -> bool:
  """Whether the loop stops after ``step``: the same answer on every process of the job.

  One process: ``local`` (this process's watch saw a stop signal). Several: jax's preemption
  sync point (a SIGTERM to any process, or a Ctrl-C the loop's watch forwarded as one); every
  process must call this at every step, as the loop does.
  """
  if not jax_owns_sigterm():
    return local
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  if multihost_utils.reached_preemption_sync_point(step):
    if _launcher["installed"]:
      _received.append(signal.SIGTERM)  # later stages of this job must not start
    return True
  return False


def stop_requested() -> int | None:
  """The last stop signal received in this process since :func:`install_process_handler`
  (None: none), handled or not."""
  return _received[-1] if _received else None


def clear_requests() -> None:
  """Forgets received signals (tests; a process that decided to go on)."""
  _received.clear()


class SigtermWatch:
  """Records SIGTERM and SIGINT for the duration of a ``with`` block, then restores the previous
  handlers.

  Attributes:
    received: True once a stop signal arrived inside the block.
    signum: the signal number received (None before).

  The previously installed Python handler (e.g. the training loop's own watch) is still called,
  so nested watches all see the signal; a ``handles=True`` watch does not call the launchers'
  process handler (which would raise :class:`Interrupted` mid-step). With ``handles=False`` (the
  default: the block merely notices the signal) and no Python handler before (default action,
  i.e. terminate), the signal is re-raised on exit, so it is never swallowed. With ``handles=True``
  the block acts on the signal itself (the loop checkpoints and returns ``preempted``), so nothing
  is re-raised; a second SIGINT raises ``KeyboardInterrupt``. Outside the main thread Python cannot
  install handlers and the watch never fires.
  """

  def __init__(self, handles: bool = False):
    self.handles = handles
    self.received = False
    self.signum: int | None = None
    self._previous: dict = {}
    self._installed = False
    self._forward = False

  def __enter__(self) -> "SigtermWatch":
    # Several processes: SIGTERM belongs to jax's preemption notifier (agreed stop); only the
    # loop's watch takes SIGINT (forwarded as SIGTERM); a handles=False watch stays off.
    watched = SIGNALS if not jax_owns_sigterm() else (signal.SIGINT,) if self.handles else ()
    self._forward = bool(watched) and watched != SIGNALS
    if threading.current_thread() is threading.main_thread():
      for sig in watched:
        self._previous[sig] = signal.getsignal(sig)
        signal.signal(sig, self._handle)
      self._installed = True
    return self

  def _handle(self, signum, frame):
    again = self.received
    self.received, self.signum = True, signum
    if _launcher["installed"]:
      _received.append(signum)
    previous = self._previous.get(signum)
    if self._forward and signum == signal.SIGINT and not again:
      os.kill(os.getpid(), signal.SIGTERM)  # to jax's notifier: every process stops together
      return
    if self.handles:
      if signum == signal.SIGINT and again:
        raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step
      if previous is _process_handler or previous is signal.default_int_handler:
        return  # this block acts on it: no Interrupted / KeyboardInterrupt mid-step
    if callable(previous):
      previous(signum, frame)

  def __exit__(self, *exc):
    if not self._installed:
      return
    for sig, previous in self._previous.items():
      signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    self._installed = False
    if self.received and not self.handles and self._previous.get(self.signum) == signal.SIG_DFL:
      signal.raise_signal(self.signum)
