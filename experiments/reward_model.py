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

If the SFT run named by config.rm.sft_workdir has no checkpoint yet and the config is the synthetic
one, SFT is run first (experiments/configs/sft_synthetic.py). Re-running a command resumes it.
"""

import importlib.util
import logging
import os

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax.algorithms import reward_model, reward_sweep, sft

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


def _ensure_sft(config) -> None:
  """Runs the default synthetic SFT first when the configured SFT workdir has no checkpoint."""
  sft_workdir = config.rm.sft_workdir
  if config.rm.init != "sft" or os.path.isdir(os.path.join(sft_workdir, "checkpoints")):
    return
  if config.data.source != "synthetic":
    raise app.UsageError(f"config.rm.sft_workdir={sft_workdir!r} holds no SFT run; train one first "
                         "(python experiments/sft.py --config=... --workdir=...)")
  spec = importlib.util.spec_from_file_location("sft_synthetic",
                                                os.path.join(_HERE, "configs", "sft_synthetic.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  logging.info("no SFT run in %s: training it first (experiments/configs/sft_synthetic.py)", sft_workdir)
  sft.train_and_evaluate(module.get_config(), sft_workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint op at INFO
  config = _CONFIG.value
  _ensure_sft(config)
  if _CURVE.value:
    reward_sweep.learning_curve(config, _WORKDIR.value, [int(n) for n in _CURVE.value],
                                list(_CURVE_OBJECTIVES.value))
  else:
    reward_model.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
