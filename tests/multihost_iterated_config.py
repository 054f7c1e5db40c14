"""Test-only iterated-RLHF config: the smallest rounds that still train each stage.

``tests/test_multihost.py`` runs it (``experiments/run.py``) once as 2 processes x 2 devices and
once as 1 process x 4 devices, over the SFT run of its pipeline fixture
(``--config.sources.sft_workdir``), and compares ``rounds.json``. Two rounds, so round 1 covers
the paths round 0 does not: the previous round's pairs carried over, PPO from the previous PPO run.
Per round: 16 + 8 prompts of comparisons (8-token answers), an RM of 2 steps on them, PPO of 2
iterations over 4 prompts; every stage on all devices (``mesh.data = -1``).
"""

import os

import ml_collections

from rlhf_jax.train import config_dicts

ITERATED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                        "configs", "iterated_synthetic.py")


def get_config() -> ml_collections.ConfigDict:
  config = config_dicts.sibling_config(ITERATED, "iterated_synthetic")
  config.rounds, config.pairs_per_round, config.eval_pairs = 2, 16, 8
  config_dicts.set_dotted(
      config.rm, {
          "data.batch_size": 8, "data.eval_batch_size": 16, "limits.buckets": (80,),
          "data.max_eval_examples": 16, "eval.num_normalization_prompts": 4,
          "eval.num_gold_prompts": 4, "eval.sample_batch": 4, **config_dicts.stage_loop(2)})
  config_dicts.set_dotted(
      config.ppo, {
          "limits.max_response_len": 8, "ppo.num_ppo_epochs": 1, "ppo.num_samples": 1,
          "ppo.num_minibatches": 1, "data.batch_size": 4, "data.synthetic_num_prompts": 32,
          "data.synthetic_num_test_prompts": 4, "loop.num_steps": 2, "loop.log_every": 1,
          "loop.eval_every": 0, "loop.checkpoint_every": 2, "eval.num_prompts": 4,
          "eval.max_new_tokens": 8, "eval.print_samples": 0, "optim.lr": 1e-3})
  for name in ("rm", "ppo"):
    config[name].mesh.data = -1  # every device (what several processes do with 1x1x1 anyway)
  return config
