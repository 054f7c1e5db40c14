r"""Loading a Hugging Face checkpoint lazily and born sharded: wall time, GB/s and peak RSS growth.

A `llama_1b`-shaped (Llama-3.2-1B: 16 layers, d 2048, 32 / 8 heads, vocab 128256, tied) bf16
checkpoint of random weights is written once (`--dir`, default /tmp/rlhf_bench_hf/llama_1b,
~2.5 GB, as 1 GB shards with an index), read once so that it sits in the page cache, and then loaded
by `hf.load_pretrained(dir, mesh=fsdp=8 mesh over 8 simulated CPU devices, param_dtype=bfloat16)`
in a fresh child process, which reports:

* wall time of `load_pretrained` (headers, plan, every parameter's `make_array_from_callback`;
  blocked until every buffer is ready) and checkpoint GB / that time;
* peak RSS growth: the child's VmHWM after the load minus its VmRSS just before it (jax, the
  devices and the abstract model already initialised). Target <= 1.2x the checkpoint's bytes:
  each device holds its 1/8 of every parameter and nothing else stays (no full host copy);
* warm loads (the first load pays the jit compiles of the on-device transposes), best of `--reps`,
  alternating the default (the host copies of the next parameters overlap the devices' transposes,
  `checkpoint.OVERLAP`) and the two stages one after the other;
* the roofline, measured in the same child on the same files right after the loads, each over all
  of the checkpoint's bytes (or all of its transposed kinds' bytes), best of `--reps`:
  - `read_into_warm`: `readinto` of every file into one already-touched buffer (the kernel's
    page cache -> user copy, one core);
  - `np_fromfile`: `np.fromfile` of every file (a plain numpy read: that copy plus first-touch page
    faults of fresh memory);
  - `memcpy_warm` / `memcpy_fresh`: one-core `np.copyto` of 1 GiB into a touched / a freshly
    allocated destination (RAM bandwidth; the second adds the first-touch faults a fresh buffer
    pays);
  - `mmap_copy`: what the loader's host side does per tensor, nothing else: map the tensor's bytes,
    copy them into a fresh 64-byte aligned buffer (`weights.map_tensor` + `weights.owned_copy`);
  - `device_put`: `jax.device_put` of those aligned buffers (adopted: should cost ~nothing);
  - `device_transpose`: the on-device `weights.to_ours` of every transposed parameter, already on
    the devices in the stored layout and sharded as the load shards it (XLA, 8 CPU devices).
  The unavoidable passes of a load are one copy out of the page cache into memory the devices own
  (>= mmap_copy's cost; np_fromfile is the same pass) and, for [out, in] layouts, one transpose
  (device_transpose); `bound_gb_per_s` is the checkpoint's bytes over their sum (the two overlap
  only where the cores are free).

Usage::

    python experiments/bench_hf_load.py            # llama_1b shapes (~2.5 GB on disk)
    python experiments/bench_hf_load.py --quick    # 4 layers, vocab 32000 (~0.4 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _mem_kb(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(field)


def _config(quick: bool):
  from rlhf_jax.models import get_model_config
  overrides = dict(dtype="bfloat16", param_dtype="bfloat16")
  if quick:
    overrides.update(n_layers=4, vocab_size=32000)
  return get_model_config("llama_1b", **overrides)


def write_checkpoint(path: str, quick: bool) -> int:
  """Random bf16 weights in HF layout, written tensor by tensor (never the whole model in RAM)."""
  import ml_dtypes
  import numpy as np
  from safetensors.numpy import save_file

  from rlhf_jax.models import Transformer, abstract_params
  from rlhf_jax.models.hf import checkpoint, families, weights

  config = _config(quick)
  arch = families.infer_architecture(config)
  plan = weights.plan(config, arch)
  # pylint: disable-next=protected-access
  leaves = checkpoint._leaf_paths(abstract_params(Transformer(config)))
  rng = np.random.default_rng(0)
  os.makedirs(path, exist_ok=True)
  shard_limit, shard, shard_bytes, shards = 10**9, {}, 0, []

  def flush():
    nonlocal shard, shard_bytes
    if shard:
      name = f"shard-{len(shards)}.safetensors"
      save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
      shards.append((name, list(shard)))
      shard, shard_bytes = {}, 0

  total = 0
  for leaf_path, leaf in leaves:
    src = plan[leaf_path]
    shape = weights.hf_shape(src, tuple(leaf.shape))
    x = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
    if shard_bytes + x.nbytes > shard_limit:
      flush()
    shard[src.name] = x
    shard_bytes += x.nbytes
    total += x.nbytes
  flush()
  n = len(shards)
  weight_map = {}
  for i, (name, names) in enumerate(shards):
    final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.replace(os.path.join(path, name), os.path.join(path, final))
    weight_map.update({t: final for t in names})
  with open(os.path.join(path, checkpoint.INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  hf_config = families.config_to_hf(config, arch) | {"dtype": "bfloat16"}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  return total


def checkpoint_bytes(path: str) -> int:
  return sum(
      os.path.getsize(os.path.join(path, f))
      for f in os.listdir(path)
      if f.endswith(".safetensors"))


def warm_page_cache(path: str) -> None:
  for f in sorted(os.listdir(path)):
    with open(os.path.join(path, f), "rb") as fh:
      while fh.read(1 << 24):
        pass


def _best(fn, reps: int) -> float:
  out = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return min(out)


def roofline(path: str, mesh, reps: int) -> dict:
  """Each bound of the load measured over the checkpoint's own bytes (see the module docstring)."""
  # pylint: disable=protected-access  (the loader's own pieces, timed one by one)
  import flax.linen as nn
  import jax
  import numpy as np

  from rlhf_jax import parallel
  from rlhf_jax.models import Transformer, abstract_variables
  from rlhf_jax.models.hf import checkpoint, families, weights

  files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
  total = sum(os.path.getsize(f) for f in files)
  buf = np.empty(max(os.path.getsize(f) for f in files), np.uint8)
  buf[:] = 1  # touched: only the page cache -> user copy is timed

  def read_into():
    for f in files:
      with open(f, "rb", buffering=0) as fh:
        fh.readinto(memoryview(buf)[:os.path.getsize(f)])

  def fromfile():
    for f in files:
      np.fromfile(f, np.uint8)

  src = np.ones(2**30, np.uint8)
  dst = np.ones(2**30, np.uint8)
  out = {"files": len(files), "bytes_gb": total / 1e9}
  t = {
      "read_into_warm": (total, _best(read_into,
                                      reps)), "np_fromfile": (total, _best(fromfile, reps)),
      "memcpy_warm": (src.nbytes, _best(lambda: np.copyto(dst, src), reps)), "memcpy_fresh":
          (src.nbytes,
           _best(lambda: np.copyto(weights.aligned_empty(src.shape, np.uint8), src), reps))}
  del src, dst, buf

  index = checkpoint._tensor_table(path)
  fds = {f: os.open(f, os.O_RDONLY) for f in files}

  def views():
    for file, shape, st, start, stop in index.values():
      yield weights.map_tensor(fds[file], start, stop, checkpoint._ST_NUMPY[st], tuple(shape))

  t["mmap_copy"] = (total, _best(lambda: [weights.owned_copy(v, v.dtype) for v in views()], reps))
  blocks = [weights.owned_copy(v, v.dtype) for v in views()]
  dev = jax.devices()[0]
  t["device_put"] = (total,
                     _best(lambda: jax.block_until_ready([jax.device_put(b, dev) for b in blocks]),
                           reps))
  del blocks
  for fd in fds.values():
    os.close(fd)

  # The transposed kinds, on the devices in the stored layout, sharded as load_pretrained does.
  config = families.config_from_hf(checkpoint.read_config(path), dtype="bfloat16",
                                   param_dtype="bfloat16")
  arch = families.architecture_of(checkpoint.read_config(path))
  abstract = abstract_variables(Transformer(config))
  plan = weights.plan(config, arch)
  shardings = dict(
      checkpoint._leaf_paths(
          parallel.logical_shardings(abstract, mesh, parallel.DEFAULT_RULES)["params"]))
  jobs, moved = [], 0
  compiler = checkpoint._LayoutCompiler(np.dtype(config.weight_dtype))
  for leaf_path, leaf in checkpoint._leaf_paths(nn.meta.unbox(abstract)["params"]):
    src_ = plan[leaf_path]
    if src_.kind not in weights.DEVICE_KINDS:
      continue
    sharding = shardings[leaf_path]
    layout = checkpoint._transpose_plan(leaf, src_, weights.hf_shape(src_, tuple(leaf.shape)),
                                        sharding, None)
    if layout is None:
      continue
    x = jax.device_put(np.zeros(layout.hf_shape, leaf.dtype), layout.hf_sharding)
    fn = compiler.get(layout)  # compiled before timing
    jobs.append((fn, x))
    moved += x.nbytes
  compiler.close()
  t["device_transpose"] = (moved,
                           _best(lambda: jax.block_until_ready([fn(x) for fn, x in jobs]), reps))
  for name, (nbytes, secs) in t.items():
    out[name] = {"gb": nbytes / 1e9, "s": secs, "gb_per_s": nbytes / 1e9 / secs}
  host_s = t["mmap_copy"][1] + t["device_put"][1]
  dev_s = t["device_transpose"][1]
  out["transposed_fraction"] = moved / total
  out["bound_s"] = host_s + dev_s
  out["bound_gb_per_s"] = total / 1e9 / (host_s + dev_s)
  out["bound_overlapped_gb_per_s"] = total / 1e9 / max(host_s, dev_s)
  # A fresh process's first load writes every byte into memory never touched before (the host
  # copy, and the transposes' outputs): at memcpy_fresh's rate, the kernel's first-touch page
  # faults alone bound it, whatever the overlap.
  fresh_s = (total + moved) / 1e9 / out["memcpy_fresh"]["gb_per_s"]
  out["first_load_fault_bound_gb_per_s"] = total / 1e9 / fresh_s
  return out


def child(path: str, reps: int = 3, precompile: bool = True) -> dict:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  from rlhf_jax import parallel
  from rlhf_jax.models import Transformer, abstract_variables
  from rlhf_jax.models.hf import checkpoint, families

  mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=8, tensor=1))
  config = families.config_from_hf(checkpoint.read_config(path), dtype="bfloat16",
                                   param_dtype="bfloat16")
  abstract_variables(Transformer(config))  # jax + tracing warm; cached for the load
  jax.block_until_ready(jax.device_put(0.0))
  checkpoint.PRECOMPILE = precompile  # the first load only: warm loads find them compiled
  rss0 = _mem_kb("VmRSS")
  t0 = time.perf_counter()
  config, params = checkpoint.load_pretrained(path, mesh=mesh, param_dtype="bfloat16")
  jax.block_until_ready(params)
  wall = time.perf_counter() - t0
  hwm = _mem_kb("VmHWM")
  leaves = jax.tree.leaves(params)
  device_bytes = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
  per_device = {}
  for x in leaves:
    for s in x.addressable_shards:
      per_device[str(s.device)] = per_device.get(str(s.device), 0) + s.data.nbytes
  del leaves, params

  def timed_load():
    t0 = time.perf_counter()
    jax.block_until_ready(checkpoint.load_pretrained(path, mesh=mesh, param_dtype="bfloat16")[1])
    return time.perf_counter() - t0

  # Warm (transposes compiled), alternating: host copies overlapping the devices' transposes (the
  # default) and the two stages one after the other.
  warm = {"overlapped": [], "serial": []}
  for _ in range(reps):
    for name in warm:
      checkpoint.OVERLAP = name == "overlapped"
      warm[name].append(timed_load())
  checkpoint.OVERLAP = True
  return {
      "wall_s": wall, "warm_load_s": {k: min(v) for k, v in warm.items()}, "warm_load_all_s": warm,
      "rss_before_gb": rss0 / 1e6, "peak_rss_growth_gb":
          (hwm - rss0) / 1e6, "device_bytes_gb": device_bytes / 1e9,
      "max_device_gb": max(per_device.values()) / 1e9, "num_params": config.num_params(),
      "devices": len(per_device), "roofline": roofline(path, mesh, reps)}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--dir", default=None)
  parser.add_argument("--rewrite", action="store_true", help="write the checkpoint again")
  parser.add_argument("--reps", type=int, default=3, help="timed repetitions (best of)")
  parser.add_argument("--_child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--_lazy_compile", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._child:  # pylint: disable=protected-access
    print(json.dumps(child(args._child, args.reps, not args._lazy_compile)))  # pylint: disable=W0212
    return {}
  path = args.dir or f"/tmp/rlhf_bench_hf/{'llama_quick' if args.quick else 'llama_1b'}"
  if args.rewrite or not os.path.isfile(os.path.join(path, "config.json")):
    t0 = time.perf_counter()
    write_checkpoint(path, args.quick)
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s", flush=True)
  size = checkpoint_bytes(path)
  results = {"checkpoint_gb": size / 1e9, "load_average_before": os.getloadavg()}
  # Side by side: glibc's default malloc, and glibc asked to back its large (mmap'd) chunks with
  # transparent huge pages: XLA's CPU buffers come from malloc and otherwise fault in 4 KiB pages.
  # Also the default with each transpose compiled on first use (checkpoint.PRECOMPILE = False).
  envs = {
      "default": {}, "glibc_hugetlb": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
      "default_lazy_compile": {}}
  for name, extra in envs.items():
    warm_page_cache(path)
    out = subprocess.run(
        [sys.executable,
         os.path.abspath(__file__), f"--_child={path}", f"--reps={args.reps}"] +
        (["--_lazy_compile"] if name.endswith("lazy_compile") else []), capture_output=True,
        text=True, cwd=REPO, check=False, env={**os.environ, **extra})
    if out.returncode:
      raise SystemExit(f"load child ({name}) failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(gb_per_s=size / 1e9 / result["wall_s"],
                  warm_gb_per_s={k: size / 1e9 / v for k, v in result["warm_load_s"].items()},
                  rss_growth_over_checkpoint=result["peak_rss_growth_gb"] / (size / 1e9))
    results[name] = result
  results["load_average_after"] = os.getloadavg()
  print(json.dumps(results, indent=2))
  for name in envs:
    r, roof = results[name], results[name]["roofline"]
    rates = "  ".join(f"{k} {roof[k]['gb_per_s']:.2f}" for k in ("read_into_warm", "np_fromfile",
                                                                 "memcpy_warm", "memcpy_fresh",
                                                                 "mmap_copy", "device_transpose"))
    print(f"{name}: first load {r['wall_s']:.2f} s = {r['gb_per_s']:.2f} GB/s, warm "
          f"{r['warm_load_s']['overlapped']:.2f} s overlapped / {r['warm_load_s']['serial']:.2f} s "
          f"serial, RSS growth {r['rss_growth_over_checkpoint']:.2f}x; GB/s: {rates}; bound "
          f"{roof['bound_gb_per_s']:.2f} (overlapped {roof['bound_overlapped_gb_per_s']:.2f}; "
          f"first load, fresh-page faults {roof['first_load_fault_bound_gb_per_s']:.2f})")
  return results


if __name__ == "__main__":
  main()
