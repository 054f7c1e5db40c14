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
import optax

from rlhf_jax import parallel

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


class DivergenceError(NonFiniteLossError):
  """A step's loss or param norm jumped by more than ``LoopConfig.divergence_factor`` over its
  recent mean; the run stopped without saving that step (or any after it).

  Attributes (besides :class:`NonFiniteLossError`'s): ``quantity`` (``"loss"`` / ``"param_norm"``),
  ``value``, ``reference`` (the mean of ``|quantity|`` over the previous steps) and ``factor``.
  """

  def __init__(self, quantity: str, value: float, reference: float, factor: float, window: int, *,
               step: int | None = None, last_good: int | None = None, workdir: str = ""):
    self.quantity, self.value, self.reference, self.factor = quantity, value, reference, factor
    detail = (f"({quantity}={value:.4g} is {abs(value) / reference:.3g}x the mean |{quantity}| "
              f"{reference:.4g} of the previous {window} steps; "
              f"LoopConfig.divergence_factor={factor:g})")
    super().__init__(f"divergence of {quantity}", detail, step=step, last_good=last_good,
                     workdir=workdir)
    where = f" in {workdir}" if workdir else ""
    ckpt = f"step {last_good}" if last_good is not None else "none yet"
    self.args = (f"divergence at step {step}{where}: {detail}; the run stopped without saving it "
                 f"or any later step; the latest checkpoint ({ckpt}) was saved before it. Lower "
                 "the learning rate (or raise divergence_factor) before resuming.",)


class DivergenceMonitor:
  """Host-side divergence check: ``|x_t| > factor * mean(|x_{t-w..t-1}|)`` for each watched
  quantity ``x`` (the loss, the post-update param norm), armed once ``min(window, 5)`` finite
  values are known. Meant for quantities bounded away from 0 (an NLL, a DPO / RM loss, a norm);
  a PPO surrogate that crosses 0 should watch only ``param_norm``.
  """

  def __init__(self, factor: float, window: int = 20, keys: tuple[str,
                                                                  ...] = ("loss", "param_norm")):
    self.factor, self.window, self.keys = float(factor), int(window), tuple(keys)
    self._history: dict[str, list[float]] = {k: [] for k in self.keys}

  def check(self, metrics: Mapping[str, Any]) -> tuple[str, float, float, int] | None:
    """``(quantity, value, reference, n)`` of the first jump in this step's host ``metrics``."""
    for key in self.keys:
      if key not in metrics:
        continue
      value = float(metrics[key])
      history = self._history[key]
      if len(history) >= min(self.window, 5):
        reference = float(np.mean(np.abs(history)))
        if reference > 0 and abs(value) > self.factor * reference:
          return key, value, reference, len(history)
      if np.isfinite(value):
        history.append(value)
        del history[:-self.window]
    return None


def guard_step(step_fn: Callable, param_norm: bool = False) -> Callable:
  """``step(state, batch)`` that keeps ``params`` / ``opt_state`` when the loss or gradient norm
  is not finite and adds the metric ``nonfinite`` (1.0 on a skipped step); with
  ``param_norm=True`` also the metric ``param_norm`` (global norm of the updated params, for the
  divergence guard)."""

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
    if param_norm:
      metrics["param_norm"] = optax.global_norm(new_state.params)
    return new_state, metrics

  return guarded


def step_cause(metrics: Mapping[str, Any]) -> tuple[str, str]:
  """``(cause, detail)`` of a bad jitted step from its (host) metrics."""
  shown = ", ".join(f"{k}={float(metrics[k]):.4g}" for k in ("loss", "grad_norm") if k in metrics)
  return "loss or gradient", f"({shown})"


def nonfinite_cause(**arrays: Any) -> tuple[str, str] | None:
  """``(name, "(NaN/inf in rows [...])")`` of the first array holding NaN/inf, else None."""
  # Host copies (gathered where a global array spans other processes: every process calls this).
  # (to_host returns a dict in sorted-key order: report in the caller's order, loss first.)
  host = parallel.to_host(arrays)
  for name in arrays:
    value = host[name]
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
