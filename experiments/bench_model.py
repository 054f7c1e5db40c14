r"""Side-by-side speed of rlhf_jax and Hugging Face transformers (PyTorch) on the same CPU and shapes.

Measures, in one process, alternating the two frameworks step by step so that background load on a
shared machine hits both alike:

* **train step** — forward + backward + AdamW on next-token cross-entropy over every position.
  rlhf_jax: ``train.make_train_step`` + ``train.jit_train_step`` (jitted, state donated, run inside
  ``parallel.use_mesh``) with ``optax.adamw``; PyTorch: ``GPT2LMHeadModel(labels=...)`` +
  ``torch.optim.AdamW``. Both float32, dropout off, random init (``GPT2Config()``; nothing is
  downloaded).
* **sampling** — greedy decoding of exactly ``new_tokens`` tokens per row with a KV cache.
  rlhf_jax: ``sampling.sample`` (greedy, no EOS); PyTorch: ``model.generate(do_sample=False,
  min_new_tokens=max_new_tokens)``.

MFU follows DESIGN.md "Performance conventions": a train step does 6·N·tokens matmul FLOPs plus
causal attention, 6·L·T·d per token (half of 12·L·T·d), where N counts the matmul weights (all
params minus the position table; the tied embedding is counted once, as the LM head). The peak is
measured in the same run: the best of several large matmuls in JAX, in the benchmark's dtype.

Rooflines (printed so that a ratio can be judged against what the hardware allows):
* train: FLOP-bound tokens/s = peak / FLOPs-per-token, and the fraction of it the target needs.
* decode: every greedy step reads all weights once for B tokens, so tokens/s <= B * (weight-read
  bandwidth) / (weight bytes). The bandwidth is measured for each framework in the same run as the
  LM-head matmul [B, d] x [d, V] (the largest weight read of a decode step), in the weight dtype.

``--dtype=bfloat16`` is a second, separately labelled comparison: rlhf_jax runs with
``dtype="bfloat16"`` (params stay float32, matmuls in bf16, softmax / norms / log-probs float32) and
PyTorch runs the same model under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (train step and
``generate``), so both can use the CPU's bf16 units (AMX / AVX512-BF16). The float32 run is the
headline; never compare one side's bf16 with the other's float32.

Our model config: the `gpt2` preset as is (unrolled stack) for both workloads; the sampler's decode
loop carries per-layer KV buffers. ``--train_scan_layers`` / ``--sample_scan_layers`` switch to the
scanned stack (same numerics, tested) for comparison.

Usage::

    python experiments/bench_model.py --quick                # ~3-5 min on 2 cores, smaller shapes
    python experiments/bench_model.py --out=/tmp/bench.json  # the issue's shapes (gpt2, 8x256, 16x128)
    python experiments/bench_model.py --quick --breakdown    # + fwd / fwd+bwd / optimizer split
    python experiments/bench_model.py --dtype=bfloat16       # second comparison: bf16 compute on both sides

Prints a markdown table and writes all numbers (with per-step times) as JSON to ``--out``.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Fewer steps and smaller shapes (stated in the output).")
flags.DEFINE_string("preset", "gpt2", "rlhf_jax model preset; the torch side is GPT2Config().")
flags.DEFINE_integer("train_batch", None, "Train batch size (default 8; quick: 2).")
flags.DEFINE_integer("train_len", None, "Train sequence length (default 256; quick: 128).")
flags.DEFINE_integer("sample_batch", None, "Sampling batch size (default 16; quick: 8).")
flags.DEFINE_integer("prompt_len", None, "Prompt length for sampling (default 64; quick: 32).")
flags.DEFINE_integer("new_tokens", None, "Tokens generated per row (default 128; quick: 32).")
flags.DEFINE_integer("steps", None, "Timed train steps per framework (default 5; quick: 3).")
flags.DEFINE_integer("sample_reps", None,
                     "Timed sampling calls per framework (default 3; quick: 2).")
flags.DEFINE_integer("matmul_n", 2048, "Size of the square matmul that measures the peak.")
flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"],
    "Compute dtype of both sides (bfloat16: ours dtype=bf16 with f32 params, torch "
    "under torch.autocast('cpu', bfloat16)). float32 is the headline comparison.")
flags.DEFINE_bool("train_scan_layers", False, "rlhf_jax train step with scan_layers=True.")
flags.DEFINE_bool("sample_scan_layers", False, "rlhf_jax sampler with scan_layers=True.")
flags.DEFINE_integer(
    "torch_threads", 0, "torch.set_num_threads; 0 = try 1 and os.cpu_count() threads on one warm "
    "call per workload and keep the faster (under load, spinning OpenMP threads "
    "can make fewer threads faster).")
flags.DEFINE_bool("breakdown", False,
                  "Also time forward, forward+backward and the optimizer alone.")
flags.DEFINE_list("workloads", ["train", "sample"], "Which comparisons to run: train, sample.")
flags.DEFINE_string("out", "/tmp/bench_model.json", "Where to write the JSON results.")

TRAIN_TARGET, SAMPLE_TARGET = 1.2, 3.0  # from the issue: ratios rlhf_jax / PyTorch


def _shapes() -> dict:
  quick = FLAGS.quick
  pick = lambda value, full, small: value if value is not None else (small if quick else full)
  return dict(train_batch=pick(FLAGS.train_batch, 8, 2), train_len=pick(FLAGS.train_len, 256, 128),
              sample_batch=pick(FLAGS.sample_batch, 16,
                                8), prompt_len=pick(FLAGS.prompt_len, 64,
                                                    32), new_tokens=pick(FLAGS.new_tokens, 128, 32),
              steps=pick(FLAGS.steps, 5, 3), sample_reps=pick(FLAGS.sample_reps, 3, 2))


def _uptime() -> str:
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
  except OSError:
    return "n/a"


def _cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def matmul_peak_flops(n: int, dtype: str = "float32", reps: int = 5) -> float:
  """Best FLOP/s of an n x n @ n x n matmul in JAX (2 n^3 FLOPs) in ``dtype``.

    bf16 operands accumulate in float32 (``preferred_element_type``), as the model's matmuls do:
    XLA:CPU's bf16 -> bf16 dot is a slow generic path that would understate the peak.
    """
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  mm(a, b).block_until_ready()
  best = min(_timed(lambda: mm(a, b).block_until_ready()) for _ in range(reps))
  return 2 * n**3 / best


def weight_read_bandwidth(batch: int, d: int, v: int, dtype: str, reps: int = 5) -> dict:
  """Bytes/s of weight read by [batch, d] x [d, v] (the LM head of one decode step), per framework.

    Both sides multiply by the weight stored as [v, d] (the tied embedding) in ``dtype``; the
    [batch, v] output is small next to the weight, so time ~ weight bytes / bandwidth.
    """
  import jax
  import jax.numpy as jnp
  import torch

  w_bytes = v * d * (2 if dtype == "bfloat16" else 4)
  x = jax.random.normal(jax.random.key(0), (batch, d), dtype)
  w = jax.random.normal(jax.random.key(1), (v, d), dtype)
  mm = jax.jit(lambda x_, w_: jnp.einsum("BD,VD->BV", x_, w_, preferred_element_type=jnp.float32))
  mm(x, w).block_until_ready()
  jax_s = min(_timed(lambda: mm(x, w).block_until_ready()) for _ in range(reps))
  tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  tx, tw = torch.randn(batch, d, dtype=tdtype), torch.randn(v, d, dtype=tdtype)
  with torch.inference_mode():
    torch.nn.functional.linear(tx, tw)
    torch_s = min(_timed(lambda: torch.nn.functional.linear(tx, tw)) for _ in range(reps))
  return {
      "weight_bytes": w_bytes, "rlhf_jax_s": jax_s, "torch_s": torch_s,
      "rlhf_jax_GBps": w_bytes / jax_s / 1e9, "torch_GBps": w_bytes / torch_s / 1e9}


def train_flops_per_token(cfg, seq_len: int) -> float:
  """6 N (matmul weights) + causal attention 6 L T d (fwd+bwd), per trained token."""
  n_matmul = cfg.num_params() - (cfg.max_seq_len * cfg.d_model if cfg.position == "learned" else 0)
  return 6 * n_matmul + 6 * cfg.n_layers * seq_len * cfg.d_model


# ------------------------------------------------------------------------------------------- JAX


class JaxSide:
  """rlhf_jax model, train step and sampler on a 1-device mesh."""

  def __init__(self, preset: str, batch: int, seq_len: int, dtype: str, scan_layers: bool):
    import jax
    import jax.numpy as jnp
    import optax

    from rlhf_jax import parallel, train
    from rlhf_jax.models import Transformer, get_model_config, token_logprobs

    self.jax, self.jnp = jax, jnp
    self.cfg = get_model_config(preset, dtype=dtype, param_dtype="float32", scan_layers=scan_layers)
    self.model = Transformer(self.cfg)
    self.mesh = parallel.make_mesh(parallel.MeshConfig(), devices=jax.devices()[:1])
    tokens = jnp.zeros((batch, seq_len), jnp.int32)
    params = parallel.create_sharded(functools.partial(self.model.init, jax.random.key(0), tokens),
                                     self.mesh)["params"]
    self.tx = optax.adamw(3e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)  # torch defaults
    self.state = train.create_train_state(params, self.tx, jax.random.key_data(jax.random.key(1)),
                                          self.mesh)
    model = self.model

    def loss_fn(p, batch_, rng):
      del rng
      logits = model.apply({"params": p}, batch_["tokens"]).logits_BxTxV
      logps = token_logprobs(logits, batch_["tokens"])
      loss = -jnp.mean(logps[:, 1:])  # column 0 predicts nothing (see token_logprobs)
      return loss, {}

    self.loss_fn = loss_fn
    self.step = train.jit_train_step(train.make_train_step(loss_fn, self.tx), self.state, self.mesh)
    rng = jax.random.key(2)
    tokens_np = jax.device_get(jax.random.randint(rng, (batch, seq_len), 0, self.cfg.vocab_size))
    self.batch = parallel.shard_batch({"tokens": tokens_np}, self.mesh)
    self.parallel = parallel

  def train_step(self) -> float:
    with self.parallel.use_mesh(self.mesh):
      self.state, metrics = self.step(self.state, self.batch)
    loss = float(metrics["loss"])  # blocks on the step
    return loss

  def breakdown(self, reps: int) -> dict:
    """Median seconds of jitted forward (loss), forward+backward, and the AdamW update alone."""
    jax = self.jax
    params = self.state.params
    fwd = jax.jit(lambda p, b: self.loss_fn(p, b, None)[0])
    fwd_bwd = jax.jit(jax.value_and_grad(lambda p, b: self.loss_fn(p, b, None)[0]))

    def opt(p, s, g):
      updates, s = self.tx.update(g, s, p)
      return jax.tree.map(lambda a, u: a + u, p, updates), s

    opt = jax.jit(opt)
    out = {}
    with self.parallel.use_mesh(self.mesh):
      _, grads = fwd_bwd(params, self.batch)
      for name, fn in (("forward", lambda: fwd(params, self.batch)),
                       ("forward_backward", lambda: fwd_bwd(params, self.batch)),
                       ("optimizer", lambda: opt(params, self.state.opt_state, grads))):
        jax.block_until_ready(fn())
        out[name] = statistics.median(
            _timed(lambda: jax.block_until_ready(fn())) for _ in range(reps))
    return out

  def make_sampler(self, batch: int, prompt_len: int, new_tokens: int, scan_layers: bool):
    jax, jnp = self.jax, self.jnp
    from rlhf_jax.models import Transformer, stack_layer_params, unstack_layer_params
    from rlhf_jax.sampling import SamplingConfig, sample

    config = SamplingConfig(max_new_tokens=new_tokens, greedy=True, eos_id=None)
    prompts = jax.random.randint(jax.random.key(3), (batch, prompt_len), 0, self.cfg.vocab_size)
    mask = jnp.ones_like(prompts)
    params = self.state.params
    model = self.model
    if scan_layers != self.cfg.scan_layers:  # same weights, the other layer layout
      model = Transformer(self.cfg.replace(scan_layers=scan_layers))
      convert = stack_layer_params if scan_layers else unstack_layer_params
      params = jax.jit(lambda p: convert(p, self.cfg.n_layers))(params)

    def run():
      out = sample(model, params, prompts, mask, jax.random.key(4), config)
      tokens = jax.block_until_ready(out.response_tokens_BxR)
      assert tokens.shape == (batch, new_tokens), tokens.shape
      assert int(out.response_lengths_B.min()) == new_tokens

    return run


# ------------------------------------------------------------------------------------------- torch


class TorchSide:
  """transformers GPT2LMHeadModel (random init), torch AdamW, generate()."""

  def __init__(self, batch: int, seq_len: int, dtype: str):
    import contextlib

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    self.torch = torch
    # bf16: autocast (weights stay f32, matmuls in bf16), the counterpart of our dtype=bf16.
    self.autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16))
                     if dtype == "bfloat16" else contextlib.nullcontext)
    config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    self.model = GPT2LMHeadModel(config)
    self.attn_impl = getattr(self.model.config, "_attn_implementation", "n/a")
    self.model.train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.01)
    self.tokens = torch.randint(0, config.vocab_size, (batch, seq_len))
    self.vocab_size = config.vocab_size
    self.num_params = sum(p.numel() for p in self.model.parameters())

  def train_step(self) -> float:
    with self.autocast():
      loss = self.model(input_ids=self.tokens, labels=self.tokens).loss
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  def breakdown(self, reps: int) -> dict:
    torch = self.torch

    def fwd():
      with torch.no_grad(), self.autocast():
        self.model(input_ids=self.tokens, labels=self.tokens)

    def fwd_bwd():
      with self.autocast():
        loss = self.model(input_ids=self.tokens, labels=self.tokens).loss
      loss.backward()

    fwd_bwd()  # leaves gradients for the optimizer timing
    out = {}
    for name, fn in (("forward", fwd), ("forward_backward", fwd_bwd), ("optimizer", self.opt.step)):
      fn()
      out[name] = statistics.median(_timed(fn) for _ in range(reps))
    self.opt.zero_grad(set_to_none=True)
    return out

  def make_generate(self, batch: int, prompt_len: int, new_tokens: int):
    torch = self.torch
    prompts = torch.randint(0, self.vocab_size, (batch, prompt_len))
    mask = torch.ones_like(prompts)

    def run():
      self.model.eval()
      with torch.inference_mode(), self.autocast():
        out = self.model.generate(input_ids=prompts, attention_mask=mask, do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  pad_token_id=0, use_cache=True)
      self.model.train()
      assert tuple(out.shape) == (batch, prompt_len + new_tokens), tuple(out.shape)

    return run


# ------------------------------------------------------------------------------------------- main


def _pick_torch_threads(fn, requested: int) -> tuple[int, dict]:
  """Sets torch's intra-op threads: ``requested`` if > 0, else the faster of 1 and all cores."""
  import torch

  if requested > 0:
    torch.set_num_threads(requested)
    return requested, {}
  trials = {}
  # All cores first: that call doubles as the warm-up (first-call allocations), which can only
  # bias the pick towards 1 thread; the timed calls then use the winner.
  for n in sorted({1, os.cpu_count() or 1}, reverse=True):
    torch.set_num_threads(n)
    trials[n] = _timed(fn)
  best = min(trials, key=trials.get)
  torch.set_num_threads(best)
  return best, trials


def _alternate(jax_fn, torch_fn, reps: int) -> tuple[list[float], list[float]]:
  jax_times, torch_times = [], []
  for _ in range(reps):
    jax_times.append(_timed(jax_fn))
    if torch_fn is not None:
      torch_times.append(_timed(torch_fn))
  return jax_times, torch_times


def main(argv):
  del argv
  import jax

  s = _shapes()
  result = {
      "command": "python " + " ".join(sys.argv),
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
      "cpu": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "uptime_before": _uptime(),
      "quick": FLAGS.quick,
      "shapes": s,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "dtype": FLAGS.dtype,
      "train_scan_layers": FLAGS.train_scan_layers,
      "sample_scan_layers": FLAGS.sample_scan_layers,}
  print(f"# bench_model ({'QUICK: smaller shapes, fewer steps' if FLAGS.quick else 'full'}), "
        f"dtype {FLAGS.dtype}" +
        ("" if FLAGS.dtype == "float32" else
         " (SECOND comparison: rlhf_jax dtype=bf16 / f32 params vs torch.autocast bf16)"))
  print(f"machine: {result['cpu']} x{result['cpu_count']}; load: {result['uptime_before']}")

  peak = matmul_peak_flops(FLAGS.matmul_n, FLAGS.dtype)
  result["peak_flops"] = peak
  print(f"measured {FLAGS.dtype} matmul peak (jax, n={FLAGS.matmul_n}): {peak / 1e9:.1f} GFLOP/s")

  js = JaxSide(FLAGS.preset, s["train_batch"], s["train_len"], FLAGS.dtype, FLAGS.train_scan_layers)
  ts = TorchSide(s["train_batch"], s["train_len"], FLAGS.dtype)
  result["torch_attn_implementation"] = ts.attn_impl
  result["params"] = {"rlhf_jax": js.cfg.num_params(), "torch": ts.num_params}

  if "train" in FLAGS.workloads:
    _bench_train(js, ts, s, peak, result)
  if "sample" in FLAGS.workloads:
    _bench_sample(js, ts, s, result)
  result["uptime_after"] = _uptime()
  _report(js, ts, s, result)


def _bench_train(js, ts, s, peak, result):
  """One warm-up (compile) each, then alternate timed steps."""
  t0 = time.perf_counter()
  js.train_step()
  result["jax_first_step_s"] = time.perf_counter() - t0  # includes compilation
  if FLAGS.torch_threads > 0:
    ts.train_step()  # warm-up; in auto mode the thread trials warm up instead
  train_threads, train_trials = _pick_torch_threads(ts.train_step, FLAGS.torch_threads)
  result["torch_threads"] = {"train": train_threads, "train_trials_s": train_trials}
  jax_times, torch_times = _alternate(js.train_step, ts.train_step, s["steps"])
  tokens = s["train_batch"] * s["train_len"]
  flops_tok = train_flops_per_token(js.cfg, s["train_len"])
  train = {}
  for name, times in (("rlhf_jax", jax_times), ("torch", torch_times)):
    sec = statistics.median(times)
    train[name] = {
        "step_s": times, "median_step_s": sec, "tokens_per_s": tokens / sec,
        "mfu": flops_tok * tokens / sec / peak}
  train["ratio"] = train["rlhf_jax"]["tokens_per_s"] / train["torch"]["tokens_per_s"]
  train["flops_per_token"] = flops_tok
  # Roofline: what the measured matmul peak allows, and how much of it the target needs.
  train["flop_bound_tokens_per_s"] = peak / flops_tok
  train["target_tokens_per_s"] = TRAIN_TARGET * train["torch"]["tokens_per_s"]
  train["target_fraction_of_peak"] = train["target_tokens_per_s"] / train["flop_bound_tokens_per_s"]
  result["train"] = train

  if FLAGS.breakdown:
    result["breakdown_s"] = {
        "rlhf_jax": js.breakdown(s["steps"]), "torch": ts.breakdown(s["steps"])}


def _bench_sample(js, ts, s, result):
  """Greedy decoding of exactly new_tokens per row; one warm-up each, then alternate."""
  jax_sample = js.make_sampler(s["sample_batch"], s["prompt_len"], s["new_tokens"],
                               FLAGS.sample_scan_layers)
  torch_generate = ts.make_generate(s["sample_batch"], s["prompt_len"], s["new_tokens"])
  t0 = time.perf_counter()
  jax_sample()
  result["jax_first_sample_s"] = time.perf_counter() - t0
  if FLAGS.torch_threads > 0:
    torch_generate()
  sample_threads, sample_trials = _pick_torch_threads(torch_generate, FLAGS.torch_threads)
  result.setdefault("torch_threads", {}).update(sample=sample_threads,
                                                sample_trials_s=sample_trials)
  jax_times, torch_times = _alternate(jax_sample, torch_generate, s["sample_reps"])
  new = s["sample_batch"] * s["new_tokens"]
  sampling = {}
  for name, times in (("rlhf_jax", jax_times), ("torch", torch_times)):
    sec = statistics.median(times)
    sampling[name] = {"call_s": times, "median_call_s": sec, "tokens_per_s": new / sec}
  sampling["ratio"] = sampling["rlhf_jax"]["tokens_per_s"] / sampling["torch"]["tokens_per_s"]
  # Roofline: each decode step reads every weight once (tied head = the embedding table) for
  # sample_batch tokens. Bandwidth measured per framework on the LM-head matmul.
  bw = weight_read_bandwidth(s["sample_batch"], js.cfg.d_model, js.cfg.vocab_size, FLAGS.dtype)
  n_read = js.cfg.num_params() - (js.cfg.max_seq_len *
                                  js.cfg.d_model if js.cfg.position == "learned" else 0)
  step_bytes = n_read * (2 if FLAGS.dtype == "bfloat16" else 4)
  bound = {
      name: s["sample_batch"] * bw[f"{name}_GBps"] * 1e9 / step_bytes
      for name in ("rlhf_jax", "torch")}
  sampling["roofline"] = {
      "weight_read": bw, "decode_step_weight_bytes": step_bytes,
      "bandwidth_bound_tokens_per_s": bound,
      "target_tokens_per_s": SAMPLE_TARGET * sampling["torch"]["tokens_per_s"],
      "bound_ratio": bound["rlhf_jax"] / bound["torch"]}
  result["sampling"] = sampling


def _report(js, ts, s, result):
  print()
  print("| workload | shape | rlhf_jax tok/s | PyTorch tok/s | ratio | target | rlhf_jax MFU | "
        "PyTorch MFU |")
  print("|---|---|---|---|---|---|---|---|")
  if "train" in result:
    tr = result["train"]
    print(
        f"| train step (fwd+bwd+AdamW), {FLAGS.dtype} | {FLAGS.preset} B={s['train_batch']} T={s['train_len']} | "
        f"{tr['rlhf_jax']['tokens_per_s']:.0f} | {tr['torch']['tokens_per_s']:.0f} | "
        f"{tr['ratio']:.2f}x | >= {TRAIN_TARGET}x | {100 * tr['rlhf_jax']['mfu']:.1f}% | "
        f"{100 * tr['torch']['mfu']:.1f}% |")
  if "sampling" in result:
    sa = result["sampling"]
    print(
        f"| greedy sampling, KV cache, {FLAGS.dtype} | B={s['sample_batch']} prompt={s['prompt_len']} "
        f"new={s['new_tokens']} | {sa['rlhf_jax']['tokens_per_s']:.0f} | "
        f"{sa['torch']['tokens_per_s']:.0f} | {sa['ratio']:.2f}x | >= {SAMPLE_TARGET}x | - | - |")
  print()
  if "train" in result:
    tr = result["train"]
    print(f"train roofline ({FLAGS.dtype}): FLOP-bound {tr['flop_bound_tokens_per_s']:.0f} tok/s "
          f"at the measured peak ({tr['flops_per_token'] / 1e6:.0f} MFLOP/token); the "
          f"{TRAIN_TARGET}x target ({tr['target_tokens_per_s']:.0f} tok/s) needs "
          f"{100 * tr['target_fraction_of_peak']:.0f}% of that peak; PyTorch is at "
          f"{100 * tr['torch']['mfu']:.0f}%, rlhf_jax at {100 * tr['rlhf_jax']['mfu']:.0f}%.")
  if "sampling" in result:
    rf = result["sampling"]["roofline"]
    wr = rf["weight_read"]
    print(f"decode roofline ({FLAGS.dtype} weights, {rf['decode_step_weight_bytes'] / 1e6:.0f} MB "
          f"per step): weight-read bandwidth (LM-head matmul, B={s['sample_batch']}) "
          f"rlhf_jax {wr['rlhf_jax_GBps']:.1f} GB/s, PyTorch {wr['torch_GBps']:.1f} GB/s -> "
          f"bandwidth-bound decode {rf['bandwidth_bound_tokens_per_s']['rlhf_jax']:.0f} vs "
          f"{rf['bandwidth_bound_tokens_per_s']['torch']:.0f} tok/s (bound ratio "
          f"{rf['bound_ratio']:.2f}x); the {SAMPLE_TARGET}x target "
          f"({rf['target_tokens_per_s']:.0f} tok/s) is "
          f"{rf['target_tokens_per_s'] / rf['bandwidth_bound_tokens_per_s']['rlhf_jax']:.1f}x "
          f"our bound.")
  print(f"rlhf_jax config: train scan_layers={FLAGS.train_scan_layers}, sampler scan_layers="
        f"{FLAGS.sample_scan_layers}, dtype={FLAGS.dtype}, param_dtype=float32")
  print(f"torch threads: {json.dumps(result.get('torch_threads'))}; attention={ts.attn_impl}")
  print(f"jax first train step (compile) {result.get('jax_first_step_s', float('nan')):.1f}s, "
        f"first sample call {result.get('jax_first_sample_s', float('nan')):.1f}s")
  if "breakdown_s" in result:
    print("breakdown (median s): " + json.dumps(result["breakdown_s"]))
  print(f"load after: {result['uptime_after']}")
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
