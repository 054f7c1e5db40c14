"""DPO family, SimPO and ORPO: hand values, float64 NumPy references, gradients, jit, invariances."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax import losses
from test_losses_common import SEEDS, SETTINGS, assert_close, check_grads_x64, check_jit_matches

B = 6


def _logsig(x):
  return -np.logaddexp(0.0, -x)


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def _score_np(u, f_div, alpha):
  if f_div == "reverse_kl":
    return u
  if f_div == "forward_kl":
    return -np.exp(-u)
  if f_div == "js_divergence":
    return _logsig(u)
  if abs(alpha - 1.0) < 1e-6:
    return u
  return np.exp(np.minimum((alpha - 1.0) * u, 80.0)) / (alpha - 1.0)


def dpo_reference(pc, pr, rc, rr, n_c, n_r, loss_type, beta, eps, f_div="reverse_kl", alpha=1.0,
                  tau=0.05):
  """Float64 NumPy restatement of TRL's per-type formulas (written from the papers/TRL, not from
    the JAX code)."""
  u_c, u_r = pc - rc, pr - rr
  s_c, s_r = _score_np(u_c, f_div, alpha), _score_np(u_r, f_div, alpha)
  d = s_c - s_r
  if loss_type == "sigmoid":
    return -(1 - eps) * _logsig(beta * d) - eps * _logsig(-beta * d)
  if loss_type == "hinge":
    return np.maximum(0.0, 1.0 - beta * d)
  if loss_type == "ipo":
    return (s_c / n_c - s_r / n_r - 1.0 / (2 * beta))**2
  if loss_type == "robust":
    return (-(1 - eps) * _logsig(beta * d) + eps * _logsig(-beta * d)) / (1 - 2 * eps)
  if loss_type == "exo_pair":
    e = eps if eps > 0 else 1e-3
    qw, ql = _sig(beta * d), _sig(-beta * d)
    return qw * (np.log(qw) - np.log(1 - e)) + ql * (np.log(ql) - np.log(e))
  if loss_type == "nca_pair":
    return -_logsig(beta * s_c) - 0.5 * _logsig(-beta * s_c) - 0.5 * _logsig(-beta * s_r)
  if loss_type == "bco_pair":
    return -_logsig(beta * s_c) - _logsig(-beta * s_r)
  if loss_type == "sppo_hard":
    return (s_c - 0.5 / beta)**2 + (s_r + 0.5 / beta)**2
  if loss_type == "aot":
    dd = np.sort(pc - pr) - np.sort(rc - rr)
    return -(1 - eps) * _logsig(beta * dd) - eps * _logsig(-beta * dd)
  if loss_type == "aot_unpaired":
    dd = np.sort(u_c) - np.sort(u_r)
    return -(1 - eps) * _logsig(beta * dd) - eps * _logsig(-beta * dd)
  if loss_type == "apo_zero":
    return 1 - _sig(beta * u_c) + _sig(beta * u_r)
  if loss_type == "apo_down":
    return _sig(beta * u_c) + 1 - _sig(beta * d)
  if loss_type == "discopop":
    z = beta * d
    w = _sig(z / tau)
    return (1 - w) * -_logsig(z) + w * np.exp(-z)
  if loss_type == "sigmoid_norm":
    return -_logsig(beta * (s_c / n_c - s_r / n_r))
  raise AssertionError(loss_type)


def _random_pairs(seed, batch=B):
  rng = np.random.default_rng(seed)
  pc = rng.uniform(-30, -5, batch)
  pr = rng.uniform(-30, -5, batch)
  rc = pc + rng.normal(0, 1.5, batch)
  rr = pr + rng.normal(0, 1.5, batch)
  n_c = rng.integers(1, 20, batch).astype(np.float64)
  n_r = rng.integers(1, 20, batch).astype(np.float64)
  return pc, pr, rc, rr, n_c, n_r


def _call(pc, pr, rc, rr, n_c, n_r, **kw):
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  return losses.dpo_loss(f32(pc), f32(pr), f32(rc), f32(rr), chosen_lengths=f32(n_c),
                         rejected_lengths=f32(n_r), **kw)


# ----------------------------------------------------------------------------------------------
# hand values


def test_sigmoid_by_hand():
  # u_c = 1, u_r = -1, β = 0.5: loss = -log σ(1) = log(1 + e^-1)
  out, m = losses.dpo_loss(jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]),
                           jnp.array([-2.0]), beta=0.5)
  assert_close(out, [math.log1p(math.exp(-1.0))])
  assert_close(m["rewards/chosen"], 0.5)
  assert_close(m["rewards/rejected"], -0.5)
  assert_close(m["rewards/margins"], 1.0)
  assert_close(m["rewards/accuracies"], 1.0)
  # cDPO with ε = 0.25: 0.75·log(1+e^-1) + 0.25·log(1+e^1)
  out, _ = losses.dpo_loss(jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]),
                           jnp.array([-2.0]), beta=0.5, label_smoothing=0.25)
  assert_close(out, [0.75 * math.log1p(math.exp(-1.0)) + 0.25 * math.log1p(math.exp(1.0))])


def test_ipo_and_hinge_by_hand():
  # u_c = 4 over 2 tokens, u_r = -2 over 4 tokens, β = 0.25: (2 - (-0.5) - 2)² = 0.25
  args = (jnp.array([-6.0]), jnp.array([-10.0]), jnp.array([-10.0]), jnp.array([-8.0]))
  out, _ = losses.dpo_loss(*args, beta=0.25, loss_type="ipo", chosen_lengths=jnp.array([2]),
                           rejected_lengths=jnp.array([4]))
  assert_close(out, [0.25])
  out, _ = losses.dpo_loss(*args, beta=0.1, loss_type="hinge")  # max(0, 1 - 0.1·6)
  assert_close(out, [0.4])
  out, _ = losses.dpo_loss(*args, beta=0.25, loss_type="sppo_hard")  # (4-2)² + (-2+2)²
  assert_close(out, [4.0])


def test_apo_zero_by_hand():
  # u_c = 0, u_r = 0: 1 - σ(0) + σ(0) = 1; apo_down: σ(0) + 1 - σ(0) = 1
  z = jnp.zeros((1,))
  for t in ("apo_zero", "apo_down"):
    out, _ = losses.dpo_loss(z, z, z, z, loss_type=t)
    assert_close(out, [1.0])


# ----------------------------------------------------------------------------------------------
# NumPy float64 references


# Every (type, smoothing) pair is its own test case so that none is left to the luck of sampling.
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("loss_type", losses.DPO_LOSS_TYPES)
@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=SEEDS, beta=st.sampled_from([0.05, 0.1, 0.5, 1.0]))
def test_every_loss_type_matches_numpy(loss_type, eps, seed, beta):
  pc, pr, rc, rr, n_c, n_r = _random_pairs(seed)
  got, _ = _call(pc, pr, rc, rr, n_c, n_r, beta=beta, loss_type=loss_type, label_smoothing=eps)
  want = dpo_reference(pc, pr, rc, rr, n_c, n_r, loss_type, beta, eps)
  assert_close(got, want)


@pytest.mark.parametrize("loss_type", ["sigmoid", "sppo_hard", "nca_pair", "ipo"])
@pytest.mark.parametrize("f_div,alpha", [("reverse_kl", 1.0), ("forward_kl", 1.0),
                                         ("js_divergence", 1.0), ("alpha_divergence", 0.5),
                                         ("alpha_divergence", 1.0)])
def test_f_divergences_match_numpy(loss_type, f_div, alpha):
  pc, pr, rc, rr, n_c, n_r = _random_pairs(7)
  got, _ = _call(pc, pr, rc, rr, n_c, n_r, beta=0.2, loss_type=loss_type, f_divergence=f_div,
                 alpha=alpha)
  want = dpo_reference(pc, pr, rc, rr, n_c, n_r, loss_type, 0.2, 0.0, f_div=f_div, alpha=alpha)
  assert_close(got, want)


def test_alpha_one_is_reverse_kl_and_js_matches_trl_softplus_form():
  pc, pr, rc, rr, n_c, n_r = _random_pairs(3)
  a, _ = _call(pc, pr, rc, rr, n_c, n_r, f_divergence="alpha_divergence", alpha=1.0)
  b, _ = _call(pc, pr, rc, rr, n_c, n_r)
  assert_close(a, b)
  # Older TRL wrote JS as logits = (u_c - u_r) - (softplus(u_c) - softplus(u_r)); same loss.
  u_c, u_r = pc - rc, pr - rr
  logits = (u_c - u_r) - (np.logaddexp(0, u_c) - np.logaddexp(0, u_r))
  js, _ = _call(pc, pr, rc, rr, n_c, n_r, f_divergence="js_divergence", beta=0.3)
  assert_close(js, -_logsig(0.3 * logits))


def test_loss_weights_combine_types():
  pc, pr, rc, rr, n_c, n_r = _random_pairs(11)
  combined, m = _call(pc, pr, rc, rr, n_c, n_r, loss_type=["sigmoid", "ipo", "bco_pair"],
                      loss_weights=[0.8, 0.5, 0.2])
  parts = [_call(pc, pr, rc, rr, n_c, n_r, loss_type=t)[0] for t in ("sigmoid", "ipo", "bco_pair")]
  assert_close(combined, 0.8 * parts[0] + 0.5 * parts[1] + 0.2 * parts[2])
  assert_close(m["loss/ipo"], np.mean(parts[1]))
  default_weights, _ = _call(pc, pr, rc, rr, n_c, n_r, loss_type=["sigmoid", "hinge"])
  assert_close(default_weights, parts[0] + _call(pc, pr, rc, rr, n_c, n_r, loss_type="hinge")[0])


def test_reference_free_equals_zero_reference():
  pc, pr, rc, rr, n_c, n_r = _random_pairs(5)
  for t in ("sigmoid", "ipo", "apo_zero", "aot"):
    free, m = losses.dpo_loss(
        jnp.asarray(pc, jnp.float32),
        jnp.asarray(pr, jnp.float32),
        None,
        None,
        loss_type=t,
        reference_free=True,
        chosen_lengths=n_c,
        rejected_lengths=n_r,
    )
    zero, _ = _call(pc, pr, 0 * rc, 0 * rr, n_c, n_r, loss_type=t)
    assert_close(free, zero)
  assert_close(m["rewards/chosen"], 0.1 * np.mean(pc))


@pytest.mark.parametrize("loss_type", losses.DPO_LOSS_TYPES)
@settings(max_examples=5, deadline=None, derandomize=True)
@given(seed=SEEDS)
def test_invariant_to_constant_added_to_policy_and_reference(loss_type, seed):
  pc, pr, rc, rr, n_c, n_r = _random_pairs(seed)
  shift = np.random.default_rng(seed + 1).uniform(-5, 5, B)  # one constant per example
  base, _ = _call(pc, pr, rc, rr, n_c, n_r, loss_type=loss_type, beta=0.3)
  moved, _ = _call(pc + shift, pr + shift, rc + shift, rr + shift, n_c, n_r, loss_type=loss_type,
                   beta=0.3)
  assert_close(moved, base, rtol=1e-4, atol=1e-4)  # float32 log-probs of size ~30 lose ~1e-6 each


# ----------------------------------------------------------------------------------------------
# gradients and jit


@pytest.mark.parametrize("loss_type", losses.DPO_LOSS_TYPES)
def test_grads_and_jit(loss_type):
  pc, pr, rc, rr, n_c, n_r = _random_pairs(13, batch=4)

  def total(pc_, pr_):
    out, _ = losses.dpo_loss(
        pc_,
        pr_,
        jnp.asarray(rc),
        jnp.asarray(rr),
        beta=0.2,
        loss_type=loss_type,
        label_smoothing=0.1,
        chosen_lengths=jnp.asarray(n_c),
        rejected_lengths=jnp.asarray(n_r),
    )
    return jnp.sum(out)

  check_grads_x64(total, (pc, pr))
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  check_jit_matches(
      losses.dpo_loss,
      f32(pc),
      f32(pr),
      f32(rc),
      f32(rr),
      beta=0.2,
      loss_type=loss_type,
      chosen_lengths=f32(n_c),
      rejected_lengths=f32(n_r),
  )


def test_grads_f_divergences():
  pc, pr, rc, rr, _, _ = _random_pairs(17, batch=4)
  for f_div in ("forward_kl", "js_divergence", "alpha_divergence"):

    def total(pc_, pr_, f_div=f_div):
      return jnp.sum(
          losses.dpo_loss(pc_, pr_, jnp.asarray(rc), jnp.asarray(rr), f_divergence=f_div,
                          alpha=0.5)[0])

    check_grads_x64(total, (pc, pr))


def test_validation_errors_name_the_field():
  x = jnp.zeros((2,))
  with pytest.raises(ValueError, match="loss_type='dpo'.*sigmoid"):
    losses.dpo_loss(x, x, x, x, loss_type="dpo")
  with pytest.raises(ValueError, match="needs chosen_lengths"):
    losses.dpo_loss(x, x, x, x, loss_type="ipo")
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.dpo_loss(x, x, x, x, label_smoothing=0.5)
  with pytest.raises(ValueError, match="f_divergence"):
    losses.dpo_loss(x, x, x, x, f_divergence="kl")
  with pytest.raises(ValueError, match="loss_weights"):
    losses.dpo_loss(x, x, x, x, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
  with pytest.raises(ValueError, match="reference_free"):
    losses.dpo_loss(x, x, None, None)


# ----------------------------------------------------------------------------------------------
# SimPO and ORPO


def simpo_reference(a_c, a_r, beta, gamma, eps):
  z = beta * (a_c - a_r) - gamma
  return -(1 - eps) * _logsig(z) - eps * _logsig(-z)


def orpo_reference(a_c, a_r, lam):
  log_odds = lambda a: a - np.log1p(-np.exp(a))  # noqa: E731
  return -a_c - lam * _logsig(log_odds(a_c) - log_odds(a_r))


def test_simpo_and_orpo_by_hand():
  # SimPO: β(a_c - a_r) - γ = 2·(−1 + 2) − 1 = 1 → log(1 + e^-1)
  out, m = losses.simpo_loss(jnp.array([-1.0]), jnp.array([-2.0]), beta=2.0, gamma=1.0)
  assert_close(out, [math.log1p(math.exp(-1.0))])
  assert_close(m["rewards/margins"], 2.0)
  # ORPO with P_c = P_r = 1/2: odds 1 each, log odds ratio 0 → -a_c + λ log 2
  a = math.log(0.5)
  out, m = losses.orpo_loss(jnp.array([a]), jnp.array([a]), lam=0.1)
  assert_close(out, [-a + 0.1 * math.log(2.0)])
  out, _ = losses.orpo_loss(jnp.array([a]), jnp.array([a]), lam=0.1, include_nll=False)
  assert_close(out, [0.1 * math.log(2.0)])


@SETTINGS
@given(seed=SEEDS, beta=st.sampled_from([1.0, 2.5, 10.0]), gamma=st.sampled_from([0.0, 0.5, 1.6]))
def test_simpo_orpo_match_numpy(seed, beta, gamma):
  rng = np.random.default_rng(seed)
  a_c, a_r = rng.uniform(-4.0, -0.01, B), rng.uniform(-4.0, -0.01, B)
  got, _ = losses.simpo_loss(a_c.astype(np.float32), a_r.astype(np.float32), beta=beta, gamma=gamma,
                             label_smoothing=0.1)
  assert_close(got, simpo_reference(a_c, a_r, beta, gamma, 0.1))
  got, _ = losses.orpo_loss(a_c.astype(np.float32), a_r.astype(np.float32), lam=beta / 10)
  assert_close(got, orpo_reference(a_c, a_r, beta / 10), rtol=2e-5)


def test_simpo_orpo_grads_and_jit():
  rng = np.random.default_rng(0)
  a_c, a_r = rng.uniform(-3.0, -0.05, 4), rng.uniform(-3.0, -0.05, 4)
  check_grads_x64(lambda c, r: jnp.sum(losses.simpo_loss(c, r, beta=2.0, gamma=0.5)[0]), (a_c, a_r))
  check_grads_x64(lambda c, r: jnp.sum(losses.orpo_loss(c, r, lam=0.1)[0]), (a_c, a_r))
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  check_jit_matches(losses.simpo_loss, f32(a_c), f32(a_r), beta=2.0, gamma=0.5)
  check_jit_matches(losses.orpo_loss, f32(a_c), f32(a_r), lam=0.1)


def test_orpo_finite_near_probability_one():
  out, _ = losses.orpo_loss(jnp.array([0.0, -1e-9]), jnp.array([-1.0, -1.0]), lam=0.1)
  grads = jax.grad(lambda c: jnp.sum(losses.orpo_loss(c, jnp.array([-1.0, -1.0]), lam=0.1)[0]))(
      jnp.array([0.0, -1e-9]))
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(grads))
