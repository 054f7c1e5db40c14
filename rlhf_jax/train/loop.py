"""The generic training loop every method uses: jitted step, metrics, eval, checkpoints, preemption.

A method supplies ``loss_fn(params, batch, rng) -> (loss, metrics)`` (a scalar mean over the
batch's examples and a dict of scalar metrics); :func:`make_train_step` turns it into
``step(state, batch) -> (state, metrics)`` and :func:`train` runs it:

* ``step`` is jitted once with explicit in/out shardings (state as created, batch split over the
  mesh's batch axes, metrics replicated) and the state donated, inside ``parallel.use_mesh`` so the
  model's logical activation constraints resolve on the mesh.
* The host never waits for the device in the hot loop: step ``t+1`` is dispatched before step
  ``t``'s metrics (kept as device arrays) are read back, so reading them only waits for work that
  is already behind the queued step.
* Every ``checkpoint_every`` steps, at the end, and on SIGTERM, the state and the data iterator's
  position are saved (orbax, asynchronous). Restarting in the same workdir restores both, so a
  resumed run computes exactly the updates an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax import parallel
from rlhf_jax.train import checkpoint as ckpt_lib
from rlhf_jax.train import metrics as metrics_lib
from rlhf_jax.train.state import TrainState, abstract_state, state_shardings

logger = logging.getLogger(__name__)

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
EvalFn = Callable[[TrainState, int], Mapping[str, float]]


class CheckpointableIterator(Protocol):
  """A batch iterator whose position can be saved and restored exactly (JSON-serialisable)."""

  def __next__(self) -> Mapping[str, np.ndarray]: ...

  def get_state(self) -> Mapping[str, Any]: ...

  def set_state(self, state: Mapping[str, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Loop cadence.

  Attributes:
    num_steps: total optimiser steps of the run (the schedule's length).
    log_every: steps between metric rows (train metrics are averaged over the interval).
    eval_every: steps between evaluations; 0 evaluates only at the end.
    checkpoint_every: steps between checkpoints (one is also written at the end and on SIGTERM).
    keep_checkpoints: how many of the latest checkpoints to keep.
    stop_after_steps: stop (checkpointing) after this many steps in this invocation; a later
      invocation resumes. 0 runs to ``num_steps``.
    progress_every_secs: minimum seconds between console progress lines.
  """

  num_steps: int = 1000
  log_every: int = 10
  eval_every: int = 0
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  stop_after_steps: int = 0
  progress_every_secs: float = 5.0

  def __post_init__(self):
    for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
      value = getattr(self, name)
      if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"LoopConfig.{name}={value!r} is invalid; allowed: an int >= 1.")
    for name in ("eval_every", "stop_after_steps"):
      value = getattr(self, name)
      if not (isinstance(value, int) and value >= 0):
        raise ValueError(f"LoopConfig.{name}={value!r} is invalid; allowed: an int >= 0 (0 = off).")
    if not self.progress_every_secs >= 0:
      raise ValueError(f"LoopConfig.progress_every_secs={self.progress_every_secs!r} is invalid; "
                       "allowed: a float >= 0.")


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  step: int  # optimiser steps done
  preempted: bool  # stopped early by SIGTERM or stop_after_steps
  eval_metrics: dict  # last evaluation's metrics ({} if none ran)


def _split_micro(x: jax.Array, n: int) -> jax.Array:
  # Strided split (row j*n + i goes to micro-batch i): with the batch dim sharded in contiguous
  # chunks over devices, every device then contributes equally to every micro-batch.
  if x.shape[0] % n:
    raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={n}")
  return jnp.moveaxis(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 1, 0)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: Callable[[Any], Any] | None = None,
                    grad_accum_steps: int = 1) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """``step(state, batch) -> (state, metrics)``: one optimiser update over ``batch``.

  With ``grad_accum_steps = n > 1`` the batch is cut into ``n`` equal micro-batches and a
  ``lax.scan`` sums their gradients, so activations of one micro-batch live at a time; the update
  uses ``g = (1/n) sum_i grad L_i`` (metrics are averaged the same way). That is exactly the
  full-batch gradient when ``loss_fn`` is a mean of per-example terms; for a token-mean loss each
  micro-batch is normalised by its own token count, so micro-batches weigh equally rather than by
  their tokens (the usual accumulation semantics). Each micro-batch gets
  ``rng = fold_in(step_rng, i)``. Metrics add ``grad_norm`` (before clipping) and ``lr``.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch):
    rng, step_rng = jax.random.split(state.rng)
    if grad_accum_steps == 1:
      (loss, metrics), grads = grad_fn(state.params, batch, step_rng)
    else:
      micro = jax.tree.map(lambda x: _split_micro(x, grad_accum_steps), batch)

      def body(carry, xs):
        mb, i = xs
        out, g = grad_fn(state.params, mb, jax.random.fold_in(step_rng, i))
        return jax.tree.map(jnp.add, carry, (out, g)), None

      first_mb = jax.tree.map(lambda x: x[0], micro)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           jax.eval_shape(grad_fn, state.params, first_mb, step_rng))
      total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum_steps)))
      ((loss, metrics), grads) = jax.tree.map(lambda x: x / grad_accum_steps, total)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics

  return step


def jit_train_step(step_fn, state: TrainState, mesh: Mesh,
                   rules: Sequence = parallel.DEFAULT_RULES):
  """Jits ``step_fn`` with the state's own shardings in and out, donating the state."""
  shardings = state_shardings(state)
  return jax.jit(step_fn,
                 in_shardings=(shardings, parallel.data_sharding(mesh, rules)),
                 out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
                 donate_argnums=(0,))


def default_token_count(batch: Mapping[str, np.ndarray]) -> float:
  """Real tokens in a host batch: the sum of its ``mask`` / ``*_mask`` leaves (not loss masks)."""
  total = 0.0
  for key, value in batch.items():
    if key == "mask" or (key.endswith("_mask") and "loss" not in key and "prompt" not in key):
      total += float(np.sum(value))
  return total


class _StopFlag:
  """Set by SIGTERM (or SIGINT) while the loop runs; handlers restored afterwards."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM,):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train(*, workdir: str, config: LoopConfig, state: TrainState, step_fn, data: CheckpointableIterator,
          fingerprint: Mapping[str, Any], mesh: Mesh, rules: Sequence = parallel.DEFAULT_RULES,
          eval_fn: EvalFn | None = None, run_config: Mapping[str, Any] | None = None,
          token_count: Callable[[Mapping[str, np.ndarray]], float] = default_token_count,
          tensorboard_events: bool = True) -> TrainResult:
  """Runs (or resumes) ``step_fn`` for ``config.num_steps`` steps in ``workdir``.

  Args:
    state: a freshly initialised state; replaced by the latest checkpoint's if one exists.
    step_fn: from :func:`make_train_step` (not yet jitted).
    data: batches of host arrays, with a restorable position.
    fingerprint: JSON-able description of what checkpoints must match (model config, tokenizer).
    eval_fn: ``eval_fn(state, step) -> metrics``, called every ``eval_every`` steps and at the end.
    run_config: written to ``<workdir>/config.json``.
  """
  is_main = parallel.is_coordinator()  # files other than orbax's are written by process 0 only
  if run_config is not None and is_main:
    ckpt_lib.atomic_write_json(f"{workdir}/config.json", dict(run_config))
  checkpointer = ckpt_lib.Checkpointer(workdir, fingerprint=fingerprint, keep=config.keep_checkpoints)
  start = checkpointer.latest_step()
  if start is not None:
    logger.info("resuming from checkpoint at step %d in %s", start, workdir)
    state, data_state = checkpointer.restore(abstract_state(state))
    data.set_state(data_state)
  start = start or 0
  if start > config.num_steps:
    raise ValueError(f"workdir {workdir!r} has a checkpoint at step {start} beyond "
                     f"num_steps={config.num_steps}; raise num_steps or use a fresh workdir")
  end = config.num_steps
  if config.stop_after_steps:
    end = min(end, start + config.stop_after_steps)

  writer = (metrics_lib.MetricsWriter(workdir, resume_step=start, tensorboard_events=tensorboard_events)
            if is_main else metrics_lib.NullWriter())
  progress = metrics_lib.Progress(config.num_steps, start, config.progress_every_secs)
  eval_metrics: dict = {}

  def emit(item):  # reads back metrics of finished steps (host sync on those only)
    at_step, window, force = item
    host = jax.device_get(window)
    mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    speed = progress.maybe_report(at_step, mean, force=force)
    if speed:
      mean.update(speed)
    writer.write(at_step, mean, split="train")

  def evaluate(at_step):
    nonlocal eval_metrics
    eval_metrics = dict(eval_fn(state, at_step))
    writer.write(at_step, eval_metrics, split="eval")
    logger.info("eval at step %d: %s", at_step,
                ", ".join(f"{k}={v:.4g}" for k, v in eval_metrics.items()))

  preempted = False
  try:
    with parallel.use_mesh(mesh, rules), _StopFlag() as stop:
      jitted = jit_train_step(step_fn, state, mesh, rules)
      ready, window = None, []
      step = start
      while step < end:
        try:
          batch = next(data)
        except StopIteration:  # a finite iterator ran out: keep what was trained, then evaluate
          logger.warning("data exhausted after %d steps (num_steps=%d)", step, config.num_steps)
          if step > start:
            checkpointer.save(step, state, data.get_state())
          break
        progress.add_tokens(token_count(batch))
        state, metrics = jitted(state, parallel.shard_batch(batch, mesh, rules))
        step += 1
        window.append(metrics)
        if ready is not None:  # step `step` is queued: reading older metrics keeps the device busy
          emit(ready)
          ready = None
        if step % config.log_every == 0 or step == end:
          ready, window = (step, window, step == end), []
        signalled = stop.signum is not None
        if step % config.checkpoint_every == 0 or step == end or signalled:
          checkpointer.save(step, state, data.get_state())
        # A periodic eval is skipped only when a signal asks to stop now; the final one runs below.
        if eval_fn is not None and config.eval_every and step % config.eval_every == 0 \
            and step < config.num_steps and not signalled:
          if ready is not None:
            emit(ready)
            ready = None
          evaluate(step)
          progress.restart(step)
        if signalled or (step == end and end < config.num_steps):
          preempted = True
          if signalled:
            logger.warning("signal %d received: checkpointed step %d, stopping", stop.signum, step)
          break
      if ready is not None:
        emit(ready)
      if window:  # steps since the last log row (stopped early by a signal or the data)
        emit((step, window, True))
      if not preempted and eval_fn is not None:
        evaluate(step)
  finally:
    checkpointer.close()
    writer.close()
  return TrainResult(state=state, step=int(step), preempted=preempted, eval_metrics=eval_metrics)
