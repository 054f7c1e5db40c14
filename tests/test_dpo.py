"""DPO-family trainer: end to end from a tiny SFT run, reference modes, bad input, the NaN guard."""

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
from rlhf_jax.algorithms import common
from rlhf_jax.data import tokenizers as tok_lib

DATA = {"data.batch_size": 8, "data.buckets": (80,), "data.num_eval_pairs": 8}


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
  assert all(r["skipped_nonfinite"] == 0.0 for r in rows)  # the NaN guard let every step through
  assert 0.0 <= rows[0]["rewards/accuracies"] <= 1.0 and "loss/sigmoid" in rows[0]
  # one step of a tiny lr away from the reference: the loss is still about log 2
  assert abs(rows[0]["loss"] - np.log(2.0)) < 0.05


@pytest.mark.slow
def test_precomputed_reference_matches_on_the_fly_and_nan_guard_keeps_checkpoint(
    on_the_fly_run, sft_dir, tmp_path):
  fly_dir, _ = on_the_fly_run
  workdir = str(tmp_path)
  config = dpo_config(sft_dir, **{"loss.reference_logps": "precomputed", "loop.stop_after_steps": 2})
  first = dpo.train_and_evaluate(config, workdir)
  assert first["preempted"] and first["step"] == 2
  table_path = os.path.join(workdir, "data", dpo.REF_LOGPS_FILE)
  assert os.path.exists(table_path)
  # same batches, same reference: the same loss as computing the reference log-probs per batch
  fly, pre = train.read_metrics(fly_dir, "train")[0], train.read_metrics(workdir, "train")[0]
  assert pre["step"] == fly["step"] == 2
  np.testing.assert_allclose(pre["loss"], fly["loss"], rtol=1e-5)
  np.testing.assert_allclose(pre["rewards/margins"], fly["rewards/margins"], atol=1e-5)

  # Poison the stored reference log-probs: the next step's loss is NaN.
  good = jax.tree.map(np.asarray, train.restore_params(workdir, 2))
  stored = dict(np.load(table_path))
  np.savez(table_path, key=stored["key"], chosen=np.full_like(stored["chosen"], np.nan),
           rejected=stored["rejected"])
  resumed = dpo_config(sft_dir, **{"loss.reference_logps": "precomputed"})
  with pytest.raises(train.NonFiniteLossError, match="non-finite loss or gradient at step 3"):
    dpo.train_and_evaluate(resumed, workdir)
  latest = jax.tree.map(np.asarray, train.restore_params(workdir))
  jax.tree.map(np.testing.assert_array_equal, latest, good)  # the bad updates were never applied
  assert not os.path.exists(os.path.join(workdir, common.FINAL_METRICS_FILE))


def test_identical_pairs_are_skipped_and_counted(tmp_path):
  src, dst = str(tmp_path / "pairs.jsonl"), str(tmp_path / "kept.jsonl")
  rows = [{"prompt": "name 1 fruits", "chosen": "fig!", "rejected": "fig!"},
          {"prompt": "name 1 fruits", "chosen": "fig!", "rejected": "gun"},
          {"prompt": "list 2 tools", "chosen": "saw", "rejected": "saw"}]
  with open(src, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  assert dpo.drop_identical_pairs(src, dst) == (1, 2)
  assert [json.loads(l)["rejected"] for l in open(dst)] == ["gun"]
  with open(src, "w") as f:
    f.write(json.dumps(rows[0]) + "\n")
  with pytest.raises(ValueError, match="every one of its 1 pairs has chosen == rejected"):
    dpo.drop_identical_pairs(src, dst)


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
  shutil.copytree(sft_dir, ref_dir, ignore=shutil.ignore_patterns("data"))
  fp_path = os.path.join(ref_dir, train.checkpoint.FINGERPRINT_FILE)
  fingerprint = json.load(open(fp_path))
  fingerprint["model"]["rope_theta"] = 500.0
  json.dump(fingerprint, open(fp_path, "w"))
  sources = common.ModelSources(sft_workdir=sft_dir, reference_workdir=ref_dir)
  mesh = parallel.mesh_from_config({"data": 1, "fsdp": 1, "tensor": 1})
  with pytest.raises(common.ReferenceMismatchError, match="rope_theta"):
    common.load_models(sources, mesh)


def _hand_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, size=(4, 12)).astype(np.int32)
  mask = np.ones((4, 12), np.int32)
  loss_mask = np.zeros((4, 12), np.int32)
  loss_mask[:, 6:] = 1
  return {"chosen_tokens": tokens[:2], "rejected_tokens": tokens[2:], "chosen_mask": mask[:2],
          "rejected_mask": mask[2:], "chosen_loss_mask": loss_mask[:2],
          "rejected_loss_mask": loss_mask[2:]}


@pytest.mark.parametrize("method,extra", [("dpo", {"loss_type": "ipo,sigmoid", "sft_weight": 0.5}),
                                          ("simpo", {}), ("orpo", {})])
def test_loss_fn_one_forward_matches_separate_forwards(method, extra):
  model = models.Transformer(models.get_model_config("tiny"))
  dummy = jnp.ones((1, 8), jnp.int32)
  params = meta.unbox(model.init(jax.random.PRNGKey(0), dummy, dummy))["params"]
  cfg = dpo.DPOLossConfig(method=method, **extra)
  batch = _hand_batch()
  if cfg.uses_reference:
    batch["ref_chosen_logps"] = jnp.array([-40.0, -35.0])
    batch["ref_rejected_logps"] = jnp.array([-38.0, -36.0])
  loss, metrics = dpo.make_loss_fn(model, cfg)(params, batch, jax.random.PRNGKey(1))
  side = lambda s: models.sequence_logprobs(model, params, batch[f"{s}_tokens"], batch[f"{s}_mask"],
                                            batch[f"{s}_loss_mask"]).sum(-1)
  n = jnp.full((2,), 6.0)
  expected, _ = dpo.pair_loss(cfg, side("chosen"), side("rejected"), n, n,
                              batch.get("ref_chosen_logps"), batch.get("ref_rejected_logps"))
  np.testing.assert_allclose(loss, jnp.mean(expected), rtol=1e-5)
  assert np.isfinite(float(metrics["rewards/margins"]))
  assert cfg.uses_reference == (method == "dpo")


def test_loss_config_errors_name_the_field():
  with pytest.raises(ValueError, match="DPOLossConfig.loss_type"):
    dpo.DPOLossConfig(loss_type="sigmoid,nope")
  with pytest.raises(ValueError, match="DPOLossConfig.method"):
    dpo.DPOLossConfig(method="kto")
  with pytest.raises(ValueError, match="DPOLossConfig.reference_logps"):
    dpo.DPOLossConfig(reference_logps="cached")
  with pytest.raises(ValueError, match="loss_weights"):
    dpo.DPOLossConfig(loss_type="sigmoid,ipo", loss_weights=(1.0,))
  assert dpo.DPOLossConfig(loss_type="sigmoid,bco_pair", sft_weight=1.0).label == "dpo:sigmoid+bco_pair+rpo"
