r"""PRO / RRHF launcher (ranked candidate lists).

  python experiments/pro_rrhf.py --workdir=workdirs/pro_synthetic \
      --config.sources.sft_workdir=workdirs/sft_synthetic
  python experiments/pro_rrhf.py --config=experiments/configs/rrhf_synthetic.py \
      --workdir=workdirs/rrhf_synthetic --config.sources.sft_workdir=workdirs/sft_synthetic

Re-running the same command in the same workdir resumes from the latest checkpoint.
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax.algorithms.offline import listwise

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "pro_synthetic.py"),
    "PRO / RRHF config file (default: experiments/configs/pro_synthetic.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/pro_synthetic",
                               "Run directory: checkpoints, metrics, config, samples.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").setLevel(logging.WARNING)
  listwise.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
