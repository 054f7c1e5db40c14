r"""Reward-model launcher (step 2 of RLHF).

  python experiments/reward_model.py --workdir=workdirs/rm_synthetic        # pairwise, synthetic task
  python experiments/reward_model.py --config=experiments/configs/rm_synthetic.py:all_pairs \
      --workdir=workdirs/rm_all_pairs
  python experiments/reward_model.py --config=experiments/configs/rm_jsonl.py:bradley_terry \
      --config.data.train_jsonl=train.jsonl --config.data.eval_jsonl=eval.jsonl \
      --config.rm.sft_workdir=workdirs/my_sft --workdir=workdirs/my_rm
  # learning curve (accuracy vs annotated prompts, one line per objective) -> <workdir>/learning_curve.png
  python experiments/reward_model.py --workdir=workdirs/rm_curve --learning_curve=250,500,1000,2000 \
      --curve_objectives=bradley_terry,all_pairs

If the SFT run named by config.rm.sft_workdir has no checkpoint yet (or an unfinished default one) and
the config is the synthetic one, SFT is run (or resumed) first (experiments/configs/sft_synthetic.py).
SIGTERM checkpoints and stops the current stage (SFT, the RM or a learning-curve point) and the
launcher exits without starting the next one; re-running the same command resumes it.
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax.algorithms.reward import trainer as reward_model
from rlhf_jax.algorithms.reward import sweep as reward_sweep

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "rm_synthetic.py"),
    "Reward-model config (default: experiments/configs/rm_synthetic.py, Bradley-Terry).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/rm_synthetic",
                               "Run directory: checkpoints, metrics, reward_model/, rm_report.md.")
_CURVE = flags.DEFINE_list("learning_curve", [],
                           "Numbers of annotated prompts: run one RM per size and objective under "
                           "<workdir>/curve/ and plot <workdir>/learning_curve.png.")
_CURVE_OBJECTIVES = flags.DEFINE_list("curve_objectives", ["bradley_terry", "all_pairs"],
                                      "Objectives of the learning curve.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint op at INFO
  config = _CONFIG.value
  if not reward_model.ensure_sft_run(config):
    return  # SFT was stopped by SIGTERM: the same command resumes it
  if _CURVE.value:
    reward_sweep.learning_curve(config, _WORKDIR.value, [int(n) for n in _CURVE.value],
                                list(_CURVE_OBJECTIVES.value))
  else:
    reward_model.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
