r"""Iterated RLHF on the synthetic task: comparisons from the current policy → new RM → PPO.

  python experiments/iterated_rlhf.py --workdir=workdirs/iterated \
      --config.sft_workdir=workdirs/sft_synthetic

Writes ``rounds.json``, ``rounds.md`` (gold reward, KL, RM accuracy per round) and
``iterated_rlhf.png`` to the workdir; rerunning resumes at the first unfinished stage.
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax.algorithms.online import iterated

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                           "iterated_synthetic.py"),
    "Iterated-RLHF config (default: experiments/configs/iterated_synthetic.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/iterated", "Run directory.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").setLevel(logging.WARNING)
  for row in iterated.run(_CONFIG.value, _WORKDIR.value):
    print(row)


if __name__ == "__main__":
  app.run(main)
