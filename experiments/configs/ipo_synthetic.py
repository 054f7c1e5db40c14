"""IPO (TRL loss_type='ipo', length-normalised log-ratios) on the synthetic task's pairs."""

import importlib.util
import os

import ml_collections


def _dpo_base():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dpo_synthetic.py")
  spec = importlib.util.spec_from_file_location("dpo_synthetic", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config() -> ml_collections.ConfigDict:
  """IPO (TRL loss_type='ipo', length-normalised log-ratios) on the synthetic task's pairs.

  Run (after SFT):
    python experiments/dpo.py --config=experiments/configs/ipo_synthetic.py \
        --workdir=workdirs/ipo_synthetic --config.sources.sft_workdir=workdirs/sft_synthetic

  Everything else is experiments/configs/dpo_synthetic.py.
  """
  config = _dpo_base().get_config()
  config.loss.loss_type = "ipo"
  config.loss.beta = 0.1  # tau of the IPO paper: the target log-ratio margin is 1/(2 tau) = 5 nats/token
  return config
