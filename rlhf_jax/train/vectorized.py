r"""Vectorised sweeps: R runs of one method trained as one jitted program.

Runs that share shapes (same model, batch, lengths) are stacked along a leading ``run`` axis:
every leaf of the ``TrainState`` (params, optimizer moments, step, RNG key) becomes ``[R, ...]``,
and one jitted step applies each run's own update,

    state_R', metrics_R = vmap(step_r)(state_R, hp_R, batch)       (batch shared, or [R, ...])

where ``hp_R`` holds the hyperparameters that differ between runs as arrays over the run axis
(β, label smoothing, the learning rate, ...). ``step_r`` is the sequential run's own step
(``train.make_train_step`` over the method's loss and ``train.make_optimizer``) rebuilt with those
values traced instead of constant, so a run of the sweep computes what its sequential run computes
(same data, same RNG stream, same arithmetic up to float rounding of the batched kernels).
Runs that differ in something static (the DPO ``loss_type``, SimPO vs DPO) form *groups*: one
``vmap`` per group inside the same jitted step, so no run pays for another's loss; each group's
runs are stacked on their own (a list of ``[R_g, ...]`` states), so no group is sliced out of
another's arrays.

What differs per run (``Run.hparams``, ``Run.state``, ``Run.data``) and what must not (everything
else) is decided by the method glue (``rlhf_jax.algorithms.vectorized``); this module is the loop:

* **Outputs.** Each run keeps its own workdir: ``config.json``, ``metrics.jsonl`` + TensorBoard
  events, orbax checkpoints (its slice of the state and its data position, readable by a
  sequential run of the same config), ``samples.jsonl`` and ``final_metrics.json``, written by the
  same writers the one loop (``train.loop``) uses.
* **Divergence per run.** The NaN guard (``train.guard.guard_step``) runs inside each run's step;
  a run whose loss or gradient goes non-finite is *frozen*: ``active_r`` turns false on the
  device and every later update of that run is masked,
  ``state_r' = where(active_r ∧ ok_r, new_r, old_r)``, so the others go on unchanged. The host
  learns it one step late (the device never idles), records ``<run>/nonfinite.json`` (step, cause,
  last checkpoint) and stops writing, checkpointing and evaluating that run, exactly where the
  sequential run would have stopped with :class:`train.NonFiniteLossError`.
* **Resume and SIGTERM.** Every ``checkpoint_every`` steps, at the end and on SIGTERM / SIGINT,
  every active run is checkpointed; a rerun restores each run from its own workdir (frozen runs
  stay frozen) and continues bit-identically.
* **Mesh.** ``run_devices = n`` adds a ``run`` mesh axis of size ``n`` in front of the runs' own
  ``(data, fsdp, tensor)`` mesh: run ``r``'s slice lives on the devices of run-shard
  ``k // (R_g / n)`` within its group (each group's size must divide by ``n``), and the model's
  logical sharding constraints carry the ``run`` axis (``vmap(spmd_axis_name="run")``), so a
  pod trains a grid as one job. Single-process only.
  Each run's ``vectorized.json`` records where its slice lived (run shard, device ids).
* **Any method that calls ``train.train`` with a jitted step** (SFT, the reward model) is swept by
  :func:`capture_runs`: each grid point's own ``train_and_evaluate`` runs in a thread of its own
  until it calls ``train.train``; the call's arguments (state, step, data, evaluation) become a
  :class:`Run`, the thread waits, the sweep trains every run, and each thread gets its run's
  :class:`train.TrainResult` back and goes on with what the method does after training
  (final metrics, the RM's normalisation and artifact), exactly as its sequential run does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax import parallel
from rlhf_jax.train import checkpoint as ckpt_lib
from rlhf_jax.train import guard
from rlhf_jax.train import loop as loop_lib
from rlhf_jax.train import metrics as metrics_lib
from rlhf_jax.train import signals
from rlhf_jax.train.state import abstract_state, split_frozen

logger = logging.getLogger(__name__)

RUN_AXIS = "run"
FROZEN_FILE = "nonfinite.json"  # {"step", "cause", "detail", "last_checkpoint"} of a frozen run
LAYOUT_FILE = "vectorized.json"  # {"runs", "index", "run_devices", "run_shard", "devices", ...}
# The loop settings every run of one vectorised sweep must share (they drive the one host loop).
SHARED_LOOP_FIELDS = ("num_steps", "log_every", "eval_every", "checkpoint_every",
                      "keep_checkpoints", "stop_after_steps")


def with_traced(obj: Any, **values: Any) -> Any:
  """A copy of the frozen dataclass ``obj`` with ``values`` (traced arrays) in place, without
  running ``__post_init__``: the concrete per-run values were validated when each run's own
  config was parsed; the validation cannot look at a tracer."""
  new = object.__new__(type(obj))
  for field in dataclasses.fields(obj):
    object.__setattr__(new, field.name, values.get(field.name, getattr(obj, field.name)))
  unknown = set(values) - {f.name for f in dataclasses.fields(obj)}
  if unknown:
    raise ValueError(f"{type(obj).__name__} has no field(s) {sorted(unknown)}")
  return new


@dataclasses.dataclass
class Run:
  """One grid point, built by the method glue and not yet trained.

  Attributes:
    name: the run's name (its folder under the sweep directory).
    workdir: where its outputs go (as the sequential run's ``--workdir``).
    state: its freshly initialised ``TrainState`` (on ``mesh``).
    step_for: ``step_for(hp) -> step(state, batch) -> (state, metrics)`` for the hyperparameter
      values ``hp`` (a dict of scalars; traced inside the sweep). ``step_for(hparams)`` is the
      sequential run's step.
    hparams: the run's values of the hyperparameters that differ across the sweep.
    group: runs with equal ``group`` share the static structure of their step (one ``vmap``).
    data: its resumable batch iterator; ``data_key``: runs with equal keys see the same batches
      (one iterator serves them all).
    loop: its ``LoopConfig`` (``SHARED_LOOP_FIELDS`` must agree across the sweep).
    mesh: the run's own ``(data, fsdp, tensor)`` mesh.
    fingerprint, run_config: as ``train.train``'s.
    eval_fn: ``eval_fn(state, step) -> metrics`` (the run's evaluation, on its own state).
    finish: ``finish(TrainResult) -> final metrics`` (writes ``final_metrics.json``).
    token_count: tokens of a host batch (the throughput line).
    should_stop: as ``train.train``'s; a vectorised sweep cannot stop one run early, so a reason
      fails the sweep naming the run (the glue refuses configs that would, e.g. RM early stopping).
    heldout_for: ``heldout_for(hp) -> fn(params, batch) -> metrics``, the loss's held-out metrics
      (eval mode) with ``hp`` traced, or None. The sweep then computes them for all runs of a
      group in one ``vmap`` per held-out batch (one compile per group instead of one per run)
      and adds ``{f"{heldout_prefix}/<metric>": mean over heldout_batches}`` after
      ``eval_fn``'s metrics, as ``algorithms.common.make_heldout_eval_fn`` does for a
      sequential run.
    heldout_batches: the run's fixed held-out batches (host arrays); equal within a data_key.
  """

  name: str
  workdir: str
  state: Any
  step_for: Callable[[Mapping[str, Any]], Callable]
  hparams: Mapping[str, float]
  group: str
  data: Any
  data_key: str
  loop: loop_lib.LoopConfig
  mesh: Mesh
  fingerprint: Mapping[str, Any]
  run_config: Mapping[str, Any]
  eval_fn: Callable[[Any, int], Mapping[str, float]] | None
  finish: Callable[[loop_lib.TrainResult], dict]
  token_count: Callable[[Mapping[str, Any]], float] = loop_lib.default_token_count
  should_stop: Callable[[int, Mapping[str, float]], str | None] | None = None
  heldout_for: Callable[[Mapping[str, Any]], Callable] | None = None
  heldout_batches: Sequence[Mapping[str, Any]] = ()
  heldout_prefix: str = ""


@dataclasses.dataclass
class RunOutcome:
  name: str
  final: dict | None  # final metrics (None: frozen or preempted)
  frozen: dict | None  # the nonfinite.json record of a frozen run
  step: int
  preempted: bool


def _check_runs(runs: Sequence[Run]) -> None:
  if not runs:
    raise ValueError("a vectorised sweep needs at least one run")
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"run names clash: {names}")
  first = runs[0]
  for run in runs[1:]:
    for field in SHARED_LOOP_FIELDS:
      a, b = getattr(first.loop, field), getattr(run.loop, field)
      if a != b:
        raise ValueError(f"runs {first.name!r} and {run.name!r} differ in loop.{field} ({a} vs "
                         f"{b}): a vectorised sweep runs one loop; put them in separate sweeps")
    if set(run.hparams) != set(first.hparams):
      raise ValueError(f"runs {first.name!r} and {run.name!r} vectorise different "
                       f"hyperparameters: {sorted(first.hparams)} vs {sorted(run.hparams)}")
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), split_frozen(run.state)[0])
    if shapes != jax.tree.map(lambda x: (x.shape, x.dtype), split_frozen(first.state)[0]):
      raise ValueError(f"runs {first.name!r} and {run.name!r} have different state shapes "
                       "(model or optimizer): they cannot share one vectorised program")
    if split_frozen(run.state)[1] is not None:
      raise ValueError("vectorised sweeps do not support frozen param parts (LoRA) yet")


def run_mesh(inner: Mesh, run_devices: int) -> Mesh:
  """``(run, data, fsdp, tensor)`` over ``run_devices`` copies of the runs' own mesh shape."""
  if not (isinstance(run_devices, int) and run_devices >= 1):
    raise ValueError(f"run_devices={run_devices!r} is invalid; allowed: an int >= 1")
  per_run = inner.devices.size
  need = run_devices * per_run
  if need > jax.device_count():
    raise ValueError(f"run_devices={run_devices} x {per_run} device(s) per run (config.mesh) = "
                     f"{need} devices, but {jax.device_count()} are available")
  devices = np.asarray(jax.devices()[:need]).reshape(run_devices, *inner.devices.shape)
  return Mesh(devices, (RUN_AXIS, *inner.axis_names),
              axis_types=(jax.sharding.AxisType.Auto,) * (1 + len(inner.axis_names)))


def _stacked_spec(sharding: Any) -> PartitionSpec:
  spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
  return PartitionSpec(RUN_AXIS, *spec)


def stack_states(states: Sequence[Any], mesh: Mesh) -> Any:
  """``[R, ...]`` leaves over ``mesh``'s ``run`` axis (each run's own layout within)."""

  def stack(*xs):
    host = np.stack([np.asarray(jax.device_get(x)) for x in xs])
    return jax.device_put(host, NamedSharding(mesh, _stacked_spec(xs[0].sharding)))

  return jax.tree.map(stack, *states)


def unstack_state(state_R: Any, r: int, like: Any) -> Any:
  """Run ``r``'s slice, placed like ``like`` (the run's own state: its mesh and shardings).

  ``state_R`` may be the host copy (``jax.device_get``) of the stacked state: slicing it costs no
  device program (slicing the device arrays dispatches, and first compiles, one slice per leaf
  shape), so a loop that unstacks every run fetches the group once and slices on the host.
  """
  return jax.tree.map(lambda x, l: jax.device_put(x[r], l.sharding), state_R, like)


def run_layout(state_R: Any, r: int, mesh: Mesh) -> dict:
  """Where run ``r`` of the stacked group state ``state_R`` lives: its run shard and the ids of
  the devices that hold its slice of every param (read from the arrays' shards, not the plan)."""
  num_runs = jax.tree.leaves(state_R.params)[0].shape[0]
  devices, pieces = set(), 1
  for leaf in jax.tree.leaves(state_R.params):
    mine = [s for s in leaf.addressable_shards if r in range(*s.index[0].indices(num_runs))]
    devices |= {s.device.id for s in mine}
    # distinct slices of the run's own array: > 1 when its data / fsdp / tensor axes split it
    pieces = max(pieces, len({str(s.index[1:]) for s in mine}))
  run_devices = mesh.shape[RUN_AXIS]
  return {
      "group_runs": num_runs, "group_index": r, "run_devices": run_devices,
      "run_shard": r // (num_runs // run_devices), "devices": sorted(devices),
      "max_param_pieces": pieces, "mesh_shape": {k: int(v) for k, v in mesh.shape.items()}}


def _groups(runs: Sequence[Run]) -> list[tuple[int, int]]:
  """Contiguous ``[lo, hi)`` ranges of equal ``group`` (runs are sorted by group by the caller)."""
  bounds, lo = [], 0
  for i in range(1, len(runs) + 1):
    if i == len(runs) or runs[i].group != runs[lo].group:
      bounds.append((lo, i))
      lo = i
  seen = [runs[lo].group for lo, _ in bounds]
  if len(set(seen)) != len(seen):
    raise ValueError(f"runs of one group must be contiguous: {[r.group for r in runs]}")
  return bounds


def make_vector_step(runs: Sequence[Run], shared_batch: bool, mesh: Mesh) -> Callable:
  """``vstep(state_G, active_G, hp_G, batch) -> (state_G, active_G, metrics_G)``, lists over the
  groups (``batch``: shared, or one ``[R_g, ...]`` stack per group).

  Each group is one ``vmap`` of its runs' guarded step; a run is updated only while active and
  on a finite step (``guard.guard_step`` keeps its params on a bad step; the outer ``where``
  also keeps its step counter and key once frozen).
  """
  bounds = _groups(runs)
  sharded = mesh.shape[RUN_AXIS] > 1

  def one(step_for, state, active, hp, batch):
    new, metrics = guard.guard_step(step_for(hp))(state, batch)
    ok = active & (metrics[guard.NONFINITE_METRIC] == 0)
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    return new, ok, metrics

  def vstep(state_G, active_G, hp_G, batch):
    news, oks, metrics = [], [], []
    for g, (lo, _) in enumerate(bounds):
      fn = jax.vmap(lambda s, a, h, b, sf=runs[lo].step_for: one(sf, s, a, h, b),
                    in_axes=(0, 0, 0, None if shared_batch else 0),
                    spmd_axis_name=RUN_AXIS if sharded else None)
      new, ok, m = fn(state_G[g], active_G[g], hp_G[g], batch if shared_batch else batch[g])
      news.append(new)
      oks.append(ok)
      metrics.append(m)
    return news, oks, metrics

  return vstep


def make_vector_heldout(run: Run, shared_batch: bool, sharded: bool) -> Callable:
  """``fn(params_R, hp_R, batch) -> {metric: [R]}``: the held-out metrics of a group's runs
  (``run.heldout_for`` of its first run) in one ``vmap``; ``batch`` shared or ``[R, ...]``."""

  def fn(params_R, hp_R, batch):
    return jax.vmap(lambda p, h, b: run.heldout_for(h)(p, b),
                    in_axes=(0, 0, None if shared_batch else 0),
                    spmd_axis_name=RUN_AXIS if sharded else None)(params_R, hp_R, batch)

  return jax.jit(fn)


def _frozen_record(workdir: str) -> dict | None:
  path = os.path.join(workdir, FROZEN_FILE)
  return ckpt_lib.read_json(path) if os.path.isfile(path) else None


def train_vectorized(runs: Sequence[Run], *, run_devices: int = 1,
                     rules: Sequence = parallel.DEFAULT_RULES,
                     progress_every_secs: float | None = None,
                     timings: dict | None = None) -> list[RunOutcome]:
  """Trains (or resumes) every run of ``runs`` as one jitted program (module docstring).

  Returns one :class:`RunOutcome` per run, in order. Runs must be sorted so that equal ``group``
  values are contiguous (the glue does it). ``timings``, if given, gets the wall seconds spent
  in evaluations (``eval_seconds``: ``eval_fn`` calls + held-out metrics, ``heldout_seconds``:
  the held-out part) added to it (benchmarks).
  """
  timings = {} if timings is None else timings
  for key in ("eval_seconds", "heldout_seconds"):
    timings.setdefault(key, 0.0)
  _check_runs(runs)
  if jax.process_count() > 1:
    raise ValueError("vectorised sweeps run in one process (jax.process_count() is "
                     f"{jax.process_count()}); launch the sweep's runs as separate jobs instead")
  n = len(runs)
  bounds = _groups(runs)

  def group_of(i: int) -> tuple[int, int]:
    """(group, index within it) of run ``i``."""
    return next((g, i - lo) for g, (lo, hi) in enumerate(bounds) if lo <= i < hi)

  cfg = runs[0].loop
  mesh = run_mesh(runs[0].mesh, run_devices)
  uneven = [hi - lo for lo, hi in bounds if (hi - lo) % run_devices]
  if uneven:
    raise ValueError(f"groups of {[hi - lo for lo, hi in bounds]} runs (one per static loss "
                     f"setting) do not split evenly over run_devices={run_devices}")
  for run in runs:
    ckpt_lib.clean_temp_files(run.workdir)
  checkpointers = [
      ckpt_lib.Checkpointer(r.workdir, fingerprint=r.fingerprint, keep=cfg.keep_checkpoints)
      for r in runs]
  for run in runs:
    ckpt_lib.atomic_write_json(os.path.join(run.workdir, "config.json"), dict(run.run_config))

  # Data: one iterator per distinct data_key.
  keys = list(dict.fromkeys(r.data_key for r in runs))
  feeds = [next(r.data for r in runs if r.data_key == k) for k in keys]
  feed_of = [keys.index(r.data_key) for r in runs]
  shared_batch = len(keys) == 1

  # Restore each run; frozen runs stay frozen.
  states, starts, frozen = [], [], []
  data_states: dict[int, Any] = {}
  try:
    for i, run in enumerate(runs):
      restored = checkpointers[i].restore_latest(abstract_state(run.state))
      record = _frozen_record(run.workdir)
      frozen.append(record)
      if restored is None:
        states.append(run.state)
        starts.append(0)
      else:
        step_i, state_i, data_i = restored
        states.append(state_i)
        starts.append(step_i)
        if record is None:
          data_states.setdefault(feed_of[i], data_i)
  except BaseException:
    for c in checkpointers:
      c.close()
    raise
  active_starts = {s for s, f in zip(starts, frozen) if f is None}
  if len(active_starts) > 1:
    for c in checkpointers:
      c.close()
    at = {r.name: s for r, s, f in zip(runs, starts, frozen) if f is None}
    raise ValueError(f"the runs of this sweep resume from different steps {at}: a vectorised "
                     "sweep resumes runs that stopped together; finish the others sequentially "
                     "(launch/sweep.py without --vectorize) or use a fresh sweep_dir")
  start = active_starts.pop() if active_starts else max(starts)
  if start > cfg.num_steps:
    for c in checkpointers:
      c.close()
    raise ValueError(f"checkpoints at step {start} beyond num_steps={cfg.num_steps}")
  for j, feed in enumerate(feeds):
    if j in data_states:
      feed.set_state(data_states[j])
  if start:
    logger.info("vectorised sweep: resuming %d run(s) from step %d", n, start)
  end = cfg.num_steps if not cfg.stop_after_steps else min(cfg.num_steps, start +
                                                           cfg.stop_after_steps)

  run_sharding = NamedSharding(mesh, PartitionSpec(RUN_AXIS))
  state_G = [stack_states(states[lo:hi], mesh) for lo, hi in bounds]
  likes = [r.state for r in runs]  # each run's own placement (checkpoints, evaluation)
  del states
  for i, run in enumerate(runs):
    g, k = group_of(i)
    ckpt_lib.atomic_write_json(
        os.path.join(run.workdir, LAYOUT_FILE),
        {"runs": n, "index": i, "group": g, **run_layout(state_G[g], k, mesh)})
  active_G = [
      jax.device_put(np.array([f is None
                               for f in frozen[lo:hi]]), run_sharding)
      for lo, hi in bounds]
  hp_G = [{
      key: jax.device_put(np.asarray([r.hparams[key]
                                      for r in runs[lo:hi]], np.float32), run_sharding)
      for key in runs[0].hparams}
          for lo, hi in bounds]
  batch_spec = PartitionSpec(parallel.batch_axes(rules))
  stacked_batch_sharding = NamedSharding(mesh, PartitionSpec(RUN_AXIS, *batch_spec))
  vstep = make_vector_step(runs, shared_batch, mesh)
  state_sh = [jax.tree.map(lambda x: x.sharding, s) for s in state_G]
  jitted = jax.jit(vstep, donate_argnums=(0,),
                   out_shardings=(state_sh, [run_sharding] * len(bounds), None))

  writers = [
      metrics_lib.MetricsWriter(r.workdir, resume_step=start) if f is None else None
      for r, f in zip(runs, frozen)]
  progress = metrics_lib.Progress(
      cfg.num_steps, start,
      progress_every_secs if progress_every_secs is not None else cfg.progress_every_secs)
  last_saved = [s if s else None for s in starts]
  eval_metrics: list[dict] = [{} for _ in runs]
  flags: list = []  # (step, ok_R, [{loss, grad_norm} per group]) not yet read on the host
  window: list = []  # (step, [metrics per group]) since the last log row

  def ask_stop(i: int, at: int, metrics: Mapping[str, float]) -> None:
    reason = runs[i].should_stop(at, metrics) if runs[i].should_stop is not None else None
    if reason:
      raise ValueError(f"run {runs[i].name} asks to stop at step {at} ({reason}); a vectorised "
                       "sweep cannot end one run early: sweep it without --vectorize")

  def freeze(i: int, at: int, metrics_g: list) -> None:
    g, k = group_of(i)
    shown = {m: float(metrics_g[g][m][k]) for m in ("loss", "grad_norm") if m in metrics_g[g]}
    cause, detail = guard.step_cause(shown)
    record = {"step": at, "cause": cause, "detail": detail, "last_checkpoint": last_saved[i]}
    frozen[i] = record
    ckpt_lib.atomic_write_json(os.path.join(runs[i].workdir, FROZEN_FILE), record)
    logger.warning(
        "run %s: non-finite %s at step %d %s: frozen (its updates are masked; the other runs "
        "go on); latest checkpoint: %s", runs[i].name, cause, at, detail,
        last_saved[i] if last_saved[i] is not None else "none")
    writers[i].close()
    writers[i] = None

  def check_flags(upto: int) -> None:
    while flags and flags[0][0] <= upto:
      at, ok_dev, lg_dev = flags.pop(0)
      ok_G, lg = jax.device_get((ok_dev, lg_dev))
      for i in range(n):
        g, k = group_of(i)
        if frozen[i] is None and not ok_G[g][k]:
          freeze(i, at, lg)

  def run_state(i: int, host: dict) -> Any:
    """Run ``i``'s own state; ``host`` caches each group's host copy for one pass over runs."""
    g, k = group_of(i)
    if g not in host:
      host[g] = jax.device_get(state_G[g])
    return unstack_state(host[g], k, likes[i])

  def save(at: int) -> None:
    check_flags(at)  # never checkpoint a run a non-finite step has touched
    host: dict = {}
    for i, run in enumerate(runs):
      if frozen[i] is None and last_saved[i] != at:
        checkpointers[i].save(at, run_state(i, host), feeds[feed_of[i]].get_state())
        last_saved[i] = at

  def emit(at: int, rows: list, force: bool) -> None:
    check_flags(at)
    host = jax.device_get([m for _, m in rows])
    steps = [s for s, _ in rows]
    means_all = []
    for i in range(n):
      if frozen[i] is not None and frozen[i]["step"] <= at:
        continue  # the sequential run stopped before writing this row
      g, k = group_of(i)
      mean = {key: float(np.mean([h[g][key][k] for h in host])) for key in host[0][g]}
      mean.pop(guard.NONFINITE_METRIC, None)
      means_all.append(mean)
      writers[i].write(at, mean, split="train")
      ask_stop(i, at, {f"train/{k}": v for k, v in mean.items()})
    del steps
    if means_all:
      progress.maybe_report(at, {"loss": float(np.mean([m["loss"] for m in means_all]))},
                            force=force)

  heldout_jits: dict[int, Callable] = {}

  def heldout(i: int, cache: dict) -> dict:
    """Run ``i``'s held-out metrics; its group's are computed together on first use."""
    g, k = group_of(i)
    if runs[i].heldout_for is None or not runs[i].heldout_batches:
      return {}
    if g not in cache:
      start_s = time.time()
      lo, hi = bounds[g]
      group = runs[lo:hi]
      shared = len({r.data_key for r in group}) == 1
      if g not in heldout_jits:
        heldout_jits[g] = make_vector_heldout(group[0], shared, mesh.shape[RUN_AXIS] > 1)
      sums: dict[str, np.ndarray] = {}
      with parallel.use_mesh(mesh, rules):
        for rows in zip(*[r.heldout_batches for r in group]):
          if shared:
            batch = parallel.shard_batch(rows[0], mesh, rules)
          else:
            batch = jax.tree.map(
                lambda *xs: jax.device_put(np.stack([np.asarray(x)
                                                     for x in xs]), stacked_batch_sharding), *rows)
          metrics = jax.device_get(heldout_jits[g](state_G[g].params, hp_G[g], batch))
          for key, v_R in metrics.items():  # float64 sums, as the sequential float() sums
            sums[key] = sums.get(key, 0.0) + np.asarray(v_R, np.float64)
      num = len(group[0].heldout_batches)
      cache[g] = [{f"{group[0].heldout_prefix}/{key}": float(v[j] / num)
                   for key, v in sums.items()}
                  for j in range(hi - lo)]
      timings["heldout_seconds"] += time.time() - start_s
    return cache[g][k]

  def evaluate(at: int) -> None:
    check_flags(at)
    start_s = time.time()
    cache: dict = {}
    host: dict = {}
    for i, run in enumerate(runs):
      if frozen[i] is None and (run.eval_fn is not None or run.heldout_for is not None):
        metrics = dict(run.eval_fn(run_state(i, host), at)) if run.eval_fn is not None else {}
        metrics.update(heldout(i, cache))
        writers[i].write(at, metrics, split="eval")
        logger.info("eval %s at step %d: %s", run.name, at,
                    ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        eval_metrics[i] = metrics
        ask_stop(i, at, {f"eval/{k}": v for k, v in metrics.items()})
    timings["eval_seconds"] += time.time() - start_s

  preempted = False
  step = start
  last_eval = -1
  ready = None
  try:
    with signals.SigtermWatch(handles=True) as stop:
      while step < end:
        with parallel.use_mesh(runs[0].mesh, rules):  # the reference transform's own mesh
          try:
            batches = [next(f) for f in feeds]
          except StopIteration:
            logger.warning("data exhausted after %d steps (num_steps=%d)", step, cfg.num_steps)
            if step > start:
              save(step)
            break
        for i in range(n):
          if frozen[i] is None:
            progress.add_tokens(runs[i].token_count(batches[feed_of[i]]))
        with parallel.use_mesh(mesh, rules):
          if shared_batch:
            batch = parallel.shard_batch(batches[0], mesh, rules)
          else:
            batch = [
                jax.tree.map(
                    lambda *xs: jax.device_put(
                        np.stack([np.asarray(jax.device_get(x))
                                  for x in xs]), stacked_batch_sharding),
                    *[batches[j]
                      for j in feed_of[lo:hi]])
                for lo, hi in bounds]
          state_G, active_G, metrics = jitted(state_G, active_G, hp_G, batch)
        step += 1
        flags.append(
            (step, active_G, [{k: m[k] for k in ("loss", "grad_norm") if k in m} for m in metrics]))
        window.append((step, metrics))
        if ready is not None:  # step `step` is queued: reading older metrics keeps it busy
          emit(*ready)
          ready = None
        if step % cfg.log_every == 0 or step == end:
          ready, window = (step, window, step == end), []
        signalled = stop.received
        if step % cfg.checkpoint_every == 0 or step == end or signalled:
          save(step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps \
            and not signalled:
          if ready is not None:
            emit(*ready)
            ready = None
          evaluate(step)
          last_eval = step
          progress.restart(step)
        if signalled or (step == end and end < cfg.num_steps):
          preempted = True
          if signalled:
            logger.warning("signal %d received: checkpointed step %d of every run, stopping",
                           stop.signum, step)
          break
      if ready is not None:
        emit(*ready)
      if window:
        emit(step, window, True)
      check_flags(step)
      if not preempted and last_eval != step:
        evaluate(step)
  finally:
    for c in checkpointers:
      c.close()
    for w in writers:
      if w is not None:
        w.close()
  outcomes = []
  host: dict = {}
  for i, run in enumerate(runs):
    if frozen[i] is not None:
      outcomes.append(RunOutcome(run.name, None, frozen[i], frozen[i]["step"] - 1, False))
      continue
    result = loop_lib.TrainResult(state=run_state(i, host), step=int(step), preempted=preempted,
                                  eval_metrics=eval_metrics[i])
    final = run.finish(result)
    outcomes.append(RunOutcome(run.name, None if preempted else final, None, int(step), preempted))
  return outcomes


def outcome_json(outcomes: Sequence[RunOutcome]) -> str:
  """One line per run for logs."""
  return "\n".join(
      json.dumps({"run": o.name, "step": o.step, "preempted": o.preempted, "frozen": o.frozen})
      for o in outcomes)


class SweepAborted(Exception):
  """Handed to a run's waiting ``train.train`` call when the sweep fails before it trained."""


class CapturedRun:
  """One grid point's ``train_and_evaluate`` in a thread of its own, paused in ``train.train``.

  ``fn()`` runs with ``loop.TRAIN_HOOK`` set (in its thread only): its ``train.train`` call for
  ``workdir`` hands its keyword arguments over (``kwargs``) and waits for :meth:`resume`; calls
  for other workdirs (an earlier stage the method trains first, e.g. the SFT run of an RM) train
  as usual. ``kwargs`` stays None when ``fn`` returned (or failed) without training.
  """

  def __init__(self, name: str, workdir: str, fn: Callable[[], Any]):
    self.name, self.workdir, self.fn = name, os.path.abspath(workdir), fn
    self.kwargs: dict | None = None
    self.value: Any = None
    self.error: BaseException | None = None
    self._reached = threading.Event()  # train.train was called, or fn ended
    self._result: queue.Queue = queue.Queue(maxsize=1)
    self._thread = threading.Thread(target=self._main, name=f"sweep-{name}", daemon=True)

  def _hook(self, **kwargs: Any) -> loop_lib.TrainResult | None:
    if os.path.abspath(kwargs["workdir"]) != self.workdir:
      return None
    if self.kwargs is not None:
      raise RuntimeError(f"{self.name}: train.train called twice for {self.workdir}")
    self.kwargs = kwargs
    self._reached.set()
    result = self._result.get()
    if isinstance(result, BaseException):
      raise result
    return result

  def _main(self) -> None:
    token = loop_lib.TRAIN_HOOK.set(self._hook)
    try:
      self.value = self.fn()
    except BaseException as err:  # pylint: disable=broad-except
      self.error = err
    finally:
      loop_lib.TRAIN_HOOK.reset(token)
      self._reached.set()

  def start(self) -> None:
    """Runs ``fn`` up to its ``train.train`` call (or its end); re-raises its error."""
    self._thread.start()
    self._reached.wait()
    if self.kwargs is None:
      self._thread.join()
      if self.error is not None:
        raise self.error

  @property
  def waiting(self) -> bool:
    return self.kwargs is not None and self._thread.is_alive()

  def resume(self, result: loop_lib.TrainResult | BaseException) -> Any:
    """Hands ``result`` to the paused ``train.train`` (an exception is raised there); waits for
    ``fn`` to finish and returns its value (re-raising its error)."""
    self._result.put(result)
    self._thread.join()
    if self.error is not None and self.error is not result:
      raise self.error
    return self.value


def capture_runs(calls: Sequence[tuple[str, str, Callable[[], Any]]]) -> list[CapturedRun]:
  """Starts ``(name, workdir, fn)`` one after the other, each up to its ``train.train`` call.

  Set-up runs one run at a time (no two threads compete for the CPU, logs stay in order). If one
  fails, the runs already paused are released with :class:`SweepAborted` and the error raised.
  """
  captured: list[CapturedRun] = []
  try:
    for name, workdir, fn in calls:
      captured.append(CapturedRun(name, workdir, fn))
      captured[-1].start()
  except BaseException:
    release(captured)
    raise
  return captured


def release(captured: Sequence[CapturedRun], error: BaseException | None = None) -> None:
  """Ends every still-paused run with ``error`` (default :class:`SweepAborted`), ignoring what
  that raises in its thread."""
  for c in captured:
    if c.waiting:
      try:
        c.resume(error if error is not None else SweepAborted("the vectorised sweep failed"))
      except BaseException:  # pylint: disable=broad-except
        pass


def run_from_capture(c: CapturedRun, *, step_for: Callable[[Mapping[str, Any]], Callable],
                     hparams: Mapping[str, float], group: str, data_key: str) -> Run:
  """The :class:`Run` of a captured ``train.train`` call (jitted ``step_fn`` only).

  ``finish`` resumes the paused thread with the run's result; a frozen run is resumed by the
  caller with the error its sequential run would have raised (:func:`release`).
  """
  kw = c.kwargs
  refuse = {
      "iteration": "its step is a host loop (PPO / GRPO rollout: sampling, reward scoring, text "
                   "decoding), not one jitted step, so vmap does not apply",
      "initial_eval": "a step-0 evaluation is not supported",
      "tokens_metric": "a throughput metric from the step is not supported"}
  for key, why in refuse.items():
    if kw.get(key):
      raise ValueError(f"run {c.name}: train.train({key}=...) cannot be vectorised: {why}; "
                       "sweep it without --vectorize")
  return Run(name=c.name, workdir=kw["workdir"], state=kw["state"], step_for=step_for,
             hparams=dict(hparams), group=group, data=kw["data"], data_key=data_key,
             loop=kw["config"], mesh=kw["mesh"], fingerprint=kw["fingerprint"],
             run_config=kw["run_config"] or {}, eval_fn=kw["eval_fn"], finish=c.resume,
             token_count=kw["token_count"], should_stop=kw["should_stop"])
