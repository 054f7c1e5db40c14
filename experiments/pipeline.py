r"""The full offline pipeline on the synthetic default, one command:

  python experiments/pipeline.py                     # -> workdirs/pipeline/{results.md,results.csv,frontier.png}

(``rlhf-pipeline`` once installed with ``pip install -e .``). SFT -> reward model -> DPO, IPO, PRO,
RRHF, RAFT, best-of-n, each in ``<workdir>/<stage>``: every stage's section is that method's own
experiment config (``config.<stage>.method`` names it) and runs through the method registry, as
``experiments/run.py`` would run it, then one table and one gold-reward-vs-KL frontier plot.
Stages are linked through their ``sources`` section alone: a stage after ``sft`` gets
``sources.sft_workdir = <workdir>/sft``, a stage after ``rm`` gets
``sources.reward_model_workdir = <workdir>/rm`` (when that run finished).

A stage whose workdir holds ``final_metrics.json`` is reused, so rerunning after an interruption
(or after deleting one stage's folder) only redoes what is missing; an interrupted stage resumes
from its checkpoint. Progress: a banner per stage with elapsed / total time, and the training
loops' step / loss / tokens-per-second / ETA lines in between.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax import cli, parallel, train
from rlhf_jax.algorithms import registry
from rlhf_jax.eval import frontier
from rlhf_jax.train import signals

logger = logging.getLogger("pipeline")

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "pipeline_synthetic.py"),
    "Pipeline config (default: experiments/configs/pipeline_synthetic.py).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/pipeline", "Root folder of every stage's run.")

STAGE_TIMES_FILE = "pipeline_stage_time.json"
# (stage, sources key): a finished run of the stage is linked into every stage after it.
LINKS = (("sft", "sft_workdir"), ("rm", "reward_model_workdir"))
REQUIRED_STAGES = ("sft", "rm")  # a later stage needs them: the pipeline stops if one fails
COLUMNS = ("method", "gold_reward", "gold_gain_vs_sft", "kl_to_sft", "win_rate_vs_sft", "rm_reward",
           "response_length", "steps", "stage_seconds", "stage_cpu_seconds", "status")


def _link(name: str, cfg, root: str) -> None:
  """Points a stage's ``sources`` at the finished SFT / RM runs of this pipeline before it."""
  for producer, key in LINKS:
    if producer == name:  # a stage links only the runs before it
      break
    run_dir = os.path.join(root, producer)
    if train.is_finished(run_dir):
      cfg.sources[key] = run_dir


def stage_names(config) -> list[str]:
  """``config.stages`` checked against the stage sections of the config."""
  stages = [s.strip() for s in config.stages.split(",") if s.strip()]
  known = [k for k in config.keys() if k != "stages"]
  unknown = [s for s in stages if s not in known]
  if unknown:
    raise ValueError(f"config.stages has unknown stage(s) {unknown}; allowed: {known}")
  for name in stages:
    if "method" not in config[name]:
      raise ValueError(f"config.{name} has no `method` key; allowed: "
                       f"{' | '.join(registry.METHODS)}")
    registry.get(config[name].method)  # an unknown method names the allowed ones
  return stages


def run_stage(name: str, cfg, root: str, index: int, total: int, start: float) -> dict:
  # Multi-process: every process decides "reuse or run" and the links from the same files (the
  # previous stage's final_metrics.json, written by process 0).
  parallel.sync(f"pipeline_stage_{name}")
  workdir = os.path.join(root, name)
  final_path = os.path.join(workdir, "final_metrics.json")
  banner = f"[{index}/{total}] {name}"
  times_path = os.path.join(workdir, STAGE_TIMES_FILE)
  if os.path.exists(final_path):
    logger.info("%s: finished earlier, reusing %s", banner, workdir)
    with open(final_path) as f:
      final = json.load(f)
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    return {
        **final, "_status": "reused", "_seconds": times.get("seconds"),
        "_cpu_seconds": times.get("cpu_seconds")}
  logger.info("%s: running in %s (pipeline time so far %s)", banner, workdir,
              train.format_duration(time.time() - start))
  _link(name, cfg, root)
  t0, c0 = time.time(), time.process_time()
  try:
    final = registry.get(cfg.method)(cfg, workdir)
  except Exception as err:  # the table reports a failed stage instead of hiding it
    failure = None if cli.debug_requested(sys.argv) else cli.describe_failure(err, workdir)
    if failure is None:  # a bug (or --debug / RLHF_JAX_DEBUG=1): keep the traceback
      logger.exception("%s failed", banner)
    else:
      logger.error("%s failed: %s", banner, failure[0])
    return {"_status": f"failed: {type(err).__name__}: {err}"[:200], "_seconds": time.time() - t0}
  # CPU seconds of this process (all threads): comparable across machines / loads, unlike wall time
  seconds, cpu = time.time() - t0, time.process_time() - c0
  if parallel.is_coordinator():
    train.atomic_write_json(times_path,
                            {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)})
  logger.info("%s: done in %s, %s CPU (pipeline time so far %s)", banner,
              train.format_duration(seconds), train.format_duration(cpu),
              train.format_duration(time.time() - start))
  return {**final, "_status": "ok", "_seconds": seconds, "_cpu_seconds": cpu}


def _eval_curve(workdir: str) -> list[tuple[float, float]]:
  """(kl, gold) of every evaluation a policy stage logged, for the frontier plot."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  points = []
  for line in open(path):
    row = json.loads(line)
    if row.get("split") == "eval" and isinstance(row.get("kl_to_sft"), float):
      points.append((row["kl_to_sft"], row["gold_reward"]))
  return points


def machine_description() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count()} logical CPUs visible, Python {platform.python_version()}"


def summarize(results: dict, root: str, total_seconds: float, command: str,
              total_cpu_seconds: float | None = None) -> str:
  """Writes results.csv / results.md / frontier.png under ``root``; returns the markdown table."""
  sft_final = results.get("sft", {})
  baseline = None
  policy_stages = [name for name in results if name not in REQUIRED_STAGES]
  for name in policy_stages:  # every policy stage evaluates the same SFT samples
    if isinstance(results.get(name, {}).get("sft_gold_reward"), float):
      baseline = results[name]["sft_gold_reward"]
      break
  rows = [{
      "method": "sft", "gold_reward": baseline,
      "gold_gain_vs_sft": 0.0 if baseline is not None else None, "kl_to_sft": 0.0,
      "steps": sft_final.get("step"), "stage_seconds": sft_final.get("_seconds"),
      "stage_cpu_seconds": sft_final.get("_cpu_seconds"), "status": sft_final.get("_status")}]
  rm_final = results.get("rm")
  if rm_final is not None:
    rows.append({
        "method": "reward model", "steps": rm_final.get("step"),
        "stage_seconds": rm_final.get("_seconds"),
        "stage_cpu_seconds": rm_final.get("_cpu_seconds"), "status": rm_final.get("_status")})
  curves, points = {}, []
  for name in policy_stages:
    final = results[name]
    label = final.get("method", name) if name != "ipo" else "ipo"
    gold = final.get("gold_reward")
    row = {
        "method": label, "gold_reward": gold, "kl_to_sft": final.get("kl_to_sft"),
        "win_rate_vs_sft": final.get("win_rate_vs_sft"), "rm_reward": final.get("rm_reward"),
        "response_length": final.get("response_length"), "steps": final.get("step"),
        "stage_seconds": final.get("_seconds"), "stage_cpu_seconds": final.get("_cpu_seconds"),
        "status": final.get("_status")}
    if isinstance(gold, float) and baseline is not None:
      row["gold_gain_vs_sft"] = gold - baseline
    rows.append(row)
    if isinstance(gold, float):
      points.append({"label": label, "kl_to_sft": final.get("kl_to_sft"), "gold_reward": gold})
    if name == "best_of_n" and final.get("curve"):
      curves["best-of-n (analytic KL)"] = [
          (r["kl_to_sft"], r["gold_reward"]) for r in final["curve"]]
    elif name != "best_of_n":
      curve = _eval_curve(os.path.join(root, name))
      if len(curve) > 1:
        curves[f"{label} (evals)"] = [(0.0, baseline)] + curve if baseline is not None else curve
  preamble = (f"Command: `{command}`  \nMachine: {machine_description()}  \n"
              f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  \n"
              f"Pipeline wall time (this invocation): {train.format_duration(total_seconds)}" +
              (f", CPU time {train.format_duration(total_cpu_seconds)}" if total_cpu_seconds
               is not None else "") + f"; load average at the end {os.getloadavg()[0]:.1f}  \n"
              "gold_reward: mean exact gold reward of one sample per held-out prompt; kl_to_sft: "
              "sampled KL(π ‖ π_SFT) per response (best-of-n: log n - (n-1)/n); win rate vs the "
              "SFT model's sample under the gold reward (ties half).")
  table = frontier.write_table(rows, COLUMNS, csv_path=os.path.join(root, "results.csv"),
                               md_path=os.path.join(root, "results.md"),
                               title="Offline pipeline on the synthetic task", preamble=preamble)
  frontier.plot_frontier(points, os.path.join(root, "frontier.png"), curves=curves,
                         sft_gold=baseline, title="Synthetic task: gold reward vs KL to SFT")
  return table


def run_pipeline(config, root: str, command: str = "") -> dict:
  stages = stage_names(config)
  os.makedirs(root, exist_ok=True)
  start, cpu_start = time.time(), time.process_time()
  results = {}
  for i, name in enumerate(stages, 1):
    if signals.stop_requested() is not None:  # a stage was stopped by SIGTERM / Ctrl-C
      logger.warning("stop signal received: not starting stage %s; rerun to resume", name)
      break
    results[name] = run_stage(name, config[name], root, i, len(stages), start)
    if name in REQUIRED_STAGES and results[name]["_status"].startswith("failed"):
      logger.error("stage %s failed; the later stages need it, stopping", name)
      break
  parallel.sync("pipeline_summary")  # the stages' files are on disk for every process
  table = parallel.write_on_coordinator(summarize, results, root,
                                        time.time() - start, command or " ".join(sys.argv),
                                        time.process_time() - cpu_start)
  if table is not None:  # process 0 wrote it
    logger.info("pipeline finished in %s; results in %s\n%s",
                train.format_duration(time.time() - start), os.path.join(root, "results.md"), table)
  return results


def main(argv):
  program = sys.argv[0]  # the script, or the rlhf-pipeline console script
  program = f"python {os.path.relpath(program)}" if program.endswith(".py") else \
      os.path.basename(program)
  command = " ".join([program] + sys.argv[1:])
  cli.stage_launcher_main(argv, lambda config, root: run_pipeline(config, root, command),
                          _CONFIG.value, _WORKDIR.value, what="pipeline")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
