"""RAFT (sample K, keep the reward model's best, fine-tune; repeat) on the synthetic task."""

import ml_collections

from rlhf_jax import parallel, train
from rlhf_jax.algorithms import sections
from rlhf_jax.algorithms.offline import raft
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.train import config_dicts


def get_config() -> ml_collections.ConfigDict:
  """RAFT from a finished SFT run with a trained reward model.

  Run:
    python experiments/run.py --config=experiments/configs/raft_synthetic.py \
        --workdir=workdirs/raft_synthetic \
        --config.sources.sft_workdir=workdirs/sft_synthetic \
        --config.sources.reward_model_workdir=workdirs/rm_synthetic

  4 rounds x 25 steps: each round samples 8 responses for 256 training prompts (the SFT run's
  synthetic ``prompts.jsonl``), keeps the best per prompt and fine-tunes on them in batches of
  ``data.batch_size``; an evaluation closes every round. Global top-fraction selection:
  ``--config.raft.selection=global --config.raft.keep_fraction=0.125``. Your own prompts:
  ``--config.data.source=jsonl --config.data.train_jsonl=prompts.jsonl``. A multi-attribute RM
  needs ``--config.sources.attribute_weights=helpful:1,harmless:1``.
  See BUILD_NOTES.md for measured results.
  """
  config = ml_collections.ConfigDict()
  config.method = "raft"
  config.seed = 0
  config.sources = config_dicts.dataclass_section(sections.Sources)
  config.data = config_dicts.dataclass_section(raft.RAFTDataConfig, batch_size=32)
  config.limits = config_dicts.dataclass_section(sections.Limits, max_prompt_len=32,
                                                 max_response_len=48)
  config.model = config_dicts.model_section("small")  # used only without sources.sft_workdir
  config.raft = config_dicts.dataclass_section(raft.RAFTConfig, num_rounds=4, prompts_per_round=256,
                                               samples_per_prompt=8)
  config.optim = config_dicts.dataclass_section(train.OptimConfig, lr=3e-4, warmup_steps=5,
                                                schedule="constant", weight_decay=0.0,
                                                clip_norm=1.0)
  config.loop = config_dicts.dataclass_section(train.LoopConfig, num_steps=100, log_every=5,
                                               checkpoint_every=25, keep_checkpoints=1,
                                               progress_every_secs=10.0)
  config.eval = config_dicts.dataclass_section(policy_eval.PolicyEvalConfig, num_prompts=128,
                                               max_new_tokens=48)
  config.mesh = config_dicts.dataclass_section(parallel.MeshConfig, data=1, fsdp=1, tensor=1)
  config.lora = config_dicts.dataclass_section(sections.Lora)  # off: --config.lora.enabled=True
  return config
