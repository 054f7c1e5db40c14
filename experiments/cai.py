r"""Constitutional AI vs RLHF on the synthetic task, one command (stages: experiments/configs/cai_synthetic.py):

  python experiments/cai.py [--workdir=workdirs/cai] [--config.sources.sft_workdir=DIR] \
      [--config.sources.feedback_workdir=DIR] [--config.stages=sft,feedback,...]

Each stage runs in ``<workdir>/<stage>``; one that finished (``final_metrics.json``) is reused, so a
rerun only redoes what is missing. Results: ``<workdir>/results.md``, ``results.json``, ``cai.png``.

One job over several processes (``launch/multiprocess_local.sh`` / ``launch/slurm.sbatch``): every
training stage runs on the global mesh (set each section's ``mesh``); the labelling, critique /
revision and evaluation stages restore their models on every process and sample, label and write
on process 0; every stage's "finished earlier?" and outcome are agreed (``train.run_or_reuse``).
"""

from __future__ import annotations

import logging
import os
import time

from absl import app
import numpy as np

from rlhf_jax import cli, fileio, parallel, train
from rlhf_jax.algorithms import registry
from rlhf_jax.data import synthetic
from rlhf_jax.feedback import cai
from rlhf_jax.feedback import constitution as const_lib
from rlhf_jax.feedback import evaluator as ev_lib
from rlhf_jax.feedback import feedback_model as fm_lib
from rlhf_jax.feedback import rlaif

logger = logging.getLogger("cai")

POLICIES = {  # report label -> stage
    "SFT (helpful)": "sft", "helpful-only RLHF": "ppo_helpful", "helpful+harmless RLHF": "ppo_hh",
    "SL-CAI": "sl_cai", "RL-CAI": "ppo_cai"}


def _task_dir(sft_dir: str) -> str:
  """The synthetic task the SFT run trained on (its ``data.synthetic_dir``, else generated)."""
  cfg = train.read_json(fileio.join(sft_dir, "config.json"))
  return cfg.get("data", {}).get("synthetic_dir") or fileio.join(sft_dir, "data", "synthetic")


def _policy(workdir: str):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from rlhf_jax import models  # pylint: disable=import-outside-toplevel
  ckpt = train.load_sft_params(workdir)
  return models.Transformer(ckpt.model_config), nn.meta.unbox(ckpt.params), ckpt.tokenizer


def _feedback_eval(config, feedback: str, task: str, workdir: str) -> dict | None:
  fm = ev_lib.load_evaluator(feedback, "cai_harmless", batch_size=config.feedback_eval.batch_size)
  if not parallel.is_coordinator():  # every process restored (collective); process 0 evaluates
    return None
  rows = fileio.read_jsonl(fileio.join(task, "feedback_sft_test.jsonl"))
  out = cai.evaluate_feedback_model(fm, rows,
                                    constitution=const_lib.load_constitution(config.constitution),
                                    max_per_task=config.feedback_eval.max_per_task,
                                    seed=config.seed, cot_max_tokens=config.rl_cai.cot_max_tokens)
  meta = train.read_json(fileio.join(task, "metadata.json"))
  out["teacher_test"] = meta["splits"]["test"].get("teacher")
  fileio.makedirs(workdir)
  train.atomic_write_json(fileio.join(workdir, "feedback_eval.json"), out)
  return out


def _pairs_of(rows: list[dict]) -> rlaif.Pairs:
  prompts, a, b = ([r[k] for r in rows] for k in ("prompt", "chosen", "rejected"))
  return rlaif.Pairs(prompts, a, b,
                     synthetic.gold_rewards(prompts, a).astype(np.float64),
                     synthetic.gold_rewards(prompts, b).astype(np.float64))


def _human_labels(config, task: str, workdir: str) -> dict | None:
  """The task's comparison pairs relabelled by simulated humans: helpfulness only, and gold."""
  if not parallel.is_coordinator():  # host NumPy only: process 0 draws and writes
    return None
  lab = config.labels
  pairs = _pairs_of(fileio.read_jsonl(fileio.join(task, "pairwise.jsonl"))[:lab.num_pairs])
  rng = np.random.default_rng([config.seed, 151])
  help_a = cai.helpful_only_rewards(pairs.prompts, pairs.a)
  help_b = cai.helpful_only_rewards(pairs.prompts, pairs.b)
  p_help = synthetic.preference_prob(help_a, help_b, lab.human_temperature)
  p_hh = synthetic.preference_prob(pairs.gold_a, pairs.gold_b, lab.human_temperature)
  out = {"num_pairs": len(pairs.prompts)}
  fileio.makedirs(workdir)
  for name, p_N in (("helpful", p_help), ("hh", p_hh)):
    first = (rng.random(len(p_N)) < p_N).astype(np.float64)
    rows = rlaif.pairwise_records(pairs, first, soft=False)
    rlaif.write_jsonl(fileio.join(workdir, f"{name}_pairs.jsonl"), rows)
    out[f"{name}_label_agrees_with_gold"] = rlaif.alignment(first, pairs.gold_a, pairs.gold_b)
    out[f"{name}_pairs"] = len(rows)
  return out


def _prompts_of_kind(task: str, harmful: bool, limit: int, split: str = "") -> list[str]:
  """Training (or ``_test``) prompts of one kind, with repeats, in file order."""
  rows = fileio.read_jsonl(fileio.join(task, f"prompts{split}.jsonl"))
  out = [r["prompt"] for r in rows if synthetic.parse_prompt(r["prompt"]).harmful == harmful]
  return out[:limit]


def _sl_cai_data(config, sft_dir: str, feedback: str, task: str, workdir: str) -> dict:
  """Red-team answers of the helpful policy, critiqued and revised; the SL-CAI SFT mixture."""
  sl = config.sl_cai
  model, params, tok = _policy(sft_dir)
  fm = ev_lib.load_evaluator(feedback, "cai_harmless", policy_tokenizer=tok)
  if not parallel.is_coordinator():  # every process restored (collective); process 0 samples
    return None
  prompts = _prompts_of_kind(task, True, sl.num_red_team)
  first = rlaif.sample_pairs(model, params, tok, prompts, max_prompt_len=sl.max_prompt_len,
                             max_new_tokens=config.sl_cai_train.limits.max_response_len,
                             temperature=sl.policy_temperature, seed=config.seed)
  t0 = time.time()
  records = cai.critique_revision_loop(
      fm, const_lib.load_constitution(config.constitution), prompts, first.a,
      cai.RevisionConfig(n_revisions=sl.n_revisions, max_critique_tokens=sl.max_critique_tokens,
                         max_revision_tokens=sl.max_revision_tokens, temperature=sl.temperature,
                         greedy=sl.greedy, seed=config.seed))
  seconds = time.time() - t0
  initial = synthetic.gold_rewards(prompts, [r["initial"] for r in records])
  final = synthetic.gold_rewards(prompts, [r["final"] for r in records])
  for r, g0, g1 in zip(records, initial, final):
    r["gold_initial"], r["gold_final"] = round(float(g0), 4), round(float(g1), 4)
  helpful = [
      r for r in fileio.read_jsonl(fileio.join(task, "sft.jsonl"))
      if not synthetic.parse_prompt(r["prompt"]).harmful]
  fileio.makedirs(workdir)
  rlaif.write_jsonl(fileio.join(workdir, "revisions.jsonl"), records)
  rlaif.write_jsonl(fileio.join(workdir, "sl_cai_sft.jsonl"), cai.sl_cai_rows(records, helpful))
  before = cai.safety_metrics(prompts, [r["initial"] for r in records])
  after = cai.safety_metrics(prompts, [r["final"] for r in records])
  return {
      "num_red_team": len(prompts), "num_helpful_rows": len(helpful), "n_revisions": sl.n_revisions,
      "loop_seconds": round(seconds, 1), "gold_initial": float(np.mean(initial)),
      "gold_final": float(np.mean(final)), "compliance_initial": before["harmful_compliance"],
      "compliance_final": after["harmful_compliance"],
      "refusal_initial": before["harmful_refusal_rate"],
      "refusal_final": after["harmful_refusal_rate"], "example": records[0]}


def _rl_cai_labels(config, sl_dir: str, feedback: str, task: str, workdir: str) -> dict:
  """SL-CAI sample pairs: AI harmlessness labels on red-team prompts, human helpfulness labels
  on safe ones (the preference model's data), and the label ablations vs the gold."""
  rl = config.rl_cai
  model, params, tok = _policy(sl_dir)
  fm = ev_lib.load_evaluator(feedback, rl.template, policy_tokenizer=tok, batch_size=rl.batch_size)
  if not parallel.is_coordinator():  # every process restored (collective); process 0 samples
    return None
  kw = dict(max_prompt_len=rl.max_prompt_len, max_new_tokens=rl.max_new_tokens,
            temperature=rl.temperature, seed=config.seed + 1)
  harm = rlaif.sample_pairs(model, params, tok, _prompts_of_kind(task, True, rl.num_harmful_pairs),
                            **kw)
  safe = rlaif.sample_pairs(model, params, tok, _prompts_of_kind(task, False, rl.num_safe_pairs),
                            **kw)
  label_cfg = cai.HarmlessLabelConfig(template=rl.template, both_orders=rl.both_orders, cot=rl.cot,
                                      cot_max_tokens=rl.cot_max_tokens, clamp=tuple(rl.clamp),
                                      soft=rl.soft)
  t0 = time.time()
  ai = cai.harmlessness_labels(fm, harm.prompts, harm.a, harm.b, label_cfg)
  seconds = time.time() - t0
  rng = np.random.default_rng([config.seed, 152])
  p_help = synthetic.preference_prob(cai.helpful_only_rewards(safe.prompts, safe.a),
                                     cai.helpful_only_rewards(safe.prompts, safe.b),
                                     config.labels.human_temperature)
  human = (rng.random(len(p_help)) < p_help).astype(np.float64)
  rows = rlaif.pairwise_records(harm, ai["p_N"], soft=rl.soft)
  rows += rlaif.pairwise_records(safe, human, soft=False)
  fileio.makedirs(workdir)
  rlaif.write_jsonl(fileio.join(workdir, "pm_pairs.jsonl"), rows)

  def harmless(pairs):
    return (np.asarray([synthetic.gold_attributes(x, y).harmless
                        for x, y in zip(pairs.prompts, a)])
            for a in (pairs.a, pairs.b))

  ha, hb = harmless(harm)
  out = {
      "pm_pairs": len(rows), "harmful_pairs": len(harm.prompts), "safe_pairs": len(safe.prompts),
      "ai_label_seconds": round(seconds,
                                1), "ai_harmless_alignment": rlaif.alignment(ai["p_N"], ha, hb),
      "ai_gold_alignment": rlaif.alignment(ai["p_N"], harm.gold_a, harm.gold_b),
      "ai_position_bias_rate": ai["labels"].position_bias_rate,
      "ai_mean_confidence": float(np.mean(np.abs(ai["p_N"] - 0.5)) + 0.5),
      "harmful_pairs_with_distinct_harmlessness": int(np.sum(ha != hb))}
  # Label ablations on the first pairs: soft vs hard, CoT raw vs clamped.
  n = min(rl.ablation_pairs, len(harm.prompts))
  sub = [x[:n] for x in (harm.prompts, harm.a, harm.b)]
  variants = {
      "soft": dict(cot=False, soft=True), "hard": dict(cot=False, soft=False),
      "cot_clamped": dict(cot=True, soft=True, clamp=tuple(rl.clamp)),
      "cot_unclamped": dict(cot=True, soft=True, clamp=())}
  target = np.where(ha[:n] == hb[:n], 0.5, (ha[:n] > hb[:n]).astype(np.float64))
  for name, kwargs in variants.items():
    cfg = cai.HarmlessLabelConfig(template=rl.template, cot_max_tokens=rl.cot_max_tokens, **kwargs)
    p = cai.harmlessness_labels(fm, *sub, cfg)["p_N"]
    out[f"ablation/{name}/harmless_alignment"] = rlaif.alignment(p, ha[:n], hb[:n])
    out[f"ablation/{name}/mean_confidence"] = float(np.mean(np.abs(p - 0.5)) + 0.5)
    # Brier score against the gold harmlessness preference (½ where the gold ties)
    out[f"ablation/{name}/brier"] = float(np.mean((p - target)**2))
  out["ablation_pairs"] = n
  return out


def _evaluate_policies(config, root: str, task: str) -> dict:
  """Each finished policy on the held-out prompts (two samples each). Multi-process: every
  process restores each policy (collective), process 0 samples; {} on the others."""
  rep = config.report
  # harmful and safe held-out prompts in equal numbers where the split has them (each kind's
  # metrics need some; the split is 20 % harmful)
  half = rep.max_prompts // 2
  harmful = _prompts_of_kind(task, True, half, "_test")
  prompts = harmful + _prompts_of_kind(task, False, rep.max_prompts - len(harmful), "_test")
  out = {}
  for label, stage in POLICIES.items():
    run_dir = fileio.join(root, stage)
    if not train.is_finished(run_dir):
      continue
    model, params, tok = _policy(run_dir)
    if not parallel.is_coordinator():
      continue
    pairs = rlaif.sample_pairs(model, params, tok, prompts, max_prompt_len=32, max_new_tokens=48,
                               temperature=rep.temperature, seed=config.seed + 7)
    out[label] = cai.safety_metrics(pairs.prompts * 2, pairs.a + pairs.b)
  return out


def _trajectories(root: str) -> dict:
  """Fig. 2's curves: the safety metrics of each PPO run's held-out samples at each evaluation."""
  out = {}
  for label, stage in POLICIES.items():
    path = fileio.join(root, stage, "samples.jsonl")
    if not stage.startswith("ppo_") or not fileio.exists(path):
      continue
    by_step: dict[int, list] = {}
    for row in fileio.read_jsonl(path):
      by_step.setdefault(int(row["step"]), []).append(row)
    out[label] = [{
        "step": step,
        **cai.safety_metrics([r["prompt"] for r in rows], [r["response"] for r in rows])
    } for step, rows in sorted(by_step.items())]
  return out


def run(config, root: str) -> dict:
  stages = [s for s in config.stages.split(",") if s]
  fm_lib.check_teacher(config.get("feedback_teacher"))  # before any stage: not minutes in
  start = time.time()
  res: dict = {}
  sft_dir = config.sources.sft_workdir or fileio.join(root, "sft")
  if "sft" in stages and not config.sources.sft_workdir:
    res["sft"] = train.run_or_reuse("sft", root,
                                    lambda w: registry.run(config.sft.method, config.sft, w))
  task = _task_dir(sft_dir)
  feedback = config.sources.feedback_workdir or fileio.join(root, "feedback")
  if "feedback" in stages and not config.sources.feedback_workdir:
    fb = fm_lib.feedback_config(config.feedback, task, init=config.feedback_init, sft_dir=sft_dir,
                                init_dir=fileio.join(root, "feedback_init"),
                                data_dir=fileio.join(root, "feedback_data"),
                                tasks=config.feedback_tasks, teacher=config.feedback_teacher)
    res["feedback"] = train.run_or_reuse("feedback", root, lambda w: registry.run(fb.method, fb, w))
  if "feedback_eval" in stages:
    res["feedback_eval"] = train.run_or_reuse("feedback_eval", root,
                                              lambda w: _feedback_eval(config, feedback, task, w))
  if "human_labels" in stages:
    res["human_labels"] = train.run_or_reuse("human_labels", root,
                                             lambda w: _human_labels(config, task, w))
  sl_dir = fileio.join(root, "sl_cai")
  if "sl_cai_data" in stages:
    res["sl_cai_data"] = train.run_or_reuse(
        "sl_cai_data", root, lambda w: _sl_cai_data(config, sft_dir, feedback, task, w))
  if "sl_cai" in stages:
    sl = config.sl_cai_train.copy_and_resolve_references()
    sl.data.source = "jsonl"
    sl.data.train_jsonl = fileio.join(root, "sl_cai_data", "sl_cai_sft.jsonl")
    sl.data.eval_jsonl = fileio.join(task, "sft_test.jsonl")
    res["sl_cai"] = train.run_or_reuse("sl_cai", root, lambda w: registry.run(sl.method, sl, w))
  if "rl_cai_labels" in stages:
    res["rl_cai_labels"] = train.run_or_reuse(
        "rl_cai_labels", root, lambda w: _rl_cai_labels(config, sl_dir, feedback, task, w))
  rms = {
      "rm_helpful": (sft_dir, fileio.join(root, "human_labels", "helpful_pairs.jsonl")),
      "rm_hh": (sft_dir, fileio.join(root, "human_labels", "hh_pairs.jsonl")),
      "rm_cai": (sl_dir, fileio.join(root, "rl_cai_labels", "pm_pairs.jsonl"))}
  for name, (init, pairs) in rms.items():
    if name in stages:
      rm = config.rm.copy_and_resolve_references()
      rm.sources.sft_workdir = init
      rm.data.train_jsonl = pairs
      rm.data.eval_jsonl = fileio.join(task, "pairwise_test.jsonl")
      res[name] = train.run_or_reuse(name, root, lambda w, rm=rm: registry.run(rm.method, rm, w))
  ppos = {
      "ppo_helpful": (sft_dir, "rm_helpful"), "ppo_hh": (sft_dir, "rm_hh"),
      "ppo_cai": (sl_dir, "rm_cai")}
  for name, (init, rm_stage) in ppos.items():
    if name in stages:
      cfg = config.ppo.copy_and_resolve_references()
      cfg.sources.sft_workdir = init
      cfg.sources.reward_model_workdir = fileio.join(root, rm_stage)
      cfg.data.synthetic_dir = task
      meta = train.read_json(fileio.join(task, "metadata.json"))["config"]
      cfg.data.synthetic_num_prompts = meta["num_prompts"]  # PPO checks the task it reads
      cfg.data.synthetic_num_test_prompts = meta["num_test_prompts"]
      cfg.data.synthetic_seed = meta["seed"]
      res[name] = train.run_or_reuse(name, root,
                                     lambda w, cfg=cfg: registry.run(cfg.method, cfg, w))
  if "report" in stages:  # every process (the policies' restores); process 0 writes
    report(config, root, task, res, time.time() - start)
  return res


def _num(x) -> str:
  return "" if x is None else f"{x:.3f}"


def report(config, root: str, task: str, res: dict, seconds: float) -> str:
  """results.md / results.json / cai.png. Multi-process: call it on every process (the policies'
  restores are collective); process 0 writes, then the processes meet at a barrier."""
  policies = _evaluate_policies(config, root, task)
  if not parallel.is_coordinator():
    parallel.sync("cai_report")
    return ""
  curves = _trajectories(root)
  cols = ("harmful_compliance", "harmful_refusal_rate", "safe_helpfulness", "safe_refusal_rate",
          "gold_reward")
  lines = [
      "# Constitutional AI vs RLHF on the synthetic task", "",
      f"Wall time of this invocation: {train.format_duration(seconds)}; load average {os.getloadavg()[0]:.1f}; "
      f"{os.cpu_count()} CPUs visible.", "", "## Policies (held-out prompts, exact gold)", "",
      "| policy | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
  for label, m in policies.items():
    lines.append(f"| {label} | " + " | ".join(_num(m[c]) for c in cols) + " |")
  fe = res.get("feedback_eval", {})
  lines += [
      "", "## Feedback model vs the exact gold (teacher's held-out records)", "",
      "| measure | feedback model | teacher |", "| --- | --- | --- |"]
  teacher = (fe.get("teacher_test") or {}).get("judgement_accuracy_vs_gold", {})
  for task, name in (("judge", "judgement"), ("judge_cot", "chain-of-thought judgement")):
    for key in sorted(k for k in fe if k.startswith(f"{task}_accuracy/")):
      c = key.split("/", 1)[1]
      n = fe.get(f"{task}_count/{c}", "")
      lines.append(f"| {name} accuracy: {c} ({n}) | {_num(fe[key])} | {_num(teacher.get(c))} |")
  for key, tkey in (("critique_exact_match", "teacher_critique_exact_match"),
                    ("critique_harm_detection", None), ("revision_gold_gain",
                                                        "teacher_revision_gold_gain")):
    if key in fe:
      lines.append(f"| {key} | {_num(fe[key])} | {_num(fe.get(tkey)) if tkey else ''} |")
  lab = res.get("rl_cai_labels", {})
  if lab:
    lines += [
        "", "## RL-CAI labels on harmful pairs (vs the gold harmlessness preference)", "",
        "| labels | alignment | mean confidence | Brier |", "| --- | --- | --- | --- |"]
    for name in ("soft", "hard", "cot_clamped", "cot_unclamped"):
      if f"ablation/{name}/harmless_alignment" in lab:
        lines.append(f"| {name} | {_num(lab[f'ablation/{name}/harmless_alignment'])} | "
                     f"{_num(lab[f'ablation/{name}/mean_confidence'])} | "
                     f"{_num(lab[f'ablation/{name}/brier'])} |")
  sl = res.get("sl_cai_data", {})
  if sl:
    lines += [
        "", f"SL-CAI revisions ({sl['num_red_team']} red-team answers, {sl['n_revisions']} "
        f"rounds): gold {sl['gold_initial']:.3f} -> {sl['gold_final']:.3f}, compliance "
        f"{sl['compliance_initial']:.3f} -> {sl['compliance_final']:.3f}."]
  lines += [
      "", "Stage seconds: " + ", ".join(f"{k} {v.get('_seconds')}" for k, v in res.items()
                                        if isinstance(v, dict) and "_seconds" in v)]
  text = "\n".join(lines) + "\n"
  fileio.atomic_write_text(fileio.join(root, "results.md"), text)
  train.atomic_write_json(
      fileio.join(root, "results.json"),
      {"policies": policies, "trajectories": curves, "stages": res, "seconds": seconds})
  _plot(root, policies, curves)
  logger.info("results in %s\n%s", fileio.join(root, "results.md"), text)
  parallel.sync("cai_report")
  return text


def _plot(root: str, policies: dict, curves: dict) -> None:
  """Harmlessness (1 - compliance on harmful requests) vs helpfulness on safe requests."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for i, (label, m) in enumerate(policies.items()):
    color = f"C{i}"
    curve = curves.get(label)
    if curve:
      ax.plot([c["safe_helpfulness"] for c in curve], [1 - c["harmful_compliance"] for c in curve],
              "-", color=color, alpha=0.5)
    ax.plot(m["safe_helpfulness"], 1 - m["harmful_compliance"], "o", color=color, label=label)
  ax.set_xlabel("helpfulness on safe requests (gold)")
  ax.set_ylabel("harmlessness: 1 - compliance with harmful requests")
  ax.set_title("Harmlessness vs helpfulness (lines: PPO evaluations)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fileio.save_figure(fig, fileio.join(root, "cai.png"), dpi=110)
  plt.close(fig)


def main(argv):
  cli.stage_launcher_main(argv, run, _FLAGS[0].value, _FLAGS[1].value, what="cai.py")


if __name__ == "__main__":
  _FLAGS = cli.define_stage_launcher_flags(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "cai_synthetic.py"),
      "workdirs/cai", "CAI")
  app.run(main, flags_parser=cli.parse_flags)
