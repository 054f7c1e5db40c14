"""KTO of the SFT ``small`` model on the unpaired split of the synthetic task's comparisons."""

import ml_collections

from rlhf_jax import parallel, train
from rlhf_jax.algorithms import sections
from rlhf_jax.algorithms.offline import kto
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.train import config_dicts


def get_config(loss_type: str = "kto") -> ml_collections.ConfigDict:
  """KTO from a finished SFT run on ``unpaired.jsonl``: the 4000 pairs DPO trains on, split into
  4000 desirable (chosen) and 4000 undesirable (rejected) examples.

  Run (after SFT, ``experiments/configs/sft_synthetic.py``):
    python experiments/run.py --config=experiments/configs/kto_synthetic.py \
        --workdir=workdirs/kto_synthetic --config.sources.sft_workdir=workdirs/sft_synthetic

  TRL's defaults (β = 0.1, desirable / undesirable weights 1.0); ``:apo_zero_unpaired`` picks
  that loss. Your own data: ``--config.data.source=jsonl --config.data.train_jsonl=...
  --config.data.eval_jsonl=...`` with ``{"prompt", "completion", "label": true|false}`` records,
  or pairwise files with ``--config.data.unpair=True``. A batch of 32 examples is 64 sequences
  (each example plus its mismatched KL row), the same as DPO's 32 pairs. The pipeline
  (``experiments/pipeline.py``, stage ``kto``) runs this with fewer steps; measured results:
  README.md / BUILD_NOTES.md.
  """
  config = ml_collections.ConfigDict()
  config.method = "kto"
  config.seed = 0
  # tokenizer '' = the SFT run's (byte when starting fresh)
  config.sources = config_dicts.dataclass_section(sections.Sources)
  config.model = config_dicts.model_section("small")  # used only without sources.sft_workdir
  config.loss = config_dicts.dataclass_section(kto.KTOLossConfig, loss_type=loss_type, beta=0.1,
                                               desirable_weight=1.0, undesirable_weight=1.0)
  config.data = config_dicts.dataclass_section(kto.KTOData, batch_size=32, num_eval_examples=512)
  # One bucket >= max_prompt_len + max_response_len: a KL row (a prompt with another example's
  # completion) then always fits whole.
  config.limits = config_dicts.dataclass_section(sections.Limits, max_prompt_len=32,
                                                 max_response_len=48, buckets=(80,))
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
