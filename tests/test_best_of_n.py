"""Best-of-n: selection and analytic KL on hand-made scores, and a tiny run through the RM API."""

import math
import os

import numpy as np
import pytest

from offline_fixtures import load_config, override, tiny_rm_workdir, tiny_sft_workdir
from rlhf_jax.algorithms.offline import best_of_n


def test_rows_select_by_reward_model_and_report_analytic_kl():
  rm = np.array([[0.0, 1.0, 0.5, 2.0], [3.0, 1.0, 0.0, 0.0]])
  gold = np.array([[1.0, -1.0, 0.5, 0.2], [0.0, 1.0, 1.3, 0.0]])
  lengths = np.array([[5, 6, 7, 8], [1, 2, 3, 4]], np.float32)
  rows = best_of_n.best_of_n_rows(rm, gold, lengths, sft_gold_S=np.array([0.0, 0.0]), ns=(4, 1, 2))
  assert [r["n"] for r in rows] == [1.0, 2.0, 4.0]
  one, two, four = rows
  assert one["kl_to_sft"] == 0.0 and one["gold_reward"] == pytest.approx(0.5)
  assert two["gold_reward"] == pytest.approx((-1.0 + 0.0) / 2)  # RM picks col 1 and col 0
  assert two["kl_to_sft"] == pytest.approx(math.log(2) - 0.5)
  assert four["gold_reward"] == pytest.approx(
      (0.2 + 0.0) / 2) and four["response_length"] == 4.5  # lengths 8 and 1
  assert four["oracle_gold_reward"] == pytest.approx((1.0 + 1.3) / 2)
  assert two["win_rate_vs_sft"] == pytest.approx(0.25)  # a loss and a tie
  with pytest.raises(ValueError, match="BestOfNConfig.ns"):
    best_of_n.BestOfNConfig(ns=(0, 2))
  with pytest.raises(ValueError, match="BestOfNDataConfig.eval_jsonl"):
    best_of_n.BestOfNDataConfig(source="jsonl")


@pytest.mark.slow
def test_tiny_run_writes_curve_and_final_metrics(tmp_path_factory, tmp_path):
  sft_dir = tiny_sft_workdir(tmp_path_factory)
  rm_dir = tiny_rm_workdir(tmp_path_factory, sft_dir)
  config = override(
      load_config("best_of_n_synthetic"), {
          "sources.sft_workdir": sft_dir, "sources.reward_model_workdir": rm_dir, "bon.ns":
              (1, 2, 4), "eval.num_prompts": 4, "eval.max_new_tokens": 8, "eval.print_samples": 0})
  final = best_of_n.train_and_evaluate(config, str(tmp_path))
  assert final["method"] == "best_of_4" and final["n"] == 4.0
  assert final["kl_to_sft"] == pytest.approx(math.log(4) - 0.75)
  assert [r["n"] for r in final["curve"]] == [1.0, 2.0, 4.0]
  # the RM's choice among the first n is nested: its RM reward never decreases with n
  rms = [r["rm_reward"] for r in final["curve"]]
  assert rms == sorted(rms)
  assert final["oracle_gold_reward"] >= final["gold_reward"]
  lines = open(os.path.join(str(tmp_path), best_of_n.CURVE_FILE)).read().splitlines()
  assert lines[0].startswith("n,gold_reward") and len(lines) == 4
