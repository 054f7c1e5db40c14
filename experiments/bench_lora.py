r"""LoRA vs full fine-tuning: memory of params + optimizer state, and DPO step time.

  python experiments/bench_lora.py            # llama_1b memory; DPO steps on small and gpt2
  python experiments/bench_lora.py --quick    # fewer / shorter timed steps (a smoke run)

1. Memory (``jax.eval_shape``, nothing allocated) for the ``llama_1b`` preset: bytes of the trained
   params, the frozen reference and the AdamW state (``train.make_optimizer``), full fine-tune vs
   LoRA rank 16 on the default targets (attention q/k/v/o, MLP up/gate/down). In full DPO the
   policy and its reference are two copies of the model; with LoRA they are one base (the same
   arrays) plus the adapters.
2. The same count on real arrays: a ``small`` LoRA DPO set-up from ``common.load_models`` after
   one jitted train step, unique buffers of (train state params, reference params) vs the base.
3. DPO train-step time (sigmoid loss, reference log-probs precomputed in the batch, AdamW, float32)
   with LoRA rank 16 (``lora.mode`` auto, and factorised / merged forced) vs full on the ``small``
   and ``gpt2`` presets, timed side by side (alternating steps of all after compilation).
4. ``--kernels``: one adapted matmul (forward + backward) per mode on the presets' kernel shapes,
   the machine's f32 matmul rate and copy bandwidth, and what ``models.lora.choose_mode`` picks:
   the evidence behind the cost model's ``FLOPS_PER_BYTE``. Results: BUILD_NOTES.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models, parallel, train
from rlhf_jax.algorithms import common, sections
from rlhf_jax.algorithms.offline import dpo
from rlhf_jax.models import lora
from rlhf_jax.train import config_dicts


def _bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def memory(preset: str, rank: int) -> dict:
  cfg = models.get_model_config(preset)
  model = models.Transformer(cfg)
  lora_cfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank)
  lm = lora.LoraModel(model, lora_cfg)
  base = models.abstract_params(model)
  adapters = nn.meta.unbox(lora.abstract_adapters(lm, lora_cfg))
  optimizer, _ = train.make_optimizer(train.OptimConfig(), 1000)
  full_opt = jax.eval_shape(optimizer.init, base)
  lora_opt = jax.eval_shape(optimizer.init, lora.LoraParams(base=base, lora=adapters))
  gib = 2.0**30
  full = {"policy": _bytes(base), "reference": _bytes(base), "optimizer": _bytes(full_opt)}
  low = {
      "base (policy + reference)": _bytes(base), "adapters": _bytes(adapters),
      "optimizer": _bytes(lora_opt)}
  return {
      "preset": preset, "rank": rank, "params": lora.count_params(base),
      "adapter_params": lora.count_params(adapters),
      "full_GiB": {k: v / gib for k, v in full.items()}, "full_total_GiB": sum(full.values()) / gib,
      "lora_GiB": {k: v / gib for k, v in low.items()}, "lora_total_GiB": sum(low.values()) / gib,
      "policy_plus_reference_over_base":
          (low["base (policy + reference)"] + low["adapters"]) / low["base (policy + reference)"]}


def _dpo_batch(cfg, pairs: int, seq: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  rows = 2 * pairs
  tokens = rng.integers(3, min(cfg.vocab_size, 50000), (rows, seq)).astype(np.int32)
  mask = np.ones((rows, seq), np.int32)
  loss_mask = mask.copy()
  loss_mask[:, :seq // 2] = 0
  return {
      "tokens": tokens, "mask": mask, "loss_mask": loss_mask,
      "ref_logps": rng.normal(-50.0, 5.0,
                              rows).astype(np.float32), "valid": np.ones(pairs, np.float32)}


def _dpo_step(preset: str, mode: str, rank: int, batch: dict, mesh):
  """(jitted step, state) of full DPO (``mode="full"``) or LoRA DPO with ``lora.mode=mode``."""
  cfg = models.get_model_config(preset)
  model = models.Transformer(cfg)
  dummy = jnp.ones((1, 8), jnp.int32)
  base = parallel.create_sharded(functools.partial(model.init, jax.random.PRNGKey(0), dummy, dummy),
                                 mesh)["params"]
  if mode != "full":
    lora_cfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank, mode=mode)
    model = lora.LoraModel(model, lora_cfg)
    params = lora.make_params(model, base, lora_cfg, mesh)
  else:
    params = base
  optimizer, schedule = train.make_optimizer(train.OptimConfig(lr=1e-5), 1000)
  state = train.create_train_state(params, optimizer, jax.random.PRNGKey(1), mesh)
  loss_fn = dpo.make_loss_fn(model, dpo.DPOLossConfig())
  step = train.jit_train_step(train.make_train_step(loss_fn, optimizer, schedule), state, mesh)
  return step, state


def step_times(preset: str, rank: int, pairs: int, seq: int, steps: int, warmup: int) -> dict:
  mesh = parallel.mesh_from_config({"data": 1, "fsdp": 1, "tensor": 1})
  batch = parallel.shard_batch(_dpo_batch(models.get_model_config(preset), pairs, seq), mesh,
                               parallel.DEFAULT_RULES)
  runs = {mode: _dpo_step(preset, mode, rank, batch, mesh) for mode in ("full",) + lora.MODES}
  states = {k: v[1] for k, v in runs.items()}
  times = {k: [] for k in runs}
  with parallel.use_mesh(mesh, parallel.DEFAULT_RULES):
    for i in range(warmup + steps):
      for name, (step, _) in runs.items():  # alternate: both see the same machine load
        t0 = time.perf_counter()
        states[name], metrics = step(states[name], batch)
        jax.block_until_ready(metrics["loss"])
        if i >= warmup:
          times[name].append(time.perf_counter() - t0)
  med = {k: float(np.median(v)) for k, v in times.items()}
  return {
      "preset": preset, "rank": rank, "pairs": pairs, "seq": seq, "timed_steps": steps,
      **{f"{k}_s_per_step": v for k, v in med.items()},
      **{f"{k}_over_full": med[k] / med["full"] for k in lora.MODES}}


def _time(fn, *args, reps: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  out = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t0)
  return float(np.median(out))


def kernels(rank: int) -> dict:
  """Forward + backward of one adapted matmul per mode, and this machine's balance."""
  key = jax.random.PRNGKey(0)
  big = jax.random.normal(key, (2048, 2048), jnp.float32)
  flops_s = 2 * 2048**3 / _time(jax.jit(lambda a: a @ a), big)
  stream = jax.random.normal(key, (64 * 2**20,), jnp.float32)  # 256 MiB
  bytes_s = 2 * stream.nbytes / _time(jax.jit(lambda x: x * 1.0001), stream)
  rows = []
  shapes = {"small": (2048, 192, (192, 512)), "gpt2": (512, 768, (768, 3072))}
  for preset, (n, d, outs) in shapes.items():
    for o in outs:
      x = jax.random.normal(key, (n, d), jnp.float32)
      w = jax.random.normal(key, (d, o), jnp.float32) / np.sqrt(d)
      a = jax.random.normal(key, (d, rank), jnp.float32) / np.sqrt(d)
      b = jax.random.normal(key, (rank, o), jnp.float32) * 0.01
      row = {
          "preset": preset, "tokens": n, "in": d, "out": o,
          "auto_picks": lora.choose_mode(n, d, o, rank, 4)}
      for mode in ("factorised", "merged"):

        def loss(x, a, b, mode=mode):
          kernel = lora.Adapted(jax.lax.stop_gradient(w), a, b, mode=mode)
          return jnp.sum(kernel.lora_matmul("nd,do->no", x)**2)

        row[f"{mode}_ms"] = 1e3 * _time(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), x, a, b)
        row[f"{mode}_model_cost"] = lora.mode_cost(mode, n, d, o, rank, 4)
      row["measured_faster"] = min(("factorised", "merged"), key=lambda m: row[f"{m}_ms"])
      rows.append(row)
  return {
      "matmul_GFLOP_s": flops_s / 1e9, "copy_GB_s": bytes_s / 1e9,
      "balance_flops_per_byte": flops_s / bytes_s, "model_FLOPS_PER_BYTE": lora.FLOPS_PER_BYTE,
      "kernels": rows}


def shared_base_bytes(rank: int) -> dict:
  """Unique bytes of a real LoRA DPO set-up (policy state + reference) vs the base alone."""
  mesh = parallel.mesh_from_config({"data": 1, "fsdp": 1, "tensor": 1})
  loaded = common.load_models(sections.Sources(), mesh,
                              model_section=config_dicts.model_section("small"),
                              lora=sections.Lora(enabled=True, rank=rank, alpha=2.0 * rank))
  optimizer, schedule = train.make_optimizer(train.OptimConfig(lr=1e-5), 10)
  state = train.create_train_state(loaded.policy_params, optimizer, jax.random.PRNGKey(1), mesh)
  step = train.jit_train_step(
      train.make_train_step(dpo.make_loss_fn(loaded.model, dpo.DPOLossConfig()), optimizer,
                            schedule), state, mesh)
  batch = parallel.shard_batch(_dpo_batch(loaded.model_config, 2, 32), mesh, parallel.DEFAULT_RULES)
  state, _ = step(state, batch)
  seen, total = set(), 0
  for leaf in jax.tree.leaves((state.params, loaded.ref_params)):
    ptr = leaf.addressable_data(0).unsafe_buffer_pointer()
    if ptr not in seen:
      seen.add(ptr)
      total += leaf.size * leaf.dtype.itemsize
  base = _bytes(loaded.ref_params)
  return {
      "preset": "small", "rank": rank, "policy_plus_reference_bytes": total, "base_bytes": base,
      "adapter_bytes": _bytes(state.params.lora),
      "ratio_to_base_plus_adapters": total / (base + _bytes(state.params.lora))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--presets", default="small,gpt2")
  parser.add_argument("--kernels", action="store_true", help="only the per-kernel mode timings")
  args = parser.parse_args()
  if args.kernels:
    print(json.dumps(kernels(args.rank), indent=2), flush=True)
    return
  out = {"memory": memory("llama_1b", args.rank), "shared_base": shared_base_bytes(args.rank)}
  print(json.dumps(out, indent=2), flush=True)
  shapes = {"small": (8, 128), "gpt2": (2, 128)}
  steps, warmup = (2, 1) if args.quick else (6, 2)
  for preset in args.presets.split(","):
    pairs, seq = shapes.get(preset, (2, 128))
    if args.quick:
      pairs, seq = 1, 32
    print(json.dumps(step_times(preset, args.rank, pairs, seq, steps, warmup)), flush=True)


if __name__ == "__main__":
  main()
