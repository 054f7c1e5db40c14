"""SFT of the ``small`` model on the embedded synthetic task (the default of ``experiments/sft.py``)."""

import ml_collections

from rlhf_jax import parallel, train
from rlhf_jax.algorithms import sft
from rlhf_jax.train import config_dicts


def get_config() -> ml_collections.ConfigDict:
  """SFT on the synthetic gold-reward task: byte tokenizer, ``small`` preset (~1.6M params).

  Run:
    python experiments/sft.py --workdir=workdirs/sft_synthetic

  Generates the task into ``<workdir>/data/synthetic`` (4000 train / 500 held-out prompts), builds
  the TFDS datasets next to it, trains 600 steps of batch 32, evaluates every 200 steps and writes
  ``<workdir>/final_metrics.json``.

  Expected (measured; see notes/BUILD_NOTES_train.md): MEASURED_PLACEHOLDER
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.aggregation = "token_mean"
  config.model = config_dicts.model_section("small")
  config.optim = config_dicts.dataclass_section(
      train.OptimConfig, lr=3e-3, warmup_steps=16, schedule="cosine", end_lr_ratio=0.05,
      weight_decay=0.05, clip_norm=1.0)
  config.loop = config_dicts.dataclass_section(
      train.LoopConfig, num_steps=160, log_every=10, eval_every=80, checkpoint_every=80,
      keep_checkpoints=2, progress_every_secs=10.0)
  config.data = config_dicts.dataclass_section(
      sft.SFTDataConfig, source="synthetic", max_prompt_len=32, max_response_len=48,
      batch_size=32, eval_batch_size=128, max_eval_examples=512, buckets=(64, 80))
  config.eval = config_dicts.dataclass_section(sft.SFTEvalConfig, num_sample_prompts=128)
  config.mesh = config_dicts.dataclass_section(parallel.MeshConfig, data=1, fsdp=1, tensor=1)
  return config
