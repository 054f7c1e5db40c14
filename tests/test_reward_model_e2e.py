"""Reward model end to end on the synthetic task: tiny SFT -> RM (early stopping) -> normalisation
-> report -> load + score, plus resume and the learning-curve plot. Tiny preset, one 64-token bucket."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from rlhf_jax import train
from rlhf_jax.algorithms import sections
from rlhf_jax.algorithms.reward import trainer as reward_model
from rlhf_jax.algorithms.reward import stats as reward_stats
from rlhf_jax.algorithms.reward import sweep as reward_sweep
from rlhf_jax.algorithms import sft
from rlhf_jax.eval import reward_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments", "configs"))
import rm_synthetic  # noqa: E402  pylint: disable=wrong-import-position
import sft_synthetic  # noqa: E402  pylint: disable=wrong-import-position

DATA = {
    "synthetic_num_prompts": 64, "synthetic_num_test_prompts": 16, "max_prompt_len": 24,
    "max_response_len": 40, "buckets": (64,)}


def _split_limits(values):
  """``DATA`` as ``data.*`` / ``limits.*`` overrides (the shared config vocabulary)."""
  limits = ("max_prompt_len", "max_response_len", "buckets")
  return {f"{'limits' if k in limits else 'data'}.{k}": v for k, v in values.items()}


def _set(config, overrides):
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("rm_e2e")
  sft_dir, rm_dir = str(root / "sft"), str(root / "rm")
  sft_cfg = _set(
      sft_synthetic.get_config(), {
          "model.preset": "tiny", **_split_limits(DATA), "data.batch_size": 8,
          "data.eval_batch_size": 16, "eval.num_sample_prompts": 4, "loop.num_steps": 4,
          "loop.eval_every": 0, "loop.checkpoint_every": 4, "optim.warmup_steps": 1})
  sft.train_and_evaluate(sft_cfg, sft_dir)
  rm_cfg = _set(
      rm_synthetic.get_config("bradley_terry"), {
          "sources.sft_workdir": sft_dir, "rm.early_stopping_patience": 1,
          **_split_limits(DATA), "data.batch_size": 8, "data.eval_batch_size": 16,
          "loop.num_steps": 8, "loop.eval_every": 2, "loop.checkpoint_every": 2,
          "loop.log_every": 2, "optim.warmup_steps": 1, "optim.lr": 3e-3,
          "eval.num_normalization_prompts": 8, "eval.samples_per_prompt": 2,
          "eval.num_gold_prompts": 8, "eval.sample_batch": 8})
  final = reward_model.train_and_evaluate(rm_cfg, rm_dir)
  return rm_dir, rm_cfg, final


@pytest.mark.slow
def test_rm_from_sft_writes_artifact_report_and_metrics(rm_run):
  rm_dir, _, final = rm_run
  stored = json.load(open(os.path.join(rm_dir, reward_model.FINAL_METRICS_FILE)))
  for key in ("pairwise/accuracy", "pairwise/auc", "pairwise/ece", "pairwise/f1",
              "gold/bayes_optimal_accuracy", "gold/expected_accuracy", "gold/gold_agreement",
              "ranked/kendall_tau", "ranked/top1_accuracy", "gold_corr/gold/spearman", "eval_loss"):
    assert key in stored, key
  assert 0.5 < stored["gold/bayes_optimal_accuracy"] <= 1.0
  assert stored["gold/expected_accuracy"] <= stored["gold/bayes_optimal_accuracy"] + 1e-9
  assert stored["pairwise/num_pairs"] == 16
  report = open(os.path.join(rm_dir, reward_report.REPORT_MD)).read()
  assert "Bayes-optimal accuracy" in report and "Kendall" in report
  # The saved params are those of the best held-out loss seen (early stopping keeps them).
  es = json.load(open(os.path.join(rm_dir, reward_model.EARLY_STOPPING_FILE)))
  assert final["final_params_step"] == es["best_step"]
  info = reward_model.read_reward_model_info(rm_dir)
  assert info.step == es["best_step"] and info.objective == "bradley_terry"
  assert "SFT samples: 8 prompts x 2" in info.normalization["source"]


@pytest.mark.slow
def test_normalised_rewards_have_mean_0_std_1_on_the_sft_samples(rm_run):
  rm_dir, rm_cfg, _ = rm_run
  ckpt = train.load_sft_params(rm_cfg.sources.sft_workdir)
  handle = reward_model.load_reward_model(rm_dir, policy_tokenizer=ckpt.tokenizer)
  # Re-draw exactly the normalisation samples (same prompts, seed and sampler settings).
  data_cfg = reward_model.RMDataConfig(**rm_cfg.data.to_dict())
  limits = sections.Limits(**{**rm_cfg.limits.to_dict(), "buckets": (64,)})
  data = reward_model.reward_data.prepare(data_cfg, limits, "bradley_terry", ckpt.tokenizer, rm_dir,
                                          vocab_size=259)
  eval_cfg = reward_stats.RMEvalConfig(**rm_cfg.eval.to_dict())
  prompts = data.normalization_prompts
  samples = reward_stats.sample_responses(reward_model.models.Transformer(ckpt.model_config),
                                          ckpt.params, prompts["prompt_tokens"][:8],
                                          prompts["prompt_mask"][:8], ckpt.tokenizer, eval_cfg, 40,
                                          jax.random.fold_in(jax.random.PRNGKey(eval_cfg.seed), 0))
  r = np.asarray(
      reward_model.score(handle, samples["prompt_tokens"], samples["prompt_mask"],
                         samples["response_tokens_BxR"], samples["response_mask_BxR"]))
  assert r.shape == (16,)
  np.testing.assert_allclose([r.mean(), r.std()], [0.0, 1.0], atol=2e-3)


@pytest.mark.slow
def test_rerun_resumes_without_training_again(rm_run):
  rm_dir, rm_cfg, final = rm_run
  again = reward_model.train_and_evaluate(rm_cfg, rm_dir)
  assert again["step"] == final["step"]
  assert again["final_params_step"] == final["final_params_step"]
  assert again["pairwise/accuracy"] == pytest.approx(final["pairwise/accuracy"])


def test_learning_curve_configs_and_plot(tmp_path):
  config = rm_synthetic.get_config("bradley_terry")
  sub = reward_sweep.sub_config(config, "all_pairs", 500)
  assert (sub.rm.objective, sub.data.num_train_examples, sub.data.batch_size) == ("all_pairs", 500,
                                                                                  8)
  assert config.rm.objective == "bradley_terry"  # the base config is untouched
  assert reward_sweep.sub_config(config, "bradley_terry", 16).data.batch_size == 16
  with pytest.raises(ValueError, match="learning curve objective 'likert'"):
    reward_sweep.learning_curve(config, str(tmp_path), [100], ["likert"])
  rows = [{"objective": o, "num_prompts": n, "pairwise/accuracy": a}
          for o, n, a in [("bradley_terry", 100, 0.6), ("bradley_terry", 400,
                                                        0.7), ("all_pairs", 100,
                                                               0.65), ("all_pairs", 400, 0.75)]]
  path = reward_report.plot_learning_curve(rows, str(tmp_path / "curve.png"), bayes_optimal=0.85)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_launcher_stops_promptly_on_sigterm_with_a_checkpoint(rm_run, tmp_path):
  """``experiments/run.py`` (RM config) under SIGTERM mid-training: checkpoint, exit 0 within seconds,
  no report (the run is unfinished); rerunning would resume from the checkpoint."""
  import signal  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  sft_dir = os.path.join(os.path.dirname(rm_run[0]), "sft")
  workdir = tmp_path / "rm_sigterm"
  overrides = {
      "sources.sft_workdir": sft_dir, **_split_limits(DATA), "data.batch_size": 8,
      "data.eval_batch_size": 16, "loop.num_steps": 100_000, "loop.log_every": 1,
      "loop.eval_every": 0, "loop.checkpoint_every": 100_000, "rm.early_stopping_patience": 0}
  args = [
      sys.executable,
      os.path.join(REPO, "experiments", "run.py"), f"--workdir={workdir}",
      f"--config={os.path.join(REPO, 'experiments', 'configs', 'rm_synthetic.py')}"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  with open(tmp_path / "launcher.log", "w") as log:
    proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
      metrics = workdir / "metrics.jsonl"
      deadline = time.monotonic() + 240
      while not (metrics.exists() and metrics.stat().st_size > 0):  # training has started
        assert proc.poll() is None, (tmp_path / "launcher.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
      proc.send_signal(signal.SIGTERM)
      sent = time.monotonic()
      returncode = proc.wait(timeout=60)
      waited = time.monotonic() - sent
    finally:
      if proc.poll() is None:
        proc.kill()
  assert returncode == 0, (tmp_path / "launcher.log").read_text()[-2000:]
  assert waited < 30, f"took {waited:.1f}s to stop after SIGTERM"
  steps = [int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
  assert steps and max(steps) < 100_000
  assert not (workdir / reward_model.FINAL_METRICS_FILE).exists()
