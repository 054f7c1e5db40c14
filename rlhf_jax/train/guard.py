"""The NaN guard of the one loop: a non-finite step is never applied and never checkpointed.

Two halves:

* Inside a jitted step (:func:`guard_step`, applied by ``train.train`` to every ``step_fn``): the
  update is kept only if the loss and the gradient norm are finite,

      params', opt_state' = where(ok, new, old),   ok = isfinite(loss) ∧ isfinite(‖g‖)

  (like ``optax.apply_if_finite``), and ``ok`` comes back as the metric ``nonfinite = 1 - ok``.
  So even a step dispatched after the bad one starts from the last finite params.
* On the host: the loop reads each step's flag one step late (after the next step is queued, so
  the device never idles) and always before a checkpoint is written; the first bad step raises
  :class:`NonFiniteLossError` naming the step and its cause, before anything after the last good
  checkpoint is saved. A non-jitted ``iteration`` (PPO) reports a bad rollout by raising
  :func:`check_finite`'s error itself; the loop adds the step and the last good checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

NONFINITE_METRIC = "nonfinite"


class NonFiniteLossError(FloatingPointError):
  """A step produced a non-finite loss, gradient or rollout; the run stopped without saving it.

  Attributes:
    cause: what was non-finite, e.g. ``"loss or gradient"`` or ``"rewards"``.
    detail: the values, e.g. ``"(loss=nan, grad_norm=nan)"`` or ``"(NaN/inf in rows [0, 3])"``.
    step: the 1-based step (update / iteration) that produced it (None until the loop knows).
    last_good: the latest checkpoint's step (None: no checkpoint yet).
  """

  def __init__(self, cause: str, detail: str = "", *, step: int | None = None,
               last_good: int | None = None, workdir: str = ""):
    self.cause, self.detail, self.step = cause, detail, step
    self.last_good, self.workdir = last_good, workdir
    detail = f" {detail}" if detail else ""
    if step is None:
      message = f"non-finite {cause}{detail}"
    else:
      where = f" in {workdir}" if workdir else ""
      ckpt = f"step {last_good}" if last_good is not None else "none yet"
      message = (
          f"non-finite {cause} at step {step}{detail}{where}: that update was not applied and the "
          f"run stopped without saving it; the latest checkpoint ({ckpt}) holds the last "
          "finite params. Lower the learning rate / beta, check the data (e.g. empty "
          "responses) or the reference / reward model before resuming.")
    super().__init__(message)


def guard_step(step_fn: Callable) -> Callable:
  """``step(state, batch)`` that keeps ``params`` / ``opt_state`` when the loss or gradient norm
  is not finite and adds the metric ``nonfinite`` (1.0 on a skipped step)."""

  def guarded(state, batch):
    new_state, metrics = step_fn(state, batch)
    ok = jnp.isfinite(metrics["loss"])
    if "grad_norm" in metrics:
      ok = ok & jnp.isfinite(metrics["grad_norm"])
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    new_state = new_state.replace(params=keep(new_state.params, state.params),
                                  opt_state=keep(new_state.opt_state, state.opt_state))
    metrics = dict(metrics)
    metrics[NONFINITE_METRIC] = 1.0 - ok.astype(jnp.float32)
    return new_state, metrics

  return guarded


def step_cause(metrics: Mapping[str, Any]) -> tuple[str, str]:
  """``(cause, detail)`` of a bad jitted step from its (host) metrics."""
  shown = ", ".join(f"{k}={float(metrics[k]):.4g}" for k in ("loss", "grad_norm") if k in metrics)
  return "loss or gradient", f"({shown})"


def nonfinite_cause(**arrays: Any) -> tuple[str, str] | None:
  """``(name, "(NaN/inf in rows [...])")`` of the first array holding NaN/inf, else None."""
  for name, value in arrays.items():
    array = np.asarray(value)
    rows_BxX = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    bad = np.flatnonzero(~np.all(np.isfinite(rows_BxX), axis=1)).tolist()
    if bad:
      if not array.ndim:
        return name, f"({float(array):.4g})"
      return name, f"(NaN/inf in rows {bad[:8]}{'...' if len(bad) > 8 else ''})"
  return None


def check_finite(**arrays: Any) -> None:
  """Raises :class:`NonFiniteLossError` (without a step: the loop adds it) naming the first array
  with NaN/inf and its bad rows. For a non-jitted ``iteration``'s host-side checks."""
  found = nonfinite_cause(**arrays)
  if found is not None:
    raise NonFiniteLossError(*found)
