r"""Online RLHF launcher: PPO (default), RLOO, GRPO or Dr. GRPO against a trained reward model.

  python experiments/ppo.py --workdir=workdirs/ppo_synthetic \
      --config.data.sft_workdir=workdirs/sft_synthetic \
      --config.data.reward_model_workdir=workdirs/rm_synthetic
  python experiments/ppo.py --config=experiments/configs/grpo_synthetic.py ...
  python experiments/ppo.py --config=experiments/configs/ppo_jsonl.py \
      --config.data.prompts_jsonl=prompts.jsonl --config.data.sft_workdir=... \
      --config.data.reward_model_workdir=... --workdir=workdirs/ppo_mine

Re-running the same command in the same workdir resumes from the latest checkpoint (SIGTERM saves
one and exits).
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax.algorithms.online import ppo

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "ppo_synthetic.py"),
    "RL config file (default: experiments/configs/ppo_synthetic.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/ppo_synthetic",
                               "Run directory: checkpoints, metrics, config, samples.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint at INFO
  ppo.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
