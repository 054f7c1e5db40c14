"""KTO: the loss (by hand, NumPy float64, gradient, jit, masks, TRL's own code transcribed), the
reference point z₀ (mismatched pairs, no gradient, global mean), the ``unpaired`` record kind and
its KL rows, the unpaired split of pairwise data and of the synthetic task, config errors, and a
tiny end-to-end run through ``experiments/run.py``."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from offline_fixtures import REPO, TINY_RUN, load_config, override, tiny_sft_workdir
from rlhf_jax import losses, models, train
from rlhf_jax.algorithms import registry
from rlhf_jax.algorithms.offline import kto
from rlhf_jax.data import batching
from rlhf_jax.data import records as rec
from rlhf_jax.data import synthetic_files as sf
from rlhf_jax.data import tokenizers as tok_lib
from rlhf_jax.data.kinds import unpaired

SPECIALS = {"bos_id": 1, "eos_id": 2, "pad_id": 0}


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def numpy_kto(pi, ref, labels, pi_kl, ref_kl, *, beta, w_d, w_u, loss_type="kto", mask=None):
  """Independent float64 reference of the module docstring's formulas (per-example, weighted)."""
  pi, ref, pi_kl, ref_kl = (np.asarray(x, np.float64) for x in (pi, ref, pi_kl, ref_kl))
  m = np.ones(len(pi)) if mask is None else np.asarray(mask, np.float64)
  labels = np.asarray(labels, bool)
  z0 = max(0.0, float(np.sum((pi_kl - ref_kl) * m) / max(m.sum(), 1.0)))
  r = np.where(m > 0, pi - ref, 0.0)
  out = np.zeros(len(pi))
  for b in range(len(pi)):
    if loss_type == "kto":
      out[b] = w_d * (1 - _sigmoid(beta *
                                   (r[b] - z0))) if labels[b] else w_u * (1 - _sigmoid(beta *
                                                                                       (z0 - r[b])))
    else:
      out[b] = w_d * (1 - _sigmoid(beta * r[b])) if labels[b] else w_u * _sigmoid(beta * r[b])
  return out * m, z0


def trl_kto_loss(policy_logps, ref_logps, labels, KL_logps, ref_KL_logps, *, beta, desirable_weight,
                 undesirable_weight, loss_type):
  """TRL's ``KTOTrainer._compute_loss`` loss lines, transcribed faithfully into NumPy.

  Source: huggingface/trl @ f2cd57710ae345ea6428ae95363267fcf38a3dc8 (2026-07-24),
  ``trl/trainer/kto_trainer.py``, lines 1552–1606 (index_select of chosen / rejected, the KL
  clamp, the two loss types, the weighted concatenation and ``losses.nanmean()``).
  """
  bool_labels = np.asarray(labels, bool)
  chosen_idx = np.nonzero(bool_labels)[0]
  rejected_idx = np.nonzero(~bool_labels)[0]
  chosen_logps, rejected_logps = policy_logps[chosen_idx], policy_logps[rejected_idx]
  ref_chosen_logps, ref_rejected_logps = ref_logps[chosen_idx], ref_logps[rejected_idx]
  if loss_type == "kto":  # calculate_KL = loss_type not in ["apo_zero_unpaired"]
    kl = max((KL_logps - ref_KL_logps).mean(),
             0.0)  # .mean().detach(); gather; .mean().clamp(min=0)
  else:
    kl = 0.0
  chosen_logratios = chosen_logps - ref_chosen_logps
  if loss_type == "kto":
    chosen_losses = 1 - _sigmoid(beta * (chosen_logratios - kl))
  elif loss_type == "apo_zero_unpaired":
    chosen_losses = 1 - _sigmoid(beta * chosen_logratios)
  chosen_rewards = beta * chosen_logratios
  rejected_logratios = rejected_logps - ref_rejected_logps
  if loss_type == "kto":
    rejected_losses = 1 - _sigmoid(beta * (kl - rejected_logratios))
  elif loss_type == "apo_zero_unpaired":
    rejected_losses = _sigmoid(beta * rejected_logratios)
  rejected_rewards = beta * rejected_logratios
  losses_ = np.concatenate((desirable_weight * chosen_losses, undesirable_weight * rejected_losses),
                           0)
  return {
      "loss": np.nanmean(losses_), "kl": kl,
      "rewards/chosen": np.nansum(chosen_rewards) / len(chosen_idx),
      "rewards/rejected": np.nansum(rejected_rewards) / len(rejected_idx),
      "logps/chosen": np.nansum(chosen_logps) / len(chosen_idx),
      "logps/rejected": np.nansum(rejected_logps) / len(rejected_idx)}


def trl_kl_completion_ids(completion_ids):
  """TRL's ``add_kl_completion_ids`` (same file, line 1106): rotate a batch's completions by one."""
  return [completion_ids[-1]] + completion_ids[:-1]


def _random_case(seed, n=7):
  rng = np.random.default_rng(seed)
  pi, ref = -rng.uniform(5, 40, n), -rng.uniform(5, 40, n)
  pi_kl, ref_kl = -rng.uniform(5, 40, n), -rng.uniform(5, 40, n)
  labels = rng.random(n) < 0.5
  labels[:2] = [True, False]
  return pi, ref, labels, pi_kl, ref_kl


# ------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------


def test_hand_computed_values_and_weights():
  pi, ref = jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])
  labels = jnp.array([True, False])
  # β = 0.5, z₀ = 0.2: desirable r = 0.5 -> 1 − σ(0.15); undesirable r = −1 -> 1 − σ(0.6)
  per, metrics = losses.kto_loss(pi, ref, labels, kl_ref_point=0.2, beta=0.5)
  np.testing.assert_allclose(per, [1 - _sigmoid(0.15), 1 - _sigmoid(0.6)], rtol=1e-6)
  np.testing.assert_allclose(per, [0.462570, 0.354344], atol=1e-6)
  assert float(metrics["kl"]) == pytest.approx(0.2)
  assert float(metrics["rewards/chosen"]) == pytest.approx(0.25)
  assert float(metrics["rewards/rejected"]) == pytest.approx(-0.5)
  assert float(metrics["rewards/margins"]) == pytest.approx(0.75)
  # weights scale each side, the batch loss is the plain mean (TRL's nanmean, not renormalised)
  per_w, metrics_w = losses.kto_loss(pi, ref, labels, kl_ref_point=0.2, beta=0.5,
                                     desirable_weight=2.0, undesirable_weight=0.5)
  np.testing.assert_allclose(per_w, [2 * 0.462570, 0.5 * 0.354344], atol=1e-6)
  assert float(metrics_w["loss"]) == pytest.approx((2 * 0.462570 + 0.5 * 0.354344) / 2, abs=1e-6)
  # apo_zero_unpaired: 1 − σ(β r) and σ(β r), no z₀
  per_a, metrics_a = losses.kto_loss(pi, ref, labels, kl_ref_point=0.2, beta=0.5,
                                     loss_type="apo_zero_unpaired")
  np.testing.assert_allclose(per_a, [1 - _sigmoid(0.25), _sigmoid(-0.5)], rtol=1e-6)
  assert float(metrics_a["kl"]) == 0.0
  # z₀ by hand: mean(π' − ref') = mean(1, −3) = −1 -> clamped to 0; mean(3, 1) = 2
  assert float(losses.kto_reference_point(jnp.array([-1.0, -5.0]), jnp.array([-2.0, -2.0]))) == 0
  assert float(losses.kto_reference_point(jnp.array([1.0, -1.0]), jnp.array([-2.0, -2.0]))) == 2


@pytest.mark.parametrize("loss_type", losses.KTO_LOSS_TYPES)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_matches_numpy_float64_reference(loss_type, weights):
  pi, ref, labels, pi_kl, ref_kl = _random_case(0)
  mask = np.array([1, 1, 1, 0, 1, 1, 0])
  with jax.enable_x64(True):
    z0 = losses.kto_reference_point(jnp.asarray(pi_kl), jnp.asarray(ref_kl), mask=mask)
    per, metrics = losses.kto_loss(jnp.asarray(pi), jnp.asarray(ref), labels, kl_ref_point=z0,
                                   beta=0.3, desirable_weight=weights[0],
                                   undesirable_weight=weights[1], loss_type=loss_type, mask=mask)
    assert per.dtype == jnp.float64
  expected, z0_np = numpy_kto(pi, ref, labels, pi_kl, ref_kl, beta=0.3, w_d=weights[0],
                              w_u=weights[1], loss_type=loss_type, mask=mask)
  np.testing.assert_allclose(per, expected, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(float(z0), z0_np, rtol=1e-12)
  np.testing.assert_allclose(float(metrics["loss"]), expected.sum() / mask.sum(), rtol=1e-12)


@pytest.mark.parametrize("loss_type", losses.KTO_LOSS_TYPES)
def test_matches_trl_kto_loss_transcribed(loss_type):
  """Against TRL's own lines (``trl_kto_loss``: repo, commit and file in its docstring)."""
  for seed in range(3):
    pi, ref, labels, pi_kl, ref_kl = _random_case(seed, n=9)
    expected = trl_kto_loss(pi, ref, labels, pi_kl, ref_kl, beta=0.1, desirable_weight=1.2,
                            undesirable_weight=0.8, loss_type=loss_type)
    with jax.enable_x64(True):
      z0 = losses.kto_reference_point(jnp.asarray(pi_kl), jnp.asarray(ref_kl))
      _, metrics = losses.kto_loss(jnp.asarray(pi), jnp.asarray(ref), labels, kl_ref_point=z0,
                                   beta=0.1, desirable_weight=1.2, undesirable_weight=0.8,
                                   loss_type=loss_type)
    for key, value in expected.items():
      np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-12, atol=1e-14, err_msg=key)


def test_gradient_matches_the_analytic_derivative_and_z0_carries_none():
  pi, ref, labels, pi_kl, ref_kl = _random_case(1)
  beta, w_d, w_u = 0.2, 1.5, 0.5
  with jax.enable_x64(True):

    def batch_loss(pi_, pi_kl_):
      z0 = losses.kto_reference_point(pi_kl_, jnp.asarray(ref_kl))
      return losses.kto_loss(pi_, jnp.asarray(ref), labels, kl_ref_point=z0, beta=beta,
                             desirable_weight=w_d, undesirable_weight=w_u)[1]["loss"]

    g_pi, g_kl = jax.grad(batch_loss, argnums=(0, 1))(jnp.asarray(pi), jnp.asarray(pi_kl))
  _, z0 = numpy_kto(pi, ref, labels, pi_kl, ref_kl, beta=beta, w_d=w_d, w_u=w_u)
  assert z0 > 0  # the case exercises an unclamped z₀ whose gradient is stopped
  r = pi - ref
  s_d, s_u = _sigmoid(beta * (r - z0)), _sigmoid(beta * (z0 - r))
  # d/dr [λ_D (1 − σ(β(r − z₀)))] = −λ_D β σ(1 − σ);  d/dr [λ_U (1 − σ(β(z₀ − r)))] = λ_U β σ(1 − σ)
  analytic = np.where(labels, -w_d * beta * s_d * (1 - s_d), w_u * beta * s_u * (1 - s_u))
  np.testing.assert_allclose(g_pi, analytic / len(pi), rtol=1e-10)
  np.testing.assert_array_equal(g_kl, np.zeros_like(pi_kl))
  # finite differences agree too
  with jax.enable_x64(True):
    eps, e0 = 1e-6, np.eye(len(pi))[0]
    fd = (batch_loss(jnp.asarray(pi + eps * e0), jnp.asarray(pi_kl)) -
          batch_loss(jnp.asarray(pi - eps * e0), jnp.asarray(pi_kl))) / (2 * eps)
  np.testing.assert_allclose(float(fd), float(g_pi[0]), rtol=1e-6)


def test_jit_equals_no_jit_and_masked_examples_are_inert():
  pi, ref, labels, pi_kl, ref_kl = _random_case(2)
  mask = np.array([1, 1, 0, 1, 1, 1, 0])

  def run(pi_, ref_, pi_kl_, ref_kl_):
    z0 = losses.kto_reference_point(pi_kl_, ref_kl_, mask=mask)
    return losses.kto_loss(pi_, ref_, labels, kl_ref_point=z0, beta=0.1, mask=mask)

  args = [jnp.asarray(x, jnp.float32) for x in (pi, ref, pi_kl, ref_kl)]
  eager, jitted = run(*args), jax.jit(run)(*args)
  np.testing.assert_allclose(eager[0], jitted[0], rtol=1e-6)
  for key in eager[1]:
    np.testing.assert_allclose(eager[1][key], jitted[1][key], rtol=1e-6, err_msg=key)
  # garbage (nan / inf) in masked examples changes nothing and gets no gradient
  dirty = [np.array(x, np.float32) for x in (pi, ref, pi_kl, ref_kl)]
  for x in dirty:
    x[mask == 0] = np.nan
  dirty[0][6] = np.inf
  dirty_out = jax.jit(run)(*[jnp.asarray(x) for x in dirty])
  np.testing.assert_allclose(dirty_out[0], eager[0], rtol=1e-6)
  for key in eager[1]:
    np.testing.assert_allclose(dirty_out[1][key], eager[1][key], rtol=1e-6, err_msg=key)
  grad = jax.grad(lambda p: run(p, *[jnp.asarray(x) for x in dirty[1:]])[1]["loss"])(jnp.asarray(
      dirty[0]))
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[mask == 0] == 0)


def test_reference_point_is_the_mean_over_the_global_batch_on_several_devices():
  """A batch sharded over 2 devices: z₀ and the loss equal the unsharded ones (one global mean)."""
  pi, ref, labels, pi_kl, ref_kl = _random_case(3, n=8)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  arrays = [jnp.asarray(x, jnp.float32) for x in (pi, ref, pi_kl, ref_kl)] + [jnp.asarray(labels)]

  def run(pi_, ref_, pi_kl_, ref_kl_, labels_):
    z0 = losses.kto_reference_point(pi_kl_, ref_kl_)
    return z0, losses.kto_loss(pi_, ref_, labels_, kl_ref_point=z0)[1]["loss"]

  sharded = [jax.device_put(x, spec) for x in arrays]
  assert len(sharded[2].addressable_shards) == 2
  np.testing.assert_allclose(jax.jit(run)(*sharded), run(*arrays), rtol=1e-6)
  np.testing.assert_allclose(float(run(*arrays)[0]), max(0.0, float(np.mean(pi_kl - ref_kl))),
                             rtol=1e-6)


def test_loss_argument_errors():
  x = jnp.zeros(3)
  with pytest.raises(ValueError, match="loss_type='sigmoid' is not one of"):
    losses.kto_loss(x, x, x > 0, kl_ref_point=0.0, loss_type="sigmoid")
  with pytest.raises(ValueError, match="beta must be > 0"):
    losses.kto_loss(x, x, x > 0, kl_ref_point=0.0, beta=0.0)
  with pytest.raises(ValueError, match="both must be >= 0"):
    losses.kto_loss(x, x, x > 0, kl_ref_point=0.0, undesirable_weight=-1.0)
  with pytest.raises(ValueError, match="shapes must match"):
    losses.kto_loss(x, jnp.zeros(2), x > 0, kl_ref_point=0.0)
  assert losses.get_loss("kto") is losses.kto_loss


# ------------------------------------------------------------------------------------------------
# The unpaired record kind and its KL rows
# ------------------------------------------------------------------------------------------------


def _example(prompt, completion, label):
  return {
      "prompt": np.asarray(prompt, np.int32), "completion": np.asarray(completion, np.int32),
      "label": np.int32(label)}


def _row(batch, r):
  """(prompt ids, completion ids) of sequence row r: [BOS] prompt completion [EOS]."""
  tokens, mask, loss_mask = (np.asarray(batch[k][r]) for k in ("tokens", "mask", "loss_mask"))
  n = int(mask.sum())
  start = int(np.argmax(loss_mask))
  assert tokens[0] == SPECIALS["bos_id"] and tokens[n - 1] == SPECIALS["eos_id"]
  return tokens[1:start].tolist(), tokens[start:n - 1].tolist()


def test_collate_adds_mismatched_rows_rotated_like_trl_over_valid_examples():
  examples = [
      _example([10, 11], [20], 1),
      _example([12], [21, 22], 0), None,
      _example([13, 14, 15], [23], 1), None]
  batch = batching.collate(examples, "unpaired", SPECIALS, 12)
  assert batch["tokens"].shape == (10, 12) and batch["label"].tolist() == [1, 0, 0, 1, 0]
  assert batch["valid"].tolist() == [1, 1, 0, 1, 0]
  valid = [e for e in examples if e is not None]
  completions = [e["completion"].tolist() for e in valid]
  kl = trl_kl_completion_ids(completions)  # TRL: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})
  for j, b in enumerate([0, 1, 3]):
    assert _row(batch, 2 * b) == (examples[b]["prompt"].tolist(), completions[j])
    assert _row(batch, 2 * b + 1) == (examples[b]["prompt"].tolist(), kl[j])
  for r in (4, 5, 8, 9):  # filler rows are all padding
    assert batch["mask"][r].sum() == 0 and batch["loss_mask"][r].sum() == 0
  matched, mismatched = unpaired.split(batch["tokens"])
  np.testing.assert_array_equal(matched, batch["tokens"][0::2])
  np.testing.assert_array_equal(mismatched, batch["tokens"][1::2])


def test_a_kl_row_longer_than_the_batch_length_keeps_the_completion_tokens_that_fit():
  examples = [_example([10] * 6, [20], 1), _example([12], [21] * 7, 0)]
  batch = batching.collate(examples, "unpaired", SPECIALS, 10)  # matched rows: 9 and 10 tokens
  assert _row(batch, 1) == ([10] * 6, [21, 21])  # 1 + 6 + 2 + 1 = 10: two completion tokens fit
  assert _row(batch, 3) == ([12], [20])


def _write(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
  return str(path)


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "completion": "c", "label": "maybe"},
     "field 'label': expected true or false (a JSON boolean; true = desirable), got str 'maybe'"),
    ({"prompt": "p", "completion": "c", "label": 1}, "field 'label': expected true or false"),
    ({"prompt": "p", "completion": "c"}, "field 'label': expected a value (the field is missing)"),
    ({"prompt": "p", "label": True}, "field 'completion': expected a value"),
    ({"prompt": "p", "completion": "  ", "label": True
     }, "field 'completion': expected a non-empty string"),
    ({"completion": "c", "label": True}, "field 'prompt': expected a string"),
    ("[1, 2]", "expected a JSON object per line"),])
def test_record_errors_name_file_line_and_field(tmp_path, row, message):
  path = _write(tmp_path / "u.jsonl", [{"prompt": "p", "completion": "ok", "label": False}, row])
  with pytest.raises(rec.RecordError) as err:
    rec.read_records(path, "unpaired")
  assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)


def test_unpair_splits_pairs_like_trl_and_drops_identical_ones(tmp_path):
  pairs = [{"prompt": "a", "chosen": "x",
            "rejected": "y"}, {"prompt": "b", "chosen": "z", "rejected": "z"},
           {"prompt": "c", "chosen": "u", "rejected": "v", "id": 3}]
  rows = list(unpaired.unpair(pairs[:1]))
  assert rows == [{"prompt": "a", "completion": "x", "label": True},
                  {"prompt": "a", "completion": "y", "label": False}]
  dst = str(tmp_path / "out" / "u.jsonl")
  skipped = kto.unpair_file(_write(tmp_path / "p.jsonl", pairs), dst, tok_lib.ByteTokenizer())
  got = [(r.prompt, r.completion, r.label) for r in rec.read_records(dst, "unpaired")]
  assert skipped == 1 and got == [("a", "x", True), ("a", "y", False), ("c", "u", True),
                                  ("c", "v", False)]
  bad = _write(tmp_path / "bad.jsonl", [pairs[0], {"prompt": "q", "chosen": "x"}])
  with pytest.raises(rec.RecordError, match=r"bad.jsonl:2: field 'rejected'"):
    kto.unpair_file(bad, dst, tok_lib.ByteTokenizer())
  same = _write(tmp_path / "same.jsonl", [pairs[1]])
  with pytest.raises(ValueError, match="every one of its 1 pairs has chosen == rejected"):
    kto.unpair_file(same, dst, tok_lib.ByteTokenizer())


def test_synthetic_task_writes_the_unpaired_split_and_leaves_the_other_files_unchanged(tmp_path):
  config = sf.SyntheticConfig(num_prompts=24, num_test_prompts=8)
  sf.write_task(str(tmp_path / "task"), config)
  digest = hashlib.sha256()
  for name in sorted(os.listdir(tmp_path / "task")):
    if name.endswith(".jsonl") and not name.startswith(("unpaired", "feedback_sft")):
      digest.update(name.encode())
      digest.update((tmp_path / "task" / name).read_bytes())
  # sha256 of these files written by the tree before the unpaired file existed (commit e4ec206)
  assert digest.hexdigest() == "2341db64cc584c346b21c4e9a1d9756a09f1f4b1dab7897f9700679ba6bd2bdd"
  for suffix in ("", "_test"):
    pairs = rec.read_records(str(tmp_path / "task" / f"pairwise{suffix}.jsonl"), "pairwise")
    got = rec.read_records(str(tmp_path / "task" / f"unpaired{suffix}.jsonl"), "unpaired")
    assert [(r.prompt, r.completion, r.label) for r in got] == [
        (p.prompt, c, label) for p in pairs for c, label in ((p.chosen, True), (p.rejected, False))]
  meta_ = json.loads((tmp_path / "task" / "metadata.json").read_text())
  assert meta_["files"]["unpaired.jsonl"] == 48 and sf.FILE_STEMS["unpaired"] == "unpaired"


# ------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------


def _tiny_model():
  model = models.Transformer(models.get_model_config("tiny"))
  dummy = jnp.ones((1, 8), jnp.int32)
  return model, meta.unbox(model.init(jax.random.PRNGKey(0), dummy, dummy))["params"]


def _method_batch(model, params, ref_params, with_filler):
  rng = np.random.default_rng(0)
  examples = [
      _example(rng.integers(3, 200, 3 + i), rng.integers(3, 200, 2 + (i * 3) % 5), i % 2 == 0)
      for i in range(4)]
  batch = batching.collate(examples + ([None] if with_filler else []), "unpaired", SPECIALS, 16)
  batch["ref_logps"] = models.response_logps(model, ref_params, batch["tokens"], batch["mask"],
                                             batch["loss_mask"])
  return batch


@pytest.mark.parametrize("loss_type", losses.KTO_LOSS_TYPES)
def test_loss_fn_uses_the_kl_rows_for_z0_without_gradient_and_ignores_padding(loss_type):
  model, params = _tiny_model()
  # a reference that differs from the policy, so r and z₀ are not 0
  ref_params = jax.tree_util.tree_map(lambda p: p * 0.9, params)
  cfg = kto.KTOLossConfig(loss_type=loss_type, beta=0.5)
  loss_fn = kto.make_loss_fn(model, cfg)
  batch = _method_batch(model, params, ref_params, with_filler=False)
  loss, metrics = loss_fn(params, batch, None)
  rows = np.asarray(
      models.response_logps(model, params, batch["tokens"], batch["mask"], batch["loss_mask"]))
  ref = np.asarray(batch["ref_logps"])
  expected, z0 = numpy_kto(rows[0::2], ref[0::2], batch["label"] > 0, rows[1::2], ref[1::2],
                           beta=0.5, w_d=1.0, w_u=1.0, loss_type=loss_type)
  np.testing.assert_allclose(float(loss), expected.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kl"]), z0 if loss_type == "kto" else 0.0, rtol=1e-5,
                             atol=1e-7)

  if loss_type == "kto":
    np.testing.assert_allclose(float(metrics["kl_unclamped"]), np.mean(rows[1::2] - ref[1::2]),
                               rtol=1e-5)
    assert z0 == pytest.approx(max(0.0, np.mean(rows[1::2] - ref[1::2])))
  # no gradient through z₀: the same as a loss with z₀ a constant
  def constant_z0(p):
    pi_B = models.response_logps(model, p, batch["tokens"][0::2], batch["mask"][0::2],
                                 batch["loss_mask"][0::2])
    return losses.kto_loss(pi_B, ref[0::2], batch["label"], kl_ref_point=z0, beta=0.5,
                           loss_type=loss_type)[1]["loss"]

  g = jax.grad(lambda p: loss_fn(p, batch, None)[0])(params)
  g_const = jax.grad(constant_z0)(params)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_const)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  # padding tokens and a filler example change nothing
  noisy = dict(batch, tokens=np.where(batch["mask"] > 0, batch["tokens"], 77))
  np.testing.assert_allclose(float(loss_fn(params, noisy, None)[0]), float(loss), rtol=1e-6)
  filled = _method_batch(model, params, ref_params, with_filler=True)
  loss_f, metrics_f = loss_fn(params, filled, None)
  np.testing.assert_allclose(float(loss_f), float(loss), rtol=1e-6)
  np.testing.assert_allclose(float(metrics_f["kl"]), float(metrics["kl"]), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(float(jax.jit(loss_fn)(params, batch, None)[0]), float(loss),
                             rtol=1e-5)


def test_config_errors_name_the_field():
  for kwargs, match in [({"beta": 0}, r"KTOLossConfig.beta=0 is invalid; allowed: a float > 0"),
                        ({"loss_type": "sigmoid"}, r"KTOLossConfig.loss_type='sigmoid' is invalid; "
                         r"allowed: kto \| apo_zero_unpaired"),
                        ({"desirable_weight": -1.0}, r"KTOLossConfig.desirable_weight=-1.0"),
                        ({"desirable_weight": 0.0, "undesirable_weight": 0.0}, "nothing to learn"),
                        ({"disable_dropout": 1}, r"KTOLossConfig.disable_dropout=1")]:
    with pytest.raises(ValueError, match=match):
      kto.KTOLossConfig(**kwargs)
  with pytest.raises(ValueError, match=r"KTOData.batch_size=1 is invalid; allowed: an int >= 2"):
    kto.KTOData(batch_size=1)
  with pytest.raises(ValueError, match=r"KTOData.unpair='yes'"):
    kto.KTOData(unpair="yes")
  assert kto.KTOLossConfig().label == "kto"
  assert kto.KTOLossConfig(loss_type="apo_zero_unpaired").label == "kto:apo_zero_unpaired"
  assert registry.get("kto") is kto.train_and_evaluate


KTO_TINY = {**TINY_RUN, "data.batch_size": 8, "limits.buckets": (80,), "data.num_eval_examples": 8}


@pytest.mark.slow
def test_end_to_end_through_the_launcher(tmp_path_factory):
  """``experiments/run.py --config=experiments/configs/kto_synthetic.py`` from the tiny SFT run."""
  sft_dir = tiny_sft_workdir(tmp_path_factory)
  workdir = tmp_path_factory.mktemp("kto_run")
  overrides = {
      **KTO_TINY, "limits.buckets": "(80,)", "sources.sft_workdir": sft_dir, "optim.lr": 1e-3}
  args = [
      sys.executable,
      os.path.join(REPO, "experiments", "run.py"), f"--workdir={workdir}",
      f"--config={os.path.join(REPO, 'experiments', 'configs', 'kto_synthetic.py')}"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  final = json.loads((workdir / train.FINAL_METRICS_FILE).read_text())
  assert final["method"] == "kto" and final["step"] == 4
  assert final["num_desirable"] == final["num_undesirable"] == final["num_train_examples"] // 2
  for key in ("gold_reward", "kl_to_sft", "win_rate_vs_sft", "kto/kl", "kto/rewards/margins",
              "kto/loss"):
    assert np.isfinite(final[key]), key
  rows = train.read_metrics(str(workdir), "train")
  assert [r["step"] for r in rows] == [2, 4] and "rewards/chosen" in rows[0]
  # two steps from the reference: r ≈ 0 and z₀ ≈ 0, so every example's loss is about 1 − σ(0)
  assert abs(rows[0]["loss"] - 0.5) < 0.02 and rows[0]["kl"] >= 0.0


@pytest.mark.slow
def test_pairwise_jsonl_files_train_through_unpair(tmp_path_factory):
  sft_dir = tiny_sft_workdir(tmp_path_factory)
  task = os.path.join(sft_dir, "data", "synthetic")
  config = override(
      load_config("kto_synthetic"), {
          **KTO_TINY, "sources.sft_workdir": sft_dir, "data.source": "jsonl", "data.unpair": True,
          "data.train_jsonl": os.path.join(task, "pairwise.jsonl"), "data.eval_jsonl": os.path.join(
              task, "pairwise_test.jsonl"), "loop.num_steps": 2, "loop.checkpoint_every": 2})
  workdir = str(tmp_path_factory.mktemp("kto_unpair"))
  final = registry.run("kto", config, workdir)
  n_pairs = len(rec.read_records(os.path.join(task, "pairwise.jsonl"), "pairwise"))
  assert final["step"] == 2 and final["num_train_examples"] == 2 * n_pairs
  assert final["num_desirable"] == n_pairs and final["skipped_identical_pairs"] == 0
