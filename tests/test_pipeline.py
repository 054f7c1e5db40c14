"""The one-command offline pipeline, on its smoke config: every stage for 1-2 steps, then a rerun
that adds a second seed to three of the stages (seed 0 reused, seed 1 trained, the ± table)."""

import csv
import importlib.util
import json
import os

import numpy as np
import pytest

from offline_fixtures import REPO, load_config

spec = importlib.util.spec_from_file_location("pipeline",
                                              os.path.join(REPO, "experiments", "pipeline.py"))
pipeline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pipeline)


@pytest.mark.slow
def test_smoke_pipeline_runs_every_stage_then_reuses_them(tmp_path):
  root = str(tmp_path / "pipeline")
  [results] = pipeline.run_pipeline(load_config("pipeline_synthetic", "smoke"), root, "pytest")
  assert list(results) == ["sft", "rm", "dpo", "ipo", "kto", "pro", "rrhf", "raft", "best_of_n"]
  assert all(r["_status"] == "ok" for r in results.values()), {
      k: r["_status"] for k, r in results.items()}
  rows = list(csv.DictReader(open(os.path.join(root, "results.csv"))))
  assert [r["method"] for r in rows] == [
      "sft", "reward model", "dpo:sigmoid", "ipo", "kto", "pro", "rrhf", "raft", "best_of_2"]
  for row in rows[2:]:
    assert row["gold_reward"] and row["kl_to_sft"] and row["win_rate_vs_sft"], row
    assert float(row["gold_gain_vs_sft"]) == pytest.approx(
        float(row["gold_reward"]) - float(rows[0]["gold_reward"]), abs=1e-6)
  md = open(os.path.join(root, "results.md")).read()
  assert "Command: `pytest`" in md and "| dpo:sigmoid |" in md
  assert os.path.getsize(os.path.join(root, "frontier.png")) > 1000

  # Second invocation, two seeds: seed 0's stages are reused from their final_metrics.json (the
  # one-seed layout is seed 0's), seed 1 trains in seed_1/ with its own seeds; the table has ±.
  config = load_config("pipeline_synthetic", "smoke")
  config.num_seeds, config.stages = 2, "sft,rm,dpo"
  again = pipeline.run_pipeline(config, root, "pytest")
  assert [r["_status"] for r in again[0].values()] == ["reused"] * 3
  assert [r["_status"] for r in again[1].values()] == ["ok"] * 3, again[1]
  assert os.path.isfile(os.path.join(root, "seed_1", "dpo", "final_metrics.json"))
  assert again[1]["sft"]["_status"] == "ok"
  seeded = list(csv.DictReader(open(os.path.join(root, "results.csv"))))
  by = {(r["method"], r["seed"]): r for r in seeded}
  for method in ("sft", "dpo:sigmoid"):  # seed 0's rows are the first run's numbers
    assert by[method,
              "0"]["gold_reward"] == next(r["gold_reward"] for r in rows if r["method"] == method)
  # seed 1 is another run (another SFT init and data order), not a copy of seed 0
  first_loss = [
      next(
          json.loads(line)["loss"]
          for line in open(os.path.join(d, "sft", "metrics.jsonl"))
          if json.loads(line).get("split") == "train")
      for d in (root, os.path.join(root, "seed_1"))]
  assert first_loss[0] != first_loss[1]
  gold = [float(by["dpo:sigmoid", k]["gold_reward"]) for k in "01"]
  assert float(by["dpo:sigmoid", "mean"]["gold_reward"]) == pytest.approx(np.mean(gold))
  assert float(by["dpo:sigmoid",
                  "mean"]["gold_reward_se"]) == pytest.approx(np.std(gold, ddof=1) / np.sqrt(2))
  md = open(os.path.join(root, "results.md")).read()
  assert "(2 seeds)" in md and " ± " in md.split("| dpo:sigmoid |")[1].split("\n")[0]


def test_unknown_stage_is_refused(tmp_path):
  config = load_config("pipeline_synthetic", "smoke")
  config.stages = "sft,ppo"
  with pytest.raises(ValueError, match=r"unknown stage\(s\) \['ppo'\]"):
    pipeline.run_pipeline(config, str(tmp_path))
