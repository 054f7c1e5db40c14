"""The one SIGTERM helper: :class:`SigtermWatch`.

The training loop (``train.train``) holds one for the whole run with ``handles=True``: a SIGTERM
is recorded, the loop finishes the current step or iteration, checkpoints it and returns
``preempted=True``. Work the loop calls between steps (a held-out evaluation that takes minutes on
a CPU) can hold its own watch inside: it sees the signal at once and can give up early, while the
loop's handler (chained) still records it and stops after the step.
"""

from __future__ import annotations

import signal
import threading


class SigtermWatch:
  """Records SIGTERM for the duration of a ``with`` block, then restores the previous handler.

  Attributes:
    received: True once SIGTERM arrived inside the block.
    signum: the signal number received (None before).

  The previously installed Python handler (e.g. the training loop's own watch) is still called,
  so nested watches all see the signal. With ``handles=False`` (the default: the block merely
  notices the signal) and no Python handler before (default action, i.e. terminate), the signal is
  re-raised on exit, so it is never swallowed. With ``handles=True`` the block acts on the signal
  itself (the loop checkpoints and returns ``preempted``), so nothing is re-raised. Outside the main
  thread Python cannot install handlers and the watch never fires.
  """

  def __init__(self, handles: bool = False):
    self.handles = handles
    self.received = False
    self.signum: int | None = None
    self._previous = None
    self._installed = False

  def __enter__(self) -> "SigtermWatch":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.getsignal(signal.SIGTERM)
      signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def _handle(self, signum, frame):
    self.received, self.signum = True, signum
    if callable(self._previous):
      self._previous(signum, frame)

  def __exit__(self, *exc):
    if not self._installed:
      return
    signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
    self._installed = False
    if self.received and not self.handles and self._previous == signal.SIG_DFL:
      signal.raise_signal(signal.SIGTERM)
