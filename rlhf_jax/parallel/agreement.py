"""Agreeing on a per-process outcome (finished / failed) through jax's coordination service.

A step that may fail on one process only (a bad record on one host's slice, a full local disk)
cannot be agreed with a device collective: the failed process never enters the collective its
peers are waiting in. :func:`agree_outcome` goes through the key-value store that
``jax.distributed`` gives every process instead, with deadlines, so every process leaves with the
same verdict, or a bounded :class:`AgreementTimeout` when a peer is stuck or dead.

Used for every stage of ``experiments/pipeline.py`` and of ``train.run_or_reuse`` (the stages of
``experiments/rlaif.py`` and ``cai.py``): failed on one process = failed on all.
"""

from __future__ import annotations

import os
import time
from typing import Any

from rlhf_jax.parallel import multihost

# How long a process waits for its peers' outcomes (seconds): a process that failed waits briefly
# (peers still inside the step are most likely blocked in a collective that waits for it; its
# exit fails that collective), one that finished waits long (a failing peer reports within its
# own wait, or its exit takes the job down).
FAILED_WAIT_S = float(os.environ.get("RLHF_JAX_AGREE_FAILED_WAIT_S", "30"))
OK_WAIT_S = float(os.environ.get("RLHF_JAX_AGREE_OK_WAIT_S", "900"))
OK = "ok"  # the value a process that finished publishes


class AgreementTimeout(RuntimeError):
  """A peer did not report its outcome in time (stuck in a collective, or dead)."""


def kv_client() -> Any:
  """jax's coordination-service client (``key_value_set`` / ``blocking_key_value_get``), as
  orbax uses it; None before ``jax.distributed.initialize``."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.client


def agree_outcome(key: str, failed: str | None, *, namespace: str = "rlhf_jax/agree",
                  client: Any = None, process_index: int | None = None,
                  process_count: int | None = None, failed_wait_s: float | None = None,
                  ok_wait_s: float | None = None) -> str | None:
  """Every process's outcome of step ``key`` -> the first failure in process order, or None.

  Each process publishes ``ok`` (``failed`` is None) or its one-line failure under
  ``<namespace>/<key>/<process>``, then reads every peer's, waiting at most ``failed_wait_s``
  (this process failed) or ``ok_wait_s`` (it finished) in all. The result is the same on every
  process: ``"<failure> (process p of n)"`` for the lowest failing process ``p``, else None.
  A key is written once per process: a caller that agrees on the same step twice in one job
  must give each call its own ``key``.

  Args:
    key: names the step (the same on every process).
    failed: this process's failure (a short line), or None if it finished.
    namespace: key prefix, so different callers' keys never collide.
    client: the key-value store (default :func:`kv_client`; tests pass a fake).
    process_index, process_count: default this job's.
    failed_wait_s, ok_wait_s: the deadlines (default ``RLHF_JAX_AGREE_FAILED_WAIT_S`` = 30 and
      ``RLHF_JAX_AGREE_OK_WAIT_S`` = 900).

  Raises:
    AgreementTimeout: a peer did not report before the deadline. The caller should end this
      process now: that fails the collectives the peer is blocked in, and the peer then finds
      this process's published failure here.
  """
  client = client if client is not None else kv_client()
  me = multihost.process_index() if process_index is None else process_index
  count = multihost.process_count() if process_count is None else process_count
  if failed:
    wait_s = FAILED_WAIT_S if failed_wait_s is None else failed_wait_s
  else:
    wait_s = OK_WAIT_S if ok_wait_s is None else ok_wait_s
  prefix = f"{namespace}/{key}/"
  client.key_value_set(prefix + str(me), failed or OK)
  deadline = time.monotonic() + wait_s
  outcomes = {}
  for p in range(count):
    try:
      outcomes[p] = client.blocking_key_value_get(prefix + str(p),
                                                  max(1, int(1e3 * (deadline - time.monotonic()))))
    except Exception as err:  # pylint: disable=broad-except  (deadline, or the service is gone)
      first_line = str(err).splitlines()[0][:120] if str(err) else ""
      raise AgreementTimeout(
          f"{key}: process {p} did not report its outcome within {wait_s:.0f} s (this "
          f"process: {failed or 'finished'}); ending the job ({type(err).__name__}: "
          f"{first_line})") from err
  failures = [(p, v) for p, v in sorted(outcomes.items()) if v != OK]
  if not failures:
    return None
  p, status = failures[0]
  return f"{status[:200]} (process {p} of {count})"
