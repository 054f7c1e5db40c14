"""Reward model on the embedded synthetic task, one objective per config string.

  python experiments/reward_model.py                                         # bradley_terry (pairs)
  python experiments/reward_model.py --config=experiments/configs/rm_synthetic.py:all_pairs
  python experiments/reward_model.py --config=experiments/configs/rm_synthetic.py:plackett_luce
  python experiments/reward_model.py --config=experiments/configs/rm_synthetic.py:likert
  python experiments/reward_model.py --config=experiments/configs/rm_synthetic.py:multi_attribute
"""

import ml_collections

from rlhf_jax import parallel, train
from rlhf_jax.algorithms import reward_model
from rlhf_jax.train import config_dicts

# Records per step: 32 pairs (64 sequences); ranked lists hold 4..9 responses (6.5 on average), so
# 8 lists (~52 sequences) keep a step's compute comparable.
_BATCH = {"bradley_terry": 32, "all_pairs": 8, "plackett_luce": 8, "likert": 32, "multi_attribute": 32}


def get_config(objective: str = "bradley_terry") -> ml_collections.ConfigDict:
  """Reward model from the synthetic SFT run (``small`` preset, byte tokenizer).

  Run (the SFT run in workdirs/sft_synthetic is trained first if it is missing):
    python experiments/reward_model.py --config=experiments/configs/rm_synthetic.py:<objective> \
        --workdir=workdirs/rm_<objective>

  Objectives: bradley_terry (pairwise.jsonl, 4000 pairs), all_pairs / plackett_luce (ranked.jsonl,
  4000 lists of 4..9), likert (rated.jsonl, 1..7), multi_attribute (attributes.jsonl: harmless,
  helpful). 600 steps (AdamW, lr 5e-4 cosine), held-out evaluation every 100 steps on 2000 held-out
  pairs (500 gave +-1.8 points of sampling noise on accuracy) with early stopping (patience 3), then
  normalisation over 512 SFT samples and the report (rm_report.md). lr 1e-3 trains noisily (held-out
  loss jumps between evaluations), 3e-3 does not learn (accuracy 0.63-0.68); at 5e-4 the same 600
  steps score ~1.6 points higher on 4000 fresh pairs. Measured numbers (pairwise default: held-out
  accuracy ~0.80 vs the Bayes-optimal ~0.85, i.e. the issue's "within 3 points" target is not met;
  why: BUILD_NOTES.md, "Reward models").
  """
  if objective not in reward_model.OBJECTIVES:
    raise ValueError(f"rm_synthetic.py:{objective}: allowed objectives: {reward_model.OBJECTIVES}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = config_dicts.model_section("small")  # used only with rm.init=scratch
  config.rm = config_dicts.dataclass_section(
      reward_model.RMConfig, objective=objective, init="sft", sft_workdir="workdirs/sft_synthetic",
      dropout_rate=0.0, early_stopping_patience=3)
  config.optim = config_dicts.dataclass_section(
      train.OptimConfig, lr=5e-4, warmup_steps=20, schedule="cosine", end_lr_ratio=0.1,
      weight_decay=0.01, clip_norm=1.0)
  config.loop = config_dicts.dataclass_section(
      train.LoopConfig, num_steps=600, log_every=20, eval_every=100, checkpoint_every=100,
      keep_checkpoints=1, progress_every_secs=15.0)
  config.data = config_dicts.dataclass_section(
      reward_model.RMDataConfig, source="synthetic", max_prompt_len=32, max_response_len=48,
      synthetic_num_test_prompts=2000, batch_size=_BATCH[objective], eval_batch_size=128,
      max_eval_examples=2000, buckets=(64, 80))
  config.eval = config_dicts.dataclass_section(
      reward_model.RMEvalConfig, num_normalization_prompts=256, samples_per_prompt=2,
      num_gold_prompts=256)
  config.mesh = config_dicts.dataclass_section(parallel.MeshConfig, data=1, fsdp=1, tensor=1)
  return config
