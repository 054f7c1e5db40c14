r"""Tokens/s of the ``small`` SFT and DPO steps on 1, 2, 4, 8 simulated devices, in one process and
in two, with the per-step time in host->device transfer, device->host reads and collectives.

Each measured step runs its parts one after another, each waited for, so they add up:

    h2d        ``parallel.shard_batch`` of the host batch (what the loop does every step)
    reference  DPO only: the on-the-fly reference forward (``reference.logps_fn``, jitted)
    step       the trainer's step (``train.make_train_step`` + ``train.loop.jit_train_step``: state
               shardings in and out, donated) with SFT's ``common.nll_loss_fn`` / DPO's
               ``dpo.make_loss_fn``
    d2h        ``parallel.to_host`` of the step's metrics

``collectives`` is read from a ``jax.profiler`` trace of further steps: the summed duration of
every all-reduce / all-gather / reduce-scatter / collective-permute / all-to-all op XLA ran, per
local device and step (on CPU that includes the rendezvous wait of the devices sharing the cores).

The global batch is fixed (SFT 16 x 80 tokens, DPO 32 pairs x 80, the synthetic configs' shapes),
so more devices means less work per device. On one CPU all simulated devices share the same cores:
this measures what partitioning costs (collectives, transfers, smaller matmuls), not a speed-up;
on a pod the compute shrinks with the devices and these overheads are what remains.

  python experiments/bench_scaling.py --quick               # ~5-10 min on 2 idle cores
  python experiments/bench_scaling.py --out=workdirs/bench_scaling.json --mesh=fsdp
  python experiments/bench_scaling.py --worker --devices=1,2,4,8   # one layout, this process

Two processes go through ``launch/multiprocess_local.sh`` (loopback coordinator; each process
holds half of the devices and feeds half of the batch).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_WORKER = flags.DEFINE_bool("worker", False, "Measure in this process (the driver runs workers).")
_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts (global).")
_METHODS = flags.DEFINE_list("methods", ["sft", "dpo"], "sft | dpo")
_MESH = flags.DEFINE_enum("mesh", "fsdp", ["fsdp", "data"], "Axis the devices go on.")
_LAYOUTS = flags.DEFINE_list("layouts", ["1proc", "2proc"], "1proc | 2proc")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per point (after 3 warm-up steps).")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 5, "Profiled steps per point.")
_QUICK = flags.DEFINE_bool("quick", False, "8 timed and 3 profiled steps.")
_OUT = flags.DEFINE_string("out", "", "JSON with every number (driver), or this worker's rows.")
_SEQ = 80
_BATCH = {"sft": 16, "dpo": 32}  # sequences / pairs (synthetic configs' data.batch_size)
COLLECTIVE_RE = re.compile(r"^(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)"
                           r"(-start|-done)?(\.\d+)?$")


def _host_batch(method: str, rng, vocab: int, rows_per_process: int):
  import numpy as np  # pylint: disable=import-outside-toplevel
  tokens = rng.integers(3, vocab, size=(rows_per_process, _SEQ), dtype=np.int32)
  mask = np.ones_like(tokens)
  loss_mask = np.zeros_like(tokens)
  loss_mask[:, 32:] = 1  # prompt 32, response 48: the synthetic limits
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def measure(method: str, mesh, steps: int, profile_steps: int) -> dict:
  """One (method, mesh) point: median seconds of each part of a step, collectives, tokens/s."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from rlhf_jax import models, parallel, train  # pylint: disable=import-outside-toplevel
  from rlhf_jax.algorithms import common, reference  # pylint: disable=import-outside-toplevel
  from rlhf_jax.algorithms.offline import dpo  # pylint: disable=import-outside-toplevel

  cfg = models.get_model_config("small", vocab_size=260)
  model = models.Transformer(cfg)
  dummy = jnp.ones((1, 8), jnp.int32)
  params = parallel.create_sharded(
      functools.partial(model.init, jax.random.PRNGKey(0), dummy, dummy), mesh)["params"]
  optimizer, schedule = train.make_optimizer(train.OptimConfig(), 1000)
  rows = _BATCH[method] * (2 if method == "dpo" else 1)
  loss_fn = (common.nll_loss_fn(model) if method == "sft" else dpo.make_loss_fn(
      model, dpo.DPOLossConfig()))
  ref_fn = None
  if method == "dpo":
    ref_params = jax.tree.map(jnp.copy, params)  # the policy's buffers are donated
    rows_sh = parallel.data_sharding(mesh)
    ref_fn = jax.jit(
        reference.logps_fn(model),
        in_shardings=(jax.tree.map(lambda x: x.sharding,
                                   ref_params), rows_sh, rows_sh, rows_sh), out_shardings=rows_sh)
  state = train.create_train_state(params, optimizer, jax.random.PRNGKey(1), mesh)
  step_fn = train.loop.jit_train_step(train.make_train_step(loss_fn, optimizer, schedule), state,
                                      mesh)
  rng = np.random.default_rng(parallel.process_index())
  host = [
      _host_batch(method, rng, cfg.vocab_size, rows // parallel.process_count()) for _ in range(4)]
  tokens = rows * _SEQ

  def one_step(state, i):
    times = {}
    t0 = time.perf_counter()
    batch = jax.block_until_ready(parallel.shard_batch(host[i % len(host)], mesh))
    times["h2d"] = time.perf_counter() - t0
    with parallel.use_mesh(mesh):
      if ref_fn is not None:
        t0 = time.perf_counter()
        batch[reference.REF_KEY] = jax.block_until_ready(
            ref_fn(ref_params, batch["tokens"], batch["mask"], batch["loss_mask"]))
        times["reference"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      state, metrics = step_fn(state, batch)
      jax.block_until_ready((state, metrics))
      times["step"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    parallel.to_host(metrics)
    times["d2h"] = time.perf_counter() - t0
    return state, times

  t0 = time.perf_counter()
  state, _ = one_step(state, 0)
  compile_s = time.perf_counter() - t0
  for i in range(2):
    state, _ = one_step(state, i + 1)
  parallel.sync("bench_scaling_timed")
  samples = []
  for i in range(steps):
    state, times = one_step(state, i)
    samples.append(times)
  parts = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
  total = statistics.median(sum(s.values()) for s in samples)

  trace_dir = tempfile.mkdtemp(prefix="bench_scaling_")
  jax.profiler.start_trace(trace_dir)
  for i in range(profile_steps):
    state, _ = one_step(state, i)
  jax.profiler.stop_trace()
  collective_s = _collective_secs(trace_dir) / max(len(mesh.local_devices), 1) / profile_steps
  batch = parallel.shard_batch(host[0], mesh)
  with parallel.use_mesh(mesh):
    if ref_fn is not None:
      batch[reference.REF_KEY] = ref_fn(ref_params, batch["tokens"], batch["mask"],
                                        batch["loss_mask"])
    compiled = step_fn.lower(state, batch).compile()  # the step's HLO: count its collectives
  hlo = compiled.as_text()
  return {
      "method": method, "devices": int(mesh.size), "processes": parallel.process_count(),
      "mesh_shape": {k: int(v) for k, v in mesh.shape.items()}, "tokens_per_step": tokens,
      "step_secs": total, "tokens_per_s": tokens / total, "parts_secs": parts,
      "collectives_secs": collective_s, "first_step_secs": compile_s, "collective_ops_in_step": {
          op: len(re.findall(rf"\b{op}(-start)?\(", hlo))
          for op in ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                     "all-to-all")}}


def _collective_secs(trace_dir: str) -> float:
  """Summed duration of the collective ops in a trace (all threads of this process)."""
  from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  total_ns = 0
  for path in paths:
    for plane in ProfileData.from_file(path).planes:
      for line in plane.lines:
        total_ns += sum(ev.duration_ns for ev in line.events if COLLECTIVE_RE.match(ev.name))
  return total_ns / 1e9


def worker() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  from rlhf_jax import parallel  # pylint: disable=import-outside-toplevel
  parallel.initialize_distributed()
  steps, profile = (8, 3) if _QUICK.value else (_STEPS.value, _PROFILE_STEPS.value)
  results = []
  counts = [int(x) for x in _DEVICES.value]
  if jax.process_count() > 1:
    counts = [jax.device_count()]
  for n in counts:
    devices = jax.devices()[:n]
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, _MESH.value: n}
    mesh = parallel.make_mesh(parallel.MeshConfig(**sizes), devices=devices)
    for method in _METHODS.value:
      row = measure(method, mesh, steps, profile)
      print(json.dumps(row), flush=True)
      results.append(row)
  if _OUT.value and parallel.is_coordinator():
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1)


def _run_layout(layout: str, counts: list[int], out_dir: str) -> list[dict]:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  common = [f"--methods={','.join(_METHODS.value)}", f"--mesh={_MESH.value}", "--worker"]
  if _QUICK.value:
    common.append("--quick")
  else:
    common += [f"--steps={_STEPS.value}", f"--profile_steps={_PROFILE_STEPS.value}"]
  rows = []
  if layout == "1proc":
    out = os.path.join(out_dir, "1proc.json")
    env = {
        **os.environ, "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={max(counts)}"}
    subprocess.run([
        sys.executable,
        os.path.abspath(__file__), *common, f"--devices={','.join(map(str, counts))}",
        f"--out={out}"], check=True, env=env, cwd=repo)
    return json.load(open(out))
  for n in (c for c in counts if c >= 2 and c % 2 == 0):
    out = os.path.join(out_dir, f"2proc_{n}.json")
    env = {
        **os.environ, "NUM_PROCESSES": "2", "DEVICES_PER_PROCESS": str(n // 2),
        "PYTHON": sys.executable, "LOG_DIR": os.path.join(out_dir, f"logs_{n}")}
    subprocess.run([
        os.path.join(repo, "launch", "multiprocess_local.sh"),
        os.path.abspath(__file__), *common, f"--out={out}"], check=True, env=env, cwd=repo)
    rows += json.load(open(out))
  return rows


def table(rows: list[dict]) -> str:
  head = ("| method | processes x devices | mesh | tokens/s | step ms | h2d ms | ref ms | "
          "train step ms | d2h ms | collectives ms/device |")
  lines = [head, "|" + " --- |" * (head.count("|") - 1)]
  for r in rows:
    p = r["parts_secs"]
    mesh = "×".join(str(r["mesh_shape"][a]) for a in ("data", "fsdp", "tensor"))
    per_proc = r["devices"] // r["processes"]
    lines.append(
        f"| {r['method']} | {r['processes']} x {per_proc} | {mesh} | {r['tokens_per_s']:.0f} | "
        f"{1e3 * r['step_secs']:.1f} | {1e3 * p['h2d']:.2f} | "
        f"{1e3 * p.get('reference', 0.0):.1f} | {1e3 * p['step']:.1f} | {1e3 * p['d2h']:.2f} | "
        f"{1e3 * r['collectives_secs']:.1f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if _WORKER.value:
    worker()
    return
  counts = [int(x) for x in _DEVICES.value]
  out_dir = tempfile.mkdtemp(prefix="bench_scaling_")
  started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  load = os.getloadavg()
  rows = []
  for layout in _LAYOUTS.value:
    rows += _run_layout(layout, counts, out_dir)
  print(table(rows))
  print(f"started {started}, load average at start {load[0]:.2f}, at end "
        f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(
          {
              "started": started, "load_at_start": load, "rows": rows, "quick": _QUICK.value,
              "mesh": _MESH.value}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
