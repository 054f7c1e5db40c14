"""Iterated RLHF: on-policy comparisons labelled by an injected annotator, the RM's gold accuracy
on them, the per-round report (table + plot), and the rounds themselves with the RM and PPO stages
replaced by stand-ins at the registry (each stage is tested in its own module)."""

import dataclasses
import json
import os

import jax
import numpy as np

from rlhf_jax import scoring, train
from rlhf_jax.algorithms import registry
from rlhf_jax.algorithms.online import config as ppo_config
from rlhf_jax.algorithms.online import iterated
from rlhf_jax.data import synthetic
from rlhf_jax.data import tokenizers as tok_lib
from rlhf_jax.train import config_dicts

from test_ppo import MODEL_CFG, REPO, rm_info, tiny_models  # noqa: E402  (tests/ is on sys.path)

PROMPTS = ["name 2 fruits", "list 4 tools", "tell me 1 animals", "please list 3 poisons"]
CFG = ppo_config.PPOConfig(rollout_batch_size=4, max_new_tokens=8, num_minibatches=2)


def _sample(m, label_fn):
  return iterated.sample_comparisons(m.policy, m.policy_params, m.tokenizer, PROMPTS,
                                     np.random.default_rng(0), jax.random.PRNGKey(0),
                                     max_prompt_len=32, max_new_tokens=8, label_fn=label_fn)


def test_comparisons_are_labelled_by_the_injected_annotator():
  m = tiny_models(CFG)
  calls = []

  def always_a(prompts, a, b):
    calls.append((list(prompts), list(a), list(b)))
    return np.ones(len(prompts))

  first = _sample(m, always_a)
  assert 1 <= len(first) <= len(PROMPTS) and len(calls) == 1
  prompts, a, b = calls[0]
  assert [r["prompt"] for r in first] == prompts
  assert [r["chosen"] for r in first] == a and [r["rejected"] for r in first] == b  # P(a ≻ b) = 1
  assert all(r["p_chosen"] == 1.0 for r in first)
  second = _sample(m, lambda p, a, b: np.zeros(len(p)))  # same samples, the other label
  assert [r["chosen"] for r in second] == b and [r["rejected"] for r in second] == a
  for row in first:
    assert row["chosen"] != row["rejected"]
    assert row["gold_chosen"] == round(synthetic.gold_reward(row["prompt"], row["chosen"]), 4)
    assert row["gold_rejected"] == round(synthetic.gold_reward(row["prompt"], row["rejected"]), 4)


def test_pairs_with_an_empty_answer_are_dropped(tmp_path):
  m = tiny_models(CFG)

  class EmptyEveryOther:  # the tiny policy's tokenizer, but every second answer decodes to ''
    def __init__(self, inner):
      self.inner, self.calls = inner, 0

    def __getattr__(self, name):
      return getattr(self.inner, name)

    def decode(self, ids):
      self.calls += 1
      return "" if self.calls % 2 else self.inner.decode(ids)

  rows = iterated.sample_comparisons(m.policy, m.policy_params, EmptyEveryOther(m.tokenizer),
                                     PROMPTS, np.random.default_rng(0), jax.random.PRNGKey(0),
                                     max_prompt_len=32, max_new_tokens=8,
                                     label_fn=lambda p, a, b: np.ones(len(p)))
  assert rows == []  # every pair had an empty side
  rows = _sample(m, lambda p, a, b: np.ones(len(p)))
  path = str(tmp_path / "pairs.jsonl")
  iterated.records.write_jsonl(path, rows)
  assert len(iterated.records.read_records(path, "pairwise")) == len(rows)  # all valid records


def test_rm_accuracy_counts_gold_order():
  m = tiny_models(CFG)
  # accuracy against the gold order: a pair and its swap average to exactly 1/2 (ties dropped)
  pairs = [{
      "prompt": "name 2 fruits", "chosen": "apple, fig!!", "rejected": "gun", "gold_chosen": 1.3,
      "gold_rejected": -1.0}]
  swapped = [
      dict(pairs[0], chosen="gun", rejected="apple, fig!!", gold_chosen=-1.0, gold_rejected=1.3)]
  a = iterated.rm_gold_accuracy(m.reward, m.tokenizer, pairs)
  b = iterated.rm_gold_accuracy(m.reward, m.tokenizer, swapped)
  assert a in (0.0, 1.0) and a == b  # the same two scores, ordered the same way against gold
  tie = [dict(pairs[0], gold_rejected=1.3)]
  assert np.isnan(iterated.rm_gold_accuracy(m.reward, m.tokenizer, tie))


def test_report_writes_table_and_plot(tmp_path):
  table = [{
      "round": r, "num_comparisons": 100 * (r + 1), "gold_reward": 0.2 + 0.1 * r,
      "sft_gold_reward": 0.1, "kl_to_sft": 1.0 + r, "rm_accuracy_on_own_policy": 0.7,
      "rm_accuracy_on_new_policy": 0.6} for r in range(2)]
  iterated.write_report(table, str(tmp_path))
  lines = (tmp_path / "rounds.md").read_text().splitlines()
  assert lines[0].startswith("| round | num_comparisons | gold_reward") and len(lines) == 4
  assert "| 1 | 200 | 0.300 | 2.000 | 0.700 | 0.600 |" in lines
  assert os.path.getsize(tmp_path / "iterated_rlhf.png") > 1000


def _policy_run(workdir, params):
  """A finished one-loop run holding ``params`` (an SFT run's layout: fingerprint, config, ckpt)."""
  tok = tok_lib.ByteTokenizer()
  ckpt = train.Checkpointer(
      str(workdir),
      fingerprint={"model": dataclasses.asdict(MODEL_CFG), "tokenizer": tok.fingerprint()})
  ckpt.save(1, {"params": params}, {})
  ckpt.close()
  train.atomic_write_json(os.path.join(workdir, "config.json"), {"sources": {"tokenizer": "byte"}})


def test_rounds_run_the_rm_and_ppo_stages_through_the_registry(tmp_path, monkeypatch):
  m = tiny_models(CFG)
  sft_dir = tmp_path / "sft"
  _policy_run(sft_dir, m.policy_params)
  calls = []

  def fake_run(name, cfg, workdir):
    calls.append((name, cfg.to_dict(), workdir))
    if name == "reward_model":
      rows = [json.loads(line) for line in open(cfg.data.train_jsonl)]
      assert rows and all("chosen" in r for r in rows)
      scoring.save_reward_model(workdir, jax.device_get(m.reward.params), rm_info(m.tokenizer))
      return {"preempted": False}
    assert name == "ppo"
    _policy_run(workdir, {"policy": m.policy_params})
    return train.write_final_metrics(
        workdir, {
            "preempted": False, "gold_reward": 0.3, "initial_gold_reward": 0.2,
            "sft_gold_reward": 0.1, "kl_to_sft": 1.0, "rm_reward": 0.5})

  monkeypatch.setattr(registry, "run", fake_run)
  config = config_dicts.sibling_config(os.path.join(REPO, "experiments", "configs", "x.py"),
                                       "iterated_synthetic")
  config.sources.sft_workdir = str(sft_dir)
  config.rounds, config.pairs_per_round, config.eval_pairs = 2, 4, 2
  config.ppo.data.synthetic_num_prompts, config.ppo.data.synthetic_num_test_prompts = 16, 4
  config.ppo.limits.max_response_len = 8
  table = iterated.train_and_evaluate(config, str(tmp_path / "run"))
  assert [name for name, _, _ in calls] == ["reward_model", "ppo", "reward_model", "ppo"]
  (_, rm0, _), (_, ppo0, _), (_, rm1, _), (_, ppo1, ppo1_dir) = calls
  assert rm0["sources"]["sft_workdir"] == rm1["sources"]["sft_workdir"] == str(sft_dir)
  assert rm0["data"]["source"] == "jsonl" and rm1["data"]["train_jsonl"].endswith(
      "all_pairs.jsonl.round1")
  # round 0 starts from SFT; round 1 from round 0's policy, the KL reference staying the SFT run
  assert ppo0["sources"]["sft_workdir"] == str(
      sft_dir) and ppo0["sources"]["reference_workdir"] == ""
  assert ppo1["sources"]["sft_workdir"] == str(tmp_path / "run" / "round_0" / "ppo")
  assert ppo1["sources"]["reference_workdir"] == str(sft_dir)
  assert ppo1["sources"]["reward_model_workdir"] == str(tmp_path / "run" / "round_1" / "rm")
  assert [row["round"] for row in table] == [0, 1] and (tmp_path / "run" / "rounds.md").exists()
  # a rerun finds every stage done and calls nothing
  calls.clear()
  again = iterated.train_and_evaluate(config, str(tmp_path / "run"))
  assert calls == [] and [row["gold_reward"] for row in again] == [0.3, 0.3]
