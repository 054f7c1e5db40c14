"""RRHF (rank hinge on length-normalised log-probs + SFT on the best) on the synthetic ranked lists."""

import importlib.util
import os

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """RRHF: experiments/configs/pro_synthetic.py with method='rrhf' (SFT weight 1, token-mean NLL).

  Run (after SFT):
    python experiments/pro_rrhf.py --config=experiments/configs/rrhf_synthetic.py \
        --workdir=workdirs/rrhf_synthetic --config.sources.sft_workdir=workdirs/sft_synthetic
  """
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pro_synthetic.py")
  spec = importlib.util.spec_from_file_location("pro_synthetic", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("rrhf")
