"""IPO (TRL loss_type='ipo', length-normalised log-ratios) on the synthetic task's pairs."""

import ml_collections

from rlhf_jax.train import config_dicts


def get_config() -> ml_collections.ConfigDict:
  """IPO (TRL loss_type='ipo', length-normalised log-ratios) on the synthetic task's pairs.

  Run (after SFT):
    python experiments/run.py --config=experiments/configs/ipo_synthetic.py \
        --workdir=workdirs/ipo_synthetic --config.sources.sft_workdir=workdirs/sft_synthetic

  Everything else is experiments/configs/dpo_synthetic.py.
  """
  config = config_dicts.sibling_config(__file__, "dpo_synthetic")
  config.loss.loss_type = "ipo"
  config.loss.beta = 0.1  # tau of the IPO paper: the target log-ratio margin is 1/(2 tau) = 5 nats/token
  return config
