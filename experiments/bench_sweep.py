r"""Vectorised vs sequential sweep: 8 DPO points (4 β x 2 loss types) of the synthetic default.

  python experiments/bench_sweep.py            # the pipeline's DPO stage (0.62M model, 120 steps,
                                               # 2 evaluations of 128 prompts x 48 tokens)
  python experiments/bench_sweep.py --quick    # tiny preset, 4 steps, 4 prompts x 8 tokens

Both sides start from the same finished SFT run (``--sft_workdir``, default: made here with the
pipeline's SFT stage, or the tiny one with ``--quick``; not timed) and train the same 8 configs:
sequential = one ``dpo.train_and_evaluate`` after the other in this process (each compiles its own
step, as a separate process would, but without the process start: the conservative baseline);
vectorised = ``algorithms.offline.vectorized.train_sweep`` (one jitted program for the 8 runs).
Wall time includes compilation, data preparation and the evaluations of every run (the vectorised
side also reports its set-up / evaluation / training split); the jit caches are cleared before each
side and the one-time imports done before either is timed. ``--no_share_eval`` evaluates every
run of the vectorised side on its own (what the per-sweep SFT samples and the vmapped held-out
metrics save). Then every
point's final metrics and final params are compared with its sequential run. Prints a table and
writes ``<workdir>/bench_sweep.json``. Results: BUILD_NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

BETAS = (0.05, 0.1, 0.2, 0.5)
LOSS_TYPES = ("sigmoid", "ipo")
COMPARED = ("gold_reward", "kl_to_sft", "win_rate_vs_sft", "pairs/rewards/margins",
            "pairs/rewards/accuracies")


def stage_configs(quick: bool):
  """(sft config, dpo config) of the pipeline (``pipeline_synthetic.py``, smoke size if quick)."""
  from rlhf_jax.train import config_dicts  # pylint: disable=import-outside-toplevel

  pipeline = config_dicts.sibling_config(os.path.join(REPO, "experiments", "configs", "x.py"),
                                         "pipeline_synthetic", "smoke" if quick else "default")
  sft, dpo_cfg = pipeline.sft, pipeline.dpo
  quiet = {"loop.progress_every_secs": 60.0, "eval.print_samples": 0}
  config_dicts.set_dotted(dpo_cfg, quiet)
  if quick:
    config_dicts.set_dotted(dpo_cfg,
                            {"loop.num_steps": 4, "loop.log_every": 2, "loop.checkpoint_every": 4})
  return sft, dpo_cfg


def points(base) -> list[tuple[str, object]]:
  from rlhf_jax.train import config_dicts  # pylint: disable=import-outside-toplevel

  out = []
  for loss_type in LOSS_TYPES:
    for beta in BETAS:
      cfg = base.copy_and_resolve_references()
      config_dicts.set_dotted(cfg, {"loss.loss_type": loss_type, "loss.beta": beta})
      out.append((f"{loss_type}_beta{beta}", cfg))
  return out


def compare(seq_dir: str, vec_dir: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from rlhf_jax import train  # pylint: disable=import-outside-toplevel

  a = json.load(open(os.path.join(seq_dir, train.FINAL_METRICS_FILE)))
  b = json.load(open(os.path.join(vec_dir, train.FINAL_METRICS_FILE)))
  diffs = {k: abs(a[k] - b[k]) for k in COMPARED if k in a and k in b}
  pa, pb = train.restore_params(seq_dir), train.restore_params(vec_dir)
  diffs["params_max_abs"] = max(
      float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
      for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))

  def samples(d):
    with open(os.path.join(d, "samples.jsonl"), encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]

  sa, sb = samples(seq_dir), samples(vec_dir)
  # the sampled text decides "same samples"; the per-sample KL is a float (rounded to 1e-4 in the
  # file) that differs in the last digit when the params do
  diffs["same_samples"] = [(x["prompt"], x["response"]) for x in sa] == [
      (x["prompt"], x["response"]) for x in sb]
  diffs["samples_differing"] = sum(x["response"] != y["response"] for x, y in zip(sa, sb))
  return {"sequential": {k: a.get(k) for k in COMPARED}, "diffs": diffs}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny preset, seconds per run")
  parser.add_argument("--workdir", default="/tmp/bench_sweep", help="runs go here (replaced)")
  parser.add_argument("--sft_workdir", default="",
                      help="a finished SFT run to start from (default: train one, not timed)")
  parser.add_argument("--skip_sequential", action="store_true",
                      help="time the vectorised sweep only")
  parser.add_argument(
      "--no_share_eval", action="store_true",
      help="evaluate every run on its own (no per-sweep SFT samples, no vmapped "
      "held-out metrics): what the sharing saves")
  args = parser.parse_args(argv)
  import logging  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.WARNING)

  from rlhf_jax import train  # pylint: disable=import-outside-toplevel
  from rlhf_jax.algorithms import sft  # pylint: disable=import-outside-toplevel
  from rlhf_jax.algorithms.offline import dpo  # pylint: disable=import-outside-toplevel
  from rlhf_jax.algorithms.offline import vectorized  # pylint: disable=import-outside-toplevel
  from rlhf_jax.train import vectorized as vec_lib  # pylint: disable=import-outside-toplevel

  sft_cfg, dpo_cfg = stage_configs(args.quick)
  sft_dir = args.sft_workdir or os.path.join(args.workdir + "_sft",
                                             "quick" if args.quick else "default")
  if not train.is_finished(sft_dir):
    print(f"training the SFT start point in {sft_dir} (not timed)", flush=True)
    sft.train_and_evaluate(sft_cfg, sft_dir)
  dpo_cfg.sources.sft_workdir = sft_dir
  grid = points(dpo_cfg)
  shutil.rmtree(args.workdir, ignore_errors=True)
  result = {"points": [n for n, _ in grid], "quick": args.quick}

  # Neither side pays the other's compiles or this process's one-time imports: the metrics
  # writer's tensorboardX (which imports torch, ~2.6 s) is imported here, and the jit caches are
  # cleared before each side (else the sequential runs would reuse the vectorised side's
  # sampler and log-prob compiles).
  import tensorboardX  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  import jax  # pylint: disable=import-outside-toplevel

  print(f"vectorised: {len(grid)} runs as one program", flush=True)
  jax.clear_caches()
  t0, c0 = time.time(), time.process_time()
  vec_dirs = [os.path.join(args.workdir, "vectorized", n) for n, _ in grid]
  # train_sweep = build_runs + train_vectorized; called apart to time set-up and evaluation
  runs = vectorized.build_runs([c for _, c in grid], vec_dirs, [n for n, _ in grid],
                               share_eval=not args.no_share_eval)
  setup_seconds = time.time() - t0
  timings: dict = {}
  outcomes = vec_lib.train_vectorized(runs, timings=timings)
  result["vectorized_seconds"] = round(time.time() - t0, 1)
  result["vectorized_cpu_seconds"] = round(time.process_time() - c0, 1)
  result["share_eval"] = not args.no_share_eval
  # train = the jitted steps incl. their compile, data feeding, checkpoints, metrics, finish
  result["vectorized_breakdown"] = {
      "setup_seconds": round(setup_seconds, 1), "eval_seconds": round(timings["eval_seconds"], 1),
      "heldout_seconds": round(timings["heldout_seconds"], 1),
      "train_seconds": round(result["vectorized_seconds"] - setup_seconds - timings["eval_seconds"],
                             1)}
  result["frozen"] = [o.name for o in outcomes if o.frozen]
  print(f"  {result['vectorized_seconds']}s {result['vectorized_breakdown']}", flush=True)

  if not args.skip_sequential:
    jax.clear_caches()
    t0, c0 = time.time(), time.process_time()
    seq_dirs, per_run = [], []
    for name, cfg in grid:
      print(f"sequential: {name}", flush=True)
      seq_dirs.append(os.path.join(args.workdir, "sequential", name))
      start = time.time()
      dpo.train_and_evaluate(cfg, seq_dirs[-1])
      per_run.append(round(time.time() - start, 1))
    result["sequential_run_seconds"] = per_run
    result["sequential_seconds"] = round(time.time() - t0, 1)
    result["sequential_cpu_seconds"] = round(time.process_time() - c0, 1)
    result["speedup"] = round(result["sequential_seconds"] / result["vectorized_seconds"], 2)
    # Roofline terms. Cores busy = CPU / wall seconds: a sequential run that already keeps the
    # machine's cores busy leaves little for one vectorised program to fill. The bound: the
    # speed-up if the vectorised side paid nothing but its measured training steps (set-up and
    # evaluation free), i.e. what removing per-run overheads alone can give.
    result["sequential_cores_busy"] = round(
        result["sequential_cpu_seconds"] / result["sequential_seconds"], 2)
    result["vectorized_cores_busy"] = round(
        result["vectorized_cpu_seconds"] / result["vectorized_seconds"], 2)
    result["speedup_bound_steps_only"] = round(
        result["sequential_seconds"] / result["vectorized_breakdown"]["train_seconds"], 2)
    result["per_point"] = {n: compare(s, v) for (n, _), s, v in zip(grid, seq_dirs, vec_dirs)}
    worst = {}
    for entry in result["per_point"].values():
      for k, v in entry["diffs"].items():
        if k not in ("same_samples", "samples_differing"):
          worst[k] = max(worst.get(k, 0.0), v)
    result["max_diffs"] = worst
    result["all_samples_equal"] = all(
        e["diffs"]["same_samples"] for e in result["per_point"].values())
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "bench_sweep.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items() if k != "per_point"}, indent=1))
  return result


if __name__ == "__main__":
  main()
