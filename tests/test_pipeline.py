"""The one-command offline pipeline, on its smoke config: every stage for 1-2 steps, then a rerun."""

import csv
import importlib.util
import os

import pytest

from offline_fixtures import REPO, load_config

spec = importlib.util.spec_from_file_location("pipeline",
                                              os.path.join(REPO, "experiments", "pipeline.py"))
pipeline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pipeline)


@pytest.mark.slow
def test_smoke_pipeline_runs_every_stage_then_reuses_them(tmp_path):
  root = str(tmp_path / "pipeline")
  results = pipeline.run_pipeline(load_config("pipeline_synthetic", "smoke"), root, "pytest")
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

  # Second invocation: every stage is reused from its final_metrics.json, nothing is retrained.
  again = pipeline.run_pipeline(load_config("pipeline_synthetic", "smoke"), root, "pytest")
  assert all(r["_status"] == "reused" for r in again.values())
  assert [r["gold_reward"] for r in csv.DictReader(open(os.path.join(root, "results.csv")))] == \
      [r["gold_reward"] for r in rows]


def test_unknown_stage_is_refused(tmp_path):
  config = load_config("pipeline_synthetic", "smoke")
  config.stages = "sft,ppo"
  with pytest.raises(ValueError, match=r"unknown stage\(s\) \['ppo'\]"):
    pipeline.run_pipeline(config, str(tmp_path))
