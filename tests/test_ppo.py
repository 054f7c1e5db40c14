"""Online RL trainer: advantages by hand, log-prob alignment, model checks, end-to-end PPO / GRPO on a
tiny model, exact resume, SIGTERM, NaN guards.

Every run shares one shape set (a 1-layer ``tiny`` model, 4 prompts × 32 columns, 8 new tokens)
so jit compiles each phase once per process: the builders of the jitted phases are cached.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses, models, parallel, sampling, train
from rlhf_jax.algorithms import sections
from rlhf_jax.algorithms.online import ppo
from rlhf_jax.algorithms.online import config as ppo_config
from rlhf_jax.algorithms.online import models as ppo_models
from rlhf_jax.algorithms.online import update as ppo_update
from rlhf_jax import scoring
from rlhf_jax.algorithms.online import rollout
from rlhf_jax.data import tokenizers as tok_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments", "configs"))
import ppo_synthetic  # noqa: E402  pylint: disable=wrong-import-position

MODEL_CFG = models.get_model_config("tiny", n_layers=1, d_ff=64)
TINY = {
    "data.batch_size": 4,
    "limits.max_response_len": 8,
    "ppo.num_ppo_epochs": 2,
    "ppo.num_minibatches": 2,
    "data.synthetic_num_prompts": 16,
    "data.synthetic_num_test_prompts": 4,
    "loop.num_steps": 2,
    "loop.log_every": 1,
    "loop.eval_every": 0,
    "loop.checkpoint_every": 1,
    "eval.num_prompts": 4,
    "eval.max_new_tokens": 8,
    "eval.print_samples": 0,
    "optim.lr": 1e-3,}


def tiny_config(**extra):
  config = ppo_synthetic.get_config()
  for key, value in {**TINY, **extra}.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def rm_info(tokenizer, *, vocab_size=MODEL_CFG.vocab_size, fingerprint=None):
  return scoring.RewardModelInfo(model=dataclasses.asdict(MODEL_CFG.replace(vocab_size=vocab_size)),
                                 output_names=("reward",), tokenizer_spec="byte",
                                 tokenizer_fingerprint=fingerprint or tokenizer.fingerprint(),
                                 max_prompt_len=32, max_response_len=48, mean=(0.1,), std=(2.0,))


def tiny_models(ppo_cfg, *, rm_bias=0.0, value_bias=None):
  """Random tiny policy (= reference) and reward model; ``rm_bias``/``value_bias`` poison heads."""
  tok = tok_lib.ByteTokenizer()
  dummy = jnp.ones((1, 8), jnp.int32)
  params = nn.meta.unbox(models.Transformer(MODEL_CFG).init(jax.random.PRNGKey(0), dummy,
                                                            dummy))["params"]
  rm_params = nn.meta.unbox(
      models.RewardModel(MODEL_CFG).init(jax.random.PRNGKey(1), dummy, dummy))["params"]
  rm_params["head"]["bias"] = rm_params["head"]["bias"] + rm_bias
  handle = scoring.make_handle(rm_info(tok), rm_params)
  value_model, value_params = ppo_models.init_value_params(ppo_cfg, MODEL_CFG, params, handle,
                                                           jax.random.PRNGKey(2))
  if value_bias is not None:
    value_params["head"]["bias"] = value_params["head"]["bias"] + value_bias
  return ppo_models.PPOModels(tok, models.Transformer(MODEL_CFG), params, params, handle,
                              value_model, value_params)


def run_tiny(workdir, config=None, **model_kwargs):
  config = config or tiny_config()
  ppo_cfg = ppo.parse_config(config).ppo
  return ppo.train_and_evaluate(config, str(workdir), models_=tiny_models(ppo_cfg, **model_kwargs))


def final_params(workdir):
  return train.restore_params(str(workdir))


# ------------------------------------------------------------------------------------------------
# Pure pieces
# ------------------------------------------------------------------------------------------------


def test_ppo_advantages_equal_a_hand_written_trl_loop():
  cfg = ppo_config.PPOConfig(kl_coef=0.1, gamma=1.0, lam=0.9, whiten_advantages=False)
  rng = np.random.default_rng(0)
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)
  logps, ref, values = (rng.normal(size=(2, 4)).astype(np.float32) for _ in range(3))
  scores = np.array([0.5, -1.0], np.float32)
  adv, ret, m = rollout.compute_advantages(cfg, scores, logps, ref, values, mask, 0.1)
  for b in range(2):  # TRL's PPO loop over one right-padded row
    n = mask[b].sum()
    r = -0.1 * (logps[b, :n] - ref[b, :n])
    r[n - 1] += scores[b]
    last, expect = 0.0, np.zeros(n)
    for t in reversed(range(n)):
      next_v = values[b, t + 1] if t + 1 < n else 0.0
      last = r[t] + next_v - values[b, t] + 0.9 * last
      expect[t] = last
    np.testing.assert_allclose(adv[b, :n], expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret[b, :n], expect + values[b, :n], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(adv)[b, n:] == 0)
  kl_seq = ((logps - ref) * mask).sum(1)
  np.testing.assert_allclose(m["kl"], kl_seq.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["rlhf_reward"], scores.mean() - 0.1 * kl_seq.mean(), rtol=1e-5)


@pytest.mark.parametrize("algorithm", ["rloo", "grpo", "dr_grpo"])
def test_group_advantages_are_per_sequence_and_broadcast(algorithm):
  agg = "seq_mean_token_sum_norm" if algorithm == "dr_grpo" else "token_mean"
  cfg = ppo_config.PPOConfig(algorithm=algorithm, num_samples=2, rollout_batch_size=2,
                             num_minibatches=1, whiten_advantages=False, kl_coef=0.5,
                             aggregation=agg)
  scores = np.array([1.0, 0.0, 2.0, 2.0], np.float32)
  logps = np.array([[-1.0, -1.0], [-1.0, -1.0], [-2.0, 0.0], [0.0, 0.0]], np.float32)
  ref = np.zeros_like(logps)
  mask = np.array([[1, 1], [1, 0], [1, 1], [1, 1]], np.int32)
  adv, ret, _ = rollout.compute_advantages(cfg, scores, logps, ref, np.zeros_like(logps), mask, 0.5)
  kl = (logps * mask).sum(1)  # k1 with ref = 0
  if algorithm == "rloo":
    r = scores - 0.5 * kl  # [2, 1.5, 3, 2]
    expect = np.array([r[0] - r[1], r[1] - r[0], r[2] - r[3], r[3] - r[2]])
  elif algorithm == "grpo":
    expect = np.array([0.5, -0.5, 0, 0]) / (np.sqrt(0.5) + 1e-4)  # unbiased std of (1, 0)
  else:
    expect = np.array([0.5, -0.5, 0.0, 0.0])
  np.testing.assert_allclose(np.asarray(adv)[:, 0], expect, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(adv) * (1 - mask), 0.0)
  np.testing.assert_allclose(np.asarray(adv)[2:, 1], expect[2:], rtol=1e-5)
  assert np.all(np.asarray(ret) == 0)


@pytest.mark.parametrize("overrides, message", [
    ({"algorithm": "a2c"}, "PPOConfig.algorithm='a2c' is invalid; allowed: ppo | rloo"),
    ({"algorithm": "grpo", "num_samples": 1}, "PPOConfig.num_samples=1 is invalid"),
    ({"num_minibatches": 3}, "a divisor of rollout_batch_size"),
    ({"critic_init": "random"}, "critic_init='random' is invalid; allowed: reward_model | sft"),
    ({"kl_coef": -1.0}, "PPOConfig.kl_coef=-1.0 is invalid; allowed: a float >= 0"),
    ({"algorithm": "dr_grpo", "num_samples": 2}, "seq_mean_token_sum_norm"),])
def test_config_errors_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("|", r"\|")):
    ppo_config.PPOConfig(**overrides)


def test_unknown_and_bad_config_keys_are_named():
  config = tiny_config()
  config.ppo.num_minibatches = 3
  with pytest.raises(ValueError, match="config.ppo: PPOConfig.num_minibatches=3"):
    ppo.parse_config(config)
  config = tiny_config()
  config.model = {}
  with pytest.raises(ValueError, match=r"unknown config key\(s\) \['config.model'\]"):
    ppo.parse_config(config)
  config = tiny_config()
  config.ppo.max_new_tokens = 8  # one key per concept: the budget is limits.max_response_len
  with pytest.raises(ValueError,
                     match="config.ppo.max_new_tokens .* config.limits.max_response_len"):
    ppo.parse_config(config)


def test_config_uses_the_shared_vocabulary():
  parsed = ppo.parse_config(tiny_config(**{"data.batch_size": 6, "limits.max_response_len": 12}))
  assert parsed.ppo.rollout_batch_size == 6 and parsed.ppo.max_new_tokens == 12
  assert isinstance(parsed.data, sections.DataSource) and parsed.data.source == "synthetic"
  assert isinstance(parsed.sources, sections.Sources) and isinstance(parsed.loop, train.LoopConfig)
  config = tiny_config()
  config.data.source = "jsonl"  # the prompts file is required, held-out prompts are optional
  with pytest.raises(ValueError, match="PPODataConfig.train_jsonl='' is invalid"):
    ppo.parse_config(config)


@pytest.mark.parametrize("algorithm, expect", [("ppo", True), ("rloo", False), ("grpo", False),
                                               ("dr_grpo", False)])
def test_advantage_whitening_defaults_per_algorithm(algorithm, expect):
  """Bug 4: whitening defaulted to on for every algorithm, putting a std division back into
  Dr. GRPO. Unset (None), it is on for PPO only; an explicit value still wins."""
  agg = "seq_mean_token_sum_norm" if algorithm == "dr_grpo" else "token_mean"
  kw = dict(algorithm=algorithm, num_samples=2, rollout_batch_size=2, num_minibatches=1,
            aggregation=agg)
  cfg = ppo_config.PPOConfig(**kw)
  assert cfg.whiten_advantages is None and cfg.whitens_advantages is expect
  assert ppo_config.PPOConfig(**kw, whiten_advantages=not expect).whitens_advantages is not expect
  config = tiny_config(**{"ppo.algorithm": algorithm, "ppo.num_samples": 2, "ppo.aggregation": agg})
  assert ppo.parse_config(config).ppo.whitens_advantages is expect
  if algorithm == "dr_grpo":  # the default config's advantages are s - mean(s), unscaled
    scores = np.array([3.0, 1.0, 0.0, 0.0], np.float32)
    zeros, mask = np.zeros((4, 2), np.float32), np.ones((4, 2), np.int32)
    adv, _, _ = rollout.compute_advantages(cfg, scores, zeros, zeros, zeros, mask, 0.0)
    np.testing.assert_allclose(np.asarray(adv)[:, 0], [1.0, -1.0, 0.0, 0.0], rtol=1e-6)


def test_importing_ppo_registers_no_jax_listener():
  code = ("from jax._src import monitoring as m; n = len(m._event_duration_secs_listeners); "
          "import rlhf_jax.algorithms.online.ppo; "
          "assert len(m._event_duration_secs_listeners) == n, 'listener registered at import'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_reference_or_reward_model_with_another_tokenizer_or_vocab_is_refused(tmp_path):
  tok = tok_lib.ByteTokenizer()
  ok = dict(reference_tokenizer=tok, reference_config=MODEL_CFG, reward_info=rm_info(tok))
  ppo_models.check_compatible(tok, MODEL_CFG, **ok)  # the compatible case passes
  with pytest.raises(scoring.TokenizerMismatchError, match="fingerprint"):
    ppo_models.check_compatible(tok, MODEL_CFG,
                                **{**ok, "reward_info": rm_info(tok, fingerprint="x")})
  with pytest.raises(ppo_models.IncompatibleModelsError, match="reward model's vocab_size=300"):
    ppo_models.check_compatible(tok, MODEL_CFG,
                                **{**ok, "reward_info": rm_info(tok, vocab_size=300)})
  with pytest.raises(ppo_models.IncompatibleModelsError,
                     match=r"differs from the policy's in \['vocab_size'\]"):
    ppo_models.check_compatible(tok, MODEL_CFG,
                                **{**ok, "reference_config": MODEL_CFG.replace(vocab_size=300)})
  import tokenizers  # a real Hugging Face tokenizer with another vocabulary
  hf = tokenizers.Tokenizer(
      tokenizers.models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "a": 3, "[UNK]": 4},
                                  unk_token="[UNK]"))
  hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  hf.save(str(tmp_path / "tokenizer.json"))
  other = tok_lib.HFTokenizer(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ppo_models.IncompatibleModelsError, match="reference model's tokenizer"):
    ppo_models.check_compatible(tok, MODEL_CFG, **{**ok, "reference_tokenizer": other})


def test_response_logps_and_values_align_with_the_sampler():
  cfg = ppo_config.PPOConfig(rollout_batch_size=4, max_new_tokens=8, num_minibatches=2)
  m = tiny_models(cfg)
  from rlhf_jax.data import batching
  prompts = batching.encode_prompts(
      m.tokenizer, ["name 2 fruits", "list 4 tools", "tell me 1 cat", "please list 3 poisons"],
      max_prompt_len=32, buckets=(32,))
  out = sampling.sample(m.policy, m.policy_params, prompts["prompt_tokens"], prompts["prompt_mask"],
                        jax.random.PRNGKey(3), sampling.SamplingConfig(max_new_tokens=8, eos_id=2))
  tokens, mask, _ = out.full_sequences()
  old, ref, values, ent = rollout.make_logprob_fn(m.policy, m.value_model, 32,
                                                  1.0)(m.policy_params, m.ref_params,
                                                       m.value_params, tokens, mask)
  np.testing.assert_allclose(old, out.response_logps_BxR, atol=2e-5)
  np.testing.assert_allclose(ref, old, atol=0)
  full_values = m.value_model.apply({"params": m.value_params}, tokens, mask)
  np.testing.assert_allclose(values, full_values[:, 31:39], atol=1e-6)
  assert np.all(np.asarray(ent)[np.asarray(out.response_mask_BxR) > 0] > 0)
  # Bug 1: the critic starts as the reward model on the scale PPO's rewards are paid in: V at the
  # last real token == the *normalised* RM score (r - μ) / σ (it used to be the raw score).
  raw = m.reward.model.apply({"params": m.reward.params}, tokens, mask)[:, 0]
  normalised = (np.asarray(raw) - 0.1) / 2.0  # rm_info: mean 0.1, std 2.0
  last = np.asarray(out.response_lengths_B) + 31
  np.testing.assert_allclose(
      np.asarray(full_values)[np.arange(4), last], normalised, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(normalised,
                             scoring.normalize_rewards(raw[:, None], m.reward.info)[:, 0],
                             rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# End to end (tiny model, 2 iterations)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ppo_full")
  final = run_tiny(workdir)
  return workdir, final


PER_ITERATION = ("gold_reward", "rm_score", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl",
                 "explained_variance", "response_length", "pg_loss", "vf_loss", "grad_norm",
                 "time_generation", "time_scoring", "time_logprobs", "time_update",
                 "generation_tokens_per_s", "update_tokens_per_s", "tokens_per_s")


def test_ppo_end_to_end_metrics_checkpoint_and_final(ppo_run):
  workdir, final = ppo_run
  rows = train.read_metrics(str(workdir), split="train")
  assert [r["step"] for r in rows] == [1, 2]
  for row in rows:
    missing = [k for k in PER_ITERATION if k not in row]
    assert not missing, missing
    assert 0.0 <= row["clipfrac"] <= 1.0 and row["time_update"] > 0 and row["response_length"] > 0
    assert np.isfinite(row["pg_loss"]) and np.isfinite(row["vf_loss"])
  assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # π = π_ref at the first rollout
  assert rows[1]["approx_kl"] > 0  # the policy moved
  evals = train.read_metrics(str(workdir), split="eval")
  assert [r["step"] for r in evals] == [0, 2]
  stored = json.load(open(workdir / ppo.FINAL_METRICS_FILE))
  assert stored["iteration"] == 2 and not stored["preempted"]
  for key in ("gold_reward", "initial_gold_reward", "kl_to_sft", "rm_reward", "win_rate_vs_sft"):
    assert key in stored, key
  assert stored["initial_kl_to_sft"] == 0.0
  assert final["kl_to_sft"] != 0.0
  params = final_params(workdir)
  assert set(params) == {"policy", "value"}
  assert rows[1]["compiles"] == 0  # every phase compiled in iteration 1 at the latest


def test_resume_reproduces_the_uninterrupted_run(ppo_run, tmp_path):
  workdir, _ = ppo_run
  first = run_tiny(tmp_path, tiny_config(**{"loop.stop_after_steps": 1}))
  assert first["preempted"] and first["iteration"] == 1
  assert not (tmp_path / ppo.FINAL_METRICS_FILE).exists()
  second = run_tiny(tmp_path)
  assert second["iteration"] == 2 and not second["preempted"]
  jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path), final_params(workdir))
  a = train.read_metrics(str(tmp_path), split="train")
  b = train.read_metrics(str(workdir), split="train")
  for key in ("gold_reward", "rm_score", "kl", "pg_loss", "vf_loss", "clipfrac"):
    assert [r[key] for r in a] == [r[key] for r in b], key


def test_sigterm_checkpoints_and_the_rerun_continues_the_stream(ppo_run, tmp_path):
  workdir, _ = ppo_run
  config = tiny_config(**{"loop.checkpoint_every": 100})
  previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a late signal must not kill pytest
  try:

    def send_after_first_row():
      path = tmp_path / "metrics.jsonl"
      while not (path.exists() and '"split": "train"' in path.read_text()):
        time.sleep(0.005)
      os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=send_after_first_row, daemon=True)
    sender.start()
    first = run_tiny(tmp_path, config)
    sender.join(timeout=60)
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert first["preempted"] and first["iteration"] in (1, 2)
  if first["iteration"] == 1:  # the usual case: caught at the end of iteration 1
    second = run_tiny(tmp_path, config)
    assert second["iteration"] == 2
  jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path), final_params(workdir))


def test_non_finite_rewards_stop_and_keep_the_last_good_checkpoint(ppo_run, tmp_path):
  workdir, _ = ppo_run
  shutil.copytree(workdir, tmp_path / "run")
  before = final_params(tmp_path / "run")
  with pytest.raises(
      train.NonFiniteLossError,
      match=r"non-finite rewards at step 3 \(NaN/inf in rows \[0, .*latest "
      r"checkpoint \(step 2\)"):
    run_tiny(tmp_path / "run", tiny_config(**{"loop.num_steps": 3}), rm_bias=float("nan"))
  ckpts = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
  assert ckpts[-1] == 2
  jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path / "run"), before)


def test_non_finite_loss_with_a_finite_rollout_stops_and_keeps_the_last_good_checkpoint(
    ppo_run, tmp_path, monkeypatch):
  """Only the update's loss goes NaN (a poisoned policy-loss term; rollout, rewards and values are
  finite) in iteration 3 of a resumed run: the run stops naming the loss, saves nothing."""
  workdir, _ = ppo_run
  shutil.copytree(workdir, tmp_path / "run")
  before = final_params(tmp_path / "run")
  real = losses.ppo_policy_loss

  def nan_policy_loss(*args, **kwargs):
    loss_B, metrics = real(*args, **kwargs)
    return loss_B * jnp.nan, metrics

  monkeypatch.setattr(ppo_update.losses, "ppo_policy_loss", nan_policy_loss)
  ppo_update.make_update_fn.cache_clear()  # trace a fresh update with the poisoned term...
  try:
    with pytest.raises(train.NonFiniteLossError,
                       match=r"non-finite loss at step 3 \(nan\) .*latest checkpoint \(step 2\)"):
      run_tiny(tmp_path / "run", tiny_config(**{"loop.num_steps": 3}))
  finally:
    ppo_update.make_update_fn.cache_clear()  # ...and never hand it to another test
  ckpts = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
  assert ckpts[-1] == 2
  jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path / "run"), before)
  rows = train.read_metrics(str(tmp_path / "run"), split="train")
  assert [r["step"] for r in rows] == [1, 2]  # iteration 3 was not logged either


def test_non_finite_values_stop_before_anything_is_saved(tmp_path):
  with pytest.raises(train.NonFiniteLossError,
                     match=r"non-finite values at step 1 .*latest checkpoint \(none yet\)"):
    run_tiny(tmp_path, value_bias=float("inf"))
  ckpt_dir = tmp_path / "checkpoints"
  assert not ckpt_dir.exists() or not [d for d in os.listdir(ckpt_dir) if d.isdigit()]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_critic_free_algorithms_run_without_a_value_model(tmp_path, algorithm):
  config = tiny_config(**{
      "ppo.algorithm": algorithm, "ppo.num_samples": 2, "data.batch_size": 2, "loop.num_steps": 1})
  final = run_tiny(tmp_path, config)
  assert final["iteration"] == 1
  rows = train.read_metrics(str(tmp_path), split="train")
  assert "vf_loss" not in rows[0] and rows[0]["grad_norm"] > 0
  assert ("kl_loss" in rows[0]) == (algorithm == "grpo")
  assert set(final_params(tmp_path)) == {"policy"}


# ------------------------------------------------------------------------------------------------
# Sharded: the same run on a 2×2×2 mesh of the 8 simulated CPU devices
# ------------------------------------------------------------------------------------------------


def test_mesh_run_compiles_once_matches_one_device_and_resumes_exactly(ppo_run, tmp_path):
  workdir, single = ppo_run
  config = tiny_config()
  parsed = ppo.parse_config(config)
  ppo_cfg, optim_cfg = parsed.ppo, parsed.optim
  # The byte vocabulary (259) does not split over `tensor`: keep it replicated; everything else
  # follows DEFAULT_RULES (embed -> fsdp, heads / kv_heads / mlp -> tensor, batch -> data × fsdp).
  rules = tuple((k, None) if k in ("vocab", "activation_vocab") else (k, v)
                for k, v in parallel.DEFAULT_RULES)
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))
  placement = parallel.Placement(mesh, rules)
  models_ = tiny_models(ppo_cfg)
  result = ppo.run(workdir=str(tmp_path), config=ppo_cfg, loop=parsed.loop, optim=optim_cfg,
                   eval_config=parsed.eval, data=parsed.data, limits=parsed.limits, models_=models_,
                   seed=config.seed, placement=placement)
  rows = train.read_metrics(str(tmp_path), split="train")
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["compiles"] <= 5 and rows[1]["compiles"] == 0  # ≤ once per phase, then never
  # The state lives on the mesh with the rules table's shardings (sharded, not replicated).
  expect = ppo_update.state_shardings(models_.policy, models_.value_model, optim_cfg,
                                      2 * ppo_cfg.updates_per_iteration, placement)
  jax.tree.map(lambda x, sh: x.sharding == sh or pytest.fail(f"{x.sharding} != {sh}"), result.state,
               expect)
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(result.state.params["policy"])}
  assert any("tensor" in spec for spec in specs) and any("fsdp" in spec for spec in specs)
  # Same numbers as the single-device run, up to float reassociation.
  reference = train.read_metrics(str(workdir), split="train")
  for a, b in zip(rows, reference):
    for key in ("gold_reward", "rm_score", "kl", "pg_loss", "vf_loss", "clipfrac", "entropy"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               jax.device_get(result.state.params), final_params(workdir))
  assert result.metrics["gold_reward"] == pytest.approx(single["gold_reward"], abs=1e-6)
  # Resume on the mesh (orbax restores onto the same shardings): bit-identical to the straight run.
  for extra in ({"loop.stop_after_steps": 1}, {}):
    config = tiny_config(**extra)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    ppo.train_and_evaluate(config, str(tmp_path / "resumed"), models_=models_, rules=rules)
  jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path / "resumed"),
               final_params(tmp_path))


def test_rollout_batch_not_divisible_by_the_mesh_batch_ways_is_refused(tmp_path):
  config = tiny_config(**{"data.batch_size": 2, "ppo.num_minibatches": 1})
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 1, 1
  with pytest.raises(
      ValueError, match=r"config.data.batch_size=2 \(rollout_batch_size\) must be a "
      r"multiple of the mesh's batch ways \(4"):
    run_tiny(tmp_path, config)


def test_a_finished_ppo_run_is_a_policy_source_for_a_later_stage(ppo_run):
  """Iterated RLHF starts round r+1's PPO from round r's run (``sources.sft_workdir``)."""
  workdir, _ = ppo_run
  ckpt = train.load_sft_params(str(workdir))
  assert ckpt.model_config == MODEL_CFG and ckpt.step == 2
  jax.tree.map(np.testing.assert_array_equal, ckpt.params, final_params(workdir)["policy"])
