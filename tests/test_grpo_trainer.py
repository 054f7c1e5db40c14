"""The GRPO loss family in the online trainer: PPOConfig's loss_type / importance_sampling_level /
dynamic sampling / overlong keys, REINFORCE++-baseline advantages, DAPO's dynamic sampling (never an
empty batch), and tiny end-to-end runs (shapes and helpers of test_ppo.py)."""

import json

import numpy as np
import pytest

from rlhf_jax import losses, train
from rlhf_jax.algorithms.online import config as ppo_config
from rlhf_jax.algorithms.online import ppo, rollout
from test_ppo import run_tiny, tiny_config


@pytest.mark.parametrize("overrides, message", [
    ({"loss_type": "sapo"}, "PPOConfig.loss_type='sapo' is invalid; allowed:  | grpo | bnpo"),
    ({"loss_type": "cispo"}, "PPOConfig.clip_eps_high=0.0 is invalid; allowed: a float > 0 with "
     "loss_type='cispo'"),
    ({"importance_sampling_level": "sequence"}, "importance_sampling_level='sequence' is invalid"),
    ({"importance_sampling_level": "seq", "loss_type": "grpo"}, "allowed: token | sequence"),
    ({"loss_type": "dapo", "aggregation": "seq_mean_token_mean"}, "PPOConfig.aggregation="
     "'seq_mean_token_mean' is invalid; allowed: the default 'token_mean' with loss_type='dapo'"),
    ({"algorithm": "ppo", "num_samples": 1, "dynamic_sampling": True
     }, "PPOConfig.dynamic_sampling=True is invalid"),
    ({"overlong_buffer_len": 100}, "PPOConfig.overlong_buffer_len=100 is invalid; allowed: an int "
     "in \\[0, max_new_tokens=48\\]"),
    ({"algorithm": "reinforce_pp"}, "reinforce_baseline"),])
def test_config_errors_name_the_field(overrides, message):
  kw = dict(algorithm="grpo", num_samples=2, rollout_batch_size=2, num_minibatches=1)
  with pytest.raises(ValueError, match=message.replace("|", r"\|").replace("(", r"\(")):
    ppo_config.PPOConfig(**{**kw, **overrides})


def test_loss_type_relaxes_dr_grpo_aggregation_and_old_configs_still_parse():
  # TRL's combination: Dr. GRPO advantages with loss_type="dr_grpo" (the constant normaliser)
  ppo_config.PPOConfig(algorithm="dr_grpo", num_samples=2, loss_type="dr_grpo")
  cfg = ppo.parse_config(tiny_config()).ppo
  assert cfg.loss_type == "" and cfg.importance_sampling_level == "token"
  assert not cfg.dynamic_sampling and cfg.overlong_buffer_len == 0


def test_reinforce_baseline_advantages_in_the_rollout():
  cfg = ppo_config.PPOConfig(algorithm="reinforce_baseline", num_samples=2, rollout_batch_size=2,
                             num_minibatches=1, kl_coef=0.1)
  rng = np.random.default_rng(0)
  mask = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], np.int32)
  logps, ref = (rng.normal(size=(4, 3)).astype(np.float32) for _ in range(2))
  scores = np.array([1.0, 0.0, 2.0, 3.0], np.float32)
  adv, ret, m = rollout.compute_advantages(cfg, scores, logps, ref, np.zeros_like(logps), mask, 0.1)
  kl = np.asarray(losses.kl_estimate(logps, ref, mask=mask))
  want = losses.reinforce_baseline_advantages(scores.reshape(2, 2), kl.reshape(2, 2, 3),
                                              mask.reshape(2, 2, 3), kl_coef=0.1)
  np.testing.assert_allclose(np.asarray(adv), np.asarray(want).reshape(4, 3), rtol=1e-6)
  assert not cfg.whitens_advantages  # whitened once, inside the estimator
  np.testing.assert_allclose(float(m["kl"]), kl.sum(1).mean(), rtol=1e-5)
  assert np.all(np.asarray(ret) == 0)


def test_overlong_penalty_reaches_the_advantages():
  kw = dict(algorithm="dr_grpo", num_samples=2, rollout_batch_size=1, num_minibatches=1,
            loss_type="dr_grpo", max_new_tokens=4)
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.int32)  # lengths 2 and 4 (the budget)
  zeros = np.zeros((2, 4), np.float32)
  scores = np.array([1.0, 1.0], np.float32)
  adv, _, m = rollout.compute_advantages(ppo_config.PPOConfig(**kw), scores, zeros, zeros, zeros,
                                         mask, 0.0)
  assert np.all(np.asarray(adv) == 0)  # equal scores, no shaping
  adv, _, m = rollout.compute_advantages(
      ppo_config.PPOConfig(**kw, overlong_buffer_len=2, overlong_penalty_factor=1.0), scores, zeros,
      zeros, zeros, mask, 0.0)
  # L_exp = 2: the full-length answer loses 1, so Dr. GRPO's centred scores are +0.5 / -0.5
  np.testing.assert_allclose(np.asarray(adv)[:, 0], [0.5, -0.5])
  np.testing.assert_allclose(float(m["overlong_penalty"]), -0.5)


# ------------------------------------------------------------------------------------------------
# dynamic sampling


def _generation(scores, t=3, r=2, tag=0):
  n = len(scores)
  tokens = np.full((n, t), tag, np.int32)
  tokens[:, 0] = np.arange(n)  # row id, to see which rows were chosen
  mask = np.ones((n, t), np.int32)
  resp = np.ones((n, r), np.int32)
  scores = np.asarray(scores, np.float32)
  return tokens, mask, resp, scores, scores


def test_dynamic_sampling_refills_then_reports_never_empty():
  cfg = ppo_config.PPOConfig(algorithm="grpo", num_samples=2, rollout_batch_size=3,
                             num_minibatches=1, dynamic_sampling=True,
                             dynamic_sampling_max_batches=3)
  gens = {
      0: _generation([1, 1, 0, 1, 2, 2], tag=0),  # groups: equal, mixed, equal
      1: _generation([0, 0, 3, 4, 5, 5], tag=1),  # equal, mixed, equal
      2: _generation([7, 7, 7, 7, 7, 7], tag=2),}  # all equal
  calls = []

  def next_generation(k):
    calls.append(k)
    return gens[k]

  arrays, stats = ppo.dynamic_sample(cfg, gens[0], next_generation)
  assert calls == [1, 2]
  tokens, _, _, scores, _ = arrays
  assert tokens.shape == (6, 3) and scores.shape == (6,)
  # kept groups first (gen 0 group 1, gen 1 group 1), then a dropped one (gen 0 group 0)
  assert [tuple(x) for x in tokens[:, [2, 0]]] == [(0, 2), (0, 3), (1, 2), (1, 3), (0, 0), (0, 1)]
  np.testing.assert_allclose(scores, [0, 1, 3, 4, 1, 1])
  assert stats == {"generations": 3.0, "kept_fraction": 2 / 9, "shortfall": 1.0}

  # nothing to refill from (max 1 generation) and every group degenerate: still a full batch
  one = ppo_config.PPOConfig(algorithm="grpo", num_samples=2, rollout_batch_size=3,
                             num_minibatches=1, dynamic_sampling=True,
                             dynamic_sampling_max_batches=1)
  arrays, stats = ppo.dynamic_sample(one, gens[2], next_generation)
  assert arrays[0].shape == (6, 3) and stats["shortfall"] == 3.0 and calls == [1, 2]
  # a first batch with no degenerate group is returned as is, without another generation
  mixed = _generation([0, 1, 2, 3, 4, 5])
  arrays, stats = ppo.dynamic_sample(cfg, mixed, next_generation)
  assert calls == [1, 2] and stats["generations"] == 1.0 and stats["shortfall"] == 0.0
  np.testing.assert_array_equal(arrays[0], mixed[0])


# ------------------------------------------------------------------------------------------------
# end to end on the tiny model


def _assert_trained(result, workdir):
  assert result["iteration"] == 2
  for value in result.values():
    if isinstance(value, float):
      assert np.isfinite(value)
  assert train.restore_params(str(workdir)) is not None


@pytest.mark.slow
def test_dapo_gspo_with_dynamic_sampling_and_overlong_runs(tmp_path):
  # tol = 1e9 makes every group "all equal": the refill and the shortfall paths both run.
  config = tiny_config(
      **{
          "ppo.algorithm": "grpo", "ppo.num_samples": 2, "ppo.loss_type": "dapo",
          "ppo.importance_sampling_level": "sequence", "ppo.clip_eps_high": 0.28,
          "ppo.dynamic_sampling": True, "ppo.dynamic_sampling_tol": 1e9,
          "ppo.dynamic_sampling_max_batches": 2, "ppo.overlong_buffer_len": 4,
          "ppo.mask_truncated_completions": True})
  result = run_tiny(tmp_path / "dapo", config)
  _assert_trained(result, tmp_path / "dapo")
  rows = [r for r in _metrics(tmp_path / "dapo") if "dynamic_sampling_generations" in r]
  assert rows and all(r["dynamic_sampling_generations"] == 2.0 for r in rows)
  assert all(r["dynamic_sampling_shortfall"] == 4.0 for r in rows)
  assert all("overlong_penalty" in r for r in rows)
  # 8-token answers of a near-random model are mostly cut: they leave the loss entirely
  assert any(r["truncated_fraction"] > 0 for r in rows)
  for r in rows:
    if r["truncated_fraction"] == 1.0:
      assert r["pg_loss"] == 0.0 and r["kl_loss"] == 0.0


@pytest.mark.slow
def test_reinforce_baseline_with_cispo_runs(tmp_path):
  config = tiny_config(
      **{
          "ppo.algorithm": "reinforce_baseline", "ppo.num_samples": 2, "ppo.loss_type": "cispo",
          "ppo.clip_eps_high": 5.0})
  result = run_tiny(tmp_path / "rpp", config)
  _assert_trained(result, tmp_path / "rpp")
  rows = _metrics(tmp_path / "rpp")
  assert rows and all(np.isfinite(r["pg_loss"]) for r in rows)


def _metrics(workdir):
  out = []
  with open(workdir / "metrics.jsonl") as f:
    for line in f:
      row = json.loads(line)
      if row.get("split", "train") == "train":
        out.append({k.split("/", 1)[-1]: v for k, v in row.items()})
  return out
