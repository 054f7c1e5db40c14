"""Seeds in the pipeline: mean ± standard error against NumPy, the seed offsets, the seed table."""

import csv
import importlib.util
import json
import math
import os

import numpy as np
import pytest

from offline_fixtures import REPO, load_config
from rlhf_jax.eval import seeds

spec = importlib.util.spec_from_file_location("pipeline",
                                              os.path.join(REPO, "experiments", "pipeline.py"))
pipeline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pipeline)


def test_mean_se_matches_numpy_and_skips_missing_values():
  x = np.array([0.51, 0.32, 0.44])
  # s.e. = sample std (ddof 1) / sqrt(n), written out by hand
  mean = (0.51 + 0.32 + 0.44) / 3
  se = math.sqrt(((0.51 - mean)**2 + (0.32 - mean)**2 + (0.44 - mean)**2) / 2) / math.sqrt(3)
  stat = seeds.mean_se([0.51, None, 0.32, float("nan"), 0.44, "failed"])
  assert stat.n == 3
  assert stat.mean == pytest.approx(mean, abs=1e-12) == pytest.approx(x.mean())
  assert stat.se == pytest.approx(se, abs=1e-12) == pytest.approx(x.std(ddof=1) / np.sqrt(3))
  assert seeds.mean_se([0.5]) == seeds.Stat(0.5, None, 1)
  assert seeds.mean_se([None]) == seeds.Stat(None, None, 0)


def test_paired_difference_uses_per_seed_differences():
  a, b = [0.60, 0.40, 0.55], [0.50, 0.31, 0.47]  # b tracks a: the paired error is small
  d = np.array(a) - np.array(b)
  diff = seeds.paired_difference(a, b)
  assert diff.mean == pytest.approx(d.mean()) and diff.se == pytest.approx(d.std(ddof=1) / 3**0.5)
  assert seeds.supported(diff)  # 0.09 ± 0.003
  # unpaired, the two error bars overlap: the pairing is what supports the ordering
  sa, sb = seeds.mean_se(a), seeds.mean_se(b)
  assert sa.mean - sa.se < sb.mean + sb.se
  assert not seeds.supported(seeds.paired_difference([0.6, 0.4, 0.5], [0.4, 0.6, 0.5]))
  assert seeds.paired_difference([0.6, None], [0.5, 0.4]).n == 1  # seed 1 has no pair


def test_format_mean_se_rounds_the_mean_to_the_error():
  assert seeds.format_mean_se(seeds.Stat(0.50712, 0.03123, 3)) == "0.507 ± 0.031"
  assert seeds.format_mean_se(seeds.Stat(12.017, 1.534, 3)) == "12.0 ± 1.5"
  assert seeds.format_mean_se(seeds.Stat(120.0, 15.2, 3)) == "120 ± 15"
  assert seeds.format_mean_se(seeds.Stat(0.50712, None, 1)) == "0.5071"
  assert seeds.format_mean_se(seeds.Stat(0.0, 0.0, 3)) == "0"
  assert seeds.format_mean_se(seeds.mean_se([0.7, 0.7, 0.7])) == "0.7"  # s.e. 8e-17: rounding


def test_aggregate_rows_per_method():
  seed_rows = [[{"method": "sft", "gold_reward": 0.0, "status": "ok"},
                {"method": "dpo", "gold_reward": 0.5, "steps": 120, "status": "ok"}],
               [{"method": "sft", "gold_reward": 0.1, "status": "ok"},
                {"method": "dpo", "gold_reward": 0.3, "steps": 120, "status": "reused"}],
               [{"method": "sft", "gold_reward": 0.2, "status": "ok"}]]
  agg = seeds.aggregate_rows(seed_rows, ["gold_reward"], ["steps"])
  assert [r["method"] for r in agg] == ["sft", "dpo"]
  assert agg[0]["gold_reward"] == pytest.approx(0.1)
  assert agg[0]["gold_reward_se"] == pytest.approx(np.std([0, .1, .2], ddof=1) / 3**0.5)
  assert agg[1]["num_seeds"] == 2 and agg[1]["gold_reward_n"] == 2 and agg[1]["steps"] == 120
  assert agg[1]["status"] == "seed 0: ok; seed 1: reused; seed 2: missing"
  assert agg[0]["status"] == "ok"


def test_seed_config_offsets_every_rng_seed_but_the_task():
  config = load_config("pipeline_synthetic", "default")
  assert config.num_seeds == 3 and load_config("pipeline_synthetic", "smoke").num_seeds == 1
  assert pipeline.seed_keys(config.best_of_n) == [
      "bon.seed", "data.shuffle_seed", "eval.seed", "seed"]
  assert pipeline.seed_config(config.dpo, 0).to_dict() == config.dpo.to_dict()
  dpo2 = pipeline.seed_config(config.dpo, 2)
  assert (dpo2.seed, dpo2.data.shuffle_seed, dpo2.eval.seed,
          dpo2.lora.seed) == (config.dpo.seed + 2, config.dpo.data.shuffle_seed + 2,
                              config.dpo.eval.seed + 2, config.dpo.lora.seed + 2)
  assert dpo2.data.synthetic_seed == config.dpo.data.synthetic_seed
  assert config.dpo.eval.seed == 1234  # the original is untouched
  assert pipeline.seed_root("/w", 0) == "/w" and pipeline.seed_root("/w", 2) == "/w/seed_2"
  config.num_seeds = 0
  with pytest.raises(ValueError, match="config.num_seeds=0 is invalid"):
    pipeline.num_seeds(config)


def _fake_seed(sft_gold, dpo_gold, dpo_kl, status="ok"):
  return {
      "sft": {"step": 2, "_status": status, "_seconds": 10.0},
      "rm": {"step": 2, "_status": status, "_seconds": 5.0}, "dpo": {
          "method": "dpo:sigmoid", "sft_gold_reward": sft_gold, "gold_reward": dpo_gold,
          "kl_to_sft": dpo_kl, "win_rate_vs_sft": 0.6, "step": 2, "_status": status,
          "_seconds": 3.0}}


def test_summarize_over_seeds_writes_mean_se_and_per_seed_rows(tmp_path):
  root = str(tmp_path)
  results = [_fake_seed(0.0, 0.5, 10.0), _fake_seed(0.1, 0.7, 14.0, "reused")]
  table = pipeline.summarize(results, root, 30.0, "pytest")
  assert "| dpo:sigmoid | 0.60 ± 0.10 | 0.550 ± 0.050 | 12.0 ± 2.0 |" in table
  rows = list(csv.DictReader(open(os.path.join(root, "results.csv"))))
  assert [(r["method"], r["seed"]) for r in rows] == [("sft", "mean"), ("reward model", "mean"),
                                                      ("dpo:sigmoid", "mean"), ("sft", "0"),
                                                      ("reward model", "0"), ("dpo:sigmoid", "0"),
                                                      ("sft", "1"), ("reward model", "1"),
                                                      ("dpo:sigmoid", "1")]
  assert float(rows[2]["gold_reward_se"]) == pytest.approx(0.1)
  assert rows[2]["status"] == "seed 0: ok; seed 1: reused"
  md = open(os.path.join(root, "results.md")).read()
  assert "(2 seeds)" in md and "paired by seed" in md and "## Each seed" in md
  assert "dpo:sigmoid > sft (0.550 ± 0.050)" in md  # 0.55 > 2 x 0.05
  assert os.path.getsize(os.path.join(root, "frontier.png")) > 1000
  # one seed: the single-run table and columns, as before seeds existed
  pipeline.summarize(results[:1], root, 30.0, "pytest")
  one = list(csv.DictReader(open(os.path.join(root, "results.csv"))))
  assert list(one[0]) == list(pipeline.COLUMNS) and len(one) == 3


def test_report_only_tables_the_finished_stages_of_every_seed_without_training(tmp_path):
  root = str(tmp_path)
  finished = {0: _fake_seed(0.0, 0.5, 10.0), 1: _fake_seed(0.1, 0.7, 14.0)}
  del finished[1]["dpo"]  # seed 1's DPO has not finished: its row has one seed
  for k, stages in finished.items():
    for name, final in stages.items():
      workdir = os.path.join(pipeline.seed_root(root, k), name)
      os.makedirs(workdir)
      with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump({key: v for key, v in final.items() if not key.startswith("_")}, f)
  config = load_config("pipeline_synthetic", "smoke")
  config.num_seeds = 2
  results = pipeline.run_pipeline(config, root, "pytest", report_only=True)
  assert [list(r) for r in results] == [["sft", "rm", "dpo"], ["sft", "rm"]]
  assert all(r["_status"] == "reused" for seed in results for r in seed.values())
  rows = {
      (r["method"], r["seed"]): r for r in csv.DictReader(open(os.path.join(root, "results.csv")))}
  assert rows["dpo:sigmoid", "mean"]["num_seeds"] == "1"
  assert rows["dpo:sigmoid", "mean"]["gold_reward_se"] == ""  # one seed: no error bar
  assert not os.path.exists(os.path.join(root, "ipo"))  # nothing was trained
