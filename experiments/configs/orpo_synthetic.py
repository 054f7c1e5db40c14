"""ORPO (odds-ratio term + chosen NLL, reference-free) on the synthetic task's pairs."""

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
  """ORPO (odds-ratio term + chosen NLL, reference-free) on the synthetic task's pairs.

  Run (after SFT):
    python experiments/dpo.py --config=experiments/configs/orpo_synthetic.py \
        --workdir=workdirs/orpo_synthetic --config.sources.sft_workdir=workdirs/sft_synthetic

  Everything else is experiments/configs/dpo_synthetic.py.
  """
  config = _dpo_base().get_config()
  config.loss.method = "orpo"
  config.loss.orpo_lambda = 0.1
  return config
