r"""Best-of-n launcher (no training: sample n from the SFT model, keep the reward model's best).

  python experiments/best_of_n.py --workdir=workdirs/best_of_n_synthetic \
      --config.sources.sft_workdir=workdirs/sft_synthetic \
      --config.sources.reward_model_workdir=workdirs/rm_synthetic
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax.algorithms.offline import best_of_n

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                           "best_of_n_synthetic.py"),
    "Best-of-n config file (default: experiments/configs/best_of_n_synthetic.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/best_of_n_synthetic",
                               "Run directory: best_of_n.csv, final_metrics.json, samples.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").setLevel(logging.WARNING)
  best_of_n.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
