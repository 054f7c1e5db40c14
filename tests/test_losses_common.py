"""Shared helpers for the loss tests (imported by the other ``test_losses_*`` files) and tests of
the loss library's common pieces: token aggregation, masked log-sum-exp, dtype policy, registry."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from rlhf_jax import losses
from rlhf_jax.losses import _common

# Few examples, no deadline: each example runs eager JAX ops, and the suite shares 2 CPU cores.
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
RTOL = ATOL = 1e-5


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                             rtol=rtol, atol=atol)


def right_padded_mask(rng, batch, length, min_len=1):
  """[B, T] 0/1 mask, each row a prefix of random length in [min_len, T]."""
  lengths = rng.integers(min_len, length + 1, size=batch)
  return (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)


def check_jit_matches(fn, *args, **kwargs):
  """``fn(*args, **kwargs)`` equals its jitted version (kwargs are static hyperparameters)."""
  eager = fn(*args, **kwargs)
  jitted = jax.jit(functools.partial(fn, **kwargs))(*args)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), eager,
                         jitted)


def check_grads_x64(scalar_fn, args, atol=1e-5, rtol=1e-5):
  """Reverse-mode gradient check of ``scalar_fn(*args)`` against finite differences, in float64.

    x64 is switched on only inside this context manager, so other tests in the process keep the
    float32 default."""
  with jax.enable_x64(True):
    args64 = tuple(jnp.asarray(np.asarray(a, np.float64)) for a in args)
    # jit: the finite differences re-evaluate the function at the same shapes many times.
    check_grads(jax.jit(scalar_fn), args64, order=1, modes=("rev",), atol=atol, rtol=rtol, eps=1e-6)


def check_mask_invariance(fn, args, mask, garbage_positions_of, **kwargs):
  """Overwriting masked positions of the arrays ``garbage_positions_of`` (indices into ``args``)
    with huge values, inf and nan changes neither the outputs nor the gradients."""
  fn = jax.jit(functools.partial(fn, **kwargs))
  base = fn(*args)
  noisy = list(args)
  rng = np.random.default_rng(0)
  for i in garbage_positions_of:
    junk = rng.choice(np.array([1e6, -1e6, np.inf, -np.inf, np.nan]), size=np.shape(args[i]))
    noisy[i] = np.where(np.asarray(mask) > 0, np.asarray(args[i]), junk).astype(np.float32)
  out = fn(*noisy)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), base,
                         out)

  def total(*xs):
    return jnp.sum(fn(*xs)[0])

  grad_fn = jax.jit(jax.grad(total, argnums=tuple(garbage_positions_of)))
  grads_base = grad_fn(*[jnp.asarray(a) for a in args])
  grads_noisy = grad_fn(*[jnp.asarray(a) for a in noisy])
  for gb, gn in zip(grads_base, grads_noisy):
    assert np.all(np.isfinite(np.asarray(gn)))
    np.testing.assert_allclose(gb, gn, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# token aggregation


def test_aggregate_tokens_by_hand():
  values = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
  # token_mean: (1+2+3+4)/4 = 2.5 overall; per example sums 6, 4 scaled by B/N = 2/4.
  assert_close(_common.aggregate_tokens(values, mask, "token_mean"), [3.0, 2.0])
  assert_close(_common.aggregate_tokens(values, mask, "seq_mean_token_mean"), [2.0, 4.0])
  assert_close(_common.aggregate_tokens(values, mask, "seq_mean_token_sum"), [6.0, 4.0])
  assert_close(_common.aggregate_tokens(values, mask, "seq_mean_token_sum_norm"), [2.0, 4.0 / 3.0])
  # a constant normaliser L = 8 instead of the padded width: sums 6, 4 over 8, whatever T is
  assert_close(_common.aggregate_tokens(values, mask, "seq_mean_token_sum_norm", 8), [0.75, 0.5])
  wide = np.pad(values, ((0, 0), (0, 5))), np.pad(mask, ((0, 0), (0, 5)))
  assert_close(_common.aggregate_tokens(*wide, "seq_mean_token_sum_norm", 8), [0.75, 0.5])
  with pytest.raises(ValueError, match="aggregation='sum'.*token_mean"):
    _common.aggregate_tokens(values, mask, "sum")


@SETTINGS
@given(seed=SEEDS)
def test_aggregate_tokens_matches_numpy(seed):
  rng = np.random.default_rng(seed)
  values = rng.normal(size=(4, 6))
  mask = right_padded_mask(rng, 4, 6)
  sums = (values * mask).sum(1)
  counts = mask.sum(1)
  expected = {
      "token_mean": sums * 4 / counts.sum(),
      "seq_mean_token_mean": sums / counts,
      "seq_mean_token_sum": sums,
      "seq_mean_token_sum_norm": sums / 6,}
  for mode, want in expected.items():
    assert_close(_common.aggregate_tokens(values.astype(np.float32), mask, mode), want)
  # the batch mean of token_mean is the token mean over the batch
  assert_close(np.mean(expected["token_mean"]), (values * mask).sum() / mask.sum())


def test_masked_logsumexp_by_hand_and_empty_rows():
  x = np.array([[0.0, np.log(3.0), 100.0], [5.0, 6.0, 7.0]], np.float32)
  mask = np.array([[1, 1, 0], [0, 0, 0]], np.float32)
  out = _common.masked_logsumexp(x, mask, axis=-1)
  assert_close(out[0], np.log(4.0))
  assert float(out[1]) == _common._NEG  # empty set: finite stand-in for -inf


def test_compute_dtype_upcasts_low_precision_to_float32():
  logps = jnp.asarray([[-1.0, -2.0]], jnp.bfloat16)
  per_example, metrics = losses.sft_loss(logps, jnp.ones((1, 2)))
  assert per_example.dtype == jnp.float32
  assert metrics["loss"].dtype == jnp.float32
  pc = jnp.asarray([-1.0], jnp.float16)
  out, _ = losses.dpo_loss(pc, pc - 1, pc, pc)
  assert out.dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# registry


def test_registry_unknown_name_lists_allowed():
  with pytest.raises(ValueError) as err:
    losses.get_loss("dpoo")
  message = str(err.value)
  assert "'dpoo'" in message
  for name in ("dpo", "dpo_ipo", "pro", "rrhf", "ppo_policy", "gae", "grpo", "sft"):
    assert f"'{name}'" in message


def test_registry_maps_names_to_functions():
  assert losses.get_loss("dpo") is losses.dpo_loss
  assert losses.get_loss("pro") is losses.pro_loss
  assert losses.get_loss("plackett_luce") is losses.plackett_luce_loss
  assert losses.get_loss("kl") is losses.kl_estimate
  for loss_type in losses.DPO_LOSS_TYPES:
    assert f"dpo_{loss_type}" in losses.LOSSES
  pc, pr = jnp.asarray([-1.0, -2.0]), jnp.asarray([-2.0, -1.5])
  ref = jnp.asarray([-1.5, -1.5])
  want, _ = losses.dpo_loss(pc, pr, ref, ref, loss_type="hinge", beta=0.5)
  got, _ = losses.get_loss("dpo_hinge")(pc, pr, ref, ref, beta=0.5)
  assert_close(got, want)
  assert set(losses.list_losses()) == set(losses.LOSSES)


def test_every_public_name_is_exported():
  for name in losses.__all__:
    assert hasattr(losses, name), name
