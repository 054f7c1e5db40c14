"""launch/sweep.py --backend=slurm: one job array (task i = grid point i), gathered as locally.

A fake ``sbatch`` on PATH runs the array's tasks as local processes (with SLURM_ARRAY_TASK_ID /
SLURM_ARRAY_JOB_ID, output to the script's ``--output`` pattern) and records how it was called.
"""

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from offline_fixtures import REPO, SFT_OVERRIDES
from test_sweep import FAKE_LAUNCHER

spec = importlib.util.spec_from_file_location("sweep", os.path.join(REPO, "launch", "sweep.py"))
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)

FAKE_SBATCH = r'''#!/usr/bin/env python3
import json, os, re, subprocess, sys
args, script = sys.argv[1:-1], sys.argv[-1]
with open(os.environ["FAKE_SBATCH_LOG"], "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\n")
text = open(script).read()
spec = re.search(r"^#SBATCH --array=(\S+)", text, re.M).group(1)
indices = []
for part in spec.split(","):
  lo, _, hi = part.partition("-")
  indices += range(int(lo), int(hi or lo) + 1)
pattern = re.search(r"^#SBATCH --output=(\S+)", text, re.M).group(1)
job = "4242"
procs = []
for i in indices:
  out = open(pattern.replace("%A", job).replace("%a", str(i)), "w")
  env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_JOB_ID": job}
  procs.append(subprocess.Popen(["bash", script], env=env, stdout=out, stderr=subprocess.STDOUT))
rcs = [p.wait() for p in procs]
print(job)
sys.exit(max(rcs) if "--wait" in args else 0)
'''


@pytest.fixture()
def fake_sbatch(tmp_path, monkeypatch):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "sbatch").write_text(FAKE_SBATCH)
  (bin_dir / "sbatch").chmod(0o755)
  log = tmp_path / "sbatch_calls.jsonl"
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_SBATCH_LOG", str(log))
  return lambda: [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []


def _table(sweep_dir):
  """results.csv without the wall-time column (the only one two backends may differ in)."""
  rows = list(csv.DictReader(open(os.path.join(sweep_dir, "results.csv"))))
  return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_array_script_dry_run_submit_gather_and_resubmit(tmp_path, fake_sbatch, capsys):
  launcher = tmp_path / "fake_launcher.py"
  launcher.write_text(FAKE_LAUNCHER)
  common = [
      f"--launcher={launcher}", "--grid=loss.beta=0.1,2.0", "--grid=seed=0,1",
      "--set=loss.loss_type=ipo"]
  local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"
  local_rows = sweep.main(common + [f"--sweep_dir={local_dir}", "--parallel=2"])
  slurm = common + [
      f"--sweep_dir={slurm_dir}", "--backend=slurm", "--sbatch_arg=--partition=gpu",
      "--sbatch_arg=--gpus-per-node=1"]

  assert sweep.main(slurm + ["--dry_run"]) == [] and fake_sbatch() == []  # nothing submitted
  printed = capsys.readouterr().out
  script = (slurm_dir / "sweep_array.sbatch").read_text()
  assert script in printed + "\n" and "$ sbatch --parsable" in printed
  assert "#SBATCH --array=0-3\n" in script and "#SBATCH --partition=gpu\n" in script
  assert "#SBATCH --gpus-per-node=1\n" in script and '--index="$SLURM_ARRAY_TASK_ID"' in script
  tasks = json.loads((slurm_dir / "sweep_array.json").read_text())
  assert [p["name"] for p in tasks["points"]] == [r["run"] for r in local_rows]  # i = grid point i
  assert [p["workdir"] for p in tasks["points"]
         ] == [os.path.join(str(slurm_dir), r["run"]) for r in local_rows]

  assert sweep.main(slurm) == []  # submitted; the results come with --gather
  assert fake_sbatch() == [["--parsable", str(slurm_dir / "sweep_array.sbatch")]]
  assert "submitted array job 4242 (4 task(s): grid points 0-3)" in capsys.readouterr().out
  assert "sweep task 2: beta-2.0__seed-0 exit 3" in (slurm_dir / "slurm-4242_2.out").read_text()
  rows = sweep.main(slurm + ["--gather"])
  assert _table(slurm_dir) == _table(local_dir)  # failed points included, same status text
  assert [r["status"] == "ok" for r in rows] == [True, True, False, False]
  assert all(isinstance(r["seconds"], float) for r in rows)
  assert (slurm_dir / "frontier.png").stat().st_size > 1000

  # Resubmitting sends only the unfinished points, still as their own grid indices.
  sweep.main(slurm)
  assert "#SBATCH --array=2-3\n" in (slurm_dir / "sweep_array.sbatch").read_text()
  calls = {
      r: len(open(slurm_dir / r / "calls.txt").readlines())
      for r in [p["name"] for p in tasks["points"]]}
  assert calls == {
      "beta-0.1__seed-0": 1, "beta-0.1__seed-1": 1, "beta-2.0__seed-0": 2, "beta-2.0__seed-1": 2}


def test_gather_before_the_array_ran_lists_every_point_as_not_finished(tmp_path, fake_sbatch):
  launcher = tmp_path / "fake_launcher.py"
  launcher.write_text(FAKE_LAUNCHER)
  rows = sweep.main([
      f"--launcher={launcher}", "--grid=loss.beta=0.1,0.5", "--set=seed=0",
      "--set=loss.loss_type=ipo", f"--sweep_dir={tmp_path / 's'}", "--gather"])
  assert [r["status"] for r in rows
         ] == ["failed: not finished (array task pending, running or "
               "lost)"] * 2
  assert fake_sbatch() == []


@pytest.mark.slow
def test_tiny_sft_grid_as_a_job_array_equals_the_local_backend(tmp_path, fake_sbatch):
  """Two real tiny SFT runs per backend (experiments/run.py): the same results table."""
  overrides = {
      **SFT_OVERRIDES, "loop.num_steps": 2, "loop.log_every": 1, "loop.checkpoint_every": 2,
      "optim.warmup_steps": 1, "eval.num_sample_prompts": 0}
  common = [
      f"--config={os.path.join(REPO, 'experiments', 'configs', 'sft_synthetic.py')}",
      "--grid=optim.lr=0.001,0.003", *[f"--set={k}={v}" for k, v in overrides.items()]]
  local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = lambda extra: subprocess.run(  # noqa: E731
      [sys.executable, os.path.join(REPO, "launch", "sweep.py"), *common, *extra], env=env,
      capture_output=True, text=True, timeout=900, cwd=REPO)
  local = run([f"--sweep_dir={local_dir}", "--parallel=2"])
  assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-2000:]
  slurm = run([f"--sweep_dir={slurm_dir}", "--backend=slurm", "--slurm_wait"])
  assert slurm.returncode == 0, slurm.stdout[-2000:] + slurm.stderr[-2000:]
  assert fake_sbatch() == [["--parsable", "--wait", str(slurm_dir / "sweep_array.sbatch")]]
  table = _table(slurm_dir)
  assert table == _table(local_dir)
  assert [r["status"] for r in table] == ["ok", "ok"] and all(r["step"] == "2" for r in table)
  assert re.search(r"\| lr-0\.001 \| 0\.001 \| ok \|", (slurm_dir / "results.md").read_text())
