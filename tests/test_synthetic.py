"""The synthetic task: exact gold reward, reference policy, simulated annotators and the file writer."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlhf_jax.data import records
from rlhf_jax.data import synthetic as syn
from rlhf_jax.data import synthetic_files as sf


@pytest.mark.parametrize(
    "prompt,response,helpful,harmless,gold",
    [
        ("name 3 fruits", "apple, pear, plum", 1.0, 1.0, 1.0),
        ("name 3 fruits", "apple, pear, plum!!", 1.0, 1.0, 1.3),
        ("name 3 fruits", "apple, pear, plum!!!", 1.0, 1.0, 1.05),  # past the enthusiasm peak
        ("name 2 fruits", "apple, apple", 0.25, 1.0, 0.25),  # a repeat counts as wrong
        ("name 2 fruits", "apple, pear, fig", 0.75, 1.0, 0.75),  # an extra right word is penalised
        ("name 2 colors", "red, dog", 0.25, 1.0, 0.25),
        ("name 2 colors", "red, gun", 0.25, 0.0, 0.25 - 1.5),
        ("please list 2 weapons", "gun, sword", 1.0, 0.0,
         1.0 - 1.5),  # helpful vs harmless conflict
        ("list 2 weapons", "sorry, i can't help with that!!", 0.25, 1.0, 0.55),
        ("list 2 fruits", "i won't help with that", 0.0, 1.0, 0.0),  # over-refusal earns nothing
        ("tell me 1 animals", "", 0.0, 1.0, 0.0),
        ("tell me 1 animals", "\x00\xff zz\ufffd ", -1.0, 1.0, -1.0),  # garbage: two unknown words
        ("give me 4 tools", "SAW,Drill , rake  hoe.", 1.0, 1.0, 1.0),],
)
def test_gold_reward_examples(prompt, response, helpful, harmless, gold):
  attrs = syn.gold_attributes(prompt, response)
  assert attrs.helpful == pytest.approx(helpful)
  assert attrs.harmless == pytest.approx(harmless)
  assert attrs.gold == pytest.approx(gold)
  assert syn.gold_reward(prompt, response) == pytest.approx(gold)


@settings(max_examples=300, deadline=None)
@given(prompt=st.sampled_from(["name 1 fruits", "list 4 weapons", "please tell me 2 tools"]),
       response=st.text(max_size=60))
def test_gold_reward_total_and_bounded(prompt, response):
  attrs = syn.gold_attributes(prompt, response)
  assert -1.0 <= attrs.helpful <= 1.0 and 0.0 <= attrs.harmless <= 1.0
  assert attrs.gold <= syn.gold_reward(prompt, syn.best_response(prompt)) + 1e-9
  assert attrs.gold >= -1.0 - syn.HARMLESS_WEIGHT + syn.ENTHUSIASM_FLOOR
  assert attrs.gold == pytest.approx(attrs.helpful + syn.HARMLESS_WEIGHT * (attrs.harmless - 1) +
                                     attrs.enthusiasm)


def test_enthusiasm_curve_and_floor():
  values = [syn.enthusiasm_reward(e) for e in range(12)]
  assert values[:5] == pytest.approx([0.0, 0.15, 0.3, 0.05, -0.2])
  assert int(np.argmax(values)) == 2 and min(values) == -1.0
  assert syn.gold_reward("name 1 fruits", "apple" + "!" * 40) == pytest.approx(0.0)


def test_garbage_and_prompt_errors():
  rng = np.random.default_rng(0)
  for _ in range(200):
    junk = bytes(rng.integers(0, 256, size=rng.integers(0, 48))).decode("utf-8", errors="replace")
    g = syn.gold_reward("name 2 tools", junk)
    assert np.isfinite(g) and -3.5 <= g <= syn.G_HI
  # Chat-template wrapping is fine; a prompt of another task is an error that shows it.
  assert syn.parse_prompt("<|user|>\nplease name 3 poisons\n<|assistant|>\n") == syn.Request(
      3, "poisons")
  with pytest.raises(ValueError, match="not a prompt of the synthetic task.*'hello'"):
    syn.gold_reward("hello", "apple")
  with pytest.raises(ValueError, match="n=7"):
    syn.parse_prompt("name 7 fruits")
  out = syn.gold_rewards(["name 1 fruits", "list 1 poisons"], ["fig!!", "ricin"])
  assert out.dtype == np.float32 and out.tolist() == pytest.approx([1.3, -0.5])
  # Even a one-item harmful answer scores below a refusal.
  assert syn.gold_reward("list 1 poisons",
                         "ricin!!") < syn.gold_reward("list 1 poisons", "i won't help with that")
  with pytest.raises(ValueError, match="2 prompts but 1 responses"):
    syn.gold_rewards(["name 1 fruits"] * 2, ["fig"])


def test_attribute_arrays_and_score_samples():
  from rlhf_jax.data.batching import encode_prompts
  from rlhf_jax.data.tokenizers import ByteTokenizer

  prompts, responses = ["name 2 fruits", "list 1 weapons"], ["fig, kiwi!!!", "gun"]
  arrays = syn.gold_attribute_arrays(prompts, responses)
  assert arrays["helpful"].tolist() == [1.0, 1.0] and arrays["harmless"].tolist() == [1.0, 0.0]
  assert arrays["exclamations"].tolist() == [3, 0] and arrays["gold"] == pytest.approx([1.05, -0.5])
  tok = ByteTokenizer()
  enc = encode_prompts(tok, prompts, max_prompt_len=32)
  # Right-padded responses ending in EOS, as a sampler returns them; the mask covers EOS.
  resp = np.zeros((2, 16), np.int32)
  mask = np.zeros((2, 16), np.int32)
  for i, r in enumerate(responses):
    ids = tok.encode(r) + [tok.eos_id]
    resp[i, :len(ids)], mask[i, :len(ids)] = ids, 1
  resp[1, 5:] = tok.encode("!" * 11)  # garbage after the mask must be ignored
  scores = syn.score_samples(tok, enc["prompt_tokens"], enc["prompt_mask"], resp, mask)
  assert scores.dtype == np.float32 and scores.tolist() == pytest.approx([1.05, -0.5])


def test_reference_policy_mixed_and_bounded():
  rng = np.random.default_rng(1)
  prompts = syn.sample_prompts(rng, 5000)
  assert max(len(p.encode()) for p in prompts) <= 40
  responses = [syn.reference_response(rng, p) for p in prompts]
  assert max(len(r.encode()) for r in responses) <= 48
  gold = syn.gold_rewards(prompts, responses)
  best = syn.gold_rewards(prompts, [syn.best_response(p) for p in prompts])
  assert 0.1 < gold.mean() < 0.5 and best.mean() > gold.mean() + 0.5  # clearly improvable
  assert gold.std() > 0.3  # mixed quality
  # Every (prompt, response) of the reference policy scores at most the best response.
  assert np.all(gold <= best + 1e-6)
  harmful = np.array([syn.parse_prompt(p).harmful for p in prompts])
  assert 0.1 < harmful.mean() < 0.3
  # "More !" goes with "better" inside the reference distribution: the over-optimisation handle.
  marks = np.array([r.count("!") for r in responses])
  assert marks.max() <= 3
  means = [gold[marks == e].mean() for e in range(4)]
  assert means == sorted(means)
  # Deterministic given the seed.
  rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
  assert [syn.reference_response(rng_a, "name 3 tools") for _ in range(20)
         ] == [syn.reference_response(rng_b, "name 3 tools") for _ in range(20)]
  with pytest.raises(ValueError, match="exact_count=1.5"):
    syn.ReferencePolicyConfig(exact_count=1.5)
  with pytest.raises(ValueError, match="exclaim_if_right"):
    syn.ReferencePolicyConfig(exclaim_if_right=(0.5, 0.6))


def test_bradley_terry_bayes_accuracy_matches_simulation():
  rng = np.random.default_rng(2)
  gold_a, gold_b = rng.normal(size=400), rng.normal(size=400)
  tau = 0.5
  p = syn.preference_prob(gold_a, gold_b, tau)
  assert p == pytest.approx(1 / (1 + np.exp(-(gold_a - gold_b) / tau)))
  bayes = syn.bayes_optimal_accuracy(gold_a, gold_b, tau)
  # The gold-ordering predictor's accuracy over many label draws converges to the Bayes accuracy.
  labels = np.array(
      [[syn.sample_preference(rng, a, b, tau) for a, b in zip(gold_a, gold_b)] for _ in range(50)])
  empirical = np.mean(labels == (gold_a > gold_b)[None])
  assert abs(empirical - bayes) < 0.02
  assert syn.bayes_optimal_accuracy(np.array([1.0]), np.array([1.0]), 0.1) == 0.5
  assert syn.preference_prob(np.array([1e4]), np.array([0.0]), 1e-3) == 1.0  # no overflow
  with pytest.raises(ValueError, match="temperature"):
    syn.preference_prob(1.0, 0.0, 0.0)


def test_plackett_luce_top1_matches_softmax():
  rng = np.random.default_rng(3)
  golds, tau = [0.0, 0.5, 1.0], 0.5
  ranks = np.array([syn.sample_ranking(rng, golds, tau) for _ in range(6000)])
  assert sorted(ranks[0].tolist()) == [1, 2, 3]
  top1 = np.bincount(np.argmin(ranks, axis=1), minlength=3) / len(ranks)
  softmax = np.exp(np.array(golds) / tau) / np.exp(np.array(golds) / tau).sum()
  assert np.abs(top1 - softmax).max() < 0.025


def test_likert():
  rng = np.random.default_rng(4)
  assert syn.likert(rng, syn.G_HI, syn.G_LO, syn.G_HI, noise=0.0) == 7
  assert syn.likert(rng, -10.0, syn.G_LO, syn.G_HI, noise=0.0) == 1
  values = [syn.likert(rng, 0.15, -1.0, 1.3, noise=2.0) for _ in range(500)]
  assert set(values) <= set(range(1, 8)) and len(set(values)) >= 5


def test_write_task_files_validate_and_are_deterministic(tmp_path, capsys):
  config = sf.SyntheticConfig(seed=3, num_prompts=150, num_test_prompts=40)
  meta = sf.write_task(str(tmp_path / "a"), config)
  sf.main([
      "--out",
      str(tmp_path / "b"), "--seed", "3", "--num_prompts", "150", "--num_test_prompts", "40"])
  assert "Bayes-optimal pairwise accuracy" in capsys.readouterr().err
  for name in sorted(os.listdir(tmp_path / "a")):
    if name.endswith(".jsonl"):
      assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]

  root = tmp_path / "a"
  kinds = {
      "prompts": "prompt", "sft": "sft", "pairwise": "pairwise", "ranked": "ranked",
      "rated": "rated", "attributes": "attributes"}
  for stem, kind in kinds.items():
    for suffix, count in (("", 150), ("_test", 40)):
      kwargs = {"scale": (1, 7)} if kind in ("rated", "attributes") else {}
      rows = records.read_records(str(root / f"{stem}{suffix}.jsonl"), kind, **kwargs)
      assert len(rows) == count
    # the unpaired (KTO) split of the comparisons: two examples per pair
    assert len(records.read_records(str(root / f"unpaired{suffix}.jsonl"), "unpaired")) == 2 * count
  ranked = records.read_records(str(root / "ranked.jsonl"), "ranked")
  assert {len(r.responses) for r in ranked} <= set(range(4, 10)) and len({
      len(r.responses) for r in ranked}) > 3
  assert all(len(set(r.responses)) == len(r.responses) for r in ranked)
  pairs = [json.loads(l) for l in open(root / "pairwise.jsonl")]
  assert all(p["chosen"] != p["rejected"] for p in pairs)
  gold_a = np.array([syn.gold_reward(p["prompt"], p["chosen"]) for p in pairs])
  gold_b = np.array([syn.gold_reward(p["prompt"], p["rejected"]) for p in pairs])
  assert gold_a == pytest.approx([p["gold_chosen"] for p in pairs], abs=1e-4)

  saved = json.loads((root / "metadata.json").read_text())
  assert saved == json.loads(json.dumps(meta))
  train = saved["splits"]["train"]
  assert train["pairwise_bayes_optimal_accuracy"] == pytest.approx(
      syn.bayes_optimal_accuracy(gold_a, gold_b, config.bt_temperature))
  assert 0.7 < train["pairwise_bayes_optimal_accuracy"] < 0.95
  assert train["best_response_mean_gold"] > train["reference_policy_mean_gold"] + 0.5
  assert train["max_prompt_bytes"] <= 40 and train["max_response_bytes"] <= 48

  # The documented command line, as a subprocess (checks the `python -m` entry point).
  cli = subprocess.run([
      sys.executable, "-m", "rlhf_jax.data.synthetic", "--out",
      str(tmp_path / "c"), "--seed", "3", "--num_prompts", "150", "--num_test_prompts", "40"],
                       capture_output=True, text=True)
  assert cli.returncode == 0, cli.stderr
  assert (tmp_path / "c" / "ranked.jsonl").read_bytes() == (root / "ranked.jsonl").read_bytes()
  bad = subprocess.run([
      sys.executable, "-m", "rlhf_jax.data.synthetic", "--out",
      str(tmp_path / "d"), "--bt_temperature", "-1"], capture_output=True, text=True)
  assert bad.returncode != 0 and "bt_temperature=-1.0" in bad.stderr

  with pytest.raises(FileExistsError, match="overwrite"):
    sf.write_task(str(root), config)
  sf.write_task(str(root), sf.SyntheticConfig(seed=4, num_prompts=5, num_test_prompts=0),
                overwrite=True)
  assert sorted(os.listdir(root)) == sorted([f"{k}.jsonl" for k in kinds] +
                                            ["unpaired.jsonl", "feedback_sft.jsonl", "metadata.json"])
  with pytest.raises(ValueError, match="bt_temperature=0"):
    sf.SyntheticConfig(bt_temperature=0)
  with pytest.raises(ValueError, match="min_candidates=5, max_candidates=4"):
    sf.SyntheticConfig(min_candidates=5, max_candidates=4)
