r"""DPO training throughput: rlhf_jax (``gpt2`` preset) vs TRL's ``DPOTrainer`` (PyTorch CPU), same shapes.

  python experiments/bench_dpo.py              # B=2 pairs, prompt 64 + completion 64 tokens, 4 timed steps
  python experiments/bench_dpo.py --quick      # B=1, 16 + 16 tokens, 2 timed steps (a smoke run)

Both sides train GPT-2 124M from random weights (``GPT2Config()`` in PyTorch, the ``gpt2`` preset
here, which is the same architecture) with the sigmoid DPO loss, β = 0.1, AdamW, float32, and a
frozen reference model evaluated on the fly every step (TRL's default; here ``reference_logps =
"on_the_fly"``: one jitted reference forward over the stacked ``[2B, T]`` batch, then the jitted
train step with chosen and rejected in one forward). Every sequence is exactly ``prompt + completion``
real tokens, so tokens/step = 2 · B · (P + C) on both sides. Reported: tokens/s over the timed steps
after warm-up steps (compilation here, first-iteration allocation there) and the ratio, plus tokens
per CPU-second of the process (all threads; ``time.process_time``), which is what stays comparable
when other jobs share the cores.

TRL is fed token ids through a word-level tokenizer built locally with the ``tokenizers`` library
(token ``t<i>`` ↔ id i; nothing is downloaded); its preprocessing appends EOS to each completion, so
TRL's completions are given C - 1 tokens to match C here. If ``trl`` is not importable in this
interpreter, the TRL half runs as a subprocess of ``--trl_python`` (default: /tmp/trl_venv/bin/python,
made by ``python -m venv --system-site-packages /tmp/trl_venv && /tmp/trl_venv/bin/pip install trl
"torch==2.13.0"``). Results: BUILD_NOTES.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shapes(args) -> dict:
  if args.quick:
    return {"batch": 1, "prompt": 16, "completion": 16, "steps": 2, "warmup": 1}
  return {
      "batch": args.batch, "prompt": args.prompt_len, "completion": args.completion_len,
      "steps": args.steps, "warmup": args.warmup}


def _token_ids(shape: dict, seed: int = 0):
  import numpy as np  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  b, p, c = shape["batch"], shape["prompt"], shape["completion"]
  n = b * (shape["steps"] + shape["warmup"])
  # ids < 50256 (50256 is GPT-2's <|endoftext|>, used as EOS by both sides)
  return (rng.integers(0, 50256, (n, p)), rng.integers(0, 50256,
                                                       (n, c)), rng.integers(0, 50256, (n, c)))


def bench_jax(shape: dict) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from rlhf_jax import models, parallel, train  # pylint: disable=import-outside-toplevel
  from rlhf_jax.algorithms import reference  # pylint: disable=import-outside-toplevel
  from rlhf_jax.algorithms.offline import dpo  # pylint: disable=import-outside-toplevel

  b, p, c = shape["batch"], shape["prompt"], shape["completion"]
  t = p + c
  config = models.get_model_config("gpt2")
  model = models.Transformer(config)
  mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=1, tensor=1),
                            devices=jax.devices()[:1])
  dummy = jnp.ones((1, 8), jnp.int32)
  params = parallel.create_sharded(lambda: model.init(jax.random.PRNGKey(0), dummy, dummy),
                                   mesh)["params"]
  ref_params = jax.tree.map(jnp.copy, params)
  optimizer, schedule = train.make_optimizer(
      train.OptimConfig(lr=1e-6, warmup_steps=0, schedule="constant", weight_decay=0.0,
                        clip_norm=1.0), shape["steps"] + shape["warmup"])
  state = train.create_train_state(params, optimizer, jax.random.PRNGKey(1), mesh)
  loss_fn = dpo.make_loss_fn(model, dpo.DPOLossConfig(beta=0.1, loss_type="sigmoid"))
  step_fn = train.guard_step(train.make_train_step(loss_fn, optimizer, schedule))
  add_reference = reference.make_transform("on_the_fly", model=model, params=ref_params, mesh=mesh)
  prompts, chosen, rejected = _token_ids(shape)

  def batch_at(i):
    """The collator's pairwise layout: pair j's chosen in row 2j, its rejected in row 2j+1."""
    sl = slice(i * b, (i + 1) * b)
    pair_rows = np.stack([
        np.concatenate([prompts[sl], chosen[sl]], 1),
        np.concatenate([prompts[sl], rejected[sl]], 1)], axis=1)  # [B, 2, T]
    loss_mask = np.concatenate([np.zeros(
        (2 * b, p), np.int32), np.ones((2 * b, c), np.int32)], axis=1)
    return {
        "tokens": pair_rows.reshape(2 * b, t).astype(np.int32), "mask": np.ones(
            (2 * b, t), np.int32), "loss_mask": loss_mask}

  with parallel.use_mesh(mesh):
    jitted = train.jit_train_step(step_fn, state, mesh)

    def one_step(state, i):
      batch = add_reference(batch_at(i))  # on-the-fly reference, as TRL
      return jitted(state, parallel.shard_batch(batch, mesh))

    t0 = time.perf_counter()
    for i in range(shape["warmup"]):
      state, metrics = one_step(state, i)
    jax.block_until_ready(metrics)
    warm = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(shape["warmup"], shape["warmup"] + shape["steps"]):
      state, metrics = one_step(state, i)
    jax.block_until_ready(metrics)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
  tokens = 2 * b * t * shape["steps"]
  return {
      "framework": f"rlhf_jax (jax {jax.__version__})", "tokens_per_s": tokens / seconds,
      "tokens_per_cpu_s": tokens / cpu, "cpu_seconds_per_step": cpu / shape["steps"],
      "seconds_per_step": seconds / shape["steps"], "warmup_seconds": warm,
      "final_loss": float(metrics["loss"]), "params": config.num_params()}


def _word_tokenizer(tmpdir: str):
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel

  vocab = {f"t{i}": i for i in range(50256)}
  vocab["<eos>"] = 50256
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  path = os.path.join(tmpdir, "tokenizer.json")
  tok.save(path)
  return PreTrainedTokenizerFast(tokenizer_file=path, eos_token="<eos>", pad_token="<eos>")


def bench_trl(shape: dict) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import trl  # pylint: disable=import-outside-toplevel
  from datasets import Dataset  # pylint: disable=import-outside-toplevel
  from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback  # pylint: disable=import-outside-toplevel

  b, p, c = shape["batch"], shape["prompt"], shape["completion"]
  prompts, chosen, rejected = _token_ids(shape)
  text = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
  # TRL appends EOS to each completion: give it C - 1 tokens so both sides train on C.
  data = Dataset.from_dict({
      "prompt": [text(x) + " " for x in prompts], "chosen": [text(x[:c - 1]) for x in chosen],
      "rejected": [text(x[:c - 1]) for x in rejected]})
  torch.manual_seed(0)
  model = GPT2LMHeadModel(GPT2Config())
  ref_model = copy.deepcopy(model).eval()  # the same frozen weights as the start, like the JAX side
  times, cpu_times = [], []

  class Timer(TrainerCallback):

    def on_step_end(self, args, state, control, **kwargs):
      times.append(time.perf_counter())
      cpu_times.append(time.process_time())

  with tempfile.TemporaryDirectory() as tmpdir:
    tokenizer = _word_tokenizer(tmpdir)
    config = trl.DPOConfig(output_dir=tmpdir, per_device_train_batch_size=b,
                           max_steps=shape["steps"] + shape["warmup"], learning_rate=1e-6,
                           lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                           max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"], logging_steps=1,
                           report_to=[], save_strategy="no", use_cpu=True, bf16=False, fp16=False,
                           dataloader_num_workers=0, max_length=p + c, gradient_checkpointing=False,
                           seed=0, disable_tqdm=True)
    trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=data,
                             processing_class=tokenizer, callbacks=[Timer()])
    start = time.perf_counter()
    trainer.train()
  warm = times[shape["warmup"] - 1] - start
  seconds = times[-1] - times[shape["warmup"] - 1]
  cpu = cpu_times[-1] - cpu_times[shape["warmup"] - 1]
  tokens = 2 * b * (p + c) * shape["steps"]
  return {
      "framework": f"TRL {trl.__version__} DPOTrainer (torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads)", "tokens_per_s": tokens / seconds,
      "seconds_per_step": seconds / shape["steps"], "tokens_per_cpu_s": tokens / cpu,
      "cpu_seconds_per_step": cpu / shape["steps"], "warmup_seconds": warm,
      "final_loss": float(trainer.state.log_history[-2].get("loss", "nan"))
                    if len(trainer.state.log_history) > 1 else float("nan"),
      "params": sum(x.numel() for x in model.parameters())}


def _trl_importable() -> bool:
  try:
    import trl  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    return True
  except ImportError:
    return False


def check_trl_side(trl_python: str) -> None:
  """Fails before any timing when neither this interpreter nor ``--trl_python`` can run TRL."""
  if not _trl_importable() and not os.access(trl_python, os.X_OK):
    raise SystemExit(
        f"trl is not importable here and --trl_python={trl_python} is not a Python "
        "executable; make it with: python -m venv --system-site-packages /tmp/trl_venv && "
        "/tmp/trl_venv/bin/pip install trl \"torch==2.13.0\"  (or pass --skip_trl)")


def run_trl(shape: dict, trl_python: str) -> dict:
  if _trl_importable():
    return bench_trl(shape)
  out = subprocess.run(
      [trl_python, os.path.abspath(__file__), "--_trl_child",
       json.dumps(shape)], capture_output=True, text=True, cwd=REPO)
  if out.returncode:
    raise SystemExit(f"TRL subprocess failed ({out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--batch", type=int, default=2, help="pairs per step")
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--completion_len", type=int, default=64)
  parser.add_argument("--steps", type=int, default=4, help="timed steps")
  parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
  parser.add_argument("--trl_python", default="/tmp/trl_venv/bin/python")
  parser.add_argument("--skip_trl", action="store_true")
  parser.add_argument("--_trl_child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._trl_child:  # pylint: disable=protected-access
    print(json.dumps(bench_trl(json.loads(args._trl_child))))  # pylint: disable=protected-access
    return {}
  if not args.skip_trl:
    check_trl_side(args.trl_python)
  shape = _shapes(args)
  print(
      f"shapes: {shape} -> {2 * shape['batch'] * (shape['prompt'] + shape['completion'])} "
      "tokens/step", flush=True)
  results = {"shape": shape, "jax": bench_jax(shape)}
  print(json.dumps(results["jax"]), flush=True)
  if not args.skip_trl:
    results["trl"] = run_trl(shape, args.trl_python)
    print(json.dumps(results["trl"]), flush=True)
    results["speedup"] = results["jax"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
  print(
      "| framework | tokens/s (wall) | s/step | tokens per CPU-s | CPU-s/step | warm-up s |\n"
      "| --- | --- | --- | --- | --- | --- |", flush=True)
  for key in ("jax", "trl"):
    if key in results:
      r = results[key]
      print(f"| {r['framework']} | {r['tokens_per_s']:.1f} | {r['seconds_per_step']:.2f} | "
            f"{r['tokens_per_cpu_s']:.1f} | {r['cpu_seconds_per_step']:.2f} | "
            f"{r['warmup_seconds']:.1f} |")
  if "speedup" in results:
    results["cpu_speedup"] = results["jax"]["tokens_per_cpu_s"] / results["trl"]["tokens_per_cpu_s"]
    print(
        f"speedup (rlhf_jax / TRL): {results['speedup']:.2f}x wall tokens/s, "
        f"{results['cpu_speedup']:.2f}x tokens per CPU-second", flush=True)
  return results


if __name__ == "__main__":
  main()
