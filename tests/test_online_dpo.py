"""Online DPO: the pair loss picks chosen / rejected by the judge and drops identical pairs; config
errors name the field; tiny runs train with the reward model and with the simulated human as judge,
count their labels and resume exactly (shapes of offline_fixtures)."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offline_fixtures import load_config, override, tiny_rm_workdir, tiny_sft_workdir
from rlhf_jax import losses, models, train
from rlhf_jax.algorithms import registry
from rlhf_jax.algorithms.online import config as online_config
from rlhf_jax.algorithms.online import online_dpo

TINY = {
    "data.batch_size": 4,
    "data.synthetic_num_prompts": 96,
    "data.synthetic_num_test_prompts": 16,
    "limits.max_response_len": 8,
    "loop.num_steps": 3,
    "loop.log_every": 1,
    "loop.eval_every": 0,
    "loop.checkpoint_every": 1,
    "loop.progress_every_secs": 0.0,
    "optim.warmup_steps": 1,
    "optim.lr": 1e-3,
    "eval.num_prompts": 4,
    "eval.max_new_tokens": 8,
    "eval.print_samples": 0,}


def test_registered_and_config_errors_name_the_field():
  assert registry.METHODS["online_dpo"] == "rlhf_jax.algorithms.online.online_dpo"
  with pytest.raises(
      ValueError, match="OnlineDPOConfig.judge='human' is invalid; allowed: "
      "reward_model \\| annotator"):
    online_config.OnlineDPOConfig(judge="human")
  with pytest.raises(ValueError, match="OnlineDPOConfig.loss_type='dpo' is invalid"):
    online_config.OnlineDPOConfig(loss_type="dpo")
  with pytest.raises(ValueError, match="OnlineDPOConfig.beta=0.0 is invalid"):
    online_config.OnlineDPOConfig(beta=0.0)


def test_pair_loss_follows_the_judge_and_drops_identical_pairs():
  """The loss over [2B] rows equals losses.dpo_loss on (chosen, rejected) picked per pair, with the
  invalid pair out of the mean."""
  cfg = models.get_model_config("tiny", n_layers=1, d_ff=64)
  policy = models.Transformer(cfg)
  p, r = 4, 3
  dummy = jnp.ones((1, 8), jnp.int32)
  params = nn.meta.unbox(policy.init(jax.random.PRNGKey(0), dummy, dummy))["params"]
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 60, size=(6, p + r)).astype(np.int32)
  mask = np.ones((6, p + r), np.int32)
  mask[1, -1] = 0  # a shorter answer
  resp = mask[:, p:]
  ref = rng.normal(-10, 1, size=6).astype(np.float32)
  batch = {
      "tokens": tokens, "mask": mask, "response_mask": resp, "ref_logps": ref,
      "first_wins": np.array([1, 0, 1], np.float32), "valid": np.array([1, 1, 0], np.float32)}
  oc = online_config.OnlineDPOConfig(beta=0.3)
  loss, metrics = online_dpo.make_loss_fn(oc, policy, p)(params, batch, None)
  seq = np.asarray(jnp.sum(models.response_token_logps(policy, params, tokens, mask, p)[0], -1))
  # pair 0: row 0 chosen; pair 1: row 3 chosen (first_wins = 0)
  want, _ = losses.dpo_loss(np.array([seq[0], seq[3]]), np.array([seq[1], seq[2]]),
                            np.array([ref[0], ref[3]]), np.array([ref[1], ref[2]]), beta=0.3)
  np.testing.assert_allclose(float(loss), float(np.mean(want)), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kl"]), float(np.mean(seq - ref)), rtol=1e-5)


def _config(sft, **extra):
  config = override(load_config("online_dpo_synthetic", extra.pop("judge", "reward_model")), TINY)
  config.sources.sft_workdir = sft
  return override(config, extra)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == "train"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  sft = tiny_sft_workdir(tmp_path_factory)
  rm = tiny_rm_workdir(tmp_path_factory, sft)
  workdir = str(tmp_path_factory.mktemp("online_dpo") / "run")
  config = _config(sft)
  config.sources.reward_model_workdir = rm
  final = online_dpo.train_and_evaluate(config, workdir)
  return config, workdir, final


def test_tiny_run_trains_counts_labels_and_evaluates(tiny_run):
  config, workdir, final = tiny_run
  assert final["step"] == 3 and final["labels_total"] == 12 and final["judge"] == "reward_model"
  for key in ("gold_reward", "kl_to_sft", "win_rate_vs_sft"):
    assert np.isfinite(final[key]), key
  rows = _rows(workdir)
  assert [r["labels_total"] for r in rows] == [4.0, 8.0, 12.0]
  assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
  first = train.load_sft_params(config.sources.sft_workdir).params
  last = train.restore_params(workdir)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), first, last)
  assert max(jax.tree.leaves(moved)) > 0  # the policy trains


def test_resume_reproduces_the_uninterrupted_run(tiny_run, tmp_path):
  config, workdir, final = tiny_run
  part = str(tmp_path / "part")
  short = config.copy_and_resolve_references()
  short.loop.num_steps = 2
  online_dpo.train_and_evaluate(short, part)
  resumed = online_dpo.train_and_evaluate(config, part)
  a, b = train.restore_params(workdir), train.restore_params(part)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  assert resumed["labels_total"] == final["labels_total"]


def test_simulated_human_judge_runs(tmp_path_factory, tmp_path):
  sft = tiny_sft_workdir(tmp_path_factory)
  config = _config(sft, judge="annotator", **{"loop.num_steps": 2})
  final = online_dpo.train_and_evaluate(config, str(tmp_path / "human"))
  assert final["judge"] == "annotator" and final["labels_total"] == 8
  rows = _rows(str(tmp_path / "human"))
  assert all(0.0 <= r["chosen_gold_accuracy"] <= 1.0 for r in rows)
