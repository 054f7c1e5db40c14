"""The one training loop every method uses: jitted step or host iteration, one shell around it.

A method supplies either ``loss_fn(params, batch, rng) -> (loss, metrics)`` (a scalar mean over
the batch's examples and a dict of scalar metrics), which :func:`make_train_step` turns into
``step(state, batch) -> (state, metrics)``, or a non-jitted ``iteration(state, batch) ->
(state, metrics)`` (PPO: rollout, then update, over prompt batches). :func:`train` runs either:

* ``step`` is jitted once with explicit in/out shardings (state as created, batch split over the
  mesh's batch axes, metrics replicated) and the state donated, inside ``parallel.use_mesh`` so the
  model's logical activation constraints resolve on the mesh.
* The host never waits for the device in the hot loop: step ``t+1`` is dispatched before step
  ``t``'s metrics (kept as device arrays) are read back, so reading them only waits for work that
  is already behind the queued step.
* Every ``checkpoint_every`` steps, at the end, and on SIGTERM, the state and the data iterator's
  position are saved (orbax, asynchronous); with several processes a SIGTERM to any one of them
  stops all at the same step (``signals.reached_stop_point``: jax's preemption sync point). Restarting in the same workdir restores both, so a
  resumed run computes exactly the updates an uninterrupted one would.
* The NaN guard (``train.guard``) is on for every method: a non-finite step is never applied and
  never checkpointed; :class:`NonFiniteLossError` names the step and the cause. The divergence
  guard (``LoopConfig.divergence_factor``, off by default) stops the same way on a jump of the
  loss or the param norm (:class:`DivergenceError`).
* Restoring falls back past unusable checkpoints (``Checkpointer.restore_latest``: manifest,
  finiteness); temp files of interrupted writers are removed at the start; the fingerprint is
  checked before ``config.json`` is written (a refused run changes nothing); a finished run
  rerun returns at once without a second evaluation row; SIGINT is handled like SIGTERM.
* ``should_stop(step, metrics) -> reason | None`` ends a run early (e.g. the reward model's early
  stopping on the held-out loss); the reason is logged, recorded and returned.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax import fileio
from rlhf_jax import parallel
from rlhf_jax.train import checkpoint as ckpt_lib
from rlhf_jax.train import guard
from rlhf_jax.train import metrics as metrics_lib
from rlhf_jax.train import signals
from rlhf_jax.train.state import (TrainState, abstract_state, join_frozen, split_frozen,
                                  state_shardings)

logger = logging.getLogger(__name__)

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Mapping[str,
                                                                                      jax.Array]]]
EvalFn = Callable[[Any, int], Mapping[str, float]]
IterationFn = Callable[[Any, Mapping[str, np.ndarray]], tuple[Any, Mapping[str, Any]]]
StopFn = Callable[[int, Mapping[str, float]], "str | None"]

STOP_FILE = "stop_reason.json"  # {"step", "reason", "eval_metrics"} of a run should_stop ended
INITIAL_EVAL_FILE = "initial_eval.json"  # the step-0 evaluation (train(initial_eval=True))
NonFiniteLossError = guard.NonFiniteLossError
DivergenceError = guard.DivergenceError
DIVERGENCE_KEYS = ("loss", "param_norm")
# Set (per thread) by a vectorised sweep collecting runs (train.vectorized.CapturedRun): train()
# hands its keyword arguments to the hook first, and returns what it returns unless that is None.
TRAIN_HOOK: contextvars.ContextVar = contextvars.ContextVar("rlhf_jax_train_hook", default=None)


class CheckpointableIterator(Protocol):
  """A batch iterator whose position can be saved and restored exactly (JSON-serialisable)."""

  def __next__(self) -> Mapping[str, np.ndarray]:
    ...

  def get_state(self) -> Mapping[str, Any]:
    ...

  def set_state(self, state: Mapping[str, Any]) -> None:
    ...


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
    divergence_factor: the divergence guard (0 = off): a step whose ``|loss|`` or post-update
      param norm exceeds this factor times its mean over the previous ``divergence_window``
      steps stops the run (:class:`guard.DivergenceError`) before that step is checkpointed,
      e.g. 10.0.
    divergence_window: steps in that mean (the guard arms after ``min(window, 5)`` steps).
    divergence_keys: the watched step metrics: ``loss`` and / or ``param_norm`` (computed in
      the step only when watched). A loss that crosses 0 (PPO's surrogate) should watch only
      ``param_norm``.
  """

  num_steps: int = 1000
  log_every: int = 10
  eval_every: int = 0
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  stop_after_steps: int = 0
  progress_every_secs: float = 5.0
  divergence_factor: float = 0.0
  divergence_window: int = 20
  divergence_keys: tuple[str, ...] = ("loss", "param_norm")

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
    if not (isinstance(self.divergence_factor, (int, float)) and
            (self.divergence_factor == 0 or self.divergence_factor > 1)):
      raise ValueError(f"LoopConfig.divergence_factor={self.divergence_factor!r} is invalid; "
                       "allowed: 0 (off) or a float > 1 (e.g. 10.0).")
    if not (isinstance(self.divergence_window, int) and self.divergence_window >= 1):
      raise ValueError(f"LoopConfig.divergence_window={self.divergence_window!r} is invalid; "
                       "allowed: an int >= 1.")
    keys = tuple(self.divergence_keys)
    if not keys or any(k not in DIVERGENCE_KEYS for k in keys):
      raise ValueError(f"LoopConfig.divergence_keys={self.divergence_keys!r} is invalid; allowed: "
                       f"a non-empty subset of {DIVERGENCE_KEYS}.")
    object.__setattr__(self, "divergence_keys", keys)


@dataclasses.dataclass
class TrainResult:
  state: Any  # TrainState (or the iteration's own state pytree)
  step: int  # steps (optimiser updates or iterations) done
  preempted: bool  # stopped early by SIGTERM or stop_after_steps (a rerun resumes)
  eval_metrics: dict  # last evaluation's metrics ({} if none ran)
  stop_reason: str | None = None  # why should_stop ended the run (the run is finished)
  initial_eval_metrics: dict = dataclasses.field(default_factory=dict)  # initial_eval=True


def _split_micro(x: jax.Array, n: int) -> jax.Array:
  # Strided split (row j*n + i goes to micro-batch i): with the batch dim sharded in contiguous
  # chunks over devices, every device then contributes equally to every micro-batch.
  if x.shape[0] % n:
    raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={n}")
  return jnp.moveaxis(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 1, 0)


def make_train_step(
    loss_fn: LossFn, optimizer: optax.GradientTransformation,
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
  live_grad_fn = jax.value_and_grad(
      lambda live, frozen, batch, rng: loss_fn(join_frozen(live, frozen), batch, rng), has_aux=True)

  def grad_fn(params, batch, rng):
    # Gradients of the live params only: a frozen part (a LoRA base) is never differentiated.
    live, frozen = split_frozen(params)
    return live_grad_fn(live, frozen, batch, rng)

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
    live, frozen = split_frozen(state.params)
    params = join_frozen(optax.apply_updates(live, updates), frozen)
    metrics = dict(metrics)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics

  step.loss_fn = loss_fn  # a vectorised sweep rebuilds the step with a traced learning rate
  return step


def jit_train_step(step_fn, state: TrainState, mesh: Mesh,
                   rules: Sequence = parallel.DEFAULT_RULES):
  """Jits ``step_fn`` with the state's own shardings in and out, donating the state.

  A frozen part of the params (``state.split_frozen``: a LoRA base, shared with the reference) is
  passed as a separate argument that is neither donated nor returned: the reference keeps reading
  the same buffers, and the step never writes a copy of them.
  """
  live, frozen = split_frozen(state)
  metrics_sharding = NamedSharding(mesh, PartitionSpec())
  if frozen is None:
    shardings = state_shardings(state)
    return jax.jit(step_fn, in_shardings=(shardings, parallel.data_sharding(mesh, rules)),
                   out_shardings=(shardings, metrics_sharding), donate_argnums=(0,))
  live_shardings = state_shardings(live)

  def split_step(live, frozen, batch):
    new_state, metrics = step_fn(join_frozen(live, frozen), batch)
    return split_frozen(new_state)[0], metrics

  jitted = jax.jit(
      split_step, in_shardings=(live_shardings, jax.tree.map(lambda x: x.sharding, frozen),
                                parallel.data_sharding(mesh, rules)),
      out_shardings=(live_shardings, metrics_sharding), donate_argnums=(0,))

  def call(state, batch):
    live, frozen = split_frozen(state)
    new_live, metrics = jitted(live, frozen, batch)
    return join_frozen(new_live, frozen), metrics

  call.jitted = jitted  # ``(live, frozen, batch)``: what a memory plan compiles
  return call


def default_token_count(batch: Mapping[str, np.ndarray]) -> float:
  """Real tokens in a host batch: the sum of its ``mask`` / ``*_mask`` leaves (not loss masks)."""
  total = 0.0
  for key, value in batch.items():
    if key == "mask" or (key.endswith("_mask") and "loss" not in key and "prompt" not in key):
      total += float(np.sum(value))
  return total


def _finished_eval(workdir: str, step: int) -> dict | None:
  """The evaluation a finished run logged at its last ``step`` (None: it did not get that far)."""
  path = fileio.join(workdir, metrics_lib.METRICS_FILE)
  found = None
  if fileio.isfile(path):
    with fileio.open_file(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        if row.get("split") == "eval" and row.get("step") == step:
          found = {k: v for k, v in row.items() if k not in ("step", "split", "time")}
  return found


def _read_stop(workdir: str, step: int) -> dict | None:
  """The stop record of a run that ``should_stop`` ended at checkpoint ``step`` (else None)."""
  path = fileio.join(workdir, STOP_FILE)
  if not fileio.isfile(path):
    return None
  record = ckpt_lib.read_json(path)
  return record if record.get("step") == step else None


def train(*, workdir: str, config: LoopConfig, state: Any, data: CheckpointableIterator,
          fingerprint: Mapping[str, Any], mesh: Mesh | None = None,
          rules: Sequence = parallel.DEFAULT_RULES, step_fn: Callable | None = None,
          iteration: IterationFn | None = None, eval_fn: EvalFn | None = None,
          initial_eval: bool = False, should_stop: StopFn | None = None,
          run_config: Mapping[str, Any] | None = None,
          token_count: Callable[[Mapping[str, np.ndarray]], float] = default_token_count,
          tokens_metric: str | None = None, nonfinite_guard: bool = True,
          tensorboard_events: bool = True, progress_keys: Sequence[str] = ()) -> TrainResult:
  """Runs (or resumes) ``config.num_steps`` steps in ``workdir``; the one loop of every method.

  A step is either a jitted ``step_fn(state, batch)`` (:func:`make_train_step`; jitted here with
  the state's shardings, the batch sharded over ``mesh``) or a non-jitted
  ``iteration(state, batch) -> (state, metrics)`` over host batches (PPO: rollout, then update),
  whose metrics are host floats. Either way the shell around it is the same: checkpoint + data
  position every ``checkpoint_every`` steps, at the end and on SIGTERM; bit-identical resume; the
  NaN guard (module ``train.guard``; on unless ``nonfinite_guard=False``); metrics (JSONL +
  TensorBoard, averaged over ``log_every`` steps) and the console progress line; evaluations
  every ``eval_every`` steps and at the end.

  Args:
    state: a freshly initialised state pytree (``TrainState``, or a method's own, e.g.
      ``PPOState``); replaced by the latest checkpoint's if one exists.
    data: host batches with a restorable position.
    fingerprint: JSON-able description of what checkpoints must match (model config, tokenizer).
    mesh: required with ``step_fn``; with ``iteration`` the steps run inside it when given.
    eval_fn: ``eval_fn(state, step) -> metrics``; every ``eval_every`` steps and at the end
      (unless an evaluation already ran at the last step).
    initial_eval: also evaluate the initial state at step 0 (the starting model's baseline; kept
      in ``<workdir>/initial_eval.json`` so a resumed run does not repeat it).
    should_stop: ``should_stop(step, metrics) -> reason | None``, called with every train row
      (keys ``train/<name>``) and every evaluation (``eval/<name>``). A reason ends the run: the
      step is checkpointed, the reason logged, recorded in ``<workdir>/stop_reason.json`` (a rerun
      returns at once; delete the file to train on) and returned as ``TrainResult.stop_reason``.
    run_config: written to ``<workdir>/config.json``.
    token_count: tokens of a host batch (throughput); ``tokens_metric``: instead, the name of a
      step metric counting them (e.g. PPO's generated tokens, known only after the step).
    progress_keys: step metrics shown in the console progress line next to the loss.

  Raises:
    NonFiniteLossError: a step was non-finite (its step and cause named); nothing after the last
      checkpoint was saved.
  """
  hook = TRAIN_HOOK.get()
  if hook is not None:
    captured = hook(**{k: v for k, v in locals().items() if k != "hook"})
    if captured is not None:
      return captured
  if (step_fn is None) == (iteration is None):
    raise ValueError("train.train needs exactly one of step_fn (jitted) or iteration (host loop)")
  if step_fn is not None and mesh is None:
    raise ValueError("train.train(step_fn=...) needs the mesh the step is jitted on")
  is_main = parallel.is_coordinator()  # files other than orbax's are written by process 0 only
  if is_main:
    ckpt_lib.clean_temp_files(workdir)
  # The fingerprint check comes first: a refused run changes nothing in the workdir.
  checkpointer = ckpt_lib.Checkpointer(workdir, fingerprint=fingerprint,
                                       keep=config.keep_checkpoints)
  if run_config is not None and is_main:
    ckpt_lib.atomic_write_json(fileio.join(workdir, "config.json"), dict(run_config))
  try:
    # A frozen part of the params (a LoRA base) is not in the checkpoints: it is the run's input.
    live, frozen = split_frozen(state)
    restored = checkpointer.restore_latest(abstract_state(live))
  except BaseException:
    checkpointer.close()
    raise
  start = 0
  if restored is not None:
    start, live, data_state = restored
    state = join_frozen(live, frozen)
    logger.info("resuming from checkpoint at step %d in %s", start, workdir)
    data.set_state(data_state)
  if start > config.num_steps:
    checkpointer.close()
    raise ValueError(f"workdir {workdir!r} has a checkpoint at step {start} beyond "
                     f"num_steps={config.num_steps}; raise num_steps or use a fresh workdir")
  stopped = _read_stop(workdir, start) if start else None
  if stopped is not None:
    checkpointer.close()
    logger.info("this run already stopped at step %d (%s); delete %s to train on", start,
                stopped["reason"], fileio.join(workdir, STOP_FILE))
    return TrainResult(state=state, step=start, preempted=False,
                       eval_metrics=dict(stopped.get("eval_metrics",
                                                     {})), stop_reason=stopped["reason"])
  if start and start == config.num_steps:
    done = _finished_eval(workdir, start) if eval_fn is not None else {}
    if done is not None:  # the final checkpoint and (if any) its evaluation are on disk
      checkpointer.close()
      logger.info("this run already finished at step %d in %s: nothing to do", start, workdir)
      initial_path = fileio.join(workdir, INITIAL_EVAL_FILE)
      initial = ckpt_lib.read_json(initial_path) if fileio.exists(initial_path) else {}
      return TrainResult(state=state, step=start, preempted=False, eval_metrics=done,
                         initial_eval_metrics=initial)
  if signals.stop_requested() is not None:  # a stop signal reached an earlier stage of this job
    checkpointer.close()
    logger.warning(
        "a stop signal was received earlier in this process: not starting the loop "
        "(step %d); rerun to resume", start)
    return TrainResult(state=state, step=start, preempted=True, eval_metrics={})
  end = config.num_steps
  if config.stop_after_steps:
    end = min(end, start + config.stop_after_steps)
  divergence = (guard.DivergenceMonitor(config.divergence_factor, config.divergence_window,
                                        config.divergence_keys)
                if config.divergence_factor else None)
  if nonfinite_guard and step_fn is not None:
    step_fn = guard.guard_step(
        step_fn, param_norm=divergence is not None and "param_norm" in config.divergence_keys)

  writer = (metrics_lib.MetricsWriter(workdir, resume_step=start,
                                      tensorboard_events=tensorboard_events)
            if is_main else metrics_lib.NullWriter())
  progress = metrics_lib.Progress(config.num_steps, start, config.progress_every_secs,
                                  keys=progress_keys)
  eval_metrics: dict = {}
  initial_metrics: dict = {}
  last_eval_step = -1
  last_saved = start if start else None
  unchecked: list = []  # (step, metrics on device) of jitted steps whose NaN flag is unread
  stop_reason = None

  def fail(found: tuple[str, str], at: int):
    raise guard.NonFiniteLossError(*found, step=at, last_good=last_saved, workdir=workdir)

  def check_divergence(host: Mapping[str, Any], at: int) -> None:
    jump = divergence.check(host) if divergence is not None else None
    if jump is not None:
      raise guard.DivergenceError(*jump[:3], config.divergence_factor, jump[3], step=at,
                                  last_good=last_saved, workdir=workdir)

  def check_flags(upto: int) -> None:
    """Reads the NaN flags of the jitted steps <= ``upto`` (a sync on those steps only)."""
    while unchecked and unchecked[0][0] <= upto:
      at, flags = unchecked.pop(0)
      host = jax.device_get(flags)
      if host[guard.NONFINITE_METRIC] > 0:
        fail(guard.step_cause(host), at)
      check_divergence(host, at)

  def save(at: int) -> None:
    nonlocal last_saved
    check_flags(at)  # never checkpoint a state a non-finite step has touched
    checkpointer.save(at, split_frozen(state)[0], data.get_state())
    last_saved = at

  def emit(item) -> dict:  # reads back metrics of finished steps (host sync on those only)
    at_step, window, force = item
    host = jax.device_get(window)
    mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    if tokens_metric is not None:
      progress.add_tokens(float(np.sum([m.get(tokens_metric, 0.0) for m in host])))
    speed = progress.maybe_report(at_step, mean, force=force)
    if speed:
      mean.update(speed)
    writer.write(at_step, mean, split="train")
    return mean

  def evaluate(at_step: int) -> dict:
    nonlocal last_eval_step
    metrics = dict(eval_fn(state, at_step))
    writer.write(at_step, metrics, split="eval")
    logger.info("eval at step %d: %s", at_step,
                ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    last_eval_step = at_step
    return metrics

  def ask(at_step: int, metrics: Mapping[str, float], split: str) -> str | None:
    if should_stop is None:
      return None
    return should_stop(at_step, {f"{split}/{k}": v for k, v in metrics.items()})

  preempted = False
  step = start
  mesh_ctx = parallel.use_mesh(mesh, rules) if mesh is not None else contextlib.nullcontext()
  try:
    with mesh_ctx, signals.SigtermWatch(handles=True) as stop:
      if initial_eval and eval_fn is not None:
        initial_path = fileio.join(workdir, INITIAL_EVAL_FILE)
        if fileio.exists(initial_path):
          initial_metrics = ckpt_lib.read_json(initial_path)
        elif start == 0:
          initial_metrics = evaluate(0)
          last_eval_step = -1  # the baseline is not the run's final evaluation
          if is_main:
            ckpt_lib.atomic_write_json(initial_path, initial_metrics)
          progress.restart(0)
      jitted = jit_train_step(step_fn, state, mesh, rules) if step_fn is not None else None
      ready, window = None, []
      while step < end:
        try:
          batch = next(data)
        except StopIteration:  # a finite iterator ran out: keep what was trained, then evaluate
          logger.warning("data exhausted after %d steps (num_steps=%d)", step, config.num_steps)
          if step > start:
            save(step)
          break
        if tokens_metric is None:
          progress.add_tokens(token_count(batch))
        if jitted is not None:
          state, metrics = jitted(state, parallel.shard_batch(batch, mesh, rules))
          step += 1
          if nonfinite_guard:
            metrics = dict(metrics)  # param_norm (divergence guard) stays a logged metric
            flag = metrics.pop(guard.NONFINITE_METRIC)
            unchecked.append((step, {guard.NONFINITE_METRIC: flag, **metrics}))
            check_flags(step -
                        1)  # step `step` is queued: reading older flags keeps the device busy
        else:
          try:
            new_state, metrics = iteration(state, batch)
          except guard.NonFiniteLossError as err:
            if err.step is None:
              fail((err.cause, err.detail), step + 1)
            raise
          metrics = dict(metrics)
          cause = guard.nonfinite_cause(
              **{k: metrics[k]
                 for k in ("loss", "grad_norm")
                 if k in metrics}) if nonfinite_guard else None
          if cause is not None:
            fail(cause, step + 1)
          check_divergence(metrics, step + 1)
          state = new_state
          step += 1
        window.append(metrics)
        if ready is not None:  # step `step` is queued: reading older metrics keeps the device busy
          stop_reason = ask(ready[0], emit(ready), "train")
          ready = None
        if step % config.log_every == 0 or step == end:
          ready, window = (step, window, step == end), []
          if jitted is None:  # host metrics: nothing to overlap with, write the row now
            stop_reason = stop_reason or ask(step, emit(ready), "train")
            ready = None
        # The same decision on every process (jax's preemption sync point when there are several).
        signalled = signals.reached_stop_point(step, stop.received)
        if step % config.checkpoint_every == 0 or step == end or signalled or stop_reason:
          save(step)
        # A periodic eval is skipped only when a signal asks to stop now; the final one runs below.
        if eval_fn is not None and config.eval_every and step % config.eval_every == 0 \
            and step < config.num_steps and not signalled and not stop_reason:
          if ready is not None:
            stop_reason = ask(ready[0], emit(ready), "train")
            ready = None
          eval_metrics = evaluate(step)
          stop_reason = ask(step, eval_metrics, "eval")
          if stop_reason:
            save(step)
          progress.restart(step)
        if stop_reason:
          logger.warning("stopping at step %d: %s", step, stop_reason)
          break
        if signalled or (step == end and end < config.num_steps):
          preempted = True
          if signalled and stop.signum is not None:
            logger.warning("signal %d received: checkpointed step %d, stopping", stop.signum, step)
          elif signalled:
            logger.warning(
                "a stop signal reached a process of this job: every process "
                "checkpointed step %d, stopping", step)
          break
      if ready is not None:
        emit(ready)
      if window:  # steps since the last log row (stopped early by a signal, the data or the hook)
        emit((step, window, True))
      check_flags(step)
      if not preempted and eval_fn is not None and last_eval_step != step:
        eval_metrics = evaluate(step)
      if stop_reason and is_main:
        ckpt_lib.atomic_write_json(
            fileio.join(workdir, STOP_FILE),
            {"step": step, "reason": stop_reason, "eval_metrics": eval_metrics})
  finally:
    checkpointer.close()
    writer.close()
  return TrainResult(state=state, step=int(step), preempted=preempted, eval_metrics=eval_metrics,
                     stop_reason=stop_reason, initial_eval_metrics=initial_metrics)
