r"""RAFT launcher.

  python experiments/raft.py --workdir=workdirs/raft_synthetic \
      --config.sources.sft_workdir=workdirs/sft_synthetic \
      --config.sources.reward_model_workdir=workdirs/rm_synthetic

Re-running the same command in the same workdir resumes at the next round.
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax.algorithms.offline import raft

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "raft_synthetic.py"),
    "RAFT config file (default: experiments/configs/raft_synthetic.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/raft_synthetic",
                               "Run directory: checkpoints, metrics, config, samples.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").setLevel(logging.WARNING)
  raft.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
