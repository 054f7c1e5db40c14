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
  each device holds its 1/8 of every parameter and nothing else stays (no full host copy).

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


def child(path: str) -> dict:
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
  return {
      "wall_s": wall, "rss_before_gb": rss0 / 1e6, "peak_rss_growth_gb": (hwm - rss0) / 1e6,
      "device_bytes_gb": device_bytes / 1e9, "max_device_gb": max(per_device.values()) / 1e9,
      "num_params": config.num_params(), "devices": len(per_device)}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--dir", default=None)
  parser.add_argument("--rewrite", action="store_true", help="write the checkpoint again")
  parser.add_argument("--_child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._child:  # pylint: disable=protected-access
    print(json.dumps(child(args._child)))  # pylint: disable=protected-access
    return {}
  path = args.dir or f"/tmp/rlhf_bench_hf/{'llama_quick' if args.quick else 'llama_1b'}"
  if args.rewrite or not os.path.isfile(os.path.join(path, "config.json")):
    t0 = time.perf_counter()
    write_checkpoint(path, args.quick)
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s", flush=True)
  size = checkpoint_bytes(path)
  warm_page_cache(path)
  out = subprocess.run(
      [sys.executable, os.path.abspath(__file__), f"--_child={path}"], capture_output=True,
      text=True, cwd=REPO, check=False)
  if out.returncode:
    raise SystemExit(f"load child failed ({out.returncode}):\n{out.stderr[-3000:]}")
  result = json.loads(out.stdout.strip().splitlines()[-1])
  result.update(checkpoint_gb=size / 1e9, gb_per_s=size / 1e9 / result["wall_s"],
                rss_growth_over_checkpoint=result["peak_rss_growth_gb"] / (size / 1e9))
  print(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
