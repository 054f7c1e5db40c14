r"""Per-device memory of SFT / DPO / PPO (KTO, the RM, LoRA SFT / DPO) on a mesh of simulated devices, before allocating anything.

For a model (a preset, a Hugging Face ``config.json``, or the built-in Llama-3.1-8B shape), a
(data, fsdp, tensor) mesh over N devices and a batch, compiles the trainers' own jitted steps on
abstract sharded inputs (``rlhf_jax.algorithms.plan``; nothing is allocated) and prints, per
device: params (policy, reference, value, reward model), optimiser state, gradients, activations
(the train phase's XLA temp minus the gradients, after the remat policy), the rollout KV cache,
the peak, and the 6·N·tokens FLOP estimate per step. The devices are simulated CPU devices
(``--xla_force_host_platform_device_count``, set here from ``--devices``), so an 8B Llama on 256
devices is planned on a laptop; resident bytes are exact, XLA's temp is the CPU compiler's
(see ``parallel.memory_plan``).

  python experiments/plan_memory.py --model=llama_1b --methods=sft --devices=8 --meshes=fsdp
  python experiments/plan_memory.py --model=llama3_8b --methods=sft,dpo,ppo --devices=8,64,256 \
      --meshes=fsdp,fsdp_tensor --out=workdirs/plan_8b.json          # the README table
  python experiments/plan_memory.py --model=/ckpt/Qwen2.5-7B/config.json --devices=64

``--meshes``: ``fsdp`` (fsdp = N), ``fsdp_tensor`` (tensor = ``--tensor``, fsdp = N / tensor),
or ``data`` (pure data parallelism). Batches are global: ``--batch`` sequences (SFT), pairs
(DPO) or prompts (PPO) per device (``--per_device``, default) or in total. Prints a markdown
table (GiB per device) and, with ``--out``, all numbers as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

_MODEL = flags.DEFINE_string(
    "model", "llama_1b", "A preset (tiny, small, gpt2, llama_1b), llama3_8b (Llama-3.1-8B's "
    "config.json, built in), or a path to a Hugging Face config.json / its folder.")
METHODS = ("sft", "dpo", "ppo", "kto", "reward_model", "sft_lora", "dpo_lora")
_METHODS = flags.DEFINE_list(
    "methods", ["sft", "dpo", "ppo"], " | ".join(METHODS) + " (*_lora: LoRA adapters of rank "
    "--lora_rank on the default targets over a frozen base, which is also DPO's reference)")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 16, "Rank of the *_lora methods' adapters.")
_DEVICES = flags.DEFINE_list("devices", ["8"], "Device counts to plan for.")
_MESHES = flags.DEFINE_list("meshes", ["fsdp"], "fsdp | fsdp_tensor | data")
_TENSOR = flags.DEFINE_integer("tensor", 8, "Tensor-parallel size of the fsdp_tensor meshes.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences (SFT) / pairs (DPO) / prompts (PPO).")
_PER_DEVICE = flags.DEFINE_bool(
    "per_device", True, "--batch is per batch shard (data x fsdp ways) rather than global.")
_SEQ = flags.DEFINE_integer("seq_len", 2048, "Sequence length of SFT / DPO rows.")
_PROMPT = flags.DEFINE_integer("prompt_len", 512, "PPO prompt length P.")
_RESPONSE = flags.DEFINE_integer("response_len", 512, "PPO response length R (new tokens).")
_MINIBATCHES = flags.DEFINE_integer("num_minibatches", 1, "PPO minibatches per epoch.")
_REMAT = flags.DEFINE_string("remat", "full", "model.remat_policy of every model.")
_SCAN = flags.DEFINE_bool(
    "scan_layers", True, "nn.scan the blocks (compile time independent of "
    "depth; what a large model runs with).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Activation dtype (params stay float32).")
_OUT = flags.DEFINE_string("out", "", "Write every plan as JSON here.")

# Llama-3.1-8B's config.json (the public values; the shapes are what matter here).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"
                     ], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}


def _set_device_count(argv) -> None:
  """XLA_FLAGS must name the device count before jax starts its CPU backend."""
  counts = [1]
  for arg in argv:
    if arg.startswith("--devices="):
      counts = [int(x) for x in arg.split("=", 1)[1].split(",") if x]
  flag = f"--xla_force_host_platform_device_count={max(counts)}"
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f] + [flag])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


# jax (and rlhf_jax, which imports it) is imported inside the functions: XLA_FLAGS must name the
# device count first (_set_device_count).


def model_config(spec: str, **runtime):
  from rlhf_jax import models
  from rlhf_jax.models import hf
  if spec == "llama3_8b":
    return hf.config_from_hf(LLAMA3_8B, source="llama3_8b", **runtime)
  if spec in models.PRESETS:
    return models.get_model_config(spec, **runtime)
  path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
  with open(path) as f:
    return hf.config_from_hf(json.load(f), source=path, **runtime)


def mesh_config(kind: str, n: int, tensor: int):
  from rlhf_jax import parallel
  if kind == "fsdp":
    return parallel.MeshConfig(data=1, fsdp=n, tensor=1)
  if kind == "fsdp_tensor":
    if n % tensor:
      raise ValueError(f"--tensor={tensor} does not divide --devices {n}")
    return parallel.MeshConfig(data=1, fsdp=n // tensor, tensor=tensor)
  if kind == "data":
    return parallel.MeshConfig(data=n, fsdp=1, tensor=1)
  raise ValueError(f"--meshes: {kind!r} is invalid; allowed: fsdp | fsdp_tensor | data")


def plan_one(method: str, cfg, mesh, batch: int):
  """The plan of ``method`` with ``batch`` sequences / pairs / prompts on ``mesh``."""
  from rlhf_jax.algorithms import plan as plan_lib
  from rlhf_jax.algorithms.offline import plan as offline_plan
  from rlhf_jax.models import lora as lora_lib
  lora = lora_lib.LoraConfig(rank=_LORA_RANK.value) if method.endswith("_lora") else None
  if method in ("sft", "sft_lora"):
    return plan_lib.sft_plan(cfg, mesh, batch_size=batch, seq_len=_SEQ.value, lora=lora)
  if method in ("dpo", "dpo_lora"):
    return offline_plan.dpo_plan(cfg, mesh, batch_size=batch, seq_len=_SEQ.value, lora=lora)
  if method == "kto":
    return offline_plan.kto_plan(cfg, mesh, batch_size=batch, seq_len=_SEQ.value)
  if method == "reward_model":
    from rlhf_jax.algorithms.reward import plan as reward_plan
    return reward_plan.reward_model_plan(cfg, mesh, batch_size=batch, seq_len=_SEQ.value)
  if method == "ppo":
    from rlhf_jax.algorithms.online import plan as online_plan
    from rlhf_jax.algorithms.online.config import PPOConfig
    ppo = PPOConfig(rollout_batch_size=batch, max_new_tokens=_RESPONSE.value,
                    num_minibatches=_MINIBATCHES.value, num_ppo_epochs=1)
    return online_plan.ppo_plan(cfg, mesh, config=ppo, prompt_len=_PROMPT.value)
  raise ValueError(f"--methods: {method!r} is invalid; allowed: {' | '.join(METHODS)}")


def table(rows) -> str:
  cols = ("params", "optimizer state", "gradients", "activations", "kv cache", "peak")
  head = "| model | method | devices | mesh (d×f×t) | " + " | ".join(cols) + " | compile s |"
  lines = [head, "|" + " --- |" * (head.count("|") - 1)]
  for r in rows:
    cats = r["categories"]
    mesh = "×".join(str(r["mesh_shape"][a]) for a in ("data", "fsdp", "tensor"))
    lines.append(f"| {r['model']} | {r['method']} | {r['devices']} | {mesh} | " +
                 " | ".join(f"{cats[c] / 2**30:.2f}" for c in cols) +
                 f" | {r['compile_secs']:.0f} |")
  return "\n".join(lines)


def _write(cfg, rows) -> None:
  if not _OUT.value:
    return
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  keys = ("seq_len", "prompt_len", "response_len", "batch", "per_device", "remat", "scan_layers",
          "dtype", "tensor", "num_minibatches", "lora_rank")
  record = {
      "model": _MODEL.value, "num_params": cfg.num_params(),
      "flags": {k: flags.FLAGS[k].value for k in keys},
      "date": time.strftime("%Y-%m-%d %H:%M UTC",
                            time.gmtime()), "load_average": os.getloadavg(), "rows": rows}
  with open(_OUT.value, "w") as f:
    json.dump(record, f, indent=1)


def main(argv):
  del argv
  import jax
  from rlhf_jax import parallel
  cfg = model_config(_MODEL.value, scan_layers=_SCAN.value, remat_policy=_REMAT.value,
                     dtype=_DTYPE.value)
  print(
      f"{_MODEL.value}: {cfg.num_params() / 1e9:.2f} B params, remat {cfg.remat_policy}, "
      f"dtype {cfg.dtype}, {jax.device_count()} simulated {jax.default_backend()} devices",
      flush=True)
  rows = []
  for n in (int(x) for x in _DEVICES.value):
    for kind in _MESHES.value:
      mesh_cfg = mesh_config(kind, n, _TENSOR.value)
      mesh = parallel.make_mesh(mesh_cfg, devices=jax.devices()[:n])
      shards = mesh_cfg.data * mesh_cfg.fsdp
      for method in _METHODS.value:
        batch = _BATCH.value * (shards if _PER_DEVICE.value else 1)
        t0 = time.perf_counter()
        plan = plan_one(method, cfg, mesh, batch)
        secs = time.perf_counter() - t0
        print(plan.summary() + f"\n  (batch {batch}; planned in {secs:.0f} s)", flush=True)
        rows.append({
            "model": _MODEL.value, "method": method, "devices": n, "mesh": kind, "batch": batch,
            "mesh_shape": plan.mesh_shape, "categories": plan.categories(), "compile_secs": secs,
            "plan": plan.to_json()})
        _write(cfg, rows)  # after every row: a long sweep that is stopped keeps what it planned
  print(table(rows))


if __name__ == "__main__":
  _set_device_count(sys.argv)
  app.run(main)
