"""RAFT: selection rules, the per-round data iterator, and a tiny two-round run with resume."""

import json
import os

import numpy as np
import pytest

from offline_fixtures import TINY_RUN, load_config, override, tiny_rm_workdir, tiny_sft_workdir
from rlhf_jax import train
from rlhf_jax.algorithms import common
from rlhf_jax.algorithms.offline import raft


def test_per_prompt_selection_takes_the_best_eligible_sample():
  rewards = np.array([[0.1, 0.9, 0.5], [2.0, -1.0, 0.0], [0.3, 0.2, 0.1]])
  eligible = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 0]], bool)
  # prompt 0 -> sample 1; prompt 1 -> sample 2 (sample 0 is not eligible); prompt 2 has none
  np.testing.assert_array_equal(raft.select(rewards, eligible, "per_prompt", 1.0), [1, 5])


def test_global_selection_takes_the_top_fraction_of_eligible_samples():
  rewards = np.array([[0.1, 0.9, 0.5], [2.0, -1.0, 0.0]])
  eligible = np.array([[1, 1, 1], [0, 1, 1]], bool)
  # ceil(0.3 x 6) = 2 kept: 0.9 and 0.5 (2.0 is not eligible)
  np.testing.assert_array_equal(raft.select(rewards, eligible, "global", 0.3), [1, 2])
  np.testing.assert_array_equal(raft.select(rewards, eligible, "global", 1.0), [0, 1, 2, 4, 5])


def test_round_data_cycles_and_restarts_each_round():
  arrays = {"tokens": np.arange(3)[:, None] * np.ones((3, 4), np.int32)}
  it = raft._RoundData(arrays, batch_size=4, seed=0, round_index=2)
  first = next(it)["tokens"][:, 0]
  assert sorted(first[:3].tolist()) == [0, 1, 2] and len(first) == 4  # 3 kept rows, batch of 4
  it.set_state({"round": 1, "position": 25})  # the previous round's final position
  assert it.position == 0
  it.set_state({"round": 2, "position": 3})
  assert it.position == 3 and it.get_state() == {"round": 2, "position": 3}


def test_config_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match="RAFTConfig.selection"):
    raft.RAFTConfig(selection="best")
  with pytest.raises(ValueError, match="RAFTConfig.keep_fraction"):
    raft.RAFTConfig(keep_fraction=0.0)
  with pytest.raises(ValueError, match="RAFTDataConfig.train_jsonl"):
    raft.RAFTDataConfig(source="jsonl", train_jsonl=str(tmp_path / "missing.jsonl"))
  config = load_config("raft_synthetic")
  with pytest.raises(ValueError,
                     match="config.sources.reward_model_workdir is empty; RAFT needs it"):
    raft.train_and_evaluate(config, str(tmp_path))


def test_raft_does_not_import_another_method():
  import ast
  tree = ast.parse(open(raft.__file__).read())
  imported = {
      alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
      for alias in node.names} | {
          node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
  assert not imported & {
      "sft", "dpo", "listwise", "rlhf_jax.algorithms.sft", "rlhf_jax.algorithms.offline.dpo"}


@pytest.mark.slow
def test_two_rounds_end_to_end_and_rerun_skips_finished_rounds(tmp_path_factory, tmp_path):
  sft_dir = tiny_sft_workdir(tmp_path_factory)
  rm_dir = tiny_rm_workdir(tmp_path_factory, sft_dir)
  config = override(
      load_config("raft_synthetic"), {
          **TINY_RUN, "sources.sft_workdir": sft_dir, "sources.reward_model_workdir": rm_dir,
          "raft.num_rounds": 2, "raft.prompts_per_round": 8, "raft.samples_per_prompt": 2,
          "data.batch_size": 8, "raft.require_eos": False, "loop.checkpoint_every": 2})
  workdir = str(tmp_path)
  final = raft.train_and_evaluate(config, workdir)
  assert final["step"] == 4 and final["method"] == "raft" and final["round"] == 2.0
  assert final["round_kept"] == 8.0  # one per prompt
  assert final["round_kept_rm_reward"] >= final["round_rm_reward"]
  for key in ("gold_reward", "rm_reward", "kl_to_sft", "win_rate_vs_sft", "response_length"):
    assert np.isfinite(final[key]), key
  evals = train.read_metrics(workdir, "eval")
  assert [r["step"] for r in evals] == [2, 4] and [r["round"] for r in evals] == [1.0, 2.0]
  assert [r["step"] for r in train.read_metrics(workdir, "train")] == [2, 4]
  # the same command again: nothing left to train, the final checkpoint is evaluated
  again = raft.train_and_evaluate(config, workdir)
  assert again["step"] == 4 and again["gold_reward"] == pytest.approx(final["gold_reward"])
  assert json.load(open(os.path.join(workdir, common.FINAL_METRICS_FILE)))["step"] == 4
