"""rlhf_jax.algorithms.seeding: replicate configs, their layout and the summary over seeds."""

import math

import ml_collections
import numpy as np
import pytest

from rlhf_jax.algorithms import seeding


def _config():
  return ml_collections.ConfigDict({
      "method": "dpo", "seed": 3, "data": {"shuffle_seed": 10, "synthetic_seed": 7},
      "eval": {"seed": 0, "num_prompts": 8}, "lora": {"seed": 1,
                                                      "enabled": False}, "flag_seed": True})


def test_seed_config_offsets_every_seed_but_the_task_and_seed_0_is_unchanged():
  config = _config()
  assert sorted(seeding.seed_keys(config)) == ["data.shuffle_seed", "eval.seed", "lora.seed", "seed"]
  assert seeding.seed_config(config, 0).to_dict() == config.to_dict()
  two = seeding.seed_config(config, 2)
  assert (two.seed, two.data.shuffle_seed, two.eval.seed, two.lora.seed) == (5, 12, 2, 3)
  assert two.data.synthetic_seed == 7 and two.flag_seed is True and two.eval.num_prompts == 8
  assert config.seed == 3  # a copy
  assert seeding.seed_root("/w", 0) == "/w" and seeding.seed_root("/w/", 2) == "/w/seed_2"
  assert seeding.seed_root("gs://b/run", 1) == "gs://b/run/seed_1"


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3"])
def test_num_seeds_must_be_a_positive_int(bad):
  with pytest.raises(ValueError, match=r"config.num_seeds=.* is invalid; allowed: an int >= 1"):
    seeding.num_seeds(ml_collections.ConfigDict({"num_seeds": bad}))
  assert seeding.num_seeds(ml_collections.ConfigDict({})) == 1


def test_summary_is_mean_and_standard_error_of_each_numeric_metric():
  finals = [{"gold_reward": 0.5, "kl_to_sft": 2.0, "step": 10, "method": "dpo",
             "preempted": False}, {"gold_reward": 0.2, "kl_to_sft": float("nan"), "step": 10},
            {"gold_reward": 0.8, "kl_to_sft": 4.0, "step": 10}]
  stats = seeding.summary(finals)
  assert set(stats) == {"gold_reward", "kl_to_sft"}  # step / strings / booleans are not averaged
  g = stats["gold_reward"]
  # by hand: mean 0.5, s = sqrt(((0)^2 + 0.3^2 + 0.3^2) / 2) = 0.3, s.e. = 0.3 / sqrt(3)
  assert g["n"] == 3 and math.isclose(g["mean"], 0.5) and math.isclose(g["se"], 0.3 / math.sqrt(3))
  k = stats["kl_to_sft"]  # the NaN seed is dropped
  assert k["n"] == 2 and math.isclose(k["mean"], 3.0)
  np.testing.assert_allclose(k["se"], np.std([2.0, 4.0], ddof=1) / np.sqrt(2))
  table = seeding.summary_markdown("dpo: 3 seeds", stats, 3)
  assert table.startswith("# dpo: 3 seeds") and "| gold_reward | 0.50 ± 0.17 | 0.5 | 0.2 | 0.8 |" \
      in table, table
