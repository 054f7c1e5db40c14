"""Test-only RLAIF config: the smoke RLAIF experiment with every training stage on all devices.

``tests/test_multihost.py`` runs it (``experiments/rlaif.py``) once as 2 processes x 2 devices and
once as 1 process x 4 devices, over the SFT run of its pipeline fixture
(``--config.sources.sft_workdir``: the same smoke SFT section), and compares every stage's final
metrics: the feedback model (2 steps from the exported SFT policy, on the teacher's labelling data
written by process 0), the labelling (16 pairs, all with CoT; process 0's), the two reward models, PPO against each, d-RLAIF (the evaluator's rating on
PPO's mesh) and DPO on the soft / hard AI labels, then the report.
"""

import os

import ml_collections

from rlhf_jax.train import config_dicts

RLAIF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                     "configs", "rlaif_synthetic.py")
TRAINED = ("sft", "feedback", "rm", "ppo", "ppo_direct", "dpo")


def get_config() -> ml_collections.ConfigDict:
  config = config_dicts.sibling_config(RLAIF, "rlaif_synthetic", "smoke")
  for name in TRAINED:
    config[name].mesh.data = -1  # every device (what several processes do with 1x1x1 anyway)
  return config
