r"""Supervised fine-tuning launcher.

  python experiments/sft.py --workdir=workdirs/sft_synthetic
  python experiments/sft.py --config=experiments/configs/sft_jsonl.py \
      --config.data.train_jsonl=train.jsonl --config.data.eval_jsonl=eval.jsonl --workdir=workdirs/mine

Re-running the same command in the same workdir resumes from the latest checkpoint.
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax.algorithms import sft

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sft_synthetic.py"),
    "SFT config file (default: experiments/configs/sft_synthetic.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/sft_synthetic",
                               "Run directory: checkpoints, metrics, config, samples.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # orbax logs every checkpoint operation through absl at INFO; keep the console to our progress.
  logging.getLogger("absl").setLevel(logging.WARNING)
  sft.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
