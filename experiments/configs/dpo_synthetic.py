"""DPO (sigmoid loss) of the SFT ``small`` model on the synthetic task's pairwise preferences."""

import ml_collections

from rlhf_jax import parallel, train
from rlhf_jax.algorithms import sections
from rlhf_jax.algorithms.offline import pairwise_shell
from rlhf_jax.algorithms.offline import dpo
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.train import config_dicts


def get_config(loss: str = "sigmoid") -> ml_collections.ConfigDict:
  """DPO from a finished SFT run on the synthetic task's 4000 Bradley-Terry-labelled pairs.

  Run (after SFT, ``experiments/configs/sft_synthetic.py``):
    python experiments/run.py --config=experiments/configs/dpo_synthetic.py \
        --workdir=workdirs/dpo_synthetic --config.sources.sft_workdir=workdirs/sft_synthetic \
        [--config.sources.reward_model_workdir=workdirs/rm_synthetic]   # adds rm_reward

  Any TRL loss: ``--config.loss.loss_type=ipo`` (or ``"sigmoid,bco_pair"``), SimPO / ORPO with
  ``--config.loss.method=simpo|orpo``; reference log-probs once up front with
  ``--config.loss.reference_logps=precomputed``; a separate reference run with
  ``--config.sources.reference_workdir=...``. The pipeline (``experiments/pipeline.py``) runs
  this with fewer steps; see BUILD_NOTES.md for measured results.
  """
  config = ml_collections.ConfigDict()
  config.method = "dpo"
  config.seed = 0
  # tokenizer '' = the SFT run's (byte when starting fresh)
  config.sources = config_dicts.dataclass_section(sections.Sources)
  config.model = config_dicts.model_section("small")  # used only without sources.sft_workdir
  config.loss = config_dicts.dataclass_section(dpo.DPOLossConfig, method="dpo", loss_type=loss,
                                               beta=0.1)
  config.data = config_dicts.dataclass_section(pairwise_shell.PairwiseData, batch_size=32,
                                               num_eval_pairs=256)
  config.limits = config_dicts.dataclass_section(sections.Limits, max_prompt_len=32,
                                                 max_response_len=48, buckets=(64, 80))
  config.optim = config_dicts.dataclass_section(train.OptimConfig, lr=5e-4, warmup_steps=10,
                                                schedule="cosine", end_lr_ratio=0.1,
                                                weight_decay=0.0, clip_norm=1.0)
  config.loop = config_dicts.dataclass_section(train.LoopConfig, num_steps=200, log_every=10,
                                               eval_every=100, checkpoint_every=100,
                                               keep_checkpoints=1, progress_every_secs=10.0)
  config.eval = config_dicts.dataclass_section(policy_eval.PolicyEvalConfig, num_prompts=128,
                                               max_new_tokens=48)
  config.mesh = config_dicts.dataclass_section(parallel.MeshConfig, data=1, fsdp=1, tensor=1)
  config.lora = config_dicts.dataclass_section(sections.Lora)  # off: --config.lora.enabled=True
  return config
