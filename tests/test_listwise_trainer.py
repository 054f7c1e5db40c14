"""PRO / RRHF trainer: data lists and RM-generated lists from a tiny SFT run, tied lists."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from offline_fixtures import TINY_RUN, load_config, override, tiny_rm_workdir, tiny_sft_workdir
from rlhf_jax import train
from rlhf_jax.algorithms.offline import listwise

DATA = {"data.batch_size": 4, "data.buckets": (80,), "data.num_eval_lists": 4,
        "data.num_candidates": 4}


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
  return tiny_sft_workdir(tmp_path_factory)


@pytest.mark.slow
def test_pro_on_data_lists_end_to_end(sft_dir, tmp_path):
  config = override(load_config("pro_synthetic"), {**TINY_RUN, **DATA,
                                                   "sources.sft_workdir": sft_dir})
  final = listwise.train_and_evaluate(config, str(tmp_path))
  assert final["step"] == 4 and final["method"] == "pro" and final["candidates"] == "data"
  for key in ("gold_reward", "kl_to_sft", "win_rate_vs_sft", "response_length",
              "lists/top1_accuracy", "lists/num_rank_terms", "lists/sft_loss"):
    assert np.isfinite(final[key]), key
  assert final["lists/num_rank_terms"] == pytest.approx(3.0)  # 4 candidates: 3 softmax terms
  rows = train.read_metrics(str(tmp_path), "train")
  assert [r["step"] for r in rows] == [2, 4] and rows[0]["rank_loss"] > 0


@pytest.mark.slow
def test_rrhf_on_generated_lists_scored_by_the_reward_model(sft_dir, tmp_path_factory, tmp_path):
  rm_dir = tiny_rm_workdir(tmp_path_factory, sft_dir)
  config = override(load_config("rrhf_synthetic"), {
      **TINY_RUN, **DATA, "sources.sft_workdir": sft_dir, "sources.reward_model_workdir": rm_dir,
      "data.candidates": "generated", "data.num_generation_prompts": 8, "loop.num_steps": 2})
  final = listwise.train_and_evaluate(config, str(tmp_path))
  assert final["step"] == 2 and final["method"] == "rrhf" and "rm_reward" in final
  rows = [json.loads(l) for l in open(tmp_path / "data" / "generated_ranked.jsonl")]
  # empty samples are dropped from a list (a list needs 2 non-empty candidates)
  assert 1 <= len(rows) <= 8
  assert all(2 <= len(r["responses"]) == len(r["scores"]) <= 4 for r in rows)
  assert 0.0 <= final["lists/violation_rate"] <= 1.0


def test_tied_lists_are_skipped_and_counted(tmp_path):
  src, dst = str(tmp_path / "ranked.jsonl"), str(tmp_path / "kept.jsonl")
  rows = [{"prompt": "name 1 fruits", "responses": ["fig", "gun", "kiwi"], "scores": [1.0, 1.0, 1.0]},
          {"prompt": "name 1 fruits", "responses": ["fig", "gun"], "ranks": [1, 2]},
          {"prompt": "list 2 tools", "responses": ["saw", "rake", "gun"], "scores": [0.5, 0.5, 0.0]}]
  with open(src, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  assert listwise.filter_lists(src, dst) == (2, 1)
  # cut to 2 candidates, the third list becomes a tie as well
  assert listwise.filter_lists(src, dst, max_candidates=2) == (1, 2)
  with open(src, "w") as f:
    f.write(json.dumps(rows[0]) + "\n")
  with pytest.raises(ValueError, match="all-equal scores"):
    listwise.filter_lists(src, dst)


def test_list_loss_terms():
  sums = jnp.array([[-2.0, -6.0, -9.0], [-3.0, -3.0, 0.0]])
  lens = jnp.array([[2.0, 3.0, 3.0], [1.0, 3.0, 1.0]])
  rewards = jnp.array([[3.0, 2.0, 1.0], [0.0, 1.0, 0.0]])
  cand = jnp.array([[1, 1, 1], [1, 1, 0]])
  rrhf = listwise.ListwiseLossConfig(method="rrhf", sft_weight=1.0)
  per_B, metrics = listwise.list_loss(rrhf, sums, lens, rewards, cand)
  # list 0 is ordered (p = -1, -2, -3): no hinge; SFT = 1 nat/token on the best
  # list 1: best is candidate 1 (p = -1) vs candidate 0 (p = -3): ordered too; SFT = 3/3
  np.testing.assert_allclose(per_B, [1.0, 1.0], rtol=1e-6)
  pro = listwise.ListwiseLossConfig(method="pro", sft_weight=0.1)
  per_B, metrics = listwise.list_loss(pro, sums, lens, rewards, cand)
  # PRO SFT term: (m - 1)^2 x summed NLL of the best = 4 x 2 and 1 x 3
  np.testing.assert_allclose(metrics["sft_loss"], (8.0 + 3.0) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="ListwiseLossConfig.method"):
    listwise.ListwiseLossConfig(method="kto")
  with pytest.raises(ValueError, match="RankedDataConfig.candidates"):
    listwise.RankedDataConfig(candidates="sampled")
