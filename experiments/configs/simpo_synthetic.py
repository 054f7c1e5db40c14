"""SimPO (reference-free, length-normalised, target margin gamma) on the synthetic task's pairs."""

import ml_collections

from rlhf_jax.train import config_dicts


def get_config() -> ml_collections.ConfigDict:
  """SimPO (reference-free, length-normalised, target margin gamma) on the synthetic task's pairs.

  Run (after SFT):
    python experiments/run.py --config=experiments/configs/simpo_synthetic.py \
        --workdir=workdirs/simpo_synthetic --config.sources.sft_workdir=workdirs/sft_synthetic

  Everything else is experiments/configs/dpo_synthetic.py.
  """
  config = config_dicts.sibling_config(__file__, "dpo_synthetic")
  config.loss.method = "simpo"
  config.loss.beta = 2.0
  config.loss.simpo_gamma = 0.5
  return config
