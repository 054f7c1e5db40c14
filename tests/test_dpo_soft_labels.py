"""DPO with soft labels (``preference_prob``, e.g. RLAIF's AI labels): per-pair target
q = (1-ε) p + ε (1-p), i.e. label smoothing ε_b = 1 - p_b (``losses.dpo_loss`` docstring)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from rlhf_jax.algorithms.offline import dpo as dpo_lib


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _inputs(n=6, seed=0):
  rng = np.random.default_rng(seed)
  pc, pr, rc, rr = (jnp.asarray(rng.normal(-20.0, 4.0, n), jnp.float32) for _ in range(4))
  lens = jnp.asarray(rng.integers(3, 30, (2, n)), jnp.float32)
  p = jnp.asarray(rng.uniform(0.0, 1.0, n), jnp.float32)
  return pc, pr, rc, rr, lens[0], lens[1], p


def test_hand_computed_value():
  # u_c = 1, u_r = -1, Δ = 2, βΔ = 0.2, p = 0.8:
  #   -0.8 log σ(0.2) - 0.2 log σ(-0.2) = 0.8 · 0.598139 + 0.2 · 0.798139 = 0.638139
  loss_B, _ = losses.dpo_loss(jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]),
                              jnp.array([-2.0]), beta=0.1, preference_prob=jnp.array([0.8]))
  expected = 0.8 * math.log1p(math.exp(-0.2)) + 0.2 * math.log1p(math.exp(0.2))
  assert abs(expected - 0.638139) < 1e-6
  np.testing.assert_allclose(np.asarray(loss_B), [expected], rtol=1e-6)
  # p = 1/2: the pair carries no preference, the loss is minimal at Δ = 0
  half_B, _ = losses.dpo_loss(jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]),
                              jnp.array([-2.0]), beta=0.1, preference_prob=jnp.array([0.5]))
  np.testing.assert_allclose(np.asarray(half_B), [0.5 * (-_log_sigmoid(0.2) - _log_sigmoid(-0.2))],
                             rtol=1e-6)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1),
                                           ("sigmoid_norm", 0.0), ("ipo", 0.0)])
def test_p_one_is_the_hard_loss_bit_for_bit(loss_type, eps):
  pc, pr, rc, rr, nc, nr, _ = _inputs()
  ones = jnp.ones_like(pc)

  def total(pc, pr, prob):
    loss_B, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=eps,
                                chosen_lengths=nc, rejected_lengths=nr, preference_prob=prob)
    return jnp.sum(loss_B), loss_B

  grad = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True), static_argnums=())
  (_, hard_B), hard_g = jax.jit(
      jax.value_and_grad(lambda a, b: total(a, b, None), argnums=(0, 1), has_aux=True))(pc, pr)
  (_, soft_B), soft_g = grad(pc, pr, ones)
  np.testing.assert_array_equal(np.asarray(soft_B), np.asarray(hard_B))
  for h, s in zip(hard_g, soft_g):
    np.testing.assert_array_equal(np.asarray(s), np.asarray(h))


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2),
                                           ("sigmoid_norm", 0.0), ("ipo", 0.0)])
def test_matches_numpy_reference(loss_type, eps):
  pc, pr, rc, rr, nc, nr, p = _inputs(seed=1)
  beta = 0.3
  loss_B, _ = losses.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps,
                              chosen_lengths=nc, rejected_lengths=nr, preference_prob=p)
  pc, pr, rc, rr, nc, nr, p = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr, nc, nr, p))
  if loss_type == "ipo":
    h = (pc - rc) / nc - (pr - rr) / nr
    ref = (h - (2 * p - 1) / (2 * beta))**2
  else:
    z = beta * ((pc - rc) - (pr - rr)) if loss_type == "sigmoid" else beta * ((pc - rc) / nc -
                                                                              (pr - rr) / nr)
    q = (1 - eps) * p + eps * (1 - p)
    ref = -q * _log_sigmoid(z) - (1 - q) * _log_sigmoid(-z)
  np.testing.assert_allclose(np.asarray(loss_B), ref, rtol=2e-5, atol=2e-6)


def test_gradient_is_sigmoid_minus_target():
  # dℓ/dπ_c = β (σ(βΔ) - q) for the sigmoid loss with soft target q
  pc, pr, rc, rr, _, _, p = _inputs(seed=2)
  beta, eps = 0.2, 0.05

  def total(pc):
    return jnp.sum(
        losses.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps, preference_prob=p)[0])

  g = np.asarray(jax.grad(total)(pc), np.float64)
  z = beta * np.asarray((pc - rc) - (pr - rr), np.float64)
  q = (1 - eps) * np.asarray(p, np.float64) + eps * (1 - np.asarray(p, np.float64))
  np.testing.assert_allclose(g, beta * (1 / (1 + np.exp(-z)) - q), rtol=1e-4, atol=1e-7)


def test_hard_only_losses_refuse_soft_labels():
  pc = jnp.zeros(2)
  with pytest.raises(ValueError, match=r"preference_prob .*\['hinge'\] take hard labels only"):
    losses.dpo_loss(pc, pc, pc, pc, loss_type="hinge", preference_prob=jnp.ones(2))
  with pytest.raises(ValueError, match="soft_labels=True with method='simpo'"):
    dpo_lib.DPOLossConfig(method="simpo", soft_labels=True)
  with pytest.raises(ValueError, match="soft_labels=True .*loss_type='robust'"):
    dpo_lib.DPOLossConfig(loss_type="robust", soft_labels=True)


def test_pair_loss_reads_the_batch_prob_only_when_on():
  pc, pr, rc, rr, nc, nr, p = _inputs(seed=3)
  hard = dpo_lib.DPOLossConfig()
  soft = dpo_lib.DPOLossConfig(soft_labels=True)
  h_B, _ = dpo_lib.pair_loss(hard, pc, pr, nc, nr, rc, rr, preference_prob_B=p)
  s_B, _ = dpo_lib.pair_loss(soft, pc, pr, nc, nr, rc, rr, preference_prob_B=p)
  ref_B, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.1)
  np.testing.assert_array_equal(np.asarray(h_B), np.asarray(ref_B))
  assert not np.allclose(np.asarray(s_B), np.asarray(h_B))
  # the fingerprint records soft_labels only when on (older runs still resume)
  assert "soft_labels" not in dpo_lib._fingerprint(hard)
  assert dpo_lib._fingerprint(soft)["soft_labels"] is True


def test_soft_label_is_trls_conservative_dpo_with_per_pair_smoothing():
  """The peer: TRL's ``loss_type="sigmoid"`` with ``label_smoothing=ε`` (cDPO) is
  −(1−ε) log σ(βΔ) − ε log σ(−βΔ); a soft label p with no global smoothing is that loss with
  ε = 1 − p, pair by pair (TRL's formula restated per pair in float64)."""
  pc, pr, rc, rr, _, _, p = _inputs(n=8, seed=3)
  beta = 0.3
  soft_B, _ = losses.dpo_loss(pc, pr, rc, rr, beta=beta, preference_prob=p)
  d = beta * ((np.float64(pc) - np.float64(rc)) - (np.float64(pr) - np.float64(rr)))
  trl = [-(1 - e) * _log_sigmoid(x) - e * _log_sigmoid(-x) for x, e in zip(d, 1 - np.float64(p))]
  np.testing.assert_allclose(np.asarray(soft_B), trl, rtol=1e-5)
  for b in range(2):  # and equal to this project's own (TRL-checked) label_smoothing path
    one_B, _ = losses.dpo_loss(pc[b:b + 1], pr[b:b + 1], rc[b:b + 1], rr[b:b + 1], beta=beta,
                               label_smoothing=float(1 - p[b]))
    np.testing.assert_allclose(np.asarray(one_B), np.asarray(soft_B[b:b + 1]), rtol=1e-5)
