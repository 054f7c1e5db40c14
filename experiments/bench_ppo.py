r"""One RL iteration, rlhf_jax vs TRL, side by side on the same shapes (random GPT-2-shaped weights).

  python experiments/bench_ppo.py [--quick] [--out=bench_ppo.json]

PPO: rlhf_jax (``rollout`` phases + ``ppo_update``) vs TRL 0.19.1's ``PPOTrainer`` (the last TRL
release that ships it). GRPO: rlhf_jax ``algorithm="grpo"`` vs current TRL's ``GRPOTrainer``. Both
sides: ``GPT2Config()`` shapes (124M, vocab 50257; ``--quick``: 2 layers), policy + frozen
reference + reward model (+ value model for PPO), the same prompts (B prompts × P tokens, no
padding), R new tokens sampled at temperature 1, the same epochs / minibatches, AdamW, float32 on
CPU. TRL runs in its own virtual environment as a subprocess (``--trl019_python`` /
``--trl_python``); see BUILD_NOTES.md for the install commands. Per-phase times for
TRL come from timing wrappers around its module-level ``batch_generation`` / ``forward`` /
``get_reward`` (PPO) or its trainer's ``_generate*`` / ``_get_per_token_logps*`` methods (GRPO);
the update is the rest of the iteration. Each side runs ``--iterations`` iterations; the first is
warm-up (rlhf_jax compiles in it: ``compile_s``) and the reported row is the median iteration of the
rest (by total time; every total is kept in ``totals``), so one disturbed iteration on a shared
machine does not decide the ratio. The load average before / after each side is recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time

from absl import app, flags

_QUICK = flags.DEFINE_bool("quick", False, "2-layer GPT-2 shapes (a smoke run).")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
_TRL019 = flags.DEFINE_string("trl019_python", "/tmp/venv_trl019/bin/python",
                              "Python of the virtualenv with trl==0.19.1 (PPOTrainer).")
_TRL = flags.DEFINE_string("trl_python", "/tmp/venv_trl_cur/bin/python",
                           "Python of the virtualenv with the current trl (GRPOTrainer).")
_THREADS = flags.DEFINE_integer("threads", 2, "CPU threads for torch (and XLA's intra-op pool).")
_SKIP = flags.DEFINE_list("skip", [], "Sides to skip: jax_ppo, trl_ppo, jax_grpo, trl_grpo.")
_ITERS = flags.DEFINE_integer(
    "iterations", 4, "Iterations per side (the first is warm-up / "
    "compilation; the median of the rest is reported).")

# The shared workload. B prompts, G samples each (GRPO), P prompt tokens, R new tokens.
SHAPES = dict(prompts=8, prompt_len=32, response_len=32, epochs=1, minibatches=2, group=4,
              grpo_prompts=2)


def _median(rows: list[dict]) -> dict:
  """The row with the median ``total`` (the upper one for an even count)."""
  return sorted(rows, key=lambda r: r["total"])[len(rows) // 2]


def _jax_side(algorithm: str, n_layer: int, iterations: int) -> dict:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from rlhf_jax import models, sampling, train  # pylint: disable=import-outside-toplevel
  from rlhf_jax.algorithms.online import config as ppo_config  # pylint: disable=import-outside-toplevel
  from rlhf_jax.algorithms.online import update as ppo_update
  from rlhf_jax.algorithms.online import rollout

  s = SHAPES
  grpo = algorithm == "grpo"
  b = s["grpo_prompts"] if grpo else s["prompts"]
  g = s["group"] if grpo else 1
  cfg = ppo_config.PPOConfig(
      algorithm=algorithm, rollout_batch_size=b, num_samples=g, max_new_tokens=s["response_len"],
      num_ppo_epochs=s["epochs"], num_minibatches=s["minibatches"], kl_coef=0.05,
      critic_init="sft")  # advantage whitening: the per-algorithm default (on for ppo only)
  optim = train.OptimConfig(lr=1e-6, schedule="constant", weight_decay=0.0, clip_norm=1.0)
  mcfg = models.get_model_config("gpt2", n_layers=n_layer)
  policy = models.Transformer(mcfg)
  dummy = jnp.ones((1, 8), jnp.int32)
  key = jax.random.PRNGKey(0)
  dev = jax.devices()[0]
  params = jax.device_put(nn.meta.unbox(policy.init(key, dummy, dummy))["params"], dev)
  ref_params = jax.tree.map(jnp.copy, params)
  rm = models.RewardModel(mcfg)
  rm_params = jax.device_put(nn.meta.unbox(rm.init(key, dummy, dummy))["params"], dev)
  value_model = models.ValueModel(mcfg) if not grpo else None
  state_params = {"policy": params}
  if value_model is not None:
    state_params["value"] = jax.device_put(
        models.with_backbone(nn.meta.unbox(value_model.init(key, dummy, dummy))["params"], params),
        dev)
    state_params["value"] = jax.tree.map(jnp.copy, state_params["value"])
  total = iterations * cfg.updates_per_iteration
  optimizer, _ = train.make_optimizer(optim, total)
  state = jax.device_put(ppo_update.create_state(state_params, optimizer, 0.05, key), dev)
  prompts = jax.random.randint(jax.random.PRNGKey(1), (b, s["prompt_len"]), 3, mcfg.vocab_size)
  prompt_mask = jnp.ones_like(prompts)
  # eos_id outside the vocabulary: every row samples all R tokens, as TRL's fixed-length generation.
  samp = sampling.SamplingConfig(max_new_tokens=s["response_len"], num_samples=g,
                                 eos_id=mcfg.vocab_size + 1, pad_id=0)
  score_fn = rollout.make_score_fn(rm, eos_id=mcfg.vocab_size + 1, missing_eos_penalty=0.0)
  logprob_fn = rollout.make_logprob_fn(policy, value_model, s["prompt_len"], 1.0)
  adv_fn = rollout.make_advantage_fn(cfg)
  update_fn = ppo_update.make_update_fn(cfg, policy, value_model, optim, total, s["prompt_len"])
  mean, std = jnp.zeros((1,)), jnp.ones((1,))

  def iteration(state, seed):
    t = [time.perf_counter()]
    out = sampling.sample(policy, state.params["policy"], prompts, prompt_mask,
                          jax.random.PRNGKey(seed), samp)
    tokens, mask, _ = out.full_sequences()
    jax.block_until_ready(tokens)
    t.append(time.perf_counter())
    scores, _ = jax.block_until_ready(
        score_fn(rm_params, mean, std, tokens, mask, out.response_mask_BxR))
    t.append(time.perf_counter())
    old, ref, values, _ = jax.block_until_ready(
        logprob_fn(state.params["policy"], ref_params, state.params.get("value"), tokens, mask))
    adv, ret, _ = jax.block_until_ready(
        adv_fn(scores, old, ref, values, out.response_mask_BxR, state.kl_coef))
    t.append(time.perf_counter())
    ro = rollout.Rollout(tokens, mask, out.response_mask_BxR, old, ref, values, adv, ret)
    state, metrics = update_fn(state, ro)
    jax.block_until_ready(metrics)
    t.append(time.perf_counter())
    phases = dict(
        zip(("generation", "scoring", "logprobs", "update"), [b - a for a, b in zip(t, t[1:])]))
    return state, phases

  t0 = time.perf_counter()
  state, _ = iteration(state, 0)
  compile_s = time.perf_counter() - t0
  rows = []
  for i in range(1, iterations):
    state, phases = iteration(state, i)
    rows.append(dict(phases, total=sum(phases.values())))
  best = _median(rows)
  return {
      "phases": {k: v for k, v in best.items() if k != "total"}, "total_s": best["total"],
      "totals": [r["total"] for r in rows], "compile_s": compile_s, "rows": b * g,
      "params_M": mcfg.num_params() / 1e6}


_TRL_COMMON = r'''
import json, os, sys, time, tempfile
import torch
torch.set_num_threads(int(sys.argv[2]))
torch.manual_seed(0)
from datasets import Dataset
from tokenizers import Tokenizer, models as tm, pre_tokenizers
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config,
                          PreTrainedTokenizerFast)
S = json.loads(sys.argv[1]); N_LAYER = int(sys.argv[3]); ITERS = int(sys.argv[4])
cfg = GPT2Config(n_layer=N_LAYER)
# A local word-level tokenizer over GPT-2's vocabulary size (no hub download): ids 0..50256.
vocab = {f"w{i}": i for i in range(cfg.vocab_size - 3)}
vocab.update({"<pad>": cfg.vocab_size - 3, "<unk>": cfg.vocab_size - 2, "<|endoftext|>": cfg.vocab_size - 1})
tk = Tokenizer(tm.WordLevel(vocab, unk_token="<unk>")); tk.pre_tokenizer = pre_tokenizers.Whitespace()
tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|endoftext|>",
                              unk_token="<unk>", bos_token="<|endoftext|>")
tok.padding_side = "left"
cfg.pad_token_id = tok.pad_token_id
g = torch.Generator().manual_seed(1)
def prompt_text(n):
  return " ".join(f"w{int(i)}" for i in torch.randint(3, cfg.vocab_size - 3, (n,), generator=g))
TIMES, SNAPSHOTS, LOG_T = {}, [], []
def snapshot_on_log(trainer):
  orig = trainer.log
  def log(*a, **k):  # called once per optimiser update / iteration: close its phase times
    LOG_T.append(time.perf_counter()); SNAPSHOTS.append(dict(TIMES)); TIMES.clear()
    return orig(*a, **k)
  trainer.log = log
def report(t0):
  iters = [b - a for a, b in zip([t0] + LOG_T, LOG_T)]
  print("RESULT", json.dumps({"iteration_s": iters, "phases": SNAPSHOTS}))
def timed(name, fn):
  def wrapper(*a, **k):
    t = time.perf_counter(); out = fn(*a, **k); TIMES[name] = TIMES.get(name, 0.0) + time.perf_counter() - t
    return out
  return wrapper
'''

_TRL_PPO = _TRL_COMMON + r'''
from trl import PPOConfig, PPOTrainer
import trl.trainer.ppo_trainer as pt
ids = [tok(prompt_text(S["prompt_len"]))["input_ids"] for _ in range(S["prompts"] * ITERS)]
ds = Dataset.from_dict({"input_ids": ids})
policy = AutoModelForCausalLM.from_config(cfg); ref = AutoModelForCausalLM.from_config(cfg)
rm = AutoModelForSequenceClassification.from_config(GPT2Config(n_layer=N_LAYER, num_labels=1, pad_token_id=tok.pad_token_id))
vm = AutoModelForSequenceClassification.from_config(GPT2Config(n_layer=N_LAYER, num_labels=1, pad_token_id=tok.pad_token_id))
# TRL 0.19: rollout batch = per_device_train_batch_size * gradient_accumulation_steps, cut into
# num_mini_batches minibatches (each one optimiser step).
args = PPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=S["prompts"], gradient_accumulation_steps=1,
                 num_mini_batches=S["minibatches"], num_ppo_epochs=S["epochs"], response_length=S["response_len"],
                 total_episodes=S["prompts"] * ITERS, local_rollout_forward_batch_size=S["prompts"],
                 num_sample_generations=0, report_to="none", use_cpu=True, learning_rate=1e-6,
                 stop_token=None, temperature=1.0, kl_coef=0.05, save_strategy="no", logging_steps=1000,
                 dataloader_num_workers=0, seed=0)
trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                     train_dataset=ds, value_model=vm)
# Phase timers: generation, ref forward (no grad) vs the update's forward, value/reward heads.
pt.batch_generation = timed("generation", pt.batch_generation)
_fwd = pt.forward
def fwd(model, *a, **k):
  name = "logprobs" if not torch.is_grad_enabled() else "update_forward"
  return timed(name, _fwd)(model, *a, **k)
pt.forward = fwd
_gr = pt.get_reward
def gr(model, *a, **k):
  return timed("scoring" if model is rm else "logprobs", _gr)(model, *a, **k)
pt.get_reward = gr
snapshot_on_log(trainer)
t0 = time.perf_counter(); trainer.train(); report(t0)
'''

_TRL_GRPO = _TRL_COMMON + r'''
from trl import GRPOConfig, GRPOTrainer
prompts = [prompt_text(S["prompt_len"]) for _ in range(S["grpo_prompts"] * ITERS)]
ds = Dataset.from_dict({"prompt": prompts})
# GRPOTrainer re-loads the reference model (beta > 0) from the policy's path: save the random
# models locally so nothing touches the hub.
root = tempfile.mkdtemp()
for name, model in (("policy", AutoModelForCausalLM.from_config(cfg)),
                    ("rm", AutoModelForSequenceClassification.from_config(
                        GPT2Config(n_layer=N_LAYER, num_labels=1, pad_token_id=tok.pad_token_id)))):
  model.save_pretrained(os.path.join(root, name)); tok.save_pretrained(os.path.join(root, name))
policy, rm = os.path.join(root, "policy"), os.path.join(root, "rm")
rows = S["grpo_prompts"] * S["group"]
# One generation of `rows` completions feeds `minibatches` optimiser steps of rows/minibatches each
# (steps_per_generation), as our num_minibatches; max_steps covers ITERS such iterations.
args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=rows // S["minibatches"],
                  gradient_accumulation_steps=1, steps_per_generation=S["minibatches"],
                  num_generations=S["group"],
                  max_completion_length=S["response_len"], num_iterations=S["epochs"], beta=0.05,
                  max_steps=ITERS * S["minibatches"], report_to="none", use_cpu=True, learning_rate=1e-6, temperature=1.0,
                  save_strategy="no", logging_steps=1, seed=0, bf16=False)
trainer = GRPOTrainer(model=policy, reward_funcs=[rm], args=args,
                      train_dataset=ds, processing_class=tok)
for name in dir(trainer):
  if name.startswith("_generate") or name.startswith("_get_per_token_logps") or name == "_calculate_rewards":
    fn = getattr(trainer, name)
    if callable(fn):
      setattr(trainer, name, timed(name, fn))
snapshot_on_log(trainer)
t0 = time.perf_counter(); trainer.train(); report(t0)
'''


def _run_trl(python: str, script: str, threads: int, n_layer: int, iterations: int) -> dict:
  with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write(script)
  env = dict(os.environ, TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run([
      python, f.name,
      json.dumps(SHAPES),
      str(threads), str(n_layer),
      str(iterations)], capture_output=True, text=True, env=env, timeout=3000)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    return {"error": (proc.stderr or proc.stdout)[-3000:]}
  return json.loads(lines[-1][len("RESULT "):])


def _trl_ppo_steady(r: dict) -> dict:
  """TRL 0.19 PPO, median of iterations 2..N: timed phases; the update is the rest."""
  rows = []
  for it, ph in list(zip(r["iteration_s"], r["phases"]))[1:]:
    gen, score, logp = ph.get("generation", 0.0), ph.get("scoring", 0.0), ph.get("logprobs", 0.0)
    rows.append({
        "generation": gen, "scoring": score, "logprobs": logp, "update": it - gen - score - logp,
        "total": it})
  return dict(_median(rows), totals=[row["total"] for row in rows])


def _trl_grpo_steady(r: dict) -> dict:
  """Current TRL GRPO: one generation feeds `minibatches` optimiser steps (one log per step);
  iteration i is the i-th group of steps; median of iterations 2..N. Old/reference log-probs are
  computed inside `_generate_and_score_completions` and cannot be separated from the update's
  forwards by method-level timers, so they are reported together with the update."""
  m = SHAPES["minibatches"]
  rows = []
  for i in range(1, len(r["iteration_s"]) // m):
    its, phs = r["iteration_s"][i * m:(i + 1) * m], r["phases"][i * m:(i + 1) * m]
    total = sum(its)
    gen = sum(p.get("_generate", 0.0) for p in phs)
    score = sum(p.get("_calculate_rewards", 0.0) for p in phs)
    rows.append({
        "generation": gen, "scoring": score, "logprobs+update": total - gen - score,
        "total": total})
  return dict(_median(rows), totals=[row["total"] for row in rows])


def summarize(results: dict) -> dict:
  out = {}
  for name in ("jax_ppo", "jax_grpo"):
    if name in results and "phases" in results[name]:
      out[name] = dict(results[name]["phases"], total=results[name]["total_s"],
                       compile=results[name]["compile_s"], totals=results[name]["totals"])
  if "trl_ppo" in results and "phases" in results["trl_ppo"]:
    out["trl_ppo"] = _trl_ppo_steady(results["trl_ppo"])
  if "trl_grpo" in results and "phases" in results["trl_grpo"]:
    out["trl_grpo"] = _trl_grpo_steady(results["trl_grpo"])
  for ours, theirs in (("jax_ppo", "trl_ppo"), ("jax_grpo", "trl_grpo")):
    if ours in out and theirs in out:
      out[f"speedup_{ours[4:]}"] = out[theirs]["total"] / out[ours]["total"]
  return out


def format_table(summary: dict) -> str:
  lines = []
  for name, row in summary.items():
    if isinstance(row, dict):
      lines.append(f"{name:9s} " +
                   "  ".join(f"{k} {v:8.2f}s" for k, v in row.items() if not isinstance(v, list)))
    else:
      lines.append(f"{name}: {row:.2f}x")
  return "\n".join(lines)


def main(argv):
  del argv
  n_layer = 2 if _QUICK.value else 12
  iters = _ITERS.value
  if iters < 2:
    raise app.UsageError(f"--iterations={iters}; allowed: >= 2 (the first is warm-up)")
  for side, flag in (("trl_ppo", _TRL019), ("trl_grpo", _TRL)):
    if side not in _SKIP.value and not os.access(flag.value, os.X_OK):
      raise app.UsageError(
          f"--{flag.name}={flag.value}: no such Python executable; create that virtualenv (commands in "
          f"BUILD_NOTES.md, 'Benchmark: experiments/bench_ppo.py vs TRL') or add {side} to --skip")
  results = {
      "shapes": SHAPES, "n_layer": n_layer, "threads": _THREADS.value, "iterations": iters,
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  sides = [("jax_ppo", lambda: _jax_side("ppo", n_layer, iters)),
           ("trl_ppo", lambda: _run_trl(_TRL019.value, _TRL_PPO, _THREADS.value, n_layer, iters)),
           ("jax_grpo", lambda: _jax_side("grpo", n_layer, iters)),
           ("trl_grpo", lambda: _run_trl(_TRL.value, _TRL_GRPO, _THREADS.value, n_layer, iters))]
  for name, fn in sides:
    if name in _SKIP.value:
      continue
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    results[name] = fn()
    results[name]["wall_s"] = time.perf_counter() - t0
    results[name]["loadavg_1min"] = [load_before, os.getloadavg()[0]]
    print(name, json.dumps(results[name], indent=1), flush=True)
  results["summary"] = summarize(results)
  print(format_table(results["summary"]))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
