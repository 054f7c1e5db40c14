r"""The full offline pipeline on the synthetic default, one command:

  python experiments/pipeline.py                     # -> workdirs/pipeline/{results.md,results.csv,frontier.png}
  python experiments/pipeline.py --report_only       # the table of what has finished, no training

(``rlhf-pipeline`` once installed with ``pip install -e .``). SFT -> reward model -> DPO, IPO, PRO,
RRHF, RAFT, best-of-n, each in ``<workdir>/<stage>``: every stage's section is that method's own
experiment config (``config.<stage>.method`` names it) and runs through the method registry, as
``experiments/run.py`` would run it, then one table and one gold-reward-vs-KL frontier plot.
Stages are linked through their ``sources`` section alone: a stage after ``sft`` gets
``sources.sft_workdir = <workdir>/sft``, a stage after ``rm`` gets
``sources.reward_model_workdir = <workdir>/rm`` (when that run finished).

Seeds (``--config.num_seeds=N``, default 3): seed k runs the whole pipeline again with every RNG
seed of every stage offset by k (``rlhf_jax.algorithms.seeding.seed_config``: init, data order,
the evaluator's and best-of-n's sampling, RAFT's rounds; the synthetic task, ``data.synthetic_seed``, stays fixed),
seed 0 in ``<workdir>/<stage>`` (today's paths: a finished one-seed pipeline is reused as seed 0,
and the configs that point at ``workdirs/pipeline/sft`` keep working), seed k > 0 in
``<workdir>/seed_<k>/<stage>``. Stages run stage by stage over the seeds (every seed's SFT, then
every seed's RM, ...). The table then reports mean ± standard error over the seeds
(``rlhf_jax.eval.seeds``), paired gold-reward differences and each seed's rows; with one seed it is
the single-run table.

A stage whose workdir holds ``final_metrics.json`` is reused, so rerunning after an interruption
(or after deleting one stage's folder) only redoes what is missing; an interrupted stage resumes
from its checkpoint. Progress: a banner per stage with elapsed / total time, and the training
loops' step / loss / tokens-per-second / ETA lines in between.
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import sys
import time

from absl import app, flags

from rlhf_jax import cli, fileio, parallel, train
from rlhf_jax.algorithms import registry
# seed k of a stage (every seed key + k but the task's), its directory, the config's seed count
from rlhf_jax.algorithms.seeding import num_seeds, seed_config, seed_keys, seed_root
from rlhf_jax.eval import frontier, seeds
from rlhf_jax.train import runs as train_runs
from rlhf_jax.train import signals

logger = logging.getLogger("pipeline")

STAGE_TIMES_FILE = "pipeline_stage_time.json"
# (stage, sources key): a finished run of the stage is linked into every stage after it.
LINKS = (("sft", "sft_workdir"), ("rm", "reward_model_workdir"))
REQUIRED_STAGES = ("sft", "rm")  # a later stage needs them: the pipeline stops if one fails
COLUMNS = ("method", "gold_reward", "gold_gain_vs_sft", "kl_to_sft", "win_rate_vs_sft", "rm_reward",
           "response_length", "steps", "stage_seconds", "stage_cpu_seconds", "status")
# Over several seeds: mean ± s.e. of these, the mean of the others.
STAT_COLUMNS = ("gold_reward", "gold_gain_vs_sft", "kl_to_sft", "win_rate_vs_sft")
MEAN_COLUMNS = ("rm_reward", "response_length", "steps", "stage_seconds", "stage_cpu_seconds")
SEED_CSV_COLUMNS = ("method", "seed", "num_seeds",
                    *[c for s in STAT_COLUMNS for c in (s, f"{s}_se")], *MEAN_COLUMNS, "status")
SEED_MD_COLUMNS = ("method", *STAT_COLUMNS, *MEAN_COLUMNS, "seeds", "status")
PER_SEED_MD_COLUMNS = ("method", "seed", *STAT_COLUMNS, "stage_seconds", "status")
CONFIG_KEYS = ("stages", "num_seeds")  # the pipeline's own keys; every other key is a stage


def _link(name: str, cfg, root: str) -> None:
  """Points a stage's ``sources`` at the finished SFT / RM runs of this pipeline before it."""
  for producer, key in LINKS:
    if producer == name:  # a stage links only the runs before it
      break
    run_dir = fileio.join(root, producer)
    if train.is_finished(run_dir):
      cfg.sources[key] = run_dir


def stage_names(config) -> list[str]:
  """``config.stages`` checked against the stage sections of the config."""
  stages = [s.strip() for s in config.stages.split(",") if s.strip()]
  known = [k for k in config.keys() if k not in CONFIG_KEYS]
  unknown = [s for s in stages if s not in known]
  if unknown:
    raise ValueError(f"config.stages has unknown stage(s) {unknown}; allowed: {known}")
  for name in stages:
    if "method" not in config[name]:
      raise ValueError(f"config.{name} has no `method` key; allowed: "
                       f"{' | '.join(registry.METHODS)}")
    registry.get(config[name].method)  # an unknown method names the allowed ones
  return stages


FAILED_FINAL_FILE = train_runs.FAILED_FINAL_FILE  # the one name train.run_or_reuse uses too
_AGREEMENTS = itertools.count()  # every process calls agree_stage_outcome in the same order


def agree_stage_outcome(key: str, failed: str | None, *, final_path: str,
                        **agree_kwargs) -> str | None:
  """Every process's outcome of stage ``key`` -> the first failure in process order, or None.

  ``parallel.agree_outcome`` (through the coordination service's key-value store, under
  ``rlhf_jax/pipeline/<key>/<process>``, with deadlines; ``agree_kwargs`` go to it): so on every
  process the stage is either finished or failed with the same status. A failure anywhere:
  process 0 moves a ``final_metrics.json`` it wrote to ``final_metrics.failed.json``, so the rerun
  does not take the stage as finished. A peer that does not report in time raises
  ``parallel.AgreementTimeout``; the caller ends this process.
  """
  failed = parallel.agree_outcome(key, failed, namespace="rlhf_jax/pipeline", **agree_kwargs)
  me = agree_kwargs.get("process_index")
  me = parallel.process_index() if me is None else me
  if failed is not None and me == 0:
    train_runs.set_aside_failed(final_path)
  return failed


def run_stage(name: str, cfg, root: str, index: int, total: int, start: float,
              seed: int | None = None) -> dict:
  # Multi-process: every process decides "reuse or run" and the links from the same files (the
  # previous stage's final_metrics.json, written by process 0).
  key = name + ("" if seed is None else f"_seed{seed}")
  parallel.sync(f"pipeline_stage_{key}")
  workdir = fileio.join(root, name)
  final_path = fileio.join(workdir, train.FINAL_METRICS_FILE)
  banner = f"[{index}/{total}] {name}" + ("" if seed is None else f" (seed {seed})")
  times_path = fileio.join(workdir, STAGE_TIMES_FILE)
  if parallel.agree(fileio.exists(final_path)):  # process 0's answer: one branch everywhere
    logger.info("%s: finished earlier, reusing %s", banner, workdir)
    final = fileio.read_json(final_path)
    times = fileio.read_json(times_path) if fileio.exists(times_path) else {}
    return {
        **final, "_status": "reused", "_seconds": times.get("seconds"),
        "_cpu_seconds": times.get("cpu_seconds")}
  logger.info("%s: running in %s (pipeline time so far %s)", banner, workdir,
              train.format_duration(time.time() - start))
  _link(name, cfg, root)
  t0, c0 = time.time(), time.process_time()
  failed = None  # this process's one-line failure
  try:
    final = registry.run(cfg.method, cfg, workdir)
  except Exception as err:  # the table reports a failed stage instead of hiding it
    failure = None if cli.debug_requested(sys.argv) else cli.describe_failure(err, workdir)
    if failure is None:  # a bug (or --debug / RLHF_JAX_DEBUG=1): keep the traceback
      logger.exception("%s failed", banner)
    else:
      logger.error("%s failed: %s", banner, failure[0])
    failed = f"failed: {type(err).__name__}: {err}"[:200]
  if parallel.process_count() > 1:  # every process takes the same branch: failed on one = on all
    try:  # numbered: the same stage of a second run_pipeline call in this job gets fresh keys
      failed = agree_stage_outcome(f"{key}/{next(_AGREEMENTS)}", failed, final_path=final_path)
    except parallel.AgreementTimeout as err:
      logger.error("%s: %s", banner, err)
      cli.quiet_exit(1)  # now, not at jax's shutdown barrier: our exit unblocks the peers
  if failed is not None:
    return {"_status": failed, "_seconds": time.time() - t0}
  # CPU seconds of this process (all threads): comparable across machines / loads, unlike wall time
  seconds, cpu = time.time() - t0, time.process_time() - c0
  if final.get("preempted"):  # stopped by SIGTERM: no final_metrics.json, a rerun resumes it
    logger.warning("%s: stopped after %s at step %s; rerun to resume", banner,
                   train.format_duration(seconds), final.get("step"))
    return {**final, "_status": "stopped (rerun resumes)", "_seconds": seconds, "_cpu_seconds": cpu}
  if parallel.is_coordinator():
    train.atomic_write_json(times_path,
                            {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)})
  logger.info("%s: done in %s, %s CPU (pipeline time so far %s)", banner,
              train.format_duration(seconds), train.format_duration(cpu),
              train.format_duration(time.time() - start))
  return {**final, "_status": "ok", "_seconds": seconds, "_cpu_seconds": cpu}


def _eval_curve(workdir: str) -> list[tuple[float, float]]:
  """(kl, gold) of every evaluation a policy stage logged, for the frontier plot."""
  path = fileio.join(workdir, "metrics.jsonl")
  if not fileio.exists(path):
    return []
  points = []
  for row in fileio.read_jsonl(path):
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


def seed_table(results: dict, root: str) -> tuple[list[dict], list[dict], dict, float | None]:
  """One seed's table rows, frontier points, curves and SFT gold reward (its stages in ``root``)."""
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
      curve = _eval_curve(fileio.join(root, name))
      if len(curve) > 1:
        curves[f"{label} (evals)"] = [(0.0, baseline)] + curve if baseline is not None else curve
  return rows, points, curves, baseline


def _preamble(command: str, total_seconds: float, total_cpu_seconds: float | None) -> str:
  return (f"Command: `{command}`  \nMachine: {machine_description()}  \n"
          f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  \n"
          f"Pipeline wall time (this invocation): {train.format_duration(total_seconds)}" +
          (f", CPU time {train.format_duration(total_cpu_seconds)}" if total_cpu_seconds is not None
           else "") + f"; load average at the end {os.getloadavg()[0]:.1f}  \n"
          "gold_reward: mean exact gold reward of one sample per held-out prompt; kl_to_sft: "
          "sampled KL(π ‖ π_SFT) per response (best-of-n: log n - (n-1)/n); win rate vs the "
          "SFT model's sample under the gold reward (ties half).")


def mean_curves(curves_by_seed: list[dict]) -> dict:
  """Each curve averaged point by point over the seeds that have it with the same length (the
  evaluations of a stage happen at the same steps in every seed); others from the first seed."""
  out = {}
  for label in curves_by_seed[0]:
    found = [c[label] for c in curves_by_seed if label in c]
    if len(found) > 1 and len({len(c) for c in found}) == 1:
      kl = [seeds.mean_se(c[i][0] for c in found).mean for i in range(len(found[0]))]
      gold = [seeds.mean_se(c[i][1] for c in found).mean for i in range(len(found[0]))]
      out[f"{label}, mean of {len(found)} seeds"] = list(zip(kl, gold))
    else:
      out[f"{label}, seed 0"] = found[0]
  return out


def gold_differences(per_seed_rows: list[list[dict]], methods: list[str]) -> tuple[str, list[str]]:
  """Markdown matrix of paired gold-reward differences (row − column) and the supported orderings."""
  gold = {
      m: [
          next((r.get("gold_reward") for r in rows if r["method"] == m),
               None) for rows in per_seed_rows] for m in methods}
  lines = [
      "| row − column | " + " | ".join(methods) + " |",
      "|" + "|".join(" --- " for _ in range(len(methods) + 1)) + "|"]
  claims = []
  for a in methods:
    cells = []
    for b in methods:
      if a == b:
        cells.append("")
        continue
      diff = seeds.paired_difference(gold[a], gold[b])
      text = seeds.format_mean_se(diff) if diff.mean is not None else ""
      if seeds.supported(diff):
        text = f"**{text}**"
        if diff.mean > 0:
          claims.append(f"{a} > {b} ({seeds.format_mean_se(diff)})")
      cells.append(text)
    lines.append(f"| {a} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n", claims


def summarize(results: list[dict] | dict, root: str, total_seconds: float, command: str,
              total_cpu_seconds: float | None = None) -> str:
  """Writes results.csv / results.md / frontier.png under ``root``; returns the markdown table.

  ``results``: one ``{stage: final metrics}`` per seed (seed k's stages in :func:`seed_root`); one
  seed (or a bare dict) writes the single-run table, several the mean ± s.e. table (module
  docstring; the CSV has a ``mean`` row per method, then every seed's rows).
  """
  if isinstance(results, dict):
    results = [results]
  tables = [seed_table(r, seed_root(root, k)) for k, r in enumerate(results)]
  preamble = _preamble(command, total_seconds, total_cpu_seconds)
  csv_path, md_path = fileio.join(root, "results.csv"), fileio.join(root, "results.md")
  png_path = fileio.join(root, "frontier.png")
  title = "Offline pipeline on the synthetic task"
  plot_title = "Synthetic task: gold reward vs KL to SFT"
  if len(results) == 1:
    rows, points, curves, baseline = tables[0]
    table = frontier.write_table(rows, COLUMNS, csv_path=csv_path, md_path=md_path, title=title,
                                 preamble=preamble)
    frontier.plot_frontier(points, png_path, curves=curves, sft_gold=baseline, title=plot_title)
    return table

  n = len(results)
  per_seed_rows = [[{**row, "seed": k} for row in t[0]] for k, t in enumerate(tables)]
  agg = seeds.aggregate_rows(per_seed_rows, STAT_COLUMNS, MEAN_COLUMNS)
  frontier.write_table([{**r, "seed": "mean"} for r in agg] +
                       [r for rows in per_seed_rows for r in rows], SEED_CSV_COLUMNS,
                       csv_path=csv_path, md_path=None)
  shown = [{
      **{c: r.get(c) for c in MEAN_COLUMNS}, "method": r["method"], "seeds": r["num_seeds"],
      "status": r["status"],
      **{c: seeds.format_mean_se(r[f"{c}_stat"]) for c in STAT_COLUMNS}} for r in agg]
  methods = [r["method"] for r in agg if r["gold_reward"] is not None]
  diffs, claims = gold_differences(per_seed_rows, methods)
  stage_sums = ", ".join(
      f"seed {k} {train.format_duration(sum(r.get('_seconds') or 0.0 for r in res.values()))}"
      for k, res in enumerate(results))
  preamble += (f"  \nSeeds: {n} (seed k offsets every RNG seed of every stage by k; the synthetic "
               "task is fixed); each number is the mean ± standard error over the seeds "
               f"(s / √n); stage wall time summed per seed: {stage_sums}.")
  postscript = (
      "\n## Gold reward differences, paired by seed\n\nMean ± s.e. of the per-seed difference "
      "(the methods of one seed share its SFT model, reward model and evaluation samples); **bold**: "
      f"|mean| > 2 s.e. (with {n} seeds a screen, not a significance test).\n\n" + diffs +
      "\nSupported orderings: " + ("; ".join(claims) if claims else "none") + ".\n"
      "\n## Each seed\n\n" +
      frontier.markdown_table([r for rows in per_seed_rows for r in rows], PER_SEED_MD_COLUMNS))
  table = frontier.write_table(shown, SEED_MD_COLUMNS, csv_path=None, md_path=md_path,
                               title=f"{title} ({n} seeds)", preamble=preamble,
                               postscript=postscript)
  points = [{
      "label": r["method"], "kl_to_sft": r["kl_to_sft"], "gold_reward": r["gold_reward"],
      "kl_to_sft_se": r["kl_to_sft_se"], "gold_reward_se": r["gold_reward_se"]}
            for r in agg
            if r["method"] not in ("sft", "reward model")]
  seed_points = [{
      "label": p["label"], "kl_to_sft": p["kl_to_sft"], "gold_reward": p["gold_reward"]}
                 for t in tables
                 for p in t[1]]
  sft = agg[0]
  seed_points += [{"label": "SFT", "kl_to_sft": 0.0, "gold_reward": t[3]} for t in tables]
  frontier.plot_frontier(points, png_path, curves=mean_curves([t[2] for t in tables]),
                         sft_gold=sft["gold_reward"], sft_gold_se=sft["gold_reward_se"],
                         seed_points=seed_points,
                         title=f"{plot_title} (mean ± s.e., {n} seeds; small: each seed)")
  return table


def run_pipeline(config, root: str, command: str = "", report_only: bool = False) -> list[dict]:
  """Runs every stage for every seed (stage by stage); returns one ``{stage: final}`` per seed.

  ``report_only``: reuses the finished stages, runs none, and writes their table (a run in progress
  or stopped part-way: the stages every seed has finished get their mean ± s.e. already).
  """
  stages = stage_names(config)
  n = num_seeds(config)
  root = fileio.absolute(root)  # a URL (gs://bucket/pipeline) stays a URL
  fileio.makedirs(root)
  start, cpu_start = time.time(), time.process_time()
  configs = [{name: seed_config(config[name], k) for name in stages} for k in range(n)]
  if n > 1:
    logger.info("%d seeds: seed k adds k to %s of each stage (seed k > 0 in %s)", n,
                sorted({key for name in stages for key in seed_keys(config[name])}),
                seed_root(root, 1).replace("seed_1", "seed_<k>"))
  results: list[dict] = [{} for _ in range(n)]
  stopped: set[int] = set()  # seeds whose SFT or RM failed
  index, total = 0, len(stages) * n
  for name in stages:
    for k in range(n):
      if signals.stop_requested() is not None:  # a stage was stopped by SIGTERM / Ctrl-C
        logger.warning("stop signal received: not starting stage %s; rerun to resume", name)
        break
      index += 1
      if k in stopped or (report_only and
                          not train.is_finished(fileio.join(seed_root(root, k), name))):
        continue
      results[k][name] = run_stage(name, configs[k][name], seed_root(root, k), index, total, start,
                                   seed=k if n > 1 else None)
      if name in REQUIRED_STAGES and results[k][name]["_status"].startswith("failed"):
        logger.error("stage %s%s failed; the later stages need it, stopping%s", name,
                     f" (seed {k})" if n > 1 else "", f" seed {k}" if n > 1 else "")
        stopped.add(k)
    if signals.stop_requested() is not None or len(stopped) == n:
      break
  parallel.sync("pipeline_summary")  # the stages' files are on disk for every process
  table = parallel.write_on_coordinator(summarize, results, root,
                                        time.time() - start, command or " ".join(sys.argv),
                                        time.process_time() - cpu_start)
  if table is not None:  # process 0 wrote it
    logger.info("pipeline finished in %s; results in %s\n%s",
                train.format_duration(time.time() - start), fileio.join(root, "results.md"), table)
  return results


def main(argv):
  program = sys.argv[0]  # the script, or the rlhf-pipeline console script
  program = f"python {os.path.relpath(program)}" if program.endswith(".py") else \
      os.path.basename(program)
  command = " ".join([program] + sys.argv[1:])
  cli.stage_launcher_main(
      argv, lambda config, root: run_pipeline(config, root, command, _REPORT_ONLY.value),
      _CONFIG.value, _WORKDIR.value, what="pipeline")


if __name__ == "__main__":
  _CONFIG, _WORKDIR = cli.define_stage_launcher_flags(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "pipeline_synthetic.py"),
      "workdirs/pipeline", "Pipeline")
  _REPORT_ONLY = flags.DEFINE_bool(
      "report_only", False,
      "Train nothing: write the table of the stages (and seeds) that finished.")
  app.run(main, flags_parser=cli.parse_flags)
