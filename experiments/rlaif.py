r"""RLAIF vs RLHF on the synthetic task, one command (stages: experiments/configs/rlaif_synthetic.py):

  python experiments/rlaif.py [--workdir=workdirs/rlaif] [--config.sources.feedback_workdir=DIR]

Each stage runs in ``<workdir>/<stage>``; one that finished (``final_metrics.json``) is reused, so a
rerun only redoes what is missing. Results: ``<workdir>/results.md``, ``results.json``, ``rlaif.png``.

One job over several processes (``launch/multiprocess_local.sh`` / ``launch/slurm.sbatch``): every
training stage runs on the global mesh (set each section's ``mesh``), d-RLAIF's rating on PPO's
mesh; labelling, the feedback model's data files and the report are process 0's, and every
stage's "finished earlier?" and outcome are agreed (``train.run_or_reuse``).
"""

from __future__ import annotations

import json
import logging
import os
import time

from absl import app
import numpy as np

from rlhf_jax import cli, fileio, parallel, train
from rlhf_jax.algorithms import registry
from rlhf_jax.algorithms.online import ppo
from rlhf_jax.feedback import evaluator as ev_lib
from rlhf_jax.feedback import feedback_model as fm_lib
from rlhf_jax.feedback import rlaif

logger = logging.getLogger("rlaif")
AI_LABELS = ("plain", "cot")  # config.label.ai_labels: the evaluator's answer the AI file holds


def _label(config, sft_dir: str, feedback: str, workdir: str) -> dict | None:
  """Samples the pairs, labels them (AI and simulated humans), writes JSONL and alignment.

  Multi-process: every process restores the policy and the evaluator (orbax restores are
  collective), process 0 alone samples, labels (on its first device) and writes; the others return
  None (``train.run_or_reuse`` then hands every process process 0's metrics)."""
  lab = config.label
  policy = train.load_sft_params(sft_dir)
  ev = ev_lib.load_evaluator(feedback, lab.pair_template, policy_tokenizer=policy.tokenizer,
                             batch_size=lab.batch_size)
  if not parallel.is_coordinator():
    return None
  task = fileio.join(sft_dir, "data", "synthetic")
  # training prompts in file order, with repeats (the task has 192 distinct prompts; each pair is
  # two fresh samples, so a repeated prompt is another comparison)
  rows = fileio.read_jsonl(fileio.join(task, "prompts.jsonl"))
  prompts = [r["prompt"] for r in rows][:lab.num_pairs]
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from rlhf_jax import models  # pylint: disable=import-outside-toplevel
  pairs = rlaif.sample_pairs(models.Transformer(policy.model_config), nn.meta.unbox(policy.params),
                             policy.tokenizer, prompts, max_prompt_len=lab.max_prompt_len,
                             max_new_tokens=lab.max_new_tokens, temperature=lab.temperature,
                             seed=config.seed)
  use_cot = lab.ai_labels == "cot"
  if use_cot and not ev.template.has_cot:
    raise ValueError(f"config.label.ai_labels='cot': the template {ev.template.source} has no "
                     "cot_ending / cot_answer; use a CoT template or label.ai_labels=plain")
  t0 = time.time()
  ai = rlaif.ai_labels(ev, pairs)
  ai_seconds = time.time() - t0
  ga, gb = pairs.gold_a, pairs.gold_b
  # chain of thought: on every pair when its labels are the AI labels, else on the first cot_pairs
  n_cot = len(pairs.prompts) if use_cot else min(lab.cot_pairs, len(pairs.prompts))
  cot, cot_seconds = None, 0.0
  if n_cot and ev.template.has_cot:
    sub = rlaif.Pairs(pairs.prompts[:n_cot], pairs.a[:n_cot], pairs.b[:n_cot], ga[:n_cot],
                      gb[:n_cot])
    t0 = time.time()
    cot = rlaif.ai_labels(ev, sub, cot=ev_lib.CotConfig(max_tokens=lab.cot_max_tokens))
    cot_seconds = time.time() - t0
  p_ai = cot.p_N if use_cot else ai.p_N  # what the AI label file (RM, DPO) trains on
  p_h, first_wins = rlaif.human_labels(pairs, lab.human_temperature, seed=config.seed)
  fileio.makedirs(workdir)
  rlaif.write_jsonl(fileio.join(workdir, "ai_pairs.jsonl"), rlaif.pairwise_records(pairs, p_ai))
  rlaif.write_jsonl(fileio.join(workdir, "human_pairs.jsonl"),
                    rlaif.pairwise_records(pairs, first_wins.astype(float), soft=False))
  from rlhf_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  distinct = ga != gb
  final = {
      "num_pairs": len(pairs.prompts), "pairs_with_distinct_gold": int(distinct.sum()),
      "human_bayes_accuracy": synthetic.bayes_optimal_accuracy(ga[distinct], gb[distinct],
                                                               lab.human_temperature),
      "human_label_accuracy": rlaif.alignment(first_wins.astype(float), ga, gb),
      "ai_label_file_alignment": rlaif.alignment(p_ai, ga, gb),
      "ai_alignment_both_orders": rlaif.alignment(ai.p_N, ga, gb),
      "ai_alignment_one_order": rlaif.alignment(ai.p_ab_N, ga,
                                                gb), "ai_position_bias_rate": ai.position_bias_rate,
      "ai_label_mass": ai.label_mass, "ai_mean_confidence": float(abs(ai.p_N - 0.5).mean() + 0.5),
      "ai_labelling_seconds": round(ai_seconds, 1), "ai_labels": lab.ai_labels}
  if cot is not None:
    final.update({
        "cot_pairs": n_cot,
        "ai_cot_alignment_both_orders": rlaif.alignment(cot.p_N, sub.gold_a, sub.gold_b),
        "ai_cot_alignment_one_order": rlaif.alignment(cot.p_ab_N, sub.gold_a, sub.gold_b),
        "ai_cot_position_bias_rate": cot.position_bias_rate,
        "ai_cot_mean_confidence": float(abs(cot.p_N - 0.5).mean() + 0.5),
        "ai_nocot_alignment_same_pairs": rlaif.alignment(ai.p_N[:n_cot], sub.gold_a, sub.gold_b),
        "ai_cot_seconds": round(cot_seconds, 1), "cot_example_rationale": cot.rationales[0]})
  p_cot = np.full(len(pairs.prompts), np.nan)
  if cot is not None:
    p_cot[:n_cot] = cot.p_N
  rlaif.write_jsonl(fileio.join(workdir, "pairs_scored.jsonl"), [{
      "prompt": x, "a": a, "b": b, "gold_a": float(g1), "gold_b": float(g2), "p_ai": float(p),
      "p_ai_ab": float(pab), "p_ai_ba": float(pba), "p_ai_cot": None if np.isnan(pc) else float(pc),
      "p_human": float(ph)} for x, a, b, g1, g2, p, pab, pba, pc, ph in zip(
          pairs.prompts, pairs.a, pairs.b, ga, gb, ai.p_N, ai.p_ab_N, ai.p_ba_N, p_cot, p_h)])
  return final


def run(config, root: str) -> dict:
  stages = [s for s in config.stages.split(",") if s]
  if config.label.ai_labels not in AI_LABELS:  # before any stage: not minutes into the run
    raise ValueError(f"config.label.ai_labels={config.label.ai_labels!r}; allowed: "
                     f"{' | '.join(AI_LABELS)}")
  fm_lib.check_teacher(config.get("feedback_teacher"))
  start = time.time()
  res: dict = {}
  sft_dir = config.sources.sft_workdir or fileio.join(root, "sft")
  if "sft" in stages and not config.sources.sft_workdir:
    res["sft"] = train.run_or_reuse("sft", root,
                                    lambda w: registry.run(config.sft.method, config.sft, w))
  task = fileio.join(sft_dir, "data", "synthetic")
  feedback = config.sources.feedback_workdir or fileio.join(root, "feedback")
  if "feedback" in stages and not config.sources.feedback_workdir:
    fb = fm_lib.feedback_config(config.feedback, task, init=config.feedback_init, sft_dir=sft_dir,
                                init_dir=fileio.join(root, "feedback_init"),
                                tasks=config.feedback_tasks, teacher=config.get("feedback_teacher"),
                                data_dir=fileio.join(root, "feedback_data"))
    res["feedback"] = train.run_or_reuse("feedback", root, lambda w: registry.run(fb.method, fb, w))
  label_dir = fileio.join(root, "label")
  if "label" in stages:
    res["label"] = train.run_or_reuse("label", root, lambda w: _label(config, sft_dir, feedback, w))
  for who in ("ai", "human"):
    if f"rm_{who}" in stages:
      rm = config.rm.copy_and_resolve_references()
      rm.sources.sft_workdir = sft_dir
      rm.data.train_jsonl = fileio.join(label_dir, f"{who}_pairs.jsonl")
      rm.data.eval_jsonl = fileio.join(task, "pairwise_test.jsonl")
      res[f"rm_{who}"] = train.run_or_reuse(f"rm_{who}", root,
                                            lambda w, rm=rm: registry.run(rm.method, rm, w))
  for who in ("ai", "human"):
    if f"ppo_{who}" in stages:
      cfg = config.ppo.copy_and_resolve_references()
      cfg.sources.sft_workdir = sft_dir
      cfg.sources.reward_model_workdir = fileio.join(root, f"rm_{who}")
      res[f"ppo_{who}"] = train.run_or_reuse(f"ppo_{who}", root,
                                             lambda w, cfg=cfg: registry.run(cfg.method, cfg, w))
  if "ppo_direct" in stages:
    cfg = config.ppo_direct.copy_and_resolve_references()
    cfg.sources.sft_workdir = sft_dir

    def direct(w):
      # the rating runs on PPO's mesh (ppo.train_and_evaluate builds the same one from cfg.mesh)
      models_ = rlaif.direct_rlaif_models(cfg, sft_dir, feedback, config.label.rating_template,
                                          seed=cfg.seed,
                                          mesh=parallel.mesh_from_config(cfg.get("mesh")))
      return ppo.train_and_evaluate(cfg, w, models_=models_)

    res["ppo_direct"] = train.run_or_reuse("ppo_direct", root, direct)
  for soft in (True, False):
    name = "dpo_ai_soft" if soft else "dpo_ai_hard"
    if name in stages:
      cfg = config.dpo.copy_and_resolve_references()
      cfg.sources.sft_workdir = sft_dir
      cfg.loss.soft_labels = soft
      cfg.data.source = "jsonl"
      cfg.data.train_jsonl = fileio.join(label_dir, "ai_pairs.jsonl")
      cfg.data.eval_jsonl = fileio.join(task, "pairwise_test.jsonl")
      cfg.data.eval_prompts_jsonl = fileio.join(task, "prompts_test.jsonl")
      res[name] = train.run_or_reuse(name, root,
                                     lambda w, cfg=cfg: registry.run(cfg.method, cfg, w))
  if "report" in stages:  # every process holds the same res (run_or_reuse); process 0 writes
    parallel.write_on_coordinator(report, root, res, time.time() - start, barrier="rlaif_report")
  return res


def report(root: str, res: dict, seconds: float) -> str:
  """results.md / results.json / rlaif.png from the stages' final metrics and samples."""
  runs = {
      "RLHF (human labels)": "ppo_human", "RLAIF distilled": "ppo_ai",
      "RLAIF direct (d-RLAIF)": "ppo_direct", "DPO on AI labels, soft": "dpo_ai_soft",
      "DPO on AI labels, hard": "dpo_ai_hard"}
  rows, h2h = [], {}
  for label, stage in runs.items():
    final = res.get(stage)
    if not final:
      continue
    # each trainer evaluates its SFT on its own held-out setup (PPO's and DPO's differ), so every
    # row carries the SFT gold its win rate is measured against
    rows.append((label, final.get("gold_reward"), final.get("gold_reward_sem"),
                 final.get("win_rate_vs_sft"), final.get("kl_to_sft"), final.get("_seconds"),
                 final.get("sft_gold_reward")))

  def samples(stage):
    return fileio.join(root, stage, "samples.jsonl")

  for a, b in (("ppo_ai", "ppo_human"), ("ppo_direct", "ppo_human"), ("ppo_ai", "ppo_direct"),
               ("dpo_ai_soft", "dpo_ai_hard")):
    if fileio.exists(samples(a)) and fileio.exists(samples(b)):
      h2h[f"{a} vs {b}"] = rlaif.head_to_head(samples(a), samples(b))
  lab = res.get("label", {})
  lines = [
      "# RLAIF vs RLHF on the synthetic task", "",
      f"Wall time of this invocation: {train.format_duration(seconds)}; load average {os.getloadavg()[0]:.1f}; "
      f"{os.cpu_count()} CPUs visible.", "", "## Label alignment with the gold preference", "",
      "| labeller | alignment | position-bias rate |", "| --- | --- | --- |"]

  def num(x):
    return "" if x is None else f"{x:.3f}"

  for name, key, bias in (("simulated humans (Bayes-optimal)", "human_bayes_accuracy",
                           None), ("simulated humans (sampled labels)", "human_label_accuracy",
                                   None), ("AI, both orders averaged", "ai_alignment_both_orders",
                                           "ai_position_bias_rate"),
                          ("AI, one order", "ai_alignment_one_order",
                           None), ("AI + CoT, both orders", "ai_cot_alignment_both_orders",
                                   "ai_cot_position_bias_rate"),
                          ("AI + CoT, one order", "ai_cot_alignment_one_order",
                           None), ("AI without CoT on the CoT pairs",
                                   "ai_nocot_alignment_same_pairs", None)):
    if key in lab:
      lines.append(f"| {name} | {num(lab[key])} | {num(lab.get(bias)) if bias else ''} |")
  lines += [
      "", f"Pairs: {lab.get('num_pairs')} (CoT: {lab.get('cot_pairs', 0)}); AI label mass "
      f"{num(lab.get('ai_label_mass'))}. The AI label file (the RM's and DPO's data) holds the "
      f"{'chain-of-thought' if lab.get('ai_labels') == 'cot' else 'plain'} labels, both orders "
      f"averaged (alignment {num(lab.get('ai_label_file_alignment'))}).", "",
      "## Policies (same PPO, same number of labels)", "",
      "SFT gold = the SFT policy under the same evaluation as the row (PPO's and DPO's held-out "
      "evaluations differ).", "",
      "| policy | gold reward | ± s.e. | SFT gold (same eval) | win rate vs SFT | KL to SFT | "
      "stage seconds |", "| --- | --- | --- | --- | --- | --- | --- |"]
  lines += [
      f"| {r[0]} | {num(r[1])} | {num(r[2])} | {num(r[6])} | {num(r[3])} | {num(r[4])} | {r[5]} |"
      for r in rows]
  lines += ["", "Head to head (gold reward, ties half):", ""]
  lines += [f"- {k}: {v:.3f}" for k, v in h2h.items()]
  text = "\n".join(lines) + "\n"
  fileio.atomic_write_text(fileio.join(root, "results.md"), text)
  fileio.atomic_write_text(
      fileio.join(root, "results.json"),
      json.dumps({"stages": res, "head_to_head": h2h, "seconds": seconds}, indent=1, default=float))
  _plot(root, lab, rows)
  logger.info("results in %s\n%s", fileio.join(root, "results.md"), text)
  return text


def _plot(root: str, lab: dict, rows: list) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  keys = [("human\nBayes", "human_bayes_accuracy"), ("human\nsampled", "human_label_accuracy"),
          ("AI\n2 orders", "ai_alignment_both_orders"), ("AI\n1 order", "ai_alignment_one_order"),
          ("AI+CoT\n2 orders", "ai_cot_alignment_both_orders")]
  keys = [(n, k) for n, k in keys if isinstance(lab.get(k), float)]
  ax1.bar([n for n, _ in keys], [lab[k] for _, k in keys], color="tab:blue")
  ax1.set_ylim(0.4, 1.0)
  ax1.set_ylabel("agreement with the gold preference")
  ax1.set_title("Labellers")
  done = [r for r in rows if isinstance(r[1], float)]
  short = {  # the table's names, shortened to fit five bars
      "RLHF (human labels)": "RLHF\n(human)", "RLAIF distilled": "RLAIF\ndistilled",
      "RLAIF direct (d-RLAIF)": "d-RLAIF\n(direct)", "DPO on AI labels, soft": "DPO AI\nsoft",
      "DPO on AI labels, hard": "DPO AI\nhard"}
  ax2.bar([short.get(r[0], r[0]) for r in done], [r[1] for r in done],
          yerr=[r[2] or 0 for r in done], color="tab:green")
  sft = [(i, r[6]) for i, r in enumerate(done) if isinstance(r[6], float)]
  if sft:  # each bar's own SFT (PPO's and DPO's evaluations differ)
    ax2.hlines([g for _, g in sft], [i - 0.4 for i, _ in sft], [i + 0.4 for i, _ in sft],
               colors="gray", linestyles="--", label="SFT (same eval)")
    ax2.legend()
  ax2.set_ylabel("held-out gold reward")
  ax2.set_title("Policies (same PPO)")
  fig.tight_layout()
  fileio.save_figure(fig, fileio.join(root, "rlaif.png"), dpi=110)
  plt.close(fig)


def main(argv):
  cli.stage_launcher_main(argv, run, _FLAGS[0].value, _FLAGS[1].value, what="rlaif.py")


if __name__ == "__main__":
  _FLAGS = cli.define_stage_launcher_flags(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "rlaif_synthetic.py"),
      "workdirs/rlaif", "RLAIF")
  app.run(main, flags_parser=cli.parse_flags)
