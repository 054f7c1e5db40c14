"""Learning curves: held-out accuracy against the number of annotated prompts, per objective.

For each objective and each size N, a reward model is trained on the first N training records
(``data.num_train_examples = N``: N pairs for ``bradley_terry``, N ranked lists for ``all_pairs`` /
``plackett_luce``) in ``<workdir>/curve/<objective>_n<N>/`` with early stopping on the held-out
loss, and evaluated on the same held-out pairs. A pair is one annotated prompt with one comparison;
a ranked list of K is one annotated prompt with C(K, 2) comparisons, which is InstructGPT's
argument for ranking (Ouyang et al., 2022, §3.5): the rows record both counts.

Curve points skip the gold correlation on fresh samples and normalise over at most 64 prompts.
Ranked objectives use ``batch_size // 4`` lists per step (a list holds 6.5 responses on average
versus 2 for a pair), so a step costs about the same compute.

Run through the launcher as the method ``rm_learning_curve`` (``config.curve.sizes``,
``config.curve.objectives``; every other section is the reward-model config of each point)::

  python experiments/run.py --config=experiments/configs/rm_synthetic.py:learning_curve \
      --workdir=workdirs/rm_curve --config.curve.sizes="(250, 500, 1000, 2000)" \
      --config.curve.objectives=bradley_terry,all_pairs

Outputs: ``learning_curve.json`` / ``learning_curve.md`` (table) and ``learning_curve.png``
(``pairwise/accuracy``; ``learning_curve_expected.png`` plots ``gold/expected_accuracy``, the same
accuracy without the label-sampling noise, when the task is synthetic).
"""

from __future__ import annotations

import copy
import logging
from typing import Sequence

import ml_collections

from rlhf_jax import fileio, train
from rlhf_jax.algorithms.reward import trainer as reward_model
from rlhf_jax.algorithms.reward.objectives import DATA_KIND
from rlhf_jax.eval import reward_report

logger = logging.getLogger(__name__)


def sub_config(config: ml_collections.ConfigDict, objective: str,
               size: int) -> ml_collections.ConfigDict:
  """The config of one curve point (unlocked copy with objective, size and batch size set)."""
  sub = copy.deepcopy(config)
  with sub.unlocked():
    if "curve" in sub:
      del sub["curve"]
    sub.method = "reward_model"
    base_kind = DATA_KIND[config.rm.objective]
    base_batch = config.data.batch_size * (4 if base_kind == "ranked" else 1)
    batch = max(1, base_batch // 4) if DATA_KIND[objective] == "ranked" else base_batch
    sub.rm.objective = objective
    sub.data.num_train_examples = int(size)
    sub.data.batch_size = min(batch, int(size))
    # Curve points are compared on held-out pairs; the fresh-sample gold correlation is skipped and
    # the normalisation uses fewer samples to keep a sweep cheap.
    sub.eval.num_gold_prompts = 0
    sub.eval.num_normalization_prompts = min(config.eval.num_normalization_prompts, 64)
  return sub


def learning_curve(config: ml_collections.ConfigDict, workdir: str, sizes: Sequence[int],
                   objectives: Sequence[str]) -> list[dict]:
  """Runs (or resumes) every (objective, size) point; writes the table and plots; returns rows.

  A point stopped by SIGTERM ends the sweep at once (the rows so far are returned, nothing is
  written); re-running resumes that point.
  """
  for objective in objectives:
    if objective not in reward_model.OBJECTIVES or DATA_KIND[objective] not in ("pairwise",
                                                                                "ranked"):
      raise ValueError(
          f"learning curve objective {objective!r} is invalid; allowed: bradley_terry | "
          "all_pairs | plackett_luce (rankings and pairs share the held-out pairs)")
  if not sizes or any(n < 1 for n in sizes):
    raise ValueError(f"learning curve sizes {list(sizes)} are invalid; allowed: positive ints")
  rows = []
  for objective in objectives:
    for size in sorted(sizes):
      run_dir = fileio.join(workdir, "curve", f"{objective}_n{size}")
      final_path = fileio.join(run_dir, reward_model.FINAL_METRICS_FILE)
      if fileio.exists(final_path):
        final = train.read_json(final_path)
      else:
        logger.info("learning curve: %s with %d annotated prompts -> %s", objective, size, run_dir)
        final = reward_model.train_and_evaluate(sub_config(config, objective, size), run_dir)
        if final.get("preempted"):  # SIGTERM: stop here; the same command resumes this point
          logger.warning(
              "learning curve stopped by a signal at %s (step %s); not starting the "
              "remaining points", run_dir, final.get("step"))
          return rows
      row = {
          "objective": objective, "num_prompts": size,
          "num_comparisons": final.get("data/train_comparisons"),
          "step": final.get("final_params_step")}
      for key in ("pairwise/accuracy", "pairwise/auc", "gold/expected_accuracy",
                  "gold/bayes_optimal_accuracy", "gold/gold_agreement", "ranked/kendall_tau",
                  "ranked/top1_accuracy"):
        if key in final:
          row[key] = final[key]
      rows.append(row)
  bayes = next(
      (r["gold/bayes_optimal_accuracy"] for r in rows if "gold/bayes_optimal_accuracy" in r), None)
  train.atomic_write_json(fileio.join(workdir, "learning_curve.json"),
                          [{k: reward_report.json_value(v) for k, v in r.items()} for r in rows])
  cols = [
      "objective", "num_prompts", "num_comparisons", "step", "pairwise/accuracy",
      "gold/expected_accuracy", "gold/bayes_optimal_accuracy", "ranked/kendall_tau"]
  lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(reward_report._fmt(r.get(c, "")) for c in cols) + " |")  # pylint: disable=protected-access
  table = "\n".join(lines) + "\n"
  fileio.atomic_write_text(fileio.join(workdir, "learning_curve.md"), table)
  reward_report.plot_learning_curve(rows, fileio.join(workdir, "learning_curve.png"),
                                    bayes_optimal=bayes)
  if bayes is not None:
    reward_report.plot_learning_curve(rows, fileio.join(workdir, "learning_curve_expected.png"),
                                      bayes_optimal=bayes, metric="gold/expected_accuracy")
  print(table, flush=True)
  return rows


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The ``rm_learning_curve`` method: :func:`learning_curve` over ``config.curve``.

  Returns ``{"points": rows, "preempted": bool}`` (preempted when SIGTERM stopped a point).
  """
  if "curve" not in config:
    raise ValueError(
        "config.curve is missing; rm_learning_curve needs config.curve.sizes and "
        "config.curve.objectives (see experiments/configs/rm_synthetic.py:learning_curve)")
  unknown = sorted(set(config.curve.keys()) - {"sizes", "objectives"})
  if unknown:
    raise ValueError(f"unknown config key(s) {[f'config.curve.{k}' for k in unknown]}; allowed: "
                     "['objectives', 'sizes']")
  sizes = tuple(config.curve.sizes)
  # A tuple of names, or the command line's "bradley_terry,all_pairs" (one string in the tuple).
  raw = config.curve.objectives
  objectives = tuple(
      name.strip(" ()'\"")
      for item in ((raw,) if isinstance(raw, str) else raw)
      for name in str(item).split(",")
      if name.strip(" ()'\""))
  if any(isinstance(n, bool) or not isinstance(n, int) for n in sizes):
    raise ValueError(f"config.curve.sizes={sizes!r} is invalid; allowed: positive ints")
  # The points train their SFT backbone first if needed (one run, shared by every point).
  if not reward_model.ensure_sft_run(config):
    return {"points": [], "preempted": True}
  total = len(sizes) * len(objectives)
  rows = learning_curve(config, workdir, sizes, objectives)
  return {"points": rows, "preempted": len(rows) < total}
