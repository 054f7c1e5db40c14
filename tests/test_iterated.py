"""Iterated RLHF pieces: on-policy comparisons labelled by the simulated annotator, the RM's gold
accuracy on them, and the per-round report (table + plot). The full rounds (RM training + PPO) are
exercised by ``experiments/iterated_rlhf.py``; each stage is tested in its own module."""

import os

import jax
import numpy as np

from rlhf_jax.algorithms.online import iterated
from rlhf_jax.algorithms.online import config as ppo_config
from rlhf_jax.data import synthetic

from test_ppo import tiny_models  # noqa: E402  (tests/ is on sys.path under pytest)

PROMPTS = ["name 2 fruits", "list 4 tools", "tell me 1 animals", "please list 3 poisons"]


def test_comparisons_are_on_policy_labelled_pairs_and_rm_accuracy_counts_gold_order():
  m = tiny_models(ppo_config.PPOConfig(rollout_batch_size=4, max_new_tokens=8, num_minibatches=2))
  rows = iterated.sample_comparisons(m.policy, m.policy_params, m.tokenizer, PROMPTS,
                                     np.random.default_rng(0), jax.random.PRNGKey(0),
                                     max_prompt_len=32, max_new_tokens=8, bt_temperature=0.25)
  assert 1 <= len(rows) <= len(PROMPTS)
  for row in rows:
    assert row["prompt"] in PROMPTS and row["chosen"] != row["rejected"]
    assert row["gold_chosen"] == round(synthetic.gold_reward(row["prompt"], row["chosen"]), 4)
    assert row["gold_rejected"] == round(synthetic.gold_reward(row["prompt"], row["rejected"]), 4)
  # accuracy against the gold order: a pair and its swap average to exactly 1/2 (ties dropped)
  pairs = [{"prompt": "name 2 fruits", "chosen": "apple, fig!!", "rejected": "gun",
            "gold_chosen": 1.3, "gold_rejected": -1.0}]
  swapped = [dict(pairs[0], chosen="gun", rejected="apple, fig!!", gold_chosen=-1.0,
                  gold_rejected=1.3)]
  a = iterated.rm_gold_accuracy(m.reward, m.tokenizer, pairs)
  b = iterated.rm_gold_accuracy(m.reward, m.tokenizer, swapped)
  assert a in (0.0, 1.0) and a == b  # the same two scores, ordered the same way against gold
  tie = [dict(pairs[0], gold_rejected=1.3)]
  assert np.isnan(iterated.rm_gold_accuracy(m.reward, m.tokenizer, tie))


def test_report_writes_table_and_plot(tmp_path):
  table = [{"round": r, "num_comparisons": 100 * (r + 1), "gold_reward": 0.2 + 0.1 * r,
            "sft_gold_reward": 0.1, "kl_to_sft": 1.0 + r, "rm_accuracy_on_own_policy": 0.7,
            "rm_accuracy_on_new_policy": 0.6} for r in range(2)]
  iterated.write_report(table, str(tmp_path))
  lines = (tmp_path / "rounds.md").read_text().splitlines()
  assert lines[0].startswith("| round | num_comparisons | gold_reward") and len(lines) == 4
  assert "| 1 | 200 | 0.300 | 2.000 | 0.700 | 0.600 |" in lines
  assert os.path.getsize(tmp_path / "iterated_rlhf.png") > 1000
