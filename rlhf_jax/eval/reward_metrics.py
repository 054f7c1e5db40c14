"""Classification and calibration metrics for reward models, in NumPy (no scikit-learn).

Pairwise data has no natural negative class: every held-out pair (chosen c, rejected r) is a
positive example of "c is preferred". The definitions used here (Δ = r_c - r_r, p = σ(Δ)):

* ``accuracy`` = mean[Δ > 0]. A tie Δ = 0 counts as wrong (as in ``losses.bradley_terry_loss``);
  ``num_ties`` reports how many there were.
* ``precision``, ``recall``, ``f1``: each pair is shown in one orientation drawn once from
  ``np.random.default_rng(seed)`` (fixed, so the numbers are reproducible): with prob. 1/2 as
  (first = c, second = r) with label y = 1 ("first preferred"), else (r, c) with y = 0. The
  classifier predicts y = 1 iff s = r_first - r_second > 0. Precision / recall / F1 are those of the
  class y = 1. For an antisymmetric score they carry little beyond accuracy (they differ from it
  only through the orientation draw), but they are the standard numbers people ask for.
* ``auc``: ROC AUC of "first preferred" over *both* orientations of every pair (scores Δ with y = 1,
  -Δ with y = 0), i.e. P(Δ_i > -Δ_j) over all pairs (i, j), ties counting 1/2 (Mann–Whitney).
  Orientation-free and deterministic.
* ``ece``: expected calibration error of p = σ(Δ) (Guo et al., 2017): the prediction is "c" when
  p > 1/2, its confidence max(p, 1 - p) ∈ [1/2, 1] is split into ``num_bins`` equal-width bins and
  ECE = Σ_b (n_b / N) |acc_b - conf_b|. Orientation-free. Compute it on *raw* rewards: the
  Bradley–Terry loss calibrates σ(r_c - r_r); normalised rewards rescale Δ by 1/σ.
* ``log_loss`` = mean(-log σ(Δ)) (the held-out BT loss) and ``brier`` = mean((1 - p)²).

On the synthetic task the gold rewards g_c, g_r and the annotators' Bradley–Terry temperature τ are
known (:func:`gold_pairwise_metrics`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlhf_jax.eval.ranking_metrics import rankdata


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
  return -np.logaddexp(0.0, -x)


def roc_auc(labels: Any, scores: Any) -> float:
  """ROC AUC = P(score of a random positive > score of a random negative), ties 1/2.

  Computed from average ranks (Mann–Whitney U): AUC = (R_+ - n_+(n_+ + 1)/2) / (n_+ n_-), with
  R_+ the rank sum of the positives. ``nan`` if one class is empty.
  """
  labels = np.asarray(labels).ravel().astype(bool)
  scores = np.asarray(scores, np.float64).ravel()
  if labels.shape != scores.shape:
    raise ValueError(f"roc_auc: labels {labels.shape} and scores {scores.shape} differ")
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = rankdata(scores)
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_calibration_error(probs: Any, labels: Any, num_bins: int = 10) -> float:
  """Confidence ECE of binary probabilities p = P(y = 1) (module docstring).

  Prediction ŷ = [p > 1/2], confidence max(p, 1 - p), bins of equal width over [1/2, 1] (the last
  bin closed), ECE = Σ_b (n_b / N) |mean_b[ŷ = y] - mean_b(confidence)|.
  """
  if not (isinstance(num_bins, int) and num_bins >= 1):
    raise ValueError(f"expected_calibration_error: num_bins={num_bins!r}; allowed: an int >= 1")
  p = np.asarray(probs, np.float64).ravel()
  y = np.asarray(labels).ravel().astype(bool)
  if p.shape != y.shape or len(p) == 0:
    raise ValueError(f"expected_calibration_error: probs {p.shape} and labels {y.shape} must be "
                     "equal and non-empty")
  if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
    raise ValueError("expected_calibration_error: probabilities must be finite and in [0, 1]")
  pred = p > 0.5
  conf = np.where(pred, p, 1.0 - p)
  correct = pred == y
  idx = np.clip(((conf - 0.5) * 2.0 * num_bins).astype(int), 0, num_bins - 1)
  ece = 0.0
  for b in range(num_bins):
    sel = idx == b
    if np.any(sel):
      ece += np.mean(sel) * abs(np.mean(correct[sel]) - np.mean(conf[sel]))
  return float(ece)


def binary_metrics(labels: Any, scores: Any) -> dict:
  """Accuracy / precision / recall / F1 of ŷ = [score > 0] against binary labels, plus AUC."""
  y = np.asarray(labels).ravel().astype(bool)
  s = np.asarray(scores, np.float64).ravel()
  pred = s > 0
  tp = int(np.sum(pred & y))
  fp = int(np.sum(pred & ~y))
  fn = int(np.sum(~pred & y))
  precision = tp / (tp + fp) if tp + fp else float("nan")
  recall = tp / (tp + fn) if tp + fn else float("nan")
  f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
  return {
      "accuracy": float(np.mean(pred == y)), "precision": precision, "recall": recall, "f1": f1,
      "auc": roc_auc(y, s)}


def pairwise_metrics(chosen_rewards: Any, rejected_rewards: Any, *, seed: int = 0,
                     num_bins: int = 10) -> dict:
  """Held-out pairwise metrics of a reward model (definitions in the module docstring)."""
  rc = np.asarray(chosen_rewards, np.float64).ravel()
  rr = np.asarray(rejected_rewards, np.float64).ravel()
  if rc.shape != rr.shape or len(rc) == 0:
    raise ValueError(
        f"pairwise_metrics: chosen {rc.shape} and rejected {rr.shape} must be equal and "
        "non-empty")
  if not (np.all(np.isfinite(rc)) and np.all(np.isfinite(rr))):
    raise ValueError("pairwise_metrics: rewards contain NaN or inf")
  delta = rc - rr
  first_is_chosen = np.random.default_rng(seed).random(len(delta)) < 0.5
  oriented = binary_metrics(first_is_chosen, np.where(first_is_chosen, delta, -delta))
  p = _sigmoid(delta)
  return {
      "accuracy": float(np.mean(delta > 0)),
      "precision": oriented["precision"],
      "recall": oriented["recall"],
      "f1": oriented["f1"],
      "auc": roc_auc(np.r_[np.ones_like(delta), np.zeros_like(delta)], np.r_[delta, -delta]),
      "ece": expected_calibration_error(p, np.ones_like(delta), num_bins),
      "log_loss": float(np.mean(-_log_sigmoid(delta))),
      "brier": float(np.mean((1.0 - p)**2)),
      "mean_margin": float(np.mean(delta)),
      "num_pairs": int(len(delta)),
      "num_ties": int(np.sum(delta == 0)),}


def gold_pairwise_metrics(chosen_rewards: Any, rejected_rewards: Any, gold_chosen: Any,
                          gold_rejected: Any, bt_temperature: float) -> dict:
  """Synthetic task: the RM against the gold reward and the annotators' noise on the same pairs.

  With Δ = r_c - r_r, G = g_c - g_r and the annotators' P(c labelled preferred) q = σ(G / τ):

  * ``bayes_optimal_accuracy`` = mean(max(q, 1 - q)): the best any predictor can score on labels
    drawn by these annotators for these pairs.
  * ``expected_accuracy`` = mean(q [Δ > 0] + (1 - q) [Δ < 0] + 1/2 [Δ = 0]): the RM's accuracy in
    expectation over the annotators' coin flips (same pairs; removes the label-sampling noise from
    the held-out accuracy, so it is directly comparable with the Bayes-optimal number).
  * ``gold_agreement``: over pairs with G ≠ 0, the share where sign(Δ) = sign(G) (Δ = 0 is wrong);
    ``label_gold_agreement`` is the same for the sampled labels (how noisy they are).
  """
  if not bt_temperature > 0:
    raise ValueError(f"gold_pairwise_metrics: bt_temperature={bt_temperature!r}; allowed: > 0")
  rc, rr = np.asarray(chosen_rewards, np.float64), np.asarray(rejected_rewards, np.float64)
  gc, gr = np.asarray(gold_chosen, np.float64), np.asarray(gold_rejected, np.float64)
  if not rc.shape == rr.shape == gc.shape == gr.shape:
    raise ValueError(
        f"gold_pairwise_metrics: shapes differ: {rc.shape} {rr.shape} {gc.shape} {gr.shape}")
  delta, gap = rc - rr, gc - gr
  q = _sigmoid(gap / bt_temperature)
  expected = np.where(delta > 0, q, np.where(delta < 0, 1.0 - q, 0.5))
  untied = gap != 0
  return {
      "bayes_optimal_accuracy": float(np.mean(np.maximum(q, 1.0 - q))),
      "expected_accuracy": float(np.mean(expected)),
      "gold_agreement": float(np.mean(
          np.sign(delta[untied]) == np.sign(gap[untied]))) if np.any(untied) else float("nan"),
      "label_gold_agreement": float(np.mean(gap[untied] > 0)) if np.any(untied) else float("nan"),
      "num_gold_ties": int(np.sum(~untied)),}


def regression_metrics(predicted: Any, targets: Any) -> dict:
  """MSE, MAE and Pearson / Spearman correlation of predictions with targets (e.g. ratings)."""
  from rlhf_jax.eval.ranking_metrics import pearson, spearman  # pylint: disable=import-outside-toplevel

  pred = np.asarray(predicted, np.float64).ravel()
  target = np.asarray(targets, np.float64).ravel()
  if pred.shape != target.shape or len(pred) < 2:
    raise ValueError(
        f"regression_metrics: predicted {pred.shape} and targets {target.shape} must be "
        "equal with >= 2 values")
  return {
      "mse": float(np.mean((pred - target)**2)), "mae": float(np.mean(np.abs(pred - target))),
      "pearson": pearson(pred, target), "spearman": spearman(pred, target)}
