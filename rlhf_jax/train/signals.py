"""SIGTERM handling outside the training loop's own step boundary.

:class:`SigtermWatch` lets work that the loop calls between steps (a held-out evaluation that takes
minutes on a CPU) notice a SIGTERM and give up early, while the loop's handler still records it and
checkpoints / stops after the next step.
"""

from __future__ import annotations

import signal
import threading


class SigtermWatch:
  """Chains a SIGTERM handler for the duration of a block: ``received`` turns true on SIGTERM and
  the handler that was installed before (the training loop's) is still called, so a periodic
  evaluation can be abandoned instead of running to its end (minutes on a CPU) before the loop
  reacts. With no Python handler before (default action), the signal is re-raised on exit."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self) -> "SigtermWatch":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.getsignal(signal.SIGTERM)
      signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = True
    if callable(self._previous):
      self._previous(signum, frame)

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      if self.received and self._previous == signal.SIG_DFL:
        signal.raise_signal(signal.SIGTERM)
