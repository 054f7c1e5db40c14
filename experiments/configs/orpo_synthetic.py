"""ORPO (odds-ratio term + chosen NLL, reference-free) on the synthetic task's pairs."""

import ml_collections

from rlhf_jax.train import config_dicts


def get_config() -> ml_collections.ConfigDict:
  """ORPO (odds-ratio term + chosen NLL, reference-free) on the synthetic task's pairs.

  Run (after SFT):
    python experiments/run.py --config=experiments/configs/orpo_synthetic.py \
        --workdir=workdirs/orpo_synthetic --config.sources.sft_workdir=workdirs/sft_synthetic

  Everything else is experiments/configs/dpo_synthetic.py.
  """
  config = config_dicts.sibling_config(__file__, "dpo_synthetic")
  config.loss.method = "orpo"
  config.loss.orpo_lambda = 0.1
  return config
