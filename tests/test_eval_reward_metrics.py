"""Reward-model metrics: hand-computed values and brute-force definitions of the rank statistics."""

import itertools
import math

import numpy as np
import pytest

from rlhf_jax.eval import ranking_metrics as rk
from rlhf_jax.eval import reward_metrics as rm


def _tau_b_by_pairs(x, y):
  """τ_b straight from its definition, one pair at a time."""
  nc = nd = tx = ty = n0 = 0
  for i, j in itertools.combinations(range(len(x)), 2):
    n0 += 1
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    tx += sx == 0
    ty += sy == 0
    nc += sx * sy > 0
    nd += sx * sy < 0
  return (nc - nd) / math.sqrt((n0 - tx) * (n0 - ty))


def test_rankdata_average_ties():
  np.testing.assert_allclose(rk.rankdata([3.0, 1.0, 3.0, 2.0, 3.0]), [4.0, 1.0, 4.0, 2.0, 4.0])
  x = np.random.default_rng(0).integers(0, 5, 40)
  # average rank = 1 + (# smaller) + (# equal - 1) / 2
  expected = [1 + np.sum(x < v) + (np.sum(x == v) - 1) / 2 for v in x]
  np.testing.assert_allclose(rk.rankdata(x), expected)


def test_kendall_tau_b_hand_and_by_pairs():
  # x = (1, 2, 3), y = (1, 3, 2): pairs (12 +, 13 +, 23 -) -> (2 - 1) / 3.
  assert rk.kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
  # Ties: x = (1, 1, 2), y = (1, 2, 3): n0 = 3, n_x = 1, n_y = 0, nc = 2, nd = 0 -> 2 / sqrt(2 * 3).
  assert rk.kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
  assert math.isnan(rk.kendall_tau_b([1, 1, 1], [1, 2, 3]))
  assert math.isnan(rk.kendall_tau_b([1.0], [2.0]))
  rng = np.random.default_rng(1)
  for _ in range(5):
    x, y = rng.integers(0, 4, 12), rng.normal(size=12)
    assert rk.kendall_tau_b(x, y) == pytest.approx(_tau_b_by_pairs(x, y), abs=1e-12)


def test_pearson_spearman():
  x = np.array([1.0, 2.0, 3.0, 4.0])
  assert rk.pearson(x, 2 * x + 1) == pytest.approx(1.0)
  assert rk.spearman(x, x**3) == pytest.approx(1.0)
  assert math.isnan(rk.pearson(x, np.ones(4))) and math.isnan(rk.spearman(np.ones(4), x))
  with pytest.raises(ValueError, match="equal-length"):
    rk.pearson(x, x[:3])
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=30), rng.normal(size=30)
  assert rk.pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
  b[:5] = b[5]  # ties: Spearman is Pearson of the average ranks
  assert rk.spearman(a, b) == pytest.approx(
      np.corrcoef(rk.rankdata(a), rk.rankdata(b))[0, 1], abs=1e-12)


def test_roc_auc_hand_values():
  # positives 0.9, 0.4 vs negatives 0.5, 0.1: 3 of 4 pairs ordered -> 0.75.
  assert rm.roc_auc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == pytest.approx(0.75)
  # a tie between a positive and a negative counts 1/2: (1 + 0.5) / 2.
  assert rm.roc_auc([1, 1, 0], [0.9, 0.5, 0.5]) == pytest.approx(0.75)
  assert math.isnan(rm.roc_auc([1, 1], [0.1, 0.2]))


def test_binary_metrics_hand_values():
  # predictions (score > 0): 1 1 0 0 1 ; labels 1 0 0 1 1 -> tp 2, fp 1, fn 1.
  out = rm.binary_metrics([1, 0, 0, 1, 1], [2.0, 1.0, -1.0, -0.5, 0.3])
  assert out["accuracy"] == pytest.approx(3 / 5)
  assert out["precision"] == pytest.approx(2 / 3)
  assert out["recall"] == pytest.approx(2 / 3)
  assert out["f1"] == pytest.approx(2 / 3)


def test_expected_calibration_error_hand_value():
  # Two bins over confidence [0.5, 1]: p = 0.6, 0.6 (conf 0.6, bin 0) and p = 0.1 (conf 0.9, bin 1).
  # bin 0: predictions 1, 1 vs labels 1, 0 -> acc 0.5, conf 0.6; bin 1: prediction 0, label 0 -> acc 1.
  ece = rm.expected_calibration_error([0.6, 0.6, 0.1], [1, 0, 0], num_bins=2)
  assert ece == pytest.approx((2 / 3) * 0.1 + (1 / 3) * 0.1)
  with pytest.raises(ValueError, match="num_bins"):
    rm.expected_calibration_error([0.5], [1], num_bins=0)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    rm.expected_calibration_error([1.5], [1])


def test_pairwise_metrics_definitions():
  rc = np.array([2.0, 1.0, 0.0, 0.5, -1.0])
  rr = np.array([1.0, 2.0, 0.0, 0.0, -3.0])
  out = rm.pairwise_metrics(rc, rr, seed=0)
  delta = rc - rr
  assert out["accuracy"] == pytest.approx(3 / 5)  # the tie (delta = 0) is wrong
  assert out["num_ties"] == 1 and out["num_pairs"] == 5
  # AUC over both orientations = P(delta_i > -delta_j), ties 1/2.
  auc = np.mean([(d > -e) + 0.5 * (d == -e) for d in delta for e in delta])
  assert out["auc"] == pytest.approx(auc)
  first = np.random.default_rng(0).random(5) < 0.5
  ref = rm.binary_metrics(first, np.where(first, delta, -delta))
  for key in ("precision", "recall", "f1"):
    assert out[key] == pytest.approx(ref[key], nan_ok=True)
  assert out["log_loss"] == pytest.approx(np.mean(np.log1p(np.exp(-delta))))
  perfect = rm.pairwise_metrics([3.0, 2.0, 5.0], [0.0, 1.0, 4.0])
  assert perfect["accuracy"] == 1.0 and perfect["auc"] == 1.0
  with pytest.raises(ValueError, match="NaN"):
    rm.pairwise_metrics([np.nan], [0.0])


def test_gold_pairwise_metrics_hand_values():
  tau = 0.5
  gc, gr = np.array([1.0, 0.0, 0.2]), np.array([0.0, 0.5, 0.2])
  rc, rr = np.array([1.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])
  q = 1 / (1 + np.exp(-(gc - gr) / tau))
  out = rm.gold_pairwise_metrics(rc, rr, gc, gr, tau)
  assert out["bayes_optimal_accuracy"] == pytest.approx(np.mean(np.maximum(q, 1 - q)))
  assert out["expected_accuracy"] == pytest.approx(np.mean([q[0], q[1], 1 - q[2]]))
  assert out["gold_agreement"] == pytest.approx(0.5)  # pair 3 has tied gold and is excluded
  assert out["num_gold_ties"] == 1
  # The expected accuracy never exceeds the Bayes-optimal one.
  rng = np.random.default_rng(3)
  g1, g2, r1, r2 = rng.normal(size=(4, 200))
  out = rm.gold_pairwise_metrics(r1, r2, g1, g2, 0.25)
  assert out["expected_accuracy"] <= out["bayes_optimal_accuracy"] + 1e-12
  ideal = rm.gold_pairwise_metrics(g1, g2, g1, g2, 0.25)
  assert ideal["expected_accuracy"] == pytest.approx(ideal["bayes_optimal_accuracy"])


def test_list_ranking_metrics_with_ties_and_padding():
  scores = np.array([[3.0, 2.0, 1.0, 0.0], [1.0, 2.0, 3.0, 9.0], [1.0, 1.0, 0.0, 0.0]])
  labels = np.array([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0], [2.0, 2.0, 1.0, 0.0]])
  mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]])
  out = rk.list_ranking_metrics(scores, labels, mask)
  # row 0: tau 1, top-1 right; row 1 (3 real): tau -1, top-1 wrong; row 2: tied best labels, tied
  # best scores -> top-1 right; tau_b over (1, 1, 0) vs (2, 2, 1) = 2 / sqrt(2 * 2) = 1.
  assert out["kendall_tau"] == pytest.approx((1.0 - 1.0 + 1.0) / 3)
  assert out["top1_accuracy"] == pytest.approx(2 / 3)
  # pairs with distinct labels: 6 + 3 + 2 = 11; correct: 6 + 0 + 2 = 8; one tied-label pair.
  assert out["num_pairs"] == 11 and out["num_tied_label_pairs"] == 1
  assert out["pair_accuracy"] == pytest.approx(8 / 11)
  assert rk.kendall_tau_b(scores[2, :3], labels[2, :3]) == pytest.approx(
      _tau_b_by_pairs(scores[2, :3], labels[2, :3]))


def test_regression_metrics():
  out = rm.regression_metrics([0.0, 1.0, 2.0], [0.0, 1.0, 4.0])
  assert out["mse"] == pytest.approx(4 / 3) and out["mae"] == pytest.approx(2 / 3)
  assert out["spearman"] == pytest.approx(1.0)
