r"""Reward model on your own JSONL preference data, initialised from your SFT run.

  python experiments/run.py --config=experiments/configs/rm_jsonl.py:<objective> \
      --config.data.train_jsonl=train.jsonl --config.data.eval_jsonl=eval.jsonl \
      --config.sources.sft_workdir=workdirs/my_sft --workdir=workdirs/my_rm

Record kinds per objective (see rlhf_jax/data/records.py):
  bradley_terry    {"prompt", "chosen", "rejected"}
  all_pairs        {"prompt", "responses": [...], "scores": [...]}  or "ranks" (1 = best)
  plackett_luce    same as all_pairs
  likert           {"prompt", "response", "rating"}  -- also set --config.data.rating_scale="(1, 7)"
  multi_attribute  {"prompt", "response", "attributes": {name: value}} -- and rating_scale
Optional: --config.data.eval_pairwise_jsonl / eval_ranked_jsonl (extra held-out metrics),
--config.data.prompts_jsonl ({"prompt"} records the SFT model answers for the normalisation).
"""

import ml_collections

from rlhf_jax import parallel, train
from rlhf_jax.algorithms import sections
from rlhf_jax.algorithms.reward import trainer as reward_model
from rlhf_jax.train import config_dicts

_BATCH = {
    "bradley_terry": 32, "all_pairs": 8, "plackett_luce": 8, "likert": 32, "multi_attribute": 32}


def get_config(objective: str = "bradley_terry") -> ml_collections.ConfigDict:
  """A user-data RM: the tokenizer and model come from ``sources.sft_workdir`` (required).

  Time and results depend on your data and model; on the synthetic task's files (pass
  <workdir>/data/synthetic/pairwise.jsonl and pairwise_test.jsonl) it reproduces rm_synthetic.py.
  The data paths are placeholders that fail validation until you set them.
  """
  if objective not in reward_model.OBJECTIVES:
    raise ValueError(f"rm_jsonl.py:{objective}: allowed objectives: {reward_model.OBJECTIVES}")
  config = ml_collections.ConfigDict()
  config.method = "reward_model"
  config.seed = 0
  config.model = config_dicts.model_section("small")  # used only with rm.init=scratch
  # The SFT run is a placeholder that fails validation until you set it.
  config.sources = config_dicts.dataclass_section(sections.Sources,
                                                  sft_workdir="workdirs/sft_jsonl")
  config.rm = config_dicts.dataclass_section(reward_model.RMConfig, objective=objective, init="sft",
                                             early_stopping_patience=3)
  config.optim = config_dicts.dataclass_section(train.OptimConfig, lr=1e-5, warmup_steps=50,
                                                schedule="cosine", end_lr_ratio=0.1,
                                                weight_decay=0.01, clip_norm=1.0)
  config.loop = config_dicts.dataclass_section(train.LoopConfig, num_steps=2000, log_every=20,
                                               eval_every=200, checkpoint_every=200,
                                               keep_checkpoints=1, progress_every_secs=30.0)
  config.data = config_dicts.dataclass_section(reward_model.RMDataConfig, source="jsonl",
                                               train_jsonl="", eval_jsonl="",
                                               batch_size=_BATCH[objective], eval_batch_size=64,
                                               max_eval_examples=2000)
  config.limits = config_dicts.dataclass_section(sections.Limits, max_prompt_len=512,
                                                 max_response_len=512)
  config.eval = config_dicts.dataclass_section(reward_model.RMEvalConfig, num_gold_prompts=0)
  config.mesh = config_dicts.dataclass_section(parallel.MeshConfig, data=-1, fsdp=1, tensor=1)
  return config
