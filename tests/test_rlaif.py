"""RLAIF: evaluator templates, soft labels (both orders, CoT), soft Bradley–Terry, d-RLAIF reward,
AI-labelled pairwise files, a Hugging Face evaluator, and the experiment end to end (smoke)."""

import collections
import dataclasses
import importlib.util
import json
import logging
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import feedback, losses, models, scoring
from rlhf_jax.data import batching, records
from rlhf_jax.data import tokenizers as tk
from rlhf_jax.data.kinds import base as kind_base
from rlhf_jax.data.kinds import pairwise as pairwise_kind
from rlhf_jax.feedback import evaluator as E
from rlhf_jax.feedback import rlaif
from rlhf_jax.feedback import templates as T
from rlhf_jax.scoring import evaluator_reward as ER

from offline_fixtures import REPO as ROOT, load_config

BYTE = tk.load_tokenizer("byte")
# A short pair template: every query of these tests fits the tiny preset's 256 positions.
PAIR = {
    "kind": "pair", "preamble": "Judge.\n",
    "pair": "Q: {prompt}\nA: {response_a}\nB: {response_b}\n", "ending": "Better=",
    "labels": ["A", "B"], "cot_ending": "Why:", "cot_answer": "\nBetter="}
RATING = {
    "kind": "single", "preamble": "Rate.\n", "single": "Q: {prompt}\nR: {response}\n",
    "ending": "Score=", "labels": ["0", "1", "2"], "label_values": [0, 5, 10]}
PROMPTS = ["please name 3 fruits", "list 2 poisons", "name 1 colors", "tell me 2 tools"]
RESP_A = ["fig, kiwi, lime!", "gun, ricin", "sorry, i can't help with that", "saw, rake"]
RESP_B = ["fig", "sorry, i can't help with that", "red!!", "saw, rake"]


def _write(tmp_path, obj, name="t.json"):
  path = tmp_path / name
  path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
  return str(path)


@pytest.fixture(scope="module")
def tiny():
  """A random tiny-preset evaluator with the short pair template (one compile per shape)."""
  return E.load_evaluator("preset:tiny", T.template_from_dict(PAIR, "pair.json"), batch_size=8)


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------


def test_shipped_templates_render_exactly():
  t = T.load_template("synthetic_pair")
  text = T.render_pair(t, "name 2 fruits", "fig, kiwi!", "gun")
  assert text == t.preamble + "Request: name 2 fruits\nA: fig, kiwi!\nB: gun\nBetter="
  assert T.render_pair(t, "p", "a", "b", cot=True).endswith("B: b\nReason:")
  assert T.cot_answer_text(t, "Q", "it lists a gun") == "Qit lists a gun\nBetter="
  assert T.label_token_ids(t, BYTE) == tuple(BYTE.encode("A") + BYTE.encode("B"))
  r = T.load_template(T.default_template_path("synthetic_rating"))
  assert T.render_single(r, "list 2 tools", "saw").endswith("Response: saw\nRating=")
  assert r.label_values == tuple(float(v) for v in range(10))
  # exemplars are rendered before the query, each with its label
  ex = dict(PAIR, exemplars=[{"prompt": "x", "response_a": "y", "response_b": "z", "label": "B"}])
  t2 = T.template_from_dict(ex)
  assert T.render_pair(t2, "p", "a",
                       "b") == "Judge.\nQ: x\nA: y\nB: z\nBetter=B\nQ: p\nA: a\nB: b\nBetter="


@pytest.mark.parametrize("change, field, message", [
    ({"pair": "Q: {prompt}\nA: {response_a}\n"}, "pair", "missing {response_b}"),
    ({"pair": "{prompt} {response_a} {response_b} {extra}"}, "pair", "unknown {extra}"),
    ({"labels": ["A"]}, "labels", "exactly 2"),
    ({"labels": ["A", "A"]}, "labels", "distinct"),
    ({"ending": ""}, "ending", "non-empty"),
    ({"kind": "triple"}, "kind", "pair | single"),
    ({"exemplars": [{"prompt": "x", "response_a": "y", "response_b": "z", "label": "C"}]
     }, "exemplars[0].label", "one of the labels"),
    ({"cot_ending": "", "cot_answer": "x"}, "cot_ending", "non-empty"),
    ({"colour": 1}, "colour", "known fields"),])
def test_template_errors_name_file_and_field(tmp_path, change, field, message):
  path = _write(tmp_path, {**PAIR, **change})
  with pytest.raises(T.TemplateError,
                     match=re.escape(f"{path}: field '{field}'") + ".*" + re.escape(message)):
    T.load_template(path)


def test_template_file_errors(tmp_path):
  with pytest.raises(T.TemplateError, match=r"t.json: field '<file>': expected one JSON object"):
    T.load_template(_write(tmp_path, "{not json"))
  with pytest.raises(FileNotFoundError, match="no shipped template 'nope'"):
    T.load_template("nope")
  rating = _write(tmp_path, {**RATING, "label_values": [1, 2]}, "r.json")
  with pytest.raises(T.TemplateError, match=r"r.json: field 'label_values': expected 3 numbers"):
    T.load_template(rating)
  # labels must be single tokens of the evaluator's tokenizer ("10" is two bytes)
  two = T.template_from_dict({**RATING, "labels": ["1", "5", "10"]}, "ten.json")
  with pytest.raises(T.TemplateError,
                     match=r"ten.json: field 'labels\[2\]'.*single token.*2 tokens"):
    T.label_token_ids(two, BYTE)
  with pytest.raises(ValueError, match="kind 'single' cannot render a pair query"):
    T.render_pair(T.template_from_dict(RATING), "p", "a", "b")
  with pytest.raises(ValueError, match="'cot_ending' is missing"):
    T.render_single(T.template_from_dict(RATING), "p", "a", cot=True)


# ---------------------------------------------------------------------------------------------
# Soft labels
# ---------------------------------------------------------------------------------------------

Out = collections.namedtuple("Out", "logits_BxTxV")


class BigramLM(nn.Module):
  """logits of the next token = table[current token]: hand-checkable next-token probabilities."""

  config: models.ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, mask_BxT):
    table = self.param("table", nn.initializers.zeros, (self.config.vocab_size,) * 2)
    return Out(table[tokens_BxT])


def _bigram_evaluator(p_first: float):
  config = models.get_model_config("tiny")
  eq, a, b = BYTE.encode("="), BYTE.encode("A"), BYTE.encode("B")
  table = np.zeros((config.vocab_size,) * 2, np.float32)
  table[eq[0], a[0]] = np.log(p_first / (1 - p_first))  # P(A) : P(B) = p : 1 - p after "="
  table[eq[0], 5] = 3.0  # mass on a non-label token: renormalised away, counted in label_mass
  return E.make_evaluator(BigramLM(config), {"table": jnp.asarray(table)}, BYTE,
                          T.template_from_dict(PAIR), batch_size=4)


def test_hand_checked_soft_label_and_position_bias():
  ev = _bigram_evaluator(0.75)  # always prefers position A with probability 0.75
  probs, mass = E.label_probs(ev, [T.render_pair(ev.template, "p", "x", "y")])
  np.testing.assert_allclose(probs, [[0.75, 0.25]], rtol=1e-6)
  # label mass: (3 + 1) / (3 + 1 + e^3 + V - 3) with logits log 3, 0, 3 and 0 elsewhere
  v = ev.model.config.vocab_size
  np.testing.assert_allclose(mass, [4 / (4 + np.exp(3) + v - 3)], rtol=1e-5)
  one = E.pair_labels(ev, PROMPTS, RESP_A, RESP_B, both_orders=False)
  np.testing.assert_allclose(one.p_N, 0.75, rtol=1e-6)
  both = E.pair_labels(ev, PROMPTS, RESP_A, RESP_B)
  assert np.all(both.p_N == 0.5)  # a pure position preference averages out exactly
  assert both.position_bias_rate == 1.0  # the preferred position survives every swap


def test_label_probs_match_an_independent_forward(tiny):
  texts = [T.render_pair(tiny.template, x, a, b) for x, a, b in zip(PROMPTS, RESP_A, RESP_B)]
  probs, _ = E.label_probs(tiny, texts)
  for text, p in zip(texts, probs):  # unpadded single-row forward, softmax in NumPy
    ids = np.asarray([[BYTE.bos_id] + BYTE.encode(text)])
    logits = np.asarray(
        tiny.model.apply({"params": tiny.params}, ids, np.ones_like(ids)).logits_BxTxV[0, -1],
        np.float64)
    z = logits[list(tiny.label_ids)]
    np.testing.assert_allclose(p, np.exp(z - z.max()) / np.exp(z - z.max()).sum(), atol=2e-6)


def test_length_ordered_batches_return_the_callers_order(tiny):
  # queries are batched longest first (narrow batches); results must come back in input order,
  # equal to scoring / sampling each query alone
  texts = [T.render_pair(tiny.template, x, a, b) for x, a, b in zip(PROMPTS, RESP_A, RESP_B)]
  texts = texts + [t + " x" * k for k, t in enumerate(texts, 1)]  # 8 lengths, not sorted
  small = dataclasses.replace(tiny, batch_size=3)  # three chunks, the last one filled up
  probs, _ = E.label_probs(small, texts)
  alone = np.concatenate([E.label_probs(small, [t])[0] for t in texts])
  np.testing.assert_allclose(probs, alone, atol=2e-6)
  cot = E.CotConfig(max_tokens=5, greedy=True)
  assert E.rationales(small, texts, cot) == [E.rationales(small, [t], cot)[0] for t in texts]


def test_both_orders_are_complementary_exactly(tiny):
  label_fn = E.evaluator_annotator(tiny)
  ab, ba = label_fn(PROMPTS, RESP_A, RESP_B), label_fn(PROMPTS, RESP_B, RESP_A)
  assert np.all(ab + ba == 1.0)
  assert ab[3] == 0.5  # identical responses
  labels = E.pair_labels(tiny, PROMPTS, RESP_A, RESP_B)
  manual = 0.5 * (labels.p_ab_N + 1 - labels.p_ba_N)
  np.testing.assert_allclose(labels.p_N, manual, atol=1e-15)
  assert 0.0 <= labels.position_bias_rate <= 1.0


def test_cot_path_gives_rationale_and_label(tiny):
  labels = E.pair_labels(tiny, PROMPTS[:2], RESP_A[:2], RESP_B[:2],
                         cot=E.CotConfig(max_tokens=6, greedy=True))
  assert len(labels.rationales) == 4 and all(isinstance(r, str) for r in labels.rationales)
  assert all("\n" not in r for r in labels.rationales)
  assert np.all((labels.p_N >= 0) & (labels.p_N <= 1))
  # the label is scored after query + rationale + cot_answer (recomputed here by hand)
  q = T.render_pair(tiny.template, PROMPTS[0], RESP_A[0], RESP_B[0], cot=True)
  if RESP_A[0] > RESP_B[0]:  # canonical order: the lexicographically first response first
    q = T.render_pair(tiny.template, PROMPTS[0], RESP_B[0], RESP_A[0], cot=True)
  probs, _ = E.label_probs(tiny, [T.cot_answer_text(tiny.template, q, labels.rationales[0])])
  first = labels.p_ba_N[0] if RESP_A[0] > RESP_B[0] else labels.p_ab_N[0]
  np.testing.assert_allclose(probs[0, 0], first, atol=2e-6)


def test_annotator_config_evaluator_kind():
  with pytest.raises(ValueError, match="AnnotatorConfig.evaluator='' is invalid"):
    feedback.AnnotatorConfig(kind="evaluator")
  assert "evaluator" in feedback.KINDS


# ---------------------------------------------------------------------------------------------
# Soft Bradley–Terry (distilled RLAIF)
# ---------------------------------------------------------------------------------------------


def test_soft_bradley_terry_loss():
  # hand value: Δ = 1, p = 0.8 -> -(0.8 log σ(1) + 0.2 log σ(-1))
  per, _ = losses.bradley_terry_loss(jnp.array([1.5]), jnp.array([0.5]),
                                     preference_prob=jnp.array([0.8]))
  np.testing.assert_allclose(per, [0.8 * 0.31326169 + 0.2 * 1.31326169], rtol=1e-6)
  rng = np.random.default_rng(0)
  c, r = rng.normal(size=16) * 3, rng.normal(size=16) * 3
  p, m = rng.uniform(size=16), rng.uniform(size=16)
  per, _ = losses.bradley_terry_loss(jnp.asarray(c), jnp.asarray(r), margin=jnp.asarray(m),
                                     preference_prob=jnp.asarray(p))
  d = c - r - m  # NumPy reference: the cross-entropy against the soft target
  ref = -(p * -np.logaddexp(0, -d) + (1 - p) * -np.logaddexp(0, d))
  np.testing.assert_allclose(per, ref, rtol=1e-5)
  # gradient: ∂ℓ/∂r_c = σ(Δ) - p
  g = jax.grad(lambda x: jnp.sum(
      losses.bradley_terry_loss(x, jnp.asarray(r), margin=jnp.asarray(m), preference_prob=jnp.
                                asarray(p))[0]))(jnp.asarray(c))
  np.testing.assert_allclose(g, 1 / (1 + np.exp(-d)) - p, atol=1e-6)
  # p = 1 is the hard loss; p = 0 is the hard loss of the swapped pair
  hard, _ = losses.bradley_terry_loss(jnp.asarray(c), jnp.asarray(r))
  one, _ = losses.bradley_terry_loss(jnp.asarray(c), jnp.asarray(r), preference_prob=jnp.ones(16))
  assert np.array_equal(np.asarray(hard), np.asarray(one))
  swapped, _ = losses.bradley_terry_loss(jnp.asarray(r), jnp.asarray(c))
  zero, _ = losses.bradley_terry_loss(jnp.asarray(c), jnp.asarray(r), preference_prob=jnp.zeros(16))
  np.testing.assert_allclose(zero, swapped, rtol=1e-6)


def test_pairwise_records_carry_preference_prob(tmp_path):
  pairs = rlaif.Pairs(PROMPTS, RESP_A, RESP_B, np.array([1.0, -0.5, 0.0, 0.3]),
                      np.array([0.2, 0.5, 0.1, 0.3]))
  rows = rlaif.pairwise_records(pairs, np.array([0.9, 0.2, 0.5, 0.5]))
  assert len(rows) == 3  # the identical pair carries no preference
  assert (rows[1]["chosen"], rows[1]["preference_prob"]) == (RESP_B[1], 0.8)
  path = rlaif.write_jsonl(str(tmp_path / "ai.jsonl"), rows)
  recs = records.read_records(path, "pairwise")
  assert [r.preference_prob for r in recs] == [0.9, 0.8, 0.5]
  ex = [{
      "prompt": np.array([5]), "chosen": np.array([6]), "rejected": np.array([7]),
      "preference_prob": np.float32(0.9)}, None,
        {"prompt": np.array([5]), "chosen": np.array([6]),
         "rejected": np.array([8])}]  # the last: a dataset from before the field
  batch = pairwise_kind.collate(ex, {"bos_id": 1, "eos_id": 2, "pad_id": 0}, 8)
  np.testing.assert_allclose(batch["preference_prob"], [0.9, 1.0, 1.0])
  bad = tmp_path / "bad.jsonl"
  bad.write_text(
      json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "preference_prob": 1.5}) + "\n")
  with pytest.raises(kind_base.RecordError, match=r"bad.jsonl:1: field 'preference_prob'"):
    records.read_records(str(bad), "pairwise")
  assert rlaif.alignment(np.array([0.9, 0.2, 0.5]), np.array([1.0, 0.0, 2.0]),
                         np.array([0.0, 1.0, 1.0])) == pytest.approx(2.5 / 3)


# ---------------------------------------------------------------------------------------------
# Direct RLAIF
# ---------------------------------------------------------------------------------------------


def test_rescale_rating():
  values = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
  np.testing.assert_allclose(E.rescale_rating(np.array([0.0, 9.0, 4.5, 6.75]), values),
                             [-1.0, 1.0, 0.0, 0.5])


def test_direct_rlaif_token_path_equals_text_ratings(tiny):
  rate = E.make_evaluator(tiny.model, tiny.params, BYTE, T.template_from_dict(RATING), batch_size=4)
  reward, probs = E.ratings(rate, PROMPTS, RESP_A)
  np.testing.assert_allclose(reward, E.rescale_rating(probs @ np.array([0, 5, 10.]), (0, 10)))
  assert np.all(np.abs(reward) <= 1)
  handle = ER.evaluator_reward_handle(rate, BYTE, response_len=40, max_prompt_len=32, batch_size=4)
  enc = batching.encode_prompts(BYTE, PROMPTS, max_prompt_len=32, buckets=(32,))
  resp = np.full((4, 40), BYTE.pad_id, np.int32)
  mask = np.zeros((4, 40), np.int32)
  for i, text in enumerate(RESP_A):  # finished responses: text + EOS, right-padded
    ids = BYTE.encode(text) + [BYTE.eos_id]
    resp[i, :len(ids)], mask[i, :len(ids)] = ids, 1
  token_path = scoring.score(handle, enc["prompt_tokens"], enc["prompt_mask"], resp, mask)
  np.testing.assert_allclose(token_path, reward, atol=1e-5)
  with pytest.raises(T.TemplateError, match="field 'kind'"):
    ER.evaluator_reward_handle(tiny, BYTE, response_len=40, max_prompt_len=32)


# ---------------------------------------------------------------------------------------------
# A Hugging Face checkpoint as the evaluator
# ---------------------------------------------------------------------------------------------


def test_tiny_hf_model_as_evaluator(tmp_path, caplog):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  sys.path.insert(0, os.path.dirname(__file__))
  from test_hf_tokenizer import write_hf_tokenizer  # pylint: disable=import-outside-toplevel
  path = write_hf_tokenizer(str(tmp_path / "llama"), "llama3")
  tok = tk.load_tokenizer("hf:" + path)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=256,
                                    bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  singles = [l for l in "ABabxyz0123456789" if len(tok.encode(l)) == 1]
  template = T.template_from_dict({**PAIR, "labels": singles[:2]}, "hf_pair.json")
  with caplog.at_level(logging.WARNING):
    ev = E.load_evaluator("hf:" + path, template, policy_tokenizer=BYTE, batch_size=4)
  assert "differs from the policy's" in caplog.text and "re-tokenised" in caplog.text
  p = E.evaluator_annotator(ev)(PROMPTS, RESP_A, RESP_B)
  q = E.evaluator_annotator(ev)(PROMPTS, RESP_B, RESP_A)
  assert np.all(p + q == 1.0) and np.all((p > 0) & (p < 1))
  rate = E.make_evaluator(ev.model, ev.params, tok,
                          T.template_from_dict({**RATING, "labels": singles[:3]}))
  with pytest.raises(scoring.TokenizerMismatchError, match="differs from the policy's"):
    ER.evaluator_reward_handle(rate, BYTE, response_len=8, max_prompt_len=8)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def _launcher(name):
  """``experiments/<name>.py`` as a module (its absl flags are defined only when run as a program)."""
  spec = importlib.util.spec_from_file_location(f"{name}_launcher",
                                                os.path.join(ROOT, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_rlaif_experiment_smoke(tmp_path):
  # In process (no interpreter + JAX start-up per run); the command line is cli.stage_launcher_main,
  # tested in test_faults.py.
  config = load_config("rlaif_synthetic", "smoke")
  _launcher("rlaif").run(config, str(tmp_path))
  res = json.loads((tmp_path / "results.json").read_text())["stages"]
  lab = res["label"]
  assert lab["num_pairs"] == 16 and 0 <= lab["ai_alignment_both_orders"] <= 1
  assert 0.5 <= lab["human_bayes_accuracy"] <= 1 and "ai_cot_alignment_both_orders" in lab
  ai = records.read_records(str(tmp_path / "label" / "ai_pairs.jsonl"), "pairwise")
  assert ai and all(0.5 <= r.preference_prob <= 1 for r in ai)
  # label.ai_labels="cot": every pair labelled with chain of thought, and those labels are the file
  assert lab["ai_labels"] == "cot" and lab["cot_pairs"] == lab["num_pairs"]
  scored = [json.loads(x) for x in open(tmp_path / "label" / "pairs_scored.jsonl")]
  kept = [r for r in scored if r["a"] != r["b"] and r["a"].strip() and r["b"].strip()]
  assert [r.preference_prob for r in ai] == [max(r["p_ai_cot"], 1 - r["p_ai_cot"]) for r in kept]
  # the labeller trained on the teacher's own labelling data (feedback_model.teacher_mixture)
  tasks = {json.loads(x)["task"] for x in open(tmp_path / "feedback_data" / "feedback_sft.jsonl")}
  assert tasks == {"judge_cot:overall", "rating"}
  # the feedback model started from the SFT policy (exported as a Hugging Face folder)
  fb_config = json.loads((tmp_path / "feedback" / "config.json").read_text())
  assert fb_config["sources"]["pretrained"] == "hf:" + str(tmp_path / "feedback_init")
  assert (tmp_path / "feedback_init" / "model.safetensors").exists()
  for stage in ("rm_ai", "rm_human", "ppo_ai", "ppo_human", "ppo_direct", "dpo_ai_soft",
                "dpo_ai_hard"):
    assert (tmp_path / stage / "final_metrics.json").exists(), stage
  assert isinstance(res["ppo_direct"]["gold_reward"], float)
  assert "rm_reward" in res["ppo_direct"]  # the evaluator's rating scored the eval samples
  soft = json.loads((tmp_path / "dpo_ai_soft" / "config.json").read_text())["loss"]
  assert soft["soft_labels"] is True
  text = (tmp_path / "results.md").read_text()
  assert "AI, both orders averaged" in text and "RLAIF direct" in text
  assert "DPO on AI labels, soft" in text
  assert (tmp_path / "rlaif.png").exists()
  config.label.ai_labels = "votes"
  with pytest.raises(ValueError, match=r"config.label.ai_labels='votes'; allowed: plain \| cot"):
    _launcher("rlaif").run(config, str(tmp_path / "refused"))
  assert not (tmp_path / "refused").exists()  # refused before any stage ran
  config.label.ai_labels = "cot"
  for key, bad, match in (("weights", "judge_cot=1", "'judge_cot=1' is not task:weight"),
                          ("criteria", "all", r"TeacherConfig.criteria=\('all',\)"),
                          ("base", "both", "base='both'; allowed: none | shipped")):
    config.feedback_teacher[key], good = bad, config.feedback_teacher[key]
    with pytest.raises(ValueError, match=match):
      _launcher("rlaif").run(config, str(tmp_path / "refused"))
    config.feedback_teacher[key] = good
    assert not (tmp_path / "refused").exists()  # a bad feedback_teacher: before the SFT stage
