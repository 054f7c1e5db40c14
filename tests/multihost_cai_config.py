"""Test-only CAI config: the smoke Constitutional AI experiment, every training stage on all devices.

``tests/test_multihost.py`` runs it (``experiments/cai.py``) once as 2 processes x 2 devices and
once as 1 process x 4 devices, over the SFT run of its pipeline fixture
(``--config.sources.sft_workdir``: the same smoke SFT section), and compares every stage's final
metrics: the feedback model (trained here: 2 steps from the exported SFT policy), its evaluation, the simulated human labels, the critique -> revision
data, SL-CAI, the RL-CAI labels (process 0's), the three reward models and PPO on each, then the
report (every finished policy evaluated on process 0).
"""

import os

import ml_collections

from rlhf_jax.train import config_dicts

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                       "configs")
CAI = os.path.join(CONFIGS, "cai_synthetic.py")
RLAIF = os.path.join(CONFIGS, "rlaif_synthetic.py")
TRAINED = ("sft", "feedback", "sl_cai_train", "rm", "ppo")


def get_config() -> ml_collections.ConfigDict:
  config = config_dicts.sibling_config(CAI, "cai_synthetic", "smoke")
  # The smoke CAI's evaluator is a random preset; here the feedback model is trained (2 steps from
  # the exported SFT policy, the RLAIF smoke's section), so every labelling stage restores it.
  config.sources.feedback_workdir = ""
  config.feedback = config_dicts.sibling_config(RLAIF, "rlaif_synthetic", "smoke").feedback
  for name in TRAINED:
    config[name].mesh.data = -1  # every device (what several processes do with 1x1x1 anyway)
  return config
