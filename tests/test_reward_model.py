"""Reward models: objectives, scoring API (save/load, normalisation, chunking, sharding, tokenizer
guard), config validation and bad input. Tiny preset, one 32-token width wherever possible."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses, models, parallel, train
from rlhf_jax.algorithms import sections
from rlhf_jax.algorithms.reward import data as reward_data
from rlhf_jax.algorithms.reward import evaluation as reward_eval
from rlhf_jax.algorithms.reward import trainer as reward_model
from rlhf_jax.algorithms.reward import objectives as reward_objectives
from rlhf_jax.scoring import reward_model as rs
from rlhf_jax.algorithms.reward import stats as reward_stats
from rlhf_jax.data import batching, records
from rlhf_jax.data import tokenizers as tok_lib

TOK = tok_lib.ByteTokenizer()
SPECIALS = {"bos_id": TOK.bos_id, "eos_id": TOK.eos_id, "pad_id": TOK.pad_id}
CFG = models.get_model_config("tiny")
WIDTH = 32


def _init(num_outputs=1, seed=0):
  model = models.RewardModel(CFG, num_outputs=num_outputs)
  dummy = jnp.ones((1, 8), jnp.int32)
  return model, nn.meta.unbox(model.init(jax.random.PRNGKey(seed), dummy, dummy))["params"]


def _ex(prompt, *responses):
  ids = lambda s: np.asarray(TOK.encode(s), np.int32)  # noqa: E731
  return {"prompt": ids(prompt), "responses": [ids(r) for r in responses]}


# -- objectives ---------------------------------------------------------------------------------


def test_breslow_plackett_luce_equals_library_without_ties():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(5, 6)).astype(np.float32)
  labels = np.stack([rng.permutation(6) for _ in range(5)]).astype(np.float32)
  mask = np.ones((5, 6), np.int32)
  mask[1, 4:] = 0
  mine, _ = reward_objectives.plackett_luce_breslow_loss(scores, labels, mask)
  ref, _ = losses.plackett_luce_loss(scores, labels, candidate_mask=mask)
  np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=1e-5)


def test_breslow_ties_do_not_depend_on_candidate_order_and_padding_has_zero_grad():
  labels = jnp.array([[2.0, 1.0, 1.0, 0.0]])
  mask = jnp.array([[1, 1, 1, 0]])
  s = jnp.array([[0.3, -0.2, 0.9, 5.0]])
  swapped = s.at[0, 1].set(0.9).at[0, 2].set(-0.2)  # swap the two tied candidates' scores
  a, _ = reward_objectives.plackett_luce_breslow_loss(s, labels, mask)
  b, _ = reward_objectives.plackett_luce_breslow_loss(swapped, labels, mask)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  # Breslow by hand: best vs all three, then each tied one vs the tied pair.
  lse = lambda *x: np.log(np.sum(np.exp(x)))  # noqa: E731
  hand = (lse(0.3, -0.2, 0.9) - 0.3) + (lse(-0.2, 0.9) + 0.2) + (lse(-0.2, 0.9) - 0.9)
  np.testing.assert_allclose(a[0], hand, rtol=1e-5)
  grad = jax.grad(lambda x: reward_objectives.plackett_luce_breslow_loss(x, labels, mask)[0].sum())(
      s)
  assert np.all(np.isfinite(grad)) and grad[0, 3] == 0.0


def test_all_pairs_with_two_candidates_equals_bradley_terry_through_the_model():
  model, params = _init()
  exs = [_ex("name 2 fruits", "fig, kiwi!", "gun"), _ex("list 1 tools", "saw", "sorry")]
  pair = batching.collate(
      [{"prompt": e["prompt"], "chosen": e["responses"][0], "rejected": e["responses"][1]}
       for e in exs], "pairwise", SPECIALS, WIDTH)
  ranked = batching.collate([{
      "prompt": e["prompt"], "responses_flat": np.concatenate(e["responses"]), "response_lengths":
          np.asarray([len(r)
                      for r in e["responses"]]), "scores": np.asarray([1.0, 0.0], np.float32)}
                             for e in exs], "ranked", SPECIALS, WIDTH, num_candidates=2)
  bt = reward_objectives.make_objective(model, "bradley_terry")
  ap = reward_objectives.make_objective(model, "all_pairs")
  pl = reward_objectives.make_objective(model, "plackett_luce")
  loss_bt, _ = bt(params, pair, None)
  loss_ap, metrics = ap(params, ranked, None)
  loss_pl, _ = pl(params, ranked, None)
  np.testing.assert_allclose(loss_bt, loss_ap, rtol=1e-5)
  np.testing.assert_allclose(loss_bt, loss_pl, rtol=1e-5)
  assert float(metrics["num_pairs"]) == 1.0


def test_rating_objectives_rescale_targets_and_need_a_scale():
  np.testing.assert_allclose(reward_objectives.scale_targets(np.array([1.0, 4.0, 7.0]), (1, 7)),
                             [-1.0, 0.0, 1.0])
  model, _ = _init()
  with pytest.raises(ValueError, match="rating_scale"):
    reward_objectives.make_objective(model, "likert")
  with pytest.raises(ValueError, match="objective='dpo'"):
    reward_objectives.make_objective(model, "dpo")
  model2, params2 = _init(num_outputs=2)
  batch = batching.collate([{
      "prompt": np.asarray(TOK.encode("hi"), np.int32), "response": np.asarray(
          TOK.encode("yo"), np.int32), "attributes": np.asarray([7.0, 1.0], np.float32)}],
                           "attributes", SPECIALS, WIDTH, num_attributes=2)
  f = reward_objectives.make_objective(model2, "multi_attribute", rating_scale=(1, 7))
  loss, metrics = f(params2, batch, None)
  r = model2.apply({"params": params2}, batch["tokens"], batch["mask"])[0]
  np.testing.assert_allclose(loss[0], ((r[0] - 1)**2 + (r[1] + 1)**2) / 2, rtol=1e-5)
  assert "mse_attr1" in metrics


# -- configs ------------------------------------------------------------------------------------


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"RMConfig.objective='ppo'.*bradley_terry"):
    reward_model.RMConfig(objective="ppo")
  with pytest.raises(ValueError, match=r"RMConfig.init='lora'"):
    reward_model.RMConfig(init="lora")
  with pytest.raises(ValueError, match="early_stopping_patience"):
    reward_model.RMConfig(early_stopping_patience=-1)
  with pytest.raises(ValueError, match=r"RMConfig.compute_dtype='bf16'.*bfloat16"):
    reward_model.RMConfig(compute_dtype="bf16")
  with pytest.raises(ValueError, match="RMDataConfig.rating_scale"):
    reward_model.RMDataConfig(rating_scale=(7, 1))
  with pytest.raises(ValueError, match="RMDataConfig.train_jsonl"):
    reward_model.RMDataConfig(source="jsonl")
  with pytest.raises(ValueError, match="num_train_examples"):
    reward_model.RMDataConfig(num_train_examples=4, batch_size=8)
  with pytest.raises(ValueError, match="RMDataConfig.batch_size=0"):  # DataSource's validators
    reward_model.RMDataConfig(batch_size=0)
  with pytest.raises(ValueError, match="RMDataConfig.eval_prompts_jsonl"):
    reward_model.RMDataConfig(source="jsonl", train_jsonl=__file__, eval_jsonl=__file__,
                              eval_prompts_jsonl=__file__)
  with pytest.raises(ValueError, match="RMEvalConfig.temperature"):
    reward_stats.RMEvalConfig(temperature=0.0)


# -- scoring API ------------------------------------------------------------------------------------


def _info(num_outputs=1, mean=(0.5,), std=(2.0,)):
  names = ("reward",) if num_outputs == 1 else tuple(f"a{k}" for k in range(num_outputs))
  return rs.RewardModelInfo(model=dataclasses.asdict(CFG), output_names=names,
                            tokenizer_spec="byte", tokenizer_fingerprint=TOK.fingerprint(),
                            max_prompt_len=12, max_response_len=40, mean=mean, std=std,
                            objective="bradley_terry")


@pytest.fixture(scope="module")
def saved_rm(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("rm_artifact"))
  model, params = _init()
  rs.save_reward_model(workdir, params, _info())
  return workdir, model, params


PROMPTS = ["name 2 fruits", "list 3 colors", "tell me 1 tool", "give me 2 cats", "hi", "yo", "x"]
RESPONSES = ["fig, kiwi!!", "red", "saw", "sorry, i can't help with that", "a", "bb", "ccc"]


def test_score_matches_manual_normalised_apply_and_chunking(saved_rm):
  workdir, model, params = saved_rm
  handle = rs.load_reward_model(workdir, policy_tokenizer=TOK, batch_size=4)
  assert handle.batch_size == 4
  prompts = batching.encode_prompts(TOK, PROMPTS, max_prompt_len=12, buckets=(12,))
  resp = [TOK.encode(r) + [TOK.eos_id] for r in RESPONSES]
  r_tokens = np.zeros((len(resp), 40), np.int32)
  r_mask = np.zeros((len(resp), 40), np.int32)
  for i, ids in enumerate(resp):
    r_tokens[i, :len(ids)], r_mask[i, :len(ids)] = ids, 1
  got = rs.score(handle, prompts["prompt_tokens"], prompts["prompt_mask"], r_tokens, r_mask)
  assert got.shape == (7,)
  tokens = np.concatenate([prompts["prompt_tokens"], r_tokens], 1)
  mask = np.concatenate([prompts["prompt_mask"], r_mask], 1)
  raw = model.apply({"params": params}, tokens, mask)[:, 0]
  np.testing.assert_allclose(got, (raw - 0.5) / 2.0, rtol=1e-4, atol=1e-5)
  raw_got = rs.score(handle, prompts["prompt_tokens"], prompts["prompt_mask"], r_tokens, r_mask,
                     normalize=False)
  np.testing.assert_allclose(raw_got, raw, rtol=1e-4, atol=1e-5)
  # The text path builds the same [BOS] prompt response [EOS] sequences (right-padded instead).
  texts = rs.score_texts(handle, TOK, PROMPTS, RESPONSES)
  assert isinstance(texts, np.ndarray)
  np.testing.assert_allclose(texts, got, rtol=1e-4, atol=1e-5)
  # The pure function agrees too, also under jit.
  f = jax.jit(rs.reward_fn(handle))
  np.testing.assert_allclose(f(handle.params, tokens, mask), got, rtol=1e-4, atol=1e-5)


def test_score_sharded_like_the_policy_equals_single_device(saved_rm):
  workdir, _, _ = saved_rm
  single = rs.score_texts(rs.load_reward_model(workdir), None, PROMPTS, RESPONSES)
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=1),
                            devices=jax.devices()[:4])
  handle = rs.load_reward_model(workdir, mesh=mesh, batch_size=3)
  assert handle.batch_size == 4 and handle.batch_ways == 4  # rounded up to the batch ways
  embed = handle.params["backbone"]["embed"]["embedding"] if "embed" in handle.params["backbone"] \
      else jax.tree.leaves(handle.params)[0]
  assert len(embed.sharding.device_set) == 4
  np.testing.assert_allclose(rs.score_texts(handle, None, PROMPTS, RESPONSES), single, rtol=1e-4,
                             atol=1e-5)


class _OtherTokenizer(tok_lib.ByteTokenizer):

  def fingerprint(self):
    return "other-v259-0000"


def test_tokenizer_mismatch_is_refused(saved_rm):
  workdir, _, _ = saved_rm
  with pytest.raises(rs.TokenizerMismatchError, match="fingerprint other-v259-0000"):
    rs.load_reward_model(workdir, policy_tokenizer=_OtherTokenizer())
  handle = rs.load_reward_model(workdir)
  with pytest.raises(rs.TokenizerMismatchError):
    rs.score_texts(handle, _OtherTokenizer(), ["a"], ["b"])


def test_multi_output_scores_and_weights(tmp_path):
  model, params = _init(num_outputs=2, seed=1)
  rs.save_reward_model(str(tmp_path), params, _info(2, mean=(0.0, 1.0), std=(1.0, 0.5)))
  handle = rs.load_reward_model(str(tmp_path))
  both = rs.score_texts(handle, None, PROMPTS[:3], RESPONSES[:3], per_attribute=True)
  assert both.shape == (3, 2) and handle.output_names == ("a0", "a1")
  combined = rs.score_texts(handle, None, PROMPTS[:3], RESPONSES[:3], attribute_weights=(1.0, 2.0))
  np.testing.assert_allclose(combined, both[:, 0] + 2 * both[:, 1], rtol=1e-5)
  with pytest.raises(ValueError, match="attribute_weights"):
    rs.score_texts(handle, None, PROMPTS[:3], RESPONSES[:3], attribute_weights=(1.0,))
  with pytest.raises(ValueError, match="attribute_weights"):  # K = 2 and no reduction configured
    rs.score_texts(handle, None, PROMPTS[:3], RESPONSES[:3])
  weighted = rs.load_reward_model(str(tmp_path), attribute_weights="a0:1,a1:2")
  np.testing.assert_allclose(rs.score_texts(weighted, None, PROMPTS[:3], RESPONSES[:3]), combined,
                             rtol=1e-5)


def test_missing_artifact_and_bad_info(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match="experiments/run.py --config=experiments/configs/rm_synthetic.py"):
    rs.load_reward_model(str(tmp_path))
  with pytest.raises(ValueError, match="std"):
    _info(mean=(0.0,), std=(0.0,))
  with pytest.raises(ValueError, match="K = 1"):
    _info(mean=(0.0, 1.0), std=(1.0, 1.0))


# -- data: bad input is an error or a counted skip ------------------------------------------------


def _fake_step(run_dir, step):
  """A committed-looking checkpoint step folder (orbax metadata, no manifest: counted as a step;
  an empty folder is an unusable checkpoint)."""
  (run_dir / "checkpoints" / str(step)).mkdir(parents=True)
  (run_dir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").write_text("{}")


def _write(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
  return str(path)


def _prepare(tmp_path, objective, train_rows, eval_rows=None, **overrides):
  train = _write(tmp_path / "train.jsonl", train_rows)
  evaluation = _write(tmp_path / "eval.jsonl", eval_rows or train_rows)
  cfg = reward_model.RMDataConfig(source="jsonl", train_jsonl=train, eval_jsonl=evaluation,
                                  batch_size=2, eval_batch_size=8, **overrides)
  limits = sections.Limits(max_prompt_len=12, max_response_len=20)
  return reward_data.prepare(cfg, limits, objective, TOK, str(tmp_path / "work"), vocab_size=259)


def test_ranked_bad_input_errors(tmp_path):
  with pytest.raises(records.RecordError,
                     match=r"train.jsonl:2: field 'responses': expected at least 2"):
    _prepare(tmp_path, "all_pairs", [{"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}, {
        "prompt": "p", "responses": ["a"], "scores": [1]}])
  with pytest.raises(records.RecordError, match=r"scores\[1\]': expected a finite number"):
    _prepare(tmp_path, "plackett_luce",
             ['{"prompt": "p", "responses": ["a", "b"], "scores": [1, NaN]}'])
  with pytest.raises(records.RecordError, match=r"scores\[0\]': expected a number \(it is missing"):
    _prepare(tmp_path, "all_pairs", [{"prompt": "p", "responses": ["a", "b"], "scores": [None, 1]}])


def test_ranked_ties_are_counted_and_give_no_all_pairs_comparison(tmp_path):
  rows = [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 1, 0]},
          {"prompt": "q", "responses": ["d", "e"], "ranks": [1, 2]}]
  data = _prepare(tmp_path, "all_pairs", rows)
  assert data.stats["data/train_tied_pairs"] == 1 and data.stats["data/train_comparisons"] == 3
  assert data.held_out.ranked["scores"].shape == (2, 3)
  model, params = _init()
  f = reward_objectives.make_objective(model, "all_pairs")
  _, metrics = f(params, data.held_out.objective_batches[0], None)
  np.testing.assert_allclose(metrics["num_pairs"], 3 / 2)  # 2 + 1 pairs over 2 lists


def test_rating_bad_input_errors(tmp_path):
  rows = [{"prompt": "p", "response": "a", "rating": 5},
          {"prompt": "p", "response": "b", "rating": 9}]
  with pytest.raises(
      records.RecordError, match=r"train.jsonl:2: field 'rating': expected a rating "
      r"within the declared scale \[1.0, 7.0\]"):
    _prepare(tmp_path, "likert", rows, rating_scale=(1, 7))
  with pytest.raises(ValueError, match="rating_scale"):
    _prepare(tmp_path, "likert", rows[:1])
  with pytest.raises(records.RecordError, match="attributes.harmless"):
    _prepare(tmp_path, "multi_attribute",
             [{"prompt": "p", "response": "a", "attributes": {"helpful": 3, "harmless": None}}],
             rating_scale=(1, 7))


def test_rating_pairs_for_per_attribute_metrics():
  keys = [b"p", b"p", b"q", b"p", b"q"]
  values = np.array([3.0, 1.0, 2.0, 3.0, 2.0])
  better, worse = reward_eval.same_prompt_pairs(keys, values, max_pairs=10)
  # p: (0,1) and (3,1) have different ratings, (0,3) is tied; q: tied.
  assert sorted(zip(better.tolist(), worse.tolist())) == [(0, 1), (3, 1)]


def test_rm_tokenizer_must_match_the_sft_run(tmp_path, monkeypatch):
  sft_dir = tmp_path / "sft"
  _fake_step(sft_dir, 5)
  (sft_dir / "config.json").write_text(json.dumps({"sources": {"tokenizer": "byte"}}))
  fake = train.SFTCheckpoint(params=None, model_config=CFG, tokenizer=_OtherTokenizer(), step=5)
  monkeypatch.setattr(reward_model.train, "load_sft_params", lambda workdir: fake)
  from rlhf_jax.scoring.reward_model import TokenizerMismatchError
  with pytest.raises(TokenizerMismatchError, match="differs from the SFT run"):
    reward_model.resolve_model_and_tokenizer(None, reward_model.RMConfig(),
                                             sections.Sources(sft_workdir=str(sft_dir)))
  with pytest.raises(TokenizerMismatchError, match="config.sources.tokenizer='byte'"):
    reward_model.resolve_model_and_tokenizer(
        None, reward_model.RMConfig(), sections.Sources(sft_workdir=str(sft_dir), tokenizer="byte"))
  (tmp_path / "none").mkdir()
  with pytest.raises(FileNotFoundError,
                     match="experiments/run.py --config=experiments/configs/sft"):
    reward_model.resolve_model_and_tokenizer(None, reward_model.RMConfig(),
                                             sections.Sources(sft_workdir=str(tmp_path / "none")))


def test_compute_dtype_overrides_only_the_sft_model_configs_dtype(tmp_path, monkeypatch):
  sft_dir = tmp_path / "sft"
  _fake_step(sft_dir, 5)
  (sft_dir / "config.json").write_text(json.dumps({"sources": {"tokenizer": "byte"}}))
  fake = train.SFTCheckpoint(params=None, model_config=CFG, tokenizer=TOK, step=5)
  monkeypatch.setattr(reward_model.train, "load_sft_params", lambda workdir: fake)
  sources = sections.Sources(sft_workdir=str(sft_dir))
  kept, *_ = reward_model.resolve_model_and_tokenizer(None, reward_model.RMConfig(), sources)
  assert kept == CFG
  bf16, *_ = reward_model.resolve_model_and_tokenizer(
      None, reward_model.RMConfig(compute_dtype="bfloat16"), sources)
  assert bf16 == CFG.replace(dtype="bfloat16") and bf16.param_dtype == CFG.param_dtype


def test_early_stopping_keeps_the_best_params_and_persists(tmp_path):
  best = {"w": jnp.arange(3.0)}
  stopper = reward_model.EarlyStopping(str(tmp_path), patience=2, min_delta=0.01)
  stopper.update(10, 1.0, best)
  stopper.update(20, 0.995, {"w": jnp.ones(3)})  # not better by more than min_delta
  with pytest.raises(reward_model.EarlyStop, match="best 1.0000 at step 10"):
    stopper.update(30, 1.5, {"w": jnp.zeros(3)})
  again = reward_model.EarlyStopping(str(tmp_path), patience=2, min_delta=0.01)
  assert again.state["stopped"] and again.state["best_step"] == 10
  abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  np.testing.assert_array_equal(again.best_params(abstract)["w"], np.arange(3.0))


# -- SIGTERM between stages ---------------------------------------------------------------------


def _rm_config(sft_dir, source="synthetic"):
  import os, sys  # noqa: E401  pylint: disable=import-outside-toplevel,multiple-imports
  sys.path.insert(
      0,
      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                   "configs"))
  import rm_synthetic  # pylint: disable=import-outside-toplevel
  config = rm_synthetic.get_config("bradley_terry")
  config.sources.sft_workdir = str(sft_dir)
  config.data.source = source
  return config


def test_sft_stopped_by_sigterm_stops_the_launcher_and_an_unfinished_sft_is_resumed(
    tmp_path, monkeypatch):
  """Regression: a SIGTERM during the launcher's SFT stage used to be followed by a full RM run on
  the half-trained SFT checkpoint (and every later run reused that checkpoint)."""
  calls = []
  result = {"preempted": True, "step": 3}
  monkeypatch.setattr(reward_model, "_train_sft",
                      lambda config, workdir: calls.append(workdir) or dict(result))
  sft_dir = tmp_path / "sft"
  config = _rm_config(sft_dir)
  assert reward_model.ensure_sft_run(config) is False and len(calls) == 1  # preempted: no RM
  # The preempted run left a checkpoint of the default config but no final metrics: resume it.
  _fake_step(sft_dir, 3)
  (sft_dir / "config.json").write_text(json.dumps(reward_model._sft_default_config().to_dict()))
  result["preempted"] = False
  assert reward_model.ensure_sft_run(config) is True and len(calls) == 2
  (sft_dir / reward_model.train.FINAL_METRICS_FILE).write_text("{}")
  assert reward_model.ensure_sft_run(config) is True and len(calls) == 2  # finished: used as is
  other = tmp_path / "other_sft"  # an unfinished run of another config is the user's: used as is
  _fake_step(other, 7)
  (other / "config.json").write_text(json.dumps({"loop": {"num_steps": 7}}))
  assert reward_model.ensure_sft_run(_rm_config(other)) is True and len(calls) == 2
  with pytest.raises(FileNotFoundError, match="holds no SFT run"):
    reward_model.ensure_sft_run(_rm_config(tmp_path / "none", source="jsonl"))
  # The RM method itself runs this first, and a preempted SFT stage trains no RM.
  result["preempted"] = True
  fresh = _rm_config(tmp_path / "fresh_sft")
  assert reward_model.train_and_evaluate(fresh, str(tmp_path / "rm")) == {
      "step": 0, "preempted": True, "stage": "sft"}
  assert calls[-1] == str(tmp_path / "fresh_sft") and not (tmp_path / "rm").exists()


def test_rm_trainer_reaches_sft_through_the_registry_only():
  import inspect  # pylint: disable=import-outside-toplevel
  source = inspect.getsource(reward_model)
  assert "algorithms import sft" not in source and "algorithms.sft" not in source
  assert reward_model._sft_default_config().get("method", "sft") == "sft"


def test_learning_curve_stops_at_a_point_stopped_by_sigterm(tmp_path, monkeypatch):
  """Regression: after SIGTERM stopped one curve point, the sweep went on training the next ones."""
  from rlhf_jax.algorithms.reward import sweep as reward_sweep  # pylint: disable=import-outside-toplevel
  calls = []
  monkeypatch.setattr(
      reward_sweep.reward_model, "train_and_evaluate",
      lambda config, workdir: calls.append(workdir) or {"step": 5, "preempted": True})
  rows = reward_sweep.learning_curve(_rm_config(tmp_path / "sft"), str(tmp_path), [100, 200],
                                     ["bradley_terry", "all_pairs"])
  assert rows == [] and len(calls) == 1
  assert not (tmp_path / "learning_curve.json").exists()


def test_learning_curve_method_runs_every_point_through_the_rm_trainer(tmp_path, monkeypatch):
  from rlhf_jax.algorithms import registry  # pylint: disable=import-outside-toplevel
  from rlhf_jax.algorithms.reward import sweep as reward_sweep  # pylint: disable=import-outside-toplevel
  seen = []
  monkeypatch.setattr(reward_sweep.reward_model, "ensure_sft_run", lambda config: True)
  monkeypatch.setattr(reward_sweep.reward_model, "train_and_evaluate",
                      lambda config, workdir: seen.append(config) or {"step": 5, "preempted": True})
  config = _rm_config(tmp_path / "sft")
  config.method = "rm_learning_curve"
  config.curve = {"sizes": (100,), "objectives": ("all_pairs",)}
  out = registry.get("rm_learning_curve")(config, str(tmp_path))
  assert out == {"points": [], "preempted": True}
  assert seen[0].method == "reward_model" and "curve" not in seen[0]
  assert (seen[0].rm.objective, seen[0].data.num_train_examples) == ("all_pairs", 100)
  config.curve.objectives = ("all_pairs,bradley_terry",)  # as the command line passes it
  registry.get("rm_learning_curve")(config, str(tmp_path))
  assert [c.rm.objective for c in seen[1:]] == ["all_pairs"]  # stopped at the preempted point
  config.curve.typo = 1
  with pytest.raises(ValueError, match=r"config.curve.typo"):
    registry.get("rm_learning_curve")(config, str(tmp_path))


def test_pairwise_eval_loss_from_the_scored_pairs_equals_the_objective_pass():
  """Bradley–Terry's held-out split is the held-out pairs: eval_loss computed from the pairwise
  scores (one forward) must equal the separate objective pass it replaces."""
  model, params = _init()
  ids = lambda s: np.asarray(TOK.encode(s), np.int32)  # noqa: E731
  texts = [("name 2 fruits", "fig, kiwi!", "saw"), ("list 1 tools", "awl", "awl!!!!"),
           ("name 3 colors", "red, tan, blue", "red!!")]
  examples = [{"prompt": ids(p), "chosen": ids(c), "rejected": ids(r)} for p, c, r in texts]
  batches = [
      batching.collate(examples[:2], "pairwise", SPECIALS, WIDTH),
      batching.collate([examples[2], None], "pairwise", SPECIALS, WIDTH)]  # a filler row
  held_out = reward_eval.HeldOut(batches, pairwise=reward_eval.concat_batches(batches, 3),
                                 objective_is_pairwise=True)
  for center_coef in (0.0, 0.1):
    objective = reward_objectives.make_objective(model, "bradley_terry", center_coef=center_coef)
    eval_loss_fn = reward_eval.make_eval_loss_fn(objective)
    scorer = reward_eval.make_raw_scorer(model, 4)
    two_pass = reward_eval.evaluate(params, held_out, scorer, eval_loss_fn, full=False)
    pair_loss = lambda rc, rr: losses.bradley_terry_loss(  # noqa: E731
        jnp.asarray(rc), jnp.asarray(rr), center_coef=center_coef)[0]  # pylint: disable=cell-var-from-loop
    one_pass = reward_eval.evaluate(params, held_out, scorer, eval_loss_fn, full=False,
                                    pair_loss_fn=pair_loss)
    assert one_pass["eval_loss"] == pytest.approx(two_pass["eval_loss"], rel=1e-5)
    assert one_pass["pairwise/accuracy"] == two_pass["pairwise/accuracy"]


def test_sigterm_during_an_evaluation_abandons_it_and_still_reaches_the_loop(monkeypatch):
  """A periodic evaluation (minutes on a CPU with 2000 held-out pairs / lists) is abandoned on
  SIGTERM instead of finishing first; the loop's own handler is still called."""
  import os  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel
  model, params = _init()
  ids = lambda s: np.asarray(TOK.encode(s), np.int32)  # noqa: E731
  ex = {"prompt": ids("name 2 fruits"), "chosen": ids("fig, kiwi!"), "rejected": ids("saw")}
  batch = batching.collate([ex, ex], "pairwise", SPECIALS, WIDTH)
  held_out = reward_eval.HeldOut([batch], pairwise=reward_eval.concat_batches([batch], 2))
  objective = reward_objectives.make_objective(model, "bradley_terry")
  scorer, eval_loss_fn = reward_eval.make_raw_scorer(model,
                                                     1), reward_eval.make_eval_loss_fn(objective)
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
  try:
    with train.SigtermWatch() as watch:
      assert reward_eval.evaluate(params, held_out, scorer, eval_loss_fn, full=False,
                                  should_stop=lambda: watch.received)["eval_loss"] > 0
      os.kill(os.getpid(), signal.SIGTERM)
      assert watch.received and seen == [signal.SIGTERM]  # the loop's handler ran too
      with pytest.raises(reward_eval.EvalInterrupted):
        reward_eval.evaluate(params, held_out, scorer, eval_loss_fn, full=False,
                             should_stop=lambda: watch.received)
    assert signal.getsignal(signal.SIGTERM) is not None and seen == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, previous)
