"""RRHF (rank hinge on length-normalised log-probs + SFT on the best) on the synthetic ranked lists."""

import ml_collections

from rlhf_jax.train import config_dicts


def get_config() -> ml_collections.ConfigDict:
  """RRHF: experiments/configs/pro_synthetic.py with method='rrhf' (SFT weight 1, token-mean NLL).

  Run (after SFT):
    python experiments/run.py --config=experiments/configs/rrhf_synthetic.py \
        --workdir=workdirs/rrhf_synthetic --config.sources.sft_workdir=workdirs/sft_synthetic
  """
  return config_dicts.sibling_config(__file__, "pro_synthetic", "rrhf")
