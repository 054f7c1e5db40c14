"""PRO / RRHF trainer: data lists and RM-generated lists from a tiny SFT run, the generated-lists
cache key, the loss terms."""

import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

from offline_fixtures import TINY_RUN, load_config, override, tiny_rm_workdir, tiny_sft_workdir
from rlhf_jax import train
from rlhf_jax.algorithms import sections
from rlhf_jax.algorithms.offline import listwise

DATA = {
    "data.batch_size": 4, "limits.buckets": (80,), "data.num_eval_lists": 4,
    "data.num_candidates": 4}


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
  return tiny_sft_workdir(tmp_path_factory)


@pytest.mark.slow
def test_pro_on_data_lists_end_to_end(sft_dir, tmp_path):
  config = override(load_config("pro_synthetic"),
                    {**TINY_RUN, **DATA, "sources.sft_workdir": sft_dir})
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
  config = override(
      load_config("rrhf_synthetic"), {
          **TINY_RUN, **DATA, "sources.sft_workdir": sft_dir,
          "sources.reward_model_workdir": rm_dir, "data.candidates": "generated",
          "data.num_generation_prompts": 48, "loop.num_steps": 2})
  final = listwise.train_and_evaluate(config, str(tmp_path))
  assert final["step"] == 2 and final["method"] == "rrhf" and "rm_reward" in final
  key = json.load(open(tmp_path / "data" / "generated_ranked.key.json"))
  assert key["num_candidates"] == 4 and key["temperature"] == 1.0 and key["policy_step"] == 6
  rows = [json.loads(l) for l in open(tmp_path / "data" / "generated_ranked.jsonl")]
  # empty and unfinished (no EOS) samples are dropped from a list (a list needs 2 candidates)
  assert 4 <= len(rows) <= 48
  assert all(2 <= len(r["responses"]) == len(r["scores"]) <= 4 for r in rows)
  assert 0.0 <= final["lists/violation_rate"] <= 1.0


def test_generated_lists_are_reused_only_when_everything_that_made_them_matches(tmp_path):
  """Bug: generated PRO lists were reused whatever K, temperature or policy asked for them."""
  path = str(tmp_path / "generated_ranked.jsonl")
  calls = []

  def generate():
    calls.append(1)
    with open(path, "w") as f:
      f.write(json.dumps({"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}) + "\n")

  key = {"num_candidates": 4, "temperature": 1.0, "policy_run": "/runs/sft", "policy_step": 6}
  assert not listwise.cached_generated_lists(path, key, generate) and len(calls) == 1
  assert listwise.cached_generated_lists(path, dict(key), generate) and len(calls) == 1
  for change in ({"num_candidates": 8}, {"temperature": 0.7}, {"policy_step": 9},
                 {"policy_run": "/runs/other"}):
    assert not listwise.cached_generated_lists(path, {**key, **change}, generate), change
  assert len(calls) == 5
  # lists without their key file (e.g. written by an older version) are never trusted
  os.remove(str(tmp_path / "generated_ranked.key.json"))
  assert not listwise.cached_generated_lists(path, key, generate) and len(calls) == 6


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
  with pytest.raises(ValueError, match="RankedData.candidates"):
    listwise.RankedData(candidates="sampled")
  with pytest.raises(ValueError, match="RankedData.num_candidates"):
    listwise.RankedData(candidates="generated", num_candidates=0)


def test_generated_lists_keep_only_finished_candidates(tmp_path, monkeypatch):
  # A sample cut at the token budget is scored as given but would be stored (and trained) as
  # [BOS] p r [EOS], a finished response the policy never wrote: it must not enter a list.
  texts = ["plum", "fig, kiwi", "cut off mid", "kiwi!", "", "pear"]
  finished = np.array([True, True, False, True, True, False])
  fake = types.SimpleNamespace(texts=texts, rewards_N=np.arange(6, dtype=np.float32),
                               finished_N=finished)
  monkeypatch.setattr(listwise.scoring, "sample_candidates", lambda *a, **k: fake)
  loaded = types.SimpleNamespace(model=None, ref_params=None, tokenizer=None, reward=None)
  cfg = listwise.RankedData(num_candidates=3)
  path = str(tmp_path / "lists.jsonl")
  listwise.generate_lists(loaded, ["name 2 fruits", "name 1 fruits"], cfg, sections.Limits(),
                          path, seed=0)
  rows = [json.loads(l) for l in open(path)]
  # prompt 0 keeps its two finished samples; prompt 1 has one finished non-empty one: dropped
  assert rows == [{"prompt": "name 2 fruits", "responses": ["plum", "fig, kiwi"],
                   "scores": [0.0, 1.0]}]
