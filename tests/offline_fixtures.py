"""Shared set-up of the offline-trainer tests (DPO family, PRO / RRHF, RAFT, best-of-n, pipeline).

One tiny SFT run on a small synthetic task is made once per pytest session (per xdist worker) under
the session's base temp dir and reused by every test that needs a policy to start from; all trainer
configs here use the same shapes (tiny model, one 80-token bucket, batch 8, 4 eval prompts of 8
new tokens) so jit compiles few programs.
"""

import importlib.util
import os

import ml_collections

from rlhf_jax import train
from rlhf_jax.algorithms import sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "experiments", "configs")

SFT_OVERRIDES = {
    "model.preset": "tiny",
    "data.synthetic_num_prompts": 96,
    "data.synthetic_num_test_prompts": 16,
    "data.batch_size": 8,
    "data.eval_batch_size": 16,
    "limits.buckets": (80,),
    "eval.num_sample_prompts": 4,
    "eval.print_samples": 0,
    "loop.num_steps": 6,
    "loop.log_every": 3,
    "loop.eval_every": 0,
    "loop.checkpoint_every": 6,
    "loop.progress_every_secs": 0.0,
    "optim.warmup_steps": 1,}

# Loop / eval / data settings shared by every tiny offline run.
TINY_RUN = {
    "loop.num_steps": 4,
    "loop.log_every": 2,
    "loop.eval_every": 0,
    "loop.checkpoint_every": 2,
    "loop.progress_every_secs": 0.0,
    "optim.warmup_steps": 1,
    "eval.num_prompts": 4,
    "eval.max_new_tokens": 8,
    "eval.print_samples": 0,}


def load_config(name: str, *args) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def override(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  for key, value in values.items():
    *path, name = key.split(".")
    section = config
    for part in path:
      section = section[part]
    section[name] = value
  return config


def tiny_sft_workdir(tmp_path_factory) -> str:
  """A finished 6-step tiny SFT run (made once per session)."""
  workdir = os.path.join(str(tmp_path_factory.getbasetemp()), "offline_tiny_sft")
  if not os.path.exists(os.path.join(workdir, train.FINAL_METRICS_FILE)):
    sft.train_and_evaluate(override(load_config("sft_synthetic"), SFT_OVERRIDES), workdir)
  return workdir


def tiny_rm_workdir(tmp_path_factory, sft_workdir: str) -> str:
  """A reward-model artifact (``reward_scoring`` layout) on the tiny SFT backbone with a random head.

  Untrained on purpose: the offline-trainer tests need something that scores samples through the
  real loading / scoring API, not a good reward model (that is the reward-model tests' business).
  """
  import dataclasses

  import jax
  import jax.numpy as jnp
  from flax.core import meta

  from rlhf_jax import models
  from rlhf_jax import scoring

  workdir = os.path.join(str(tmp_path_factory.getbasetemp()), "offline_tiny_rm")
  if os.path.exists(os.path.join(workdir, scoring.ARTIFACT_DIR)):
    return workdir
  ckpt = train.load_sft_params(sft_workdir)
  rm = models.RewardModel(ckpt.model_config)
  dummy = jnp.ones((1, 8), jnp.int32)
  head = meta.unbox(rm.init(jax.random.PRNGKey(7), dummy, dummy))["params"]
  params = models.with_backbone(head, ckpt.params)
  info = scoring.RewardModelInfo(model=dataclasses.asdict(ckpt.model_config),
                                 output_names=("reward",), tokenizer_spec="byte",
                                 tokenizer_fingerprint=ckpt.tokenizer.fingerprint(),
                                 max_prompt_len=32, max_response_len=48, mean=(0.0,), std=(1.0,),
                                 objective="untrained-test-head")
  scoring.save_reward_model(workdir, params, info)
  return workdir
