"""Meshes, rules, sharded init and batch placement on 8 simulated CPU devices (see conftest.py).

The decisive test runs the real ``tiny`` Transformer on a (data=2, fsdp=2, tensor=2) mesh and checks
that logits and gradients equal the single-device ones, and that each parameter carries the
PartitionSpec the rules table promises.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import parallel
from rlhf_jax.models import Transformer, get_model_config

BATCH = ("data", "fsdp")

# --------------------------------------------------------------------------- MeshConfig / make_mesh


@pytest.mark.parametrize("kwargs, field", [
    (dict(data=-1, fsdp=-1), "fsdp=-1"),
    (dict(tensor=0), "MeshConfig.tensor"),
    (dict(fsdp=-2), "MeshConfig.fsdp"),
    (dict(data=2.0), "MeshConfig.data"),
    (dict(tensor=True), "MeshConfig.tensor"),])
def test_mesh_config_rejects_bad_fields(kwargs, field):
  with pytest.raises((ValueError, TypeError), match=field):
    parallel.MeshConfig(**kwargs)


def test_mesh_config_resolve():
  assert parallel.MeshConfig().resolve(8) == (8, 1, 1)
  assert parallel.MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
  with pytest.raises(ValueError, match=r"uses 4 devices but 8 are available"):
    parallel.MeshConfig(data=2, fsdp=2, tensor=1).resolve(8)
  with pytest.raises(ValueError, match=r"MeshConfig.data=-1 cannot be resolved"):
    parallel.MeshConfig(data=-1, tensor=3).resolve(8)


def test_make_mesh_axes_and_sizes():
  assert jax.device_count() == 8, "conftest.py should provide 8 simulated CPU devices"
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(parallel.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  sub = parallel.make_mesh(parallel.MeshConfig(tensor=2), devices=jax.devices()[:4])
  assert dict(sub.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
  assert set(sub.devices.flat) == set(jax.devices()[:4])


# --------------------------------------------------------------------------- rules


def test_default_rules_cover_the_contract_axes():
  table = parallel.validate_rules(parallel.DEFAULT_RULES)
  assert set(table) == set(parallel.PARAM_AXES) | set(parallel.ACTIVATION_AXES)
  assert table["embed"] == "fsdp"
  assert table["activation_batch"] == BATCH
  assert {table[a] for a in ("vocab", "mlp", "heads", "kv_heads")} == {"tensor"}


def test_rules_collision_is_an_error():
  # Sharding embed over "tensor" as well as mlp makes an MLP kernel use "tensor" twice.
  rules = tuple((k, "tensor" if k == "embed" else v) for k, v in parallel.DEFAULT_RULES)
  with pytest.raises(
      ValueError, match=r"'embed' \(dim 0\) and 'mlp' \(dim 1\) both map to mesh "
      r"axis 'tensor'"):
    parallel.logical_to_spec(("embed", "mlp"), rules)
  # A tuple rule overlapping a single-axis rule collides too.
  with pytest.raises(ValueError, match=r"mesh axis 'fsdp'"):
    parallel.logical_to_spec(("activation_batch", "embed"))
  assert parallel.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert parallel.logical_to_spec(
      ("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "tensor", None)


def test_unknown_logical_axis_lists_the_known_ones():
  with pytest.raises(
      ValueError, match=r"'hiddn' \(dim 1\) has no rule; known logical axes: "
      r"\[.*'embed'.*\]"):
    parallel.logical_to_spec(("embed", "hiddn"))


@pytest.mark.parametrize("rules, message", [
    ((("embed", "fsdp"), ("embed", None)), "appears more than once"),
    ((("embed", "model"),), r"unknown mesh axes \['model'\]"),
    ((("embed", ("fsdp", "fsdp")),), "mesh axis repeated"),
    ({"embed": "fsdp"}, "must be a tuple"),])
def test_validate_rules_errors(rules, message):
  with pytest.raises((ValueError, TypeError), match=message):
    parallel.validate_rules(rules)


# --------------------------------------------------------------------------- sharded init (own module)


class _TwoLayer(nn.Module):
  """A minimal logically-annotated module: x -> relu(x W_in) W_out + b."""

  hidden_axis: str = "mlp"

  @nn.compact
  def __call__(self, x_BxD):
    init = nn.initializers.normal(0.1)
    w_in = self.param("w_in", nn.with_logical_partitioning(init, ("embed", self.hidden_axis)),
                      (8, 16))
    w_out = self.param("w_out", nn.with_logical_partitioning(init, (self.hidden_axis, "embed")),
                       (16, 8))
    b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (8,))
    h_BxF = nn.with_logical_constraint(jax.nn.relu(x_BxD @ w_in),
                                       ("activation_batch", "activation_mlp"))
    return h_BxF @ w_out + b


@pytest.fixture(scope="module")
def mesh222():
  return parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))


def test_create_sharded_train_state(mesh222):
  """Params *and* AdamW moments come out sharded per the rules; the step counter is replicated."""
  module, tx = _TwoLayer(), optax.adamw(1e-3)
  x = jnp.ones((4, 8))

  def init_state(rng):
    params = module.init(rng, x)["params"]
    return {"params": params, "opt_state": tx.init(params)}

  state = parallel.create_sharded(init_state, mesh222, args=(jax.random.key(0),))
  assert not any(
      isinstance(l, nn.LogicallyPartitioned)
      for l in jax.tree.leaves(state, is_leaf=lambda l: isinstance(l, nn.LogicallyPartitioned)))
  specs = jax.tree.map(lambda a: a.sharding.spec, state)
  assert specs["params"] == {
      "w_in": P("fsdp", "tensor"), "w_out": P("tensor", "fsdp"), "b": P("fsdp")}
  adam = state["opt_state"][0]
  assert adam.mu["w_in"].sharding.spec == P("fsdp", "tensor")
  assert adam.nu["w_out"].sharding.spec == P("tensor", "fsdp")
  assert adam.count.sharding.spec == P()
  # Each device holds one shard: 8x16 over fsdp=2, tensor=2 -> 4x8.
  assert state["params"]["w_in"].addressable_shards[0].data.shape == (4, 8)
  expected = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), x))["params"]
  np.testing.assert_allclose(np.asarray(state["params"]["w_in"]), np.asarray(expected["w_in"]),
                             rtol=1e-6, atol=1e-7)


def test_create_sharded_reports_collisions_and_unknown_names_with_path(mesh222):
  x = jnp.ones((4, 8))
  rules = tuple((k, "tensor" if k == "embed" else v) for k, v in parallel.DEFAULT_RULES)
  with pytest.raises(ValueError, match=r"param params/w_in: logical axes 'embed'"):
    parallel.create_sharded(functools.partial(_TwoLayer().init, jax.random.key(0), x), mesh222,
                            rules)
  with pytest.raises(ValueError, match=r"param params/w_in: logical axis 'ffn' .* no rule"):
    parallel.create_sharded(
        functools.partial(_TwoLayer(hidden_axis="ffn").init, jax.random.key(0), x), mesh222)


def test_use_mesh_activates_activation_constraints(mesh222):
  constrain = jax.jit(lambda x: nn.with_logical_constraint(x,
                                                           ("activation_batch", "activation_mlp")))
  x = jnp.ones((8, 16))
  with parallel.use_mesh(mesh222):
    y = constrain(x)
  assert y.sharding.spec == P(BATCH, "tensor")
  # Outside the context the constraint is a no-op: x stays on one device.
  assert len(constrain(x).sharding.device_set) == 1


def test_shard_batch(mesh222):
  tokens = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
  batch = parallel.shard_batch({"tokens": tokens, "lengths": np.arange(8)}, mesh222)
  assert parallel.data_sharding(mesh222).spec == P(BATCH)
  assert batch["tokens"].sharding.spec == P(BATCH)
  assert batch["tokens"].addressable_shards[0].data.shape == (2, 5)  # 8 rows / (data*fsdp=4)
  np.testing.assert_array_equal(np.asarray(batch["tokens"]), tokens)
  with pytest.raises(ValueError, match=r"batch leaf tokens: dim 0 .* 6 is not divisible by 4"):
    parallel.shard_batch({"tokens": tokens[:6]}, mesh222)


# --------------------------------------------------------------------------- the real model

SEQ = 16


@pytest.fixture(scope="module")
def tiny_model():
  # vocab 259 (the byte tokenizer) cannot be split over tensor=2; 260 can (see next test).
  return Transformer(get_model_config("tiny", vocab_size=260))


def test_indivisible_vocab_is_reported(mesh222):
  model = Transformer(get_model_config("tiny"))  # vocab_size=259
  tokens = jnp.zeros((8, SEQ), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
  with pytest.raises(
      ValueError, match=r"param params/embedding: dim 0 of shape \(259, 64\) is "
      r"sharded 2 ways"):
    parallel.logical_shardings(abstract, mesh222)


def test_scanned_layers_get_a_leading_replicated_axis(mesh222):
  model = Transformer(get_model_config("tiny", vocab_size=260, scan_layers=True))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((8, SEQ), jnp.int32))
  specs = jax.tree.map(lambda s: s.spec, parallel.logical_shardings(abstract, mesh222))
  layers = specs["params"]["layers"]
  assert layers["attn"]["q_kernel"] == P(None, "fsdp", "tensor", None)
  assert layers["mlp"]["down_kernel"] == P(None, "tensor", "fsdp")


def test_model_activation_constraints_are_emitted_under_use_mesh(mesh222, tiny_model):
  """Lowering only (no compile): the model's logical constraints reach the program as Shardy
    constraints on the mesh axes the rules name, and vanish outside ``use_mesh``."""
  tokens = jnp.zeros((8, SEQ), jnp.int32)
  abstract = jax.eval_shape(tiny_model.init, jax.random.key(0), tokens)
  forward = jax.jit(lambda p, t: tiny_model.apply(p, t).logits_BxTxV)
  with parallel.use_mesh(mesh222):
    text = forward.lower(abstract, tokens).as_text()
  constraints = [l for l in text.splitlines() if "sdy.sharding_constraint" in l]
  assert any('[{"data", "fsdp"}, {}, {"tensor"}]> : tensor<8x16x260xf32>' in l
             for l in constraints), "logits constraint (batch, length, vocab) missing"
  assert any('[{"data", "fsdp"}, {}, {"tensor"}]> : tensor<8x16x128xf32>' in l
             for l in constraints), "MLP hidden constraint (batch, length, mlp) missing"
  assert "sdy.sharding_constraint" not in forward.lower(abstract, tokens).as_text()


def test_tiny_transformer_sharded_matches_single_device(mesh222, tiny_model):
  model = tiny_model
  rng = jax.random.key(0)
  tokens_np = np.asarray(jax.random.randint(jax.random.key(1), (8, SEQ), 0, 260), np.int32)
  mask_np = np.ones((8, SEQ), np.int32)
  mask_np[0, 11:] = 0  # right padding
  mask_np[3, :5] = 0  # left padding

  params = parallel.create_sharded(
      functools.partial(model.init, rng, jnp.asarray(tokens_np), jnp.asarray(mask_np)), mesh222)
  p = params["params"]
  assert p["embedding"].sharding.spec == P("tensor", "fsdp")  # (vocab, embed)
  assert p["layers_0"]["attn"]["q_kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert p["layers_0"]["attn"]["k_kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert p["layers_0"]["attn"]["o_kernel"].sharding.spec == P("tensor", None, "fsdp")
  assert p["layers_1"]["mlp"]["up_kernel"].sharding.spec == P("fsdp", "tensor")
  assert p["layers_1"]["mlp"]["down_kernel"].sharding.spec == P("tensor", "fsdp")
  assert p["final_norm"]["scale"].sharding.spec == P("fsdp")
  assert p["embedding"].addressable_shards[0].data.shape == (130, 32)

  def loss_fn(params, tokens, mask):
    logits = model.apply(params, tokens, mask).logits_BxTxV.astype(jnp.float32)
    # A loss that touches every logit so every parameter gets a gradient.
    return jnp.mean(jnp.square(logits) * mask[:, :, None]), logits

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  # Single device: the same parameter values, gathered to the host.
  host_params = jax.device_get(params)
  (loss_1, logits_1), grads_1 = grad_fn(host_params, tokens_np, mask_np)

  # Sharded: a train step pins its output shardings (gradients like their params) rather than
  # leaving them to GSPMD, which would e.g. return up_kernel's gradient as P(None, 'tensor').
  param_shardings = jax.tree.map(lambda a: a.sharding, params)
  logits_sharding = jax.sharding.NamedSharding(mesh222, P(BATCH, None, "tensor"))
  replicated = jax.sharding.NamedSharding(mesh222, P())
  grad_fn_8 = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                      out_shardings=((replicated, logits_sharding), param_shardings))
  batch = parallel.shard_batch({"tokens": tokens_np, "mask": mask_np}, mesh222)
  with parallel.use_mesh(mesh222):
    (loss_8, logits_8), grads_8 = grad_fn_8(params, batch["tokens"], batch["mask"])

  assert logits_8.sharding.spec == P(BATCH, None, "tensor")
  assert grads_8["params"]["layers_0"]["mlp"]["up_kernel"].sharding.spec == P("fsdp", "tensor")
  np.testing.assert_allclose(np.asarray(logits_8), np.asarray(logits_1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(loss_8), float(loss_1), rtol=1e-5)
  flat_1 = jax.tree_util.tree_flatten_with_path(grads_1)[0]
  flat_8 = jax.tree.leaves(grads_8)
  for (path, g1), g8 in zip(flat_1, flat_8):
    scale = float(np.max(np.abs(g1)))
    assert scale > 0, f"zero gradient for {jax.tree_util.keystr(path)}"
    np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-5, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
