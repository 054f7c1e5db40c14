"""SFT end to end on the synthetic task with the tiny preset: library function, resume, launcher.

Every run here shares one shape set (tiny model, one 80-token bucket, batch 8) so jit compiles
little; the synthetic task is generated once and copied into each workdir.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rlhf_jax import train
from rlhf_jax.algorithms import sft

from offline_fixtures import REPO, SFT_OVERRIDES, load_config, override

# The shared tiny SFT shapes (offline_fixtures), with this file's own loop cadence.
TINY_OVERRIDES = {
    **SFT_OVERRIDES, "eval.print_samples": 1, "loop.num_steps": 8, "loop.log_every": 2,
    "loop.checkpoint_every": 4, "optim.warmup_steps": 2}


def tiny_config(**extra):
  return override(load_config("sft_synthetic"), {**TINY_OVERRIDES, **extra})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sft_full"))
  final = sft.train_and_evaluate(tiny_config(), workdir)
  return workdir, final


def _seed_data(src_workdir, dst_workdir):
  # The synthetic task and its TFDS datasets are deterministic; copying them skips regeneration.
  shutil.copytree(os.path.join(src_workdir, "data"), os.path.join(dst_workdir, "data"))


def test_end_to_end_tiny_run(full_run):
  workdir, final = full_run
  stored = json.load(open(os.path.join(workdir, train.FINAL_METRICS_FILE)))
  assert stored["step"] == 8 and not stored["preempted"]
  # 8 steps from a uniform start (ln 259 = 5.56 nats) must already cut the held-out NLL
  assert 0 < stored["eval_nll_per_token"] < 5.0
  assert -3.0 <= stored["sample_gold_reward"] <= 1.3
  assert stored["reference_policy_gold_reward"] < stored["best_response_gold_reward"]
  rows = train.read_metrics(workdir, "train")
  assert [r["step"] for r in rows] == [2, 4, 6, 8]
  assert rows[-1]["loss"] < rows[0]["loss"]
  samples = [json.loads(l) for l in open(os.path.join(workdir, "samples.jsonl"))]
  assert len(samples) == 4 and {"prompt", "response", "gold"} <= set(samples[0])
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["preset"] == "tiny"
  ckpt = train.load_sft_params(workdir)
  assert ckpt.step == 8 and ckpt.model_config.d_model == 64 and ckpt.tokenizer.vocab_size == 259
  assert ckpt.params["embedding"].shape == (259, 64)


def test_resume_matches_uninterrupted_bit_for_bit(full_run, tmp_path):
  full_dir, _ = full_run
  workdir = str(tmp_path)
  _seed_data(full_dir, workdir)
  first = sft.train_and_evaluate(tiny_config(**{"loop.stop_after_steps": 4}), workdir)
  assert first["preempted"] and first["step"] == 4
  assert not os.path.exists(os.path.join(workdir, train.FINAL_METRICS_FILE))
  second = sft.train_and_evaluate(tiny_config(), workdir)
  assert second["step"] == 8
  a, b = train.load_sft_params(full_dir).params, train.load_sft_params(workdir).params
  for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a),
                               jax.tree_util.tree_leaves_with_path(b), strict=True):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  assert [r["loss"] for r in train.read_metrics(workdir, "train")] == \
      [r["loss"] for r in train.read_metrics(full_dir, "train")]


def test_workdir_with_other_model_config_is_refused(full_run, tmp_path):
  workdir = str(tmp_path)
  shutil.copytree(full_run[0], workdir, dirs_exist_ok=True)
  with pytest.raises(train.WorkdirMismatchError) as err:
    sft.train_and_evaluate(tiny_config(**{"model.d_ff": 96}), workdir)
  assert "model.d_ff: workdir has 128, this run has 96" in str(err.value)


def test_loading_a_workdir_that_is_not_a_finished_sft_run_says_so(full_run, tmp_path):
  with pytest.raises(
      FileNotFoundError, match=r"is not an SFT run's workdir \(missing "
      r"run_fingerprint.json, config.json\).*"
      r"experiments/run.py --config=experiments/configs/sft"):
    train.load_sft_params(str(tmp_path / "empty"))
  started = tmp_path / "started"  # fingerprint and config written, no checkpoint committed yet
  started.mkdir()
  for name in ("run_fingerprint.json", "config.json"):
    shutil.copy(os.path.join(full_run[0], name), started / name)
  with pytest.raises(FileNotFoundError, match="saved no checkpoint yet"):
    train.load_sft_params(str(started))


@pytest.mark.parametrize("key,value,message", [
    ("optim.schedule", "cosin", "config.optim: OptimConfig.schedule='cosin' is invalid; allowed: "
     "cosine | linear | constant"),
    ("data.source", "csv", "SFTDataConfig.source='csv' is invalid; allowed: synthetic | jsonl"),
    ("model.preset", "huge", "allowed presets"),
    ("loop.num_steps", 0, "config.loop: LoopConfig.num_steps=0 is invalid"),])
def test_bad_config_values_name_the_key(tmp_path, key, value, message):
  with pytest.raises(ValueError) as err:
    sft.train_and_evaluate(tiny_config(**{key: value}), str(tmp_path))
  assert message in str(err.value)


def test_unknown_config_keys_are_named(tmp_path):
  config = tiny_config()
  config.optimizer = {"lr": 1.0}
  with pytest.raises(ValueError, match=r"unknown config key\(s\) \['config.optimizer'\]"):
    sft.train_and_evaluate(config, str(tmp_path))
  config = tiny_config()
  config.optim.lrr = 1.0
  with pytest.raises(ValueError, match=r"config.optim.lrr.*allowed keys of config.optim"):
    sft.train_and_evaluate(config, str(tmp_path))


def _launch(workdir, *flags):
  cmd = [
      sys.executable,
      os.path.join(REPO, "experiments", "run.py"), f"--workdir={workdir}",
      f"--config={os.path.join(REPO, 'experiments', 'configs', 'sft_synthetic.py')}"]
  cmd += [
      f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
      for k, v in TINY_OVERRIDES.items()
      if k != "limits.buckets"]
  cmd += ["--config.limits.buckets=(80,)", *flags]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = ""  # one CPU device, as a user would have
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=REPO)


def _wait_for(predicate, proc, timeout=120.0):
  start = time.time()
  while time.time() - start < timeout:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"process exited early ({proc.returncode}):\n{proc.stdout.read()}")
    time.sleep(0.2)
  proc.kill()
  raise AssertionError(f"timed out:\n{proc.stdout.read()}")


def _train_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return [json.loads(l)["step"] for l in open(path) if l.strip().endswith("}")]


def _committed(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.mark.slow
def test_launcher_sigterm_then_kill9_then_resume(full_run, tmp_path):
  workdir = str(tmp_path)
  _seed_data(full_run[0], workdir)
  long_run = ("--config.loop.num_steps=100000", "--config.loop.checkpoint_every=40")
  # 1) SIGTERM mid-run: checkpoint at the current step, exit 0.
  proc = _launch(workdir, *long_run)
  _wait_for(lambda: len(_train_steps(workdir)) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out
  match = re.search(r"signal 15 received: checkpointed step (\d+), stopping", out)
  assert match, out
  stopped_at = int(match.group(1))
  assert stopped_at >= 6 and _committed(workdir)[-1] == stopped_at
  assert not os.path.exists(os.path.join(workdir, train.FINAL_METRICS_FILE))
  # 2) Rerun resumes there; kill -9 after its next periodic checkpoint is committed.
  proc = _launch(workdir, *long_run)
  target = (stopped_at // 40 + 1) * 40
  _wait_for(lambda: target in _committed(workdir), proc, timeout=180)
  proc.kill()  # SIGKILL: no handler runs
  out, _ = proc.communicate(timeout=30)
  assert f"resuming from checkpoint at step {stopped_at}" in out
  last = _committed(workdir)[-1]
  assert last >= target
  # 3) Rerun resumes from the last committed checkpoint and finishes its 5 steps.
  proc = _launch(workdir, *long_run, "--config.loop.stop_after_steps=5")
  out, _ = proc.communicate(timeout=180)
  assert proc.returncode == 0, out
  assert f"resuming from checkpoint at step {last}" in out
  assert _committed(workdir)[-1] == last + 5
  steps = [s for s in _train_steps(workdir)]
  assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated rows after kill


@pytest.mark.slow
def test_launcher_rejects_unknown_flag_key(tmp_path):
  proc = _launch(str(tmp_path), "--config.optim.lrr=0.1")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and "lrr" in out


def _jsonl_config(train_jsonl, eval_jsonl, **extra):
  config = load_config("sft_jsonl")
  values = {
      **TINY_OVERRIDES, "limits.max_prompt_len": 32, "limits.max_response_len": 48,
      "loop.num_steps": 2, "loop.checkpoint_every": 2, "data.train_jsonl": train_jsonl,
      "data.eval_jsonl": eval_jsonl, **extra}
  for key, value in values.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def test_jsonl_config_requires_existing_files(tmp_path):
  with pytest.raises(
      ValueError, match=r"config.data: SFTDataConfig.train_jsonl='/nonexistent.jsonl' "
      r"is invalid; allowed: an existing file"):
    sft.train_and_evaluate(_jsonl_config("/nonexistent.jsonl", "/nonexistent.jsonl"), str(tmp_path))


@pytest.mark.slow
def test_jsonl_config_trains_on_user_files(full_run, tmp_path):
  task = os.path.join(full_run[0], "data", "synthetic")
  final = sft.train_and_evaluate(
      _jsonl_config(os.path.join(task, "sft.jsonl"), os.path.join(task, "sft_test.jsonl")),
      str(tmp_path / "run"))
  assert final["step"] == 2 and 0 < final["eval_nll_per_token"] < 6.0
  assert "sample_gold_reward" not in final  # no gold reward for user data
  assert os.path.isdir(tmp_path / "run" / "data" / "sft_train")


@pytest.mark.slow
def test_launcher_num_seeds_reuses_seed_0_trains_seed_1_and_writes_mean_and_se(full_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(full_run[0], workdir)  # seed 0 = this finished run, with the same config
  proc = _launch(workdir, "--config.num_seeds=2")
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "holds this run, finished: nothing to do" in out  # seed 0 reused, not retrained
  seed1 = os.path.join(workdir, "seed_1")
  c0 = json.load(open(os.path.join(workdir, "config.json")))
  c1 = json.load(open(os.path.join(seed1, "config.json")))
  assert "num_seeds" not in c1 and c1["seed"] == c0["seed"] + 1
  assert c1["data"]["shuffle_seed"] == c0["data"]["shuffle_seed"] + 1
  assert c1["data"]["synthetic_seed"] == c0["data"]["synthetic_seed"]  # the task stays fixed
  f0, f1 = (json.load(open(os.path.join(d, train.FINAL_METRICS_FILE))) for d in (workdir, seed1))
  assert f0["eval_nll_per_token"] != f1["eval_nll_per_token"]  # another init and data order
  stats = json.load(open(os.path.join(workdir, "seeds.json")))
  nll = stats["metrics"]["eval_nll_per_token"]
  x = np.array([f0["eval_nll_per_token"], f1["eval_nll_per_token"]])
  assert stats["num_seeds"] == 2 and nll["n"] == 2
  np.testing.assert_allclose(nll["mean"], x.mean(), rtol=1e-12)
  np.testing.assert_allclose(nll["se"], x.std(ddof=1) / np.sqrt(2), rtol=1e-12)
  assert "step" not in stats["metrics"]  # describes the run, not averaged
  table = open(os.path.join(workdir, "seeds.md")).read()
  assert "| eval_nll_per_token |" in table and table.splitlines()[0] in out


def test_launcher_num_seeds_below_one_is_a_one_line_flag_error(tmp_path):
  proc = _launch(str(tmp_path), "--config.num_seeds=0")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 2, out
  assert "--num_seeds=0 is invalid; allowed: an int >= 1" in out and "Traceback" not in out
