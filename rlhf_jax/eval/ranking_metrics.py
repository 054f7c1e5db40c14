"""Rank statistics (``scipy.stats``): average ranks, Kendall's τ_b, Spearman / Pearson, list metrics.

All functions take host arrays and return Python floats (``nan`` where a statistic is undefined,
e.g. a constant input: SciPy's ``ConstantInputWarning`` is silenced, the ``nan`` says it).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy import stats


def _pair(name: str, x: Any, y: Any, min_len: int) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
  if x.shape != y.shape or len(x) < min_len:
    raise ValueError(f"{name}: need two equal-length inputs of >= {min_len} values, got {x.shape}, "
                     f"{y.shape}")
  return x, y


def _statistic(fn, x: np.ndarray, y: np.ndarray) -> float:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", stats.ConstantInputWarning)
    warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 inside SciPy for constant inputs
    return float(fn(x, y).statistic)


def rankdata(x: Any) -> np.ndarray:
  """Ranks 1..n with ties given their average rank (``scipy.stats.rankdata(method="average")``)."""
  return stats.rankdata(np.asarray(x, np.float64).ravel(), method="average")


def pearson(x: Any, y: Any) -> float:
  """Pearson correlation ρ = cov(x, y) / (σ_x σ_y); ``nan`` if either input is constant."""
  x, y = _pair("pearson", x, y, 2)
  if np.ptp(x) == 0 or np.ptp(y) == 0:
    return float("nan")
  return _statistic(stats.pearsonr, x, y)


def spearman(x: Any, y: Any) -> float:
  """Spearman's ρ: the Pearson correlation of the average ranks; ``nan`` for a constant input."""
  x, y = _pair("spearman", x, y, 2)
  if np.ptp(x) == 0 or np.ptp(y) == 0:
    return float("nan")
  return _statistic(stats.spearmanr, x, y)


def kendall_tau_b(x: Any, y: Any) -> float:
  """Kendall's τ_b (the tie-corrected τ, ``scipy.stats.kendalltau``'s default):

      τ_b = (n_c - n_d) / sqrt((n_0 - n_x) (n_0 - n_y))

  over the n_0 = n(n-1)/2 pairs, with n_c / n_d concordant / discordant pairs and n_x / n_y pairs
  tied in x / in y. ``nan`` when x or y is constant or has fewer than 2 values.
  """
  x, y = _pair("kendall_tau_b", x, y, 0)
  if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return float("nan")
  return _statistic(stats.kendalltau, x, y)


def list_ranking_metrics(scores_BxK: Any, labels_BxK: Any, candidate_mask_BxK: Any = None) -> dict:
  """Metrics of predicted scores against labelled rankings, one list (prompt) per row.

  Labels are larger-is-better (scores, or ``-rank``). Per list with n >= 2 real candidates:

  * ``kendall_tau``: mean over lists of τ_b(scores, labels); lists where τ_b is undefined (all labels
    tied, or all scores tied) are skipped and counted in ``num_lists_tau_undefined``.
  * ``top1_accuracy``: share of lists whose highest-scoring candidate has the highest label; with
    tied best labels any of them counts (ties broken in the model's favour, since the labels do
    not separate them). A tie for the top *score* counts as wrong unless all tied are best.
  * ``pair_accuracy``: over all candidate pairs with different labels, the share ordered the same
    way by the scores (a tied score is wrong); ``num_pairs``, ``num_tied_label_pairs`` count them.
  """
  scores = np.asarray(scores_BxK, np.float64)
  labels = np.asarray(labels_BxK, np.float64)
  if scores.ndim != 2 or scores.shape != labels.shape:
    raise ValueError(
        f"list_ranking_metrics: scores {scores.shape} and labels {labels.shape} must be "
        "the same [B, K]")
  mask = np.ones(scores.shape, bool) if candidate_mask_BxK is None else \
      np.asarray(candidate_mask_BxK) > 0
  taus, top1 = [], []
  correct = num_pairs = tied_label_pairs = undefined = short = 0
  for s_row, l_row, m_row in zip(scores, labels, mask):
    s, lab = s_row[m_row], l_row[m_row]
    if len(s) < 2:
      short += 1
      continue
    tau = kendall_tau_b(s, lab)
    if np.isnan(tau):
      undefined += 1
    else:
      taus.append(tau)
    top = np.flatnonzero(s == s.max())
    top1.append(bool(np.all(lab[top] == lab.max())))
    ds = np.sign(s[:, None] - s[None, :])
    dl = np.sign(lab[:, None] - lab[None, :])
    iu = np.triu_indices(len(s), k=1)
    ds, dl = ds[iu], dl[iu]
    num_pairs += int(np.sum(dl != 0))
    tied_label_pairs += int(np.sum(dl == 0))
    correct += int(np.sum((dl != 0) & (ds == dl)))
  return {
      "kendall_tau": float(np.mean(taus)) if taus else float("nan"),
      "top1_accuracy": float(np.mean(top1)) if top1 else float("nan"),
      "pair_accuracy": correct / num_pairs if num_pairs else float("nan"),
      "num_lists": len(top1),
      "num_lists_tau_undefined": undefined,
      "num_lists_too_short": short,
      "num_pairs": num_pairs,
      "num_tied_label_pairs": tied_label_pairs,}
