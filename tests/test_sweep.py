"""launch/sweep.py with a stand-in launcher (no JAX): expansion, parallel runs, failures, skipping."""

import csv
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from offline_fixtures import REPO

spec = importlib.util.spec_from_file_location("sweep", os.path.join(REPO, "launch", "sweep.py"))
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)

# A launcher with the experiments/*.py command-line contract: --workdir, --config, --config.k=v.
FAKE_LAUNCHER = r'''
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
workdir = args["workdir"]
beta, seed = float(args["config.loss.beta"]), int(args["config.seed"])
with open(os.path.join(workdir, "calls.txt"), "a") as f:
  f.write("call\n")
if beta > 1.0:
  print("ValueError: beta too large for this fake", file=sys.stderr)
  sys.exit(3)
final = {"gold_reward": 0.1 + beta + 0.01 * seed, "kl_to_sft": 10 * beta, "sft_gold_reward": 0.1,
         "win_rate_vs_sft": 0.6, "step": 5, "method": args["config.loss.loss_type"]}
json.dump(final, open(os.path.join(workdir, "final_metrics.json"), "w"))
'''


def test_grid_parsing_and_expansion():
  grid = sweep.parse_grid(["loss.loss_type=sigmoid,bco_pair;ipo", "config.loss.beta=0.1,0.3"])
  assert grid == [("loss.loss_type", ["sigmoid,bco_pair", "ipo"]), ("loss.beta", ["0.1", "0.3"])]
  points = sweep.expand(grid)
  assert len(points) == 4 and points[0] == {
      "loss.loss_type": "sigmoid,bco_pair", "loss.beta": "0.1"}
  assert sweep.run_name(points[0]) == "loss_type-sigmoid_bco_pair__beta-0.1"
  with pytest.raises(ValueError, match="not key=value"):
    sweep.parse_grid(["loss.beta"])


def test_sweep_runs_reports_failures_and_skips_finished_runs(tmp_path):
  launcher = tmp_path / "fake_launcher.py"
  launcher.write_text(FAKE_LAUNCHER)
  sweep_dir = tmp_path / "sweep"
  argv = [
      f"--launcher={launcher}", "--grid=loss.beta=0.1,0.5,2.0", "--grid=seed=0,1",
      "--set=loss.loss_type=ipo", f"--sweep_dir={sweep_dir}", "--parallel=2"]
  rows = sweep.main(argv)
  assert len(rows) == 6
  failed = [r for r in rows if r["status"].startswith("failed")]
  assert [r["run"] for r in failed] == ["beta-2.0__seed-0", "beta-2.0__seed-1"]
  assert "exit 3" in failed[0]["status"] and "beta too large" in failed[0]["status"]
  ok = {r["run"]: r for r in rows if r["status"] == "ok"}
  assert ok["beta-0.5__seed-1"]["gold_reward"] == pytest.approx(0.61)
  table = list(csv.DictReader(open(sweep_dir / "results.csv")))
  assert [r["run"] for r in table] == [r["run"] for r in rows]  # failed runs are rows too
  assert table[4]["status"].startswith("failed") and table[4]["gold_reward"] == ""
  md = (sweep_dir / "results.md").read_text()
  assert "| beta-2.0__seed-0 | 2.0 | 0 | failed (exit 3)" in md
  assert (sweep_dir / "frontier.png").stat().st_size > 1000

  # rerun: the 4 finished runs are skipped, the 2 failed ones are attempted again
  rows = sweep.main(argv)
  calls = {r["run"]: len(open(sweep_dir / r["run"] / "calls.txt").readlines()) for r in rows}
  assert calls == {
      "beta-0.1__seed-0": 1, "beta-0.1__seed-1": 1, "beta-0.5__seed-0": 1, "beta-0.5__seed-1": 1,
      "beta-2.0__seed-0": 2, "beta-2.0__seed-1": 2}
  assert sum(r["status"] == "finished earlier (skipped)" for r in rows) == 4


def test_command_line_exit_status_reflects_failures(tmp_path):
  launcher = tmp_path / "fake_launcher.py"
  launcher.write_text(FAKE_LAUNCHER)
  base = [
      sys.executable,
      os.path.join(REPO, "launch", "sweep.py"), f"--launcher={launcher}",
      "--set=loss.loss_type=sigmoid", "--grid=seed=0"]
  good = subprocess.run(base + ["--grid=loss.beta=0.1", f"--sweep_dir={tmp_path / 'a'}"],
                        capture_output=True, text=True)
  assert good.returncode == 0, good.stderr
  bad = subprocess.run(base + ["--grid=loss.beta=3.0", f"--sweep_dir={tmp_path / 'b'}"],
                       capture_output=True, text=True)
  assert bad.returncode == 1 and "1 run(s) failed" in bad.stdout


@pytest.mark.parametrize("config, grid, why", [
    ("ppo_synthetic.py", ["seed=0,1"], "its step is a host loop"),
    ("dpo_synthetic.py", ["model.d_model=16,32"], r"\['model.d_model'\] cannot be vectorised"),
    ("rm_synthetic.py", ["seed=0,1"], "rm.early_stopping_patience > 0"),])
def test_vectorize_refuses_in_one_line_before_training(tmp_path, config, grid, why):
  with pytest.raises(SystemExit) as refused:
    sweep.run_sweep(launcher="", config=os.path.join(REPO, "experiments", "configs",
                                                     config), grid=sweep.parse_grid(grid), fixed={},
                    sweep_dir=str(tmp_path), vectorize=True, log=lambda msg: None)
  message = str(refused.value)
  assert message.startswith("sweep: ") and "\n" not in message
  assert re.search(why, message), message
  assert os.listdir(tmp_path) == []  # no run was started
