"""DPO-family trainer: end to end from a tiny SFT run, reference modes and their cache key, eval
mode / dropout, bad input, the NaN guard."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from offline_fixtures import TINY_RUN, load_config, override, tiny_sft_workdir
from rlhf_jax import models, parallel, train
from rlhf_jax.algorithms.offline import dpo
from rlhf_jax.algorithms import common, sections
from rlhf_jax.algorithms.offline import pairwise_shell
from rlhf_jax.data import dataset as ds_lib
from rlhf_jax.data import tokenizers as tok_lib

DATA = {"data.batch_size": 8, "limits.buckets": (80,), "data.num_eval_pairs": 8}
MESH = {"data": 1, "fsdp": 1, "tensor": 1}


def _copy_run_without_dataset(src: str, dst: str) -> None:
  """A copy of a finished run without its top-level tokenized dataset (`<run>/data`); the
  checkpoint steps keep every file (their `data` item is the loader position, which the step's
  manifest covers)."""
  shutil.copytree(src, dst, ignore=lambda d, names: ["data"] if d == src else [])


def dpo_config(sft_dir, **extra):
  config = load_config("dpo_synthetic")
  return override(config, {**TINY_RUN, **DATA, "sources.sft_workdir": sft_dir, **extra})


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
  return tiny_sft_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def on_the_fly_run(sft_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("dpo_fly"))
  return workdir, dpo.train_and_evaluate(dpo_config(sft_dir), workdir)


@pytest.mark.slow
def test_end_to_end_reports_policy_and_implicit_reward_metrics(on_the_fly_run):
  workdir, final = on_the_fly_run
  stored = json.load(open(os.path.join(workdir, common.FINAL_METRICS_FILE)))
  assert stored["step"] == 4 and stored["method"] == "dpo:sigmoid"
  for key in ("gold_reward", "sft_gold_reward", "kl_to_sft", "response_length", "win_rate_vs_sft",
              "pairs/rewards/margins", "pairs/rewards/accuracies", "pairs/rewards/chosen"):
    assert np.isfinite(stored[key]), key
  assert 0.0 <= stored["win_rate_vs_sft"] <= 1.0
  assert stored["skipped_identical_pairs"] == 0 and stored["num_train_pairs"] > 0
  rows = train.read_metrics(workdir, "train")
  assert [r["step"] for r in rows] == [2, 4]
  assert 0.0 <= rows[0]["rewards/accuracies"] <= 1.0 and "loss/sigmoid" in rows[0]
  # one step of a tiny lr away from the reference: the loss is still about log 2
  assert abs(rows[0]["loss"] - np.log(2.0)) < 0.05


@pytest.mark.slow
def test_precomputed_reference_matches_on_the_fly_and_nan_guard_keeps_checkpoint(
    on_the_fly_run, sft_dir, tmp_path):
  fly_dir, _ = on_the_fly_run
  workdir = str(tmp_path)
  config = dpo_config(sft_dir,
                      **{"loss.reference_logps": "precomputed", "loop.stop_after_steps": 2})
  first = dpo.train_and_evaluate(config, workdir)
  assert first["preempted"] and first["step"] == 2
  table_path = os.path.join(workdir, "data", pairwise_shell.REF_LOGPS_FILE)
  assert os.path.exists(table_path)
  # same batches, same reference: the same loss as computing the reference log-probs per batch
  fly, pre = train.read_metrics(fly_dir, "train")[0], train.read_metrics(workdir, "train")[0]
  assert pre["step"] == fly["step"] == 2
  np.testing.assert_allclose(pre["loss"], fly["loss"], rtol=1e-5)
  np.testing.assert_allclose(pre["rewards/margins"], fly["rewards/margins"], atol=1e-5)

  # Poison the stored reference log-probs (column 0: the chosen rows): the next step's loss is NaN.
  good = jax.tree.map(np.asarray, train.restore_params(workdir, 2))
  stored = dict(np.load(table_path))
  assert stored["table"].shape == (first["num_train_pairs"], 2)
  poisoned = stored["table"].copy()
  poisoned[:, 0] = np.nan
  np.savez(table_path, key=stored["key"], table=poisoned)
  resumed = dpo_config(sft_dir, **{"loss.reference_logps": "precomputed"})
  with pytest.raises(train.NonFiniteLossError, match="non-finite loss or gradient at step 3"):
    dpo.train_and_evaluate(resumed, workdir)
  latest = jax.tree.map(np.asarray, train.restore_params(workdir))
  jax.tree.map(np.testing.assert_array_equal, latest, good)  # the bad updates were never applied
  assert not os.path.exists(os.path.join(workdir, common.FINAL_METRICS_FILE))


def test_reference_with_other_config_or_tokenizer_is_refused(sft_dir, tmp_path):
  ckpt_config = models.get_model_config("tiny")
  byte = tok_lib.ByteTokenizer()

  class OtherTokenizer(tok_lib.ByteTokenizer):

    def fingerprint(self):
      return "other-fingerprint"

  with pytest.raises(common.ReferenceMismatchError, match="tokenizer"):
    common.check_reference(ckpt_config, byte, ckpt_config, OtherTokenizer())
  with pytest.raises(common.ReferenceMismatchError, match=r"\['d_model', 'd_ff'\]|d_model"):
    common.check_reference(ckpt_config, byte, ckpt_config.replace(d_model=32, d_ff=64), byte)
  # a reference run whose stored model config differs is refused when loading
  ref_dir = str(tmp_path / "ref")
  _copy_run_without_dataset(sft_dir, ref_dir)
  fp_path = os.path.join(ref_dir, train.checkpoint.FINGERPRINT_FILE)
  fingerprint = json.load(open(fp_path))
  fingerprint["model"]["rope_theta"] = 500.0
  json.dump(fingerprint, open(fp_path, "w"))
  sources = sections.Sources(sft_workdir=sft_dir, reference_workdir=ref_dir)
  mesh = parallel.mesh_from_config(MESH)
  with pytest.raises(common.ReferenceMismatchError, match="rope_theta"):
    common.load_models(sources, mesh)


def _hand_batch():
  """Two pairs in the collator's layout: pair b's chosen in row 2b, its rejected in row 2b+1."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, size=(4, 12)).astype(np.int32)
  loss_mask = np.zeros((4, 12), np.int32)
  loss_mask[:, 6:] = 1
  return {
      "tokens": tokens, "mask": np.ones((4, 12), np.int32), "loss_mask": loss_mask,
      "valid": np.ones(2, np.int32), "index": np.arange(2, dtype=np.int32)}


def _tiny(dropout_rate=0.0):
  model = models.Transformer(models.get_model_config("tiny").replace(dropout_rate=dropout_rate))
  dummy = jnp.ones((1, 8), jnp.int32)
  return model, meta.unbox(model.init(jax.random.PRNGKey(0), dummy, dummy))["params"]


@pytest.mark.parametrize("method,extra", [("dpo", {"loss_type": "ipo,sigmoid", "sft_weight": 0.5}),
                                          ("simpo", {}), ("orpo", {})])
def test_loss_fn_one_forward_matches_separate_forwards(method, extra):
  model, params = _tiny()
  cfg = dpo.DPOLossConfig(method=method, **extra)
  batch = _hand_batch()
  if cfg.uses_reference:
    batch["ref_logps"] = jnp.array([-40.0, -38.0, -35.0, -36.0])  # (c0, r0, c1, r1)
  loss, metrics = dpo.make_loss_fn(model, cfg)(params, batch, jax.random.PRNGKey(1))
  row = lambda rows: models.sequence_logprobs(
      model,
      params,
      batch["tokens"][rows],  # noqa: E731
      batch["mask"][rows],
      batch["loss_mask"][rows]).sum(-1)
  n = jnp.full((2,), 6.0)
  ref_c, ref_r = (jnp.array([-40.0, -35.0]), jnp.array([-38.0, -36.0])) if cfg.uses_reference \
      else (None, None)
  expected, _ = dpo.pair_loss(cfg, row([0, 2]), row([1, 3]), n, n, ref_c, ref_r)
  np.testing.assert_allclose(loss, jnp.mean(expected), rtol=1e-5)
  assert np.isfinite(float(metrics["rewards/margins"]))
  assert cfg.uses_reference == (method == "dpo")


def test_heldout_metrics_are_deterministic_with_dropout_in_the_model():
  """Bug: held-out pair metrics ran the policy with dropout on (a fixed dropout key) when the model
  has dropout_rate > 0; they must be the eval-mode (deterministic) numbers."""
  model, params = _tiny(dropout_rate=0.5)
  plain, _ = _tiny()
  batch = _hand_batch()
  batch["ref_logps"] = jnp.array([-40.0, -38.0, -35.0, -36.0])
  cfg = dpo.DPOLossConfig(disable_dropout=False)  # dropout stays on in training
  mesh = parallel.mesh_from_config(MESH)
  got = common.make_heldout_eval_fn(dpo.make_loss_fn(model, cfg), [batch], mesh)(params)
  _, want = dpo.make_loss_fn(plain, cfg)(params, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(got["pairs/rewards/margins"], want["rewards/margins"], rtol=1e-5)
  np.testing.assert_allclose(got["pairs/loss"], want["loss"], rtol=1e-5)
  # training with disable_dropout=False does use dropout (the loss depends on the key)
  train_loss = dpo.make_loss_fn(model, cfg)
  assert not np.isclose(float(train_loss(params, batch, jax.random.PRNGKey(1))[0]),
                        float(train_loss(params, batch, jax.random.PRNGKey(2))[0]))


def test_dropout_is_disabled_in_preference_training_by_default():
  """Bug: training kept dropout in the policy while the reference is deterministic; by default
  (TRL's disable_dropout) the training forward is deterministic too."""
  model, params = _tiny(dropout_rate=0.5)
  plain, _ = _tiny()
  batch = _hand_batch()
  batch["ref_logps"] = jnp.array([-40.0, -38.0, -35.0, -36.0])
  assert dpo.DPOLossConfig().disable_dropout
  loss_fn = dpo.make_loss_fn(model, dpo.DPOLossConfig())
  a = loss_fn(params, batch, jax.random.PRNGKey(1))[0]
  b = loss_fn(params, batch, jax.random.PRNGKey(2))[0]
  c = dpo.make_loss_fn(plain, dpo.DPOLossConfig())(params, batch, jax.random.PRNGKey(1))[0]
  np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_allclose(a, c, rtol=1e-5)
  with pytest.raises(ValueError, match="DPOLossConfig.disable_dropout"):
    dpo.DPOLossConfig(disable_dropout="yes")


def test_loss_config_errors_name_the_field():
  with pytest.raises(ValueError, match="DPOLossConfig.loss_type"):
    dpo.DPOLossConfig(loss_type="sigmoid,nope")
  with pytest.raises(ValueError, match="DPOLossConfig.method"):
    dpo.DPOLossConfig(method="kto")
  with pytest.raises(ValueError, match="DPOLossConfig.reference_logps"):
    dpo.DPOLossConfig(reference_logps="cached")
  with pytest.raises(ValueError, match="loss_weights"):
    dpo.DPOLossConfig(loss_type="sigmoid,ipo", loss_weights=(1.0,))
  assert dpo.DPOLossConfig(loss_type="sigmoid,bco_pair",
                           sft_weight=1.0).label == "dpo:sigmoid+bco_pair+rpo"


def test_precomputed_reference_table_is_keyed_on_the_reference_run_and_its_step(sft_dir, tmp_path):
  """Bug: the table's key held the *policy's* SFT step even with a separate reference run, so a
  reference run that moved to a later checkpoint reused a stale table."""
  ref_dir = str(tmp_path / "ref")
  _copy_run_without_dataset(sft_dir, ref_dir)
  os.rename(os.path.join(ref_dir, "checkpoints", "6"), os.path.join(ref_dir, "checkpoints", "9"))
  mesh = parallel.mesh_from_config(MESH)
  own = common.load_models(sections.Sources(sft_workdir=sft_dir), mesh)
  other = common.load_models(sections.Sources(sft_workdir=sft_dir, reference_workdir=ref_dir), mesh)
  assert (own.sft_step, own.ref_step, own.ref_workdir) == (6, 6, os.path.abspath(sft_dir))
  assert (other.sft_step, other.ref_step, other.ref_workdir) == (6, 9, os.path.abspath(ref_dir))
  pairs = os.path.join(sft_dir, "data", "synthetic", "pairwise_test.jsonl")
  ds = ds_lib.prepare_dataset(pairs, "pairwise", own.tokenizer, str(tmp_path / "ds"),
                              max_prompt_len=32, max_response_len=48, drop_uninformative=True)
  key_own, key_other = (pairwise_shell.reference_cache_key(m, ds, seed=0) for m in (own, other))
  assert key_other["reference_run"] == os.path.abspath(ref_dir) and key_other["reference_step"] == 9
  assert key_own["reference_step"] == 6 and key_own != key_other
  later = pairwise_shell.reference_cache_key(other._replace(ref_step=12), ds, seed=0)
  assert later != key_other  # same reference folder, a newer checkpoint: another table
  assert key_own["dataset"] == ds.metadata["settings"] and key_own[
      "tokenizer"] == own.tokenizer.fingerprint()


def test_resolve_files_finds_or_generates_the_synthetic_task(sft_dir, tmp_path):
  sources = sections.Sources(sft_workdir=sft_dir)
  data = pairwise_shell.PairwiseData(num_eval_pairs=8)
  train_f, eval_f, prompts = common.resolve_files(data, sources, "pairwise", str(tmp_path / "w"))
  assert train_f == os.path.join(sft_dir, "data", "synthetic", "pairwise.jsonl")
  assert eval_f.endswith("pairwise_test.jsonl") and prompts.endswith("prompts_test.jsonl")
  # no SFT run (a fresh policy): the task is generated into the workdir, as config.data says
  small = pairwise_shell.PairwiseData(synthetic_num_prompts=8, synthetic_num_test_prompts=4,
                                      synthetic_seed=3)
  workdir = str(tmp_path / "fresh")
  train_f, _, _ = common.resolve_files(small, sections.Sources(), "ranked", workdir)
  assert train_f == os.path.join(workdir, "data", "synthetic", "ranked.jsonl")
  assert sum(1 for _ in open(train_f)) == 8
  with pytest.raises(ValueError, match="config.data.synthetic_dir='/nonexistent'"):
    common.resolve_files(pairwise_shell.PairwiseData(synthetic_dir="/nonexistent"), sources,
                         "pairwise", workdir)
  with pytest.raises(ValueError, match="PairwiseData.num_eval_pairs=0"):
    pairwise_shell.PairwiseData(num_eval_pairs=0)
