"""Hugging Face checkpoints: every supported family against transformers 5 on tiny random models.

Each model is built in the test with transformers' own config class, its parameters perturbed away
from the init (norm weights of 1 / 0 and zero biases would hide a (1 + w) or a transpose mix-up),
and saved with `save_pretrained` into a temporary folder, which `hf.load_pretrained` reads.
Checked per family: logits on a batch with a left- and a right-padded row (each row against
transformers run on that row alone), a greedy 16-token continuation against `generate`, export
back to transformers, a bit-exact round trip, and (for three families) loading onto a
(data=2, fsdp=2, tensor=2) mesh of simulated devices. The sliding-window families use a window of 4,
shorter than every test sequence.
"""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # test extra (setup.cfg [test]); a missing install should fail, not skip
import transformers

from rlhf_jax import parallel
from rlhf_jax.models import Transformer, abstract_variables, hf
from rlhf_jax.sampling import SamplingConfig, sample

V, D, L, N, K, F, CTX = 128, 32, 2, 4, 2, 48, 64
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16}
COMMON = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
              num_attention_heads=N, num_key_value_heads=K, max_position_embeddings=CTX)

FAMILIES = {
    "gpt2": lambda: transformers.
            GPT2Config(vocab_size=V, n_positions=CTX, n_embd=D, n_layer=L, n_head=N, n_inner=F,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    # llama3 rope scaling with original_max_position_embeddings below the test positions'
    # wavelengths, attention and MLP biases on, untied.
    "llama": lambda: transformers.
             LlamaConfig(**COMMON, rope_theta=500_000.0, rope_scaling=LLAMA3_ROPE, attention_bias=
                         True, mlp_bias=True, tie_word_embeddings=False),
    "mistral": lambda: transformers.MistralConfig(**COMMON, head_dim=16, sliding_window=4),
    # tied; the second layer slides (max_window_layers=1).
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True, use_sliding_window
                                              =True, sliding_window=4, max_window_layers=1),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=16),
    # soft caps small enough that tanh bends the tiny model's scores and logits.
    "gemma2": lambda: transformers.
              Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=
                           2.0, final_logit_softcapping=3.0, sliding_window=4),}


def _build(family: str, seed: int = 0):
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](),
                                                        attn_implementation="eager").eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.3 if ("norm" in name or "ln_" in name) else 0.1
      p.add_(scale * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """family -> (transformers model, checkpoint folder), built once per module."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for family in FAMILIES:
    model = _build(family)
    path = str(root / family)
    model.save_pretrained(path)
    out[family] = (model, path)
  return out


def _hf_logits(model, tokens_T):
  with torch.no_grad():
    return model(input_ids=torch.tensor(np.asarray(tokens_T)[None])).logits[0].numpy()


def _padded_batch(rng, t=12):
  """Row 0 full, row 1 left-padded by 3, row 2 right-padded by 4 (padding ids are random)."""
  tokens = rng.integers(0, V, size=(3, t))
  mask = np.ones_like(tokens)
  mask[1, :3] = 0
  mask[2, -4:] = 0
  return tokens, mask


def _assert_close(ours, ref, what):
  scale = np.abs(ref).max()
  assert scale > 0.5, f"{what}: degenerate comparison (logit scale {scale})"
  err = np.abs(ours - ref).max()
  assert err <= 1e-4 * scale, f"{what}: max |dlogit| {err} vs scale {scale}"


def _check_rows(config, params, model, family):
  tokens, mask = _padded_batch(np.random.default_rng(0))
  ours = np.asarray(
      Transformer(config).apply({"params": params}, jnp.asarray(tokens),
                                jnp.asarray(mask)).logits_BxTxV, np.float32)
  for b in range(tokens.shape[0]):
    real = mask[b].astype(bool)
    _assert_close(ours[b][real], _hf_logits(model, tokens[b][real]), f"{family} row {b}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(checkpoints, family):
  model, path = checkpoints[family]
  config, params = hf.load_pretrained(path)
  assert config.param_dtype == "float32" and config.dtype == "float32"
  _check_rows(config, params, model, family)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_continuation_matches_generate(checkpoints, family):
  model, path = checkpoints[family]
  config, params = hf.load_pretrained(path)
  rng = np.random.default_rng(1)
  prompts = rng.integers(3, V, size=(2, 6))
  mask = np.ones_like(prompts)
  mask[0, :2] = 0  # row 0: 4 real tokens, left-padded
  new = 16
  out = sample(Transformer(config), params, jnp.asarray(prompts), jnp.asarray(mask),
               jax.random.key(0), SamplingConfig(max_new_tokens=new, greedy=True))
  for b in range(2):
    row = prompts[b][mask[b].astype(bool)]
    with torch.no_grad():
      ref = model.generate(input_ids=torch.tensor(row[None]), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0,
                           eos_token_id=None).numpy()[0, len(row):]
    np.testing.assert_array_equal(np.asarray(out.response_tokens_BxR[b]), ref,
                                  err_msg=f"{family} row {b}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_pretrained_loads_in_transformers_and_round_trips(checkpoints, family, tmp_path):
  model, path = checkpoints[family]
  config, params = hf.load_pretrained(path)
  out = str(tmp_path / "export")
  # A shard limit below one layer's size: several shards and an index.
  hf.save_pretrained(out, config, params, dtype="float32", max_shard_size=20_000)
  assert os.path.isfile(os.path.join(out, hf.INDEX_FILE))
  back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  tokens = np.random.default_rng(2).integers(0, V, size=10)
  np.testing.assert_array_equal(_hf_logits(back, tokens), _hf_logits(model, tokens))
  config2, params2 = hf.load_pretrained(out)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_save_bfloat16_single_file_with_tokenizer(checkpoints, tmp_path):
  model, path = checkpoints["llama"]
  config, params = hf.load_pretrained(path)
  tok_dir = tmp_path / "tok"
  tok_dir.mkdir()
  (tok_dir / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
  out = str(tmp_path / "bf16")
  hf.save_pretrained(out, config, params, tokenizer=str(tok_dir))
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer_config.json"]
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  from safetensors import safe_open
  with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
    assert f.metadata() == {"format": "pt"}
  config_bf16, params_bf16 = hf.load_pretrained(out)
  assert config_bf16.param_dtype == "bfloat16"
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = np.random.default_rng(3).integers(0, V, size=8)
  ref = _hf_logits(model, tokens)
  assert np.abs(_hf_logits(back, tokens) - ref).max() < 0.05 * np.abs(ref).max()
  # bf16 -> bf16 is exact: the re-export holds the same bits.
  out2 = str(tmp_path / "bf16_again")
  hf.save_pretrained(out2, config_bf16, params_bf16)
  with open(os.path.join(out, "model.safetensors"), "rb") as a, \
      open(os.path.join(out2, "model.safetensors"), "rb") as b:
    assert a.read() == b.read()


def test_float16_checkpoint_from_transformers_loads_as_float16(checkpoints, tmp_path):
  """Stored F16 (transformers' own half-precision save): read as float16, each weight the f32
  checkpoint's rounded to f16 (the layout changes are exact); param_dtype="float32" upcasts."""
  model, path = checkpoints["llama"]
  half = str(tmp_path / "f16")
  copy.deepcopy(model).to(torch.float16).save_pretrained(half)  # the fixture's model is shared
  from safetensors import safe_open
  with safe_open(os.path.join(half, "model.safetensors"), framework="numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
  config16, params16 = hf.load_pretrained(half)
  assert config16.param_dtype == "float16" and config16.dtype == "float16"
  config32, params32 = hf.load_pretrained(path)
  assert config16.replace(param_dtype="float32", dtype="float32") == config32
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a,
                                                          np.asarray(b).astype(np.float16)),
               params16, params32)
  assert {str(x.dtype) for x in jax.tree.leaves(params16)} == {"float16"}
  _, params_up = hf.load_pretrained(half, param_dtype="float32")
  assert {str(x.dtype) for x in jax.tree.leaves(params_up)} == {"float32"}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a,
                                                          np.asarray(b).astype(np.float32)),
               params_up, params16)


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
def test_scan_layers_tree_gives_the_same_logits(checkpoints, family):
  """Mixed sliding / full layers inside nn.scan (a scanned per-layer flag)."""
  model, path = checkpoints[family]
  config, params = hf.load_pretrained(path, scan_layers=True)
  assert config.scan_layers and params["layers"]["attn"]["q_kernel"].shape == (
      L, D, N, 16 if family == "gemma2" else D // N)
  _check_rows(config, params, model, family)
  # The scanned stack's KV-cache decode (stacked cache, per-layer window flag) equals the
  # unrolled one's.
  config_u, params_u = hf.load_pretrained(path)
  prompts = np.random.default_rng(4).integers(3, V, size=(2, 6))
  mask = np.ones_like(prompts)
  mask[1, :3] = 0
  run = lambda c, p: np.asarray(
      sample(Transformer(c), p, jnp.asarray(prompts), jnp.asarray(mask), jax.random.key(0),
             SamplingConfig(max_new_tokens=12, greedy=True)).response_tokens_BxR)
  np.testing.assert_array_equal(run(config, params), run(config_u, params_u))


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_load_onto_simulated_mesh(checkpoints, family):
  model, path = checkpoints[family]
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))
  config, params = hf.load_pretrained(path, mesh=mesh)
  want = parallel.logical_shardings(abstract_variables(Transformer(config)), mesh)["params"]
  flat_want = jax.tree_util.tree_leaves_with_path(want, is_leaf=lambda x: hasattr(x, "spec"))
  flat_got = dict(jax.tree_util.tree_leaves_with_path(params))
  sharded = 0
  for path_, sharding in flat_want:
    got = flat_got[path_]
    assert got.sharding.is_equivalent_to(sharding, got.ndim), path_
    sharded += any(a is not None for a in sharding.spec)
  assert sharded >= 6  # a real test of placement, not a replicated tree
  _check_rows(config, params, model, family)


def test_old_top_level_rope_keys_equal_rope_parameters(checkpoints):
  _, path = checkpoints["llama"]
  new = hf.read_config(path)
  old = dict(new)
  rope = dict(old.pop("rope_parameters"))
  old["rope_theta"] = rope.pop("rope_theta")
  old["rope_scaling"] = rope  # hub Llama 3.1 style
  assert hf.config_from_hf(old) == hf.config_from_hf(new)
  assert hf.config_from_hf(new).rope_scaling == "llama3"


def test_config_round_trip_through_config_to_hf():
  for family, make in FAMILIES.items():
    config = hf.config_from_hf(make().to_dict() | {"architectures": None})
    assert hf.config_from_hf(hf.config_to_hf(config)) == config, family


# ---- bad input: each a clear error naming file / tensor / key ----


def _copy(checkpoints, family, tmp_path):
  dst = str(tmp_path / family)
  shutil.copytree(checkpoints[family][1], dst)
  return dst


def _edit_config(path, **changes):
  with open(os.path.join(path, "config.json")) as f:
    d = json.load(f)
  d.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(d, f)


def test_unsupported_architecture_lists_the_supported(checkpoints, tmp_path):
  path = _copy(checkpoints, "llama", tmp_path)
  _edit_config(path, architectures=["PhiForCausalLM"], model_type="phi")
  with pytest.raises(
      hf.HFConfigError, match=r"'PhiForCausalLM' is not supported.*"
      r"LlamaForCausalLM.*Gemma2ForCausalLM"):
    hf.load_pretrained(path)


@pytest.mark.parametrize("changes, pattern", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
     }, r"rope_parameters.rope_type'='yarn' is not supported"),
    ({"quantization_config": {"quant_method": "gptq"}}, r"key 'quantization_config'"),
    ({"hidden_act": "relu"}, r"key 'hidden_act'='relu' is not supported"),])
def test_unsupported_option_names_the_key(checkpoints, tmp_path, changes, pattern):
  path = _copy(checkpoints, "llama", tmp_path)
  _edit_config(path, **changes)
  with pytest.raises(hf.HFConfigError, match=pattern) as err:
    hf.load_pretrained(path)
  assert "config.json" in str(err.value)


def _sharded_copy(checkpoints, tmp_path):
  config, params = hf.load_pretrained(checkpoints["llama"][1])
  path = str(tmp_path / "sharded")
  hf.save_pretrained(path, config, params, dtype="float32", max_shard_size=20_000)
  return path


def test_missing_shard(checkpoints, tmp_path):
  path = _sharded_copy(checkpoints, tmp_path)
  with open(os.path.join(path, hf.INDEX_FILE)) as f:
    second = sorted(set(json.load(f)["weight_map"].values()))[1]
  os.remove(os.path.join(path, second))
  with pytest.raises(hf.HFCheckpointError, match=rf"{second}: missing shard"):
    hf.load_pretrained(path)


def test_truncated_shard(checkpoints, tmp_path):
  path = _copy(checkpoints, "llama", tmp_path)
  file = os.path.join(path, "model.safetensors")
  size = os.path.getsize(file)
  with open(file, "r+b") as f:
    f.truncate(size - 100)
  with pytest.raises(hf.HFCheckpointError, match=r"model.safetensors: truncated safetensors"):
    hf.load_pretrained(path)


def test_shape_disagreeing_with_config(checkpoints, tmp_path):
  path = _copy(checkpoints, "llama", tmp_path)
  _edit_config(path, intermediate_size=F + 8)
  with pytest.raises(
      hf.HFCheckpointError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' "
      r"has shape \[32, 48\] but config.json .* implies \[32, 56\]"):
    hf.load_pretrained(path)


def test_missing_and_unexpected_weights(checkpoints, tmp_path):
  from safetensors.numpy import load_file, save_file
  path = _copy(checkpoints, "llama", tmp_path)
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  del tensors["model.layers.1.self_attn.k_proj.weight"]
  save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(hf.HFCheckpointError, match=r"weight 'model.layers.1.self_attn.k_proj."
                     r"weight' missing"):
    hf.load_pretrained(path)
  path = _copy(checkpoints, "qwen3", tmp_path)  # the same weights read as Llama: q/k norms left
  _edit_config(path, architectures=["LlamaForCausalLM"], model_type="llama",
               use_sliding_window=None, sliding_window=None, max_window_layers=None,
               layer_types=None)
  with pytest.raises(hf.HFCheckpointError, match=r"unexpected weight 'model.layers.0.self_attn."
                     r"k_norm.weight'"):
    hf.load_pretrained(path)


def test_no_safetensors(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(FAMILIES["llama"]().to_dict()))
  with pytest.raises(hf.HFCheckpointError, match=r"no model.safetensors or "
                     r"model.safetensors.index.json"):
    hf.load_pretrained(str(tmp_path))


# ---- the logit checker CLI ----


def test_check_cli_passes_on_a_faithful_load(checkpoints, capsys):
  from rlhf_jax.models.hf import cli
  assert cli.main(["check", f"--path={checkpoints['gemma2'][1]}", "--num_prompts=2"]) == 0
  out = capsys.readouterr().out
  assert "max|dlogit|" in out and "KL" in out and out.strip().splitlines()[-1].startswith("OK")


def test_check_cli_fails_past_the_tolerance(checkpoints, capsys, monkeypatch):
  """A load that gets one norm wrong (the (1 + w) mix-up) must exit 1."""
  from rlhf_jax.models.hf import cli
  real = cli.load_for_check

  def wrong(path, dtype):
    config, params = real(path, dtype)
    params["final_norm"]["scale"] = params["final_norm"]["scale"] + 1.0
    return config, params

  monkeypatch.setattr(cli, "load_for_check", wrong)
  assert cli.main(["check", f"--path={checkpoints['gemma'][1]}", "--num_prompts=1"]) == 1
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith("FAIL")


@pytest.mark.slow
def test_check_command_exits_1_past_the_tolerance(checkpoints):
  """`python -m rlhf_jax.models.hf check` as a process: its exit status is the verdict (a KL
  tolerance below 0 cannot be met, so a faithful checkpoint fails)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  res = subprocess.run([
      sys.executable, "-m", "rlhf_jax.models.hf", "check", f"--path={checkpoints['qwen3'][1]}",
      "--num_prompts=1", "--length=8", "--kl_tolerance=-1"], capture_output=True, text=True,
                       env=env, cwd=repo, timeout=300)
  assert res.returncode == 1, res.stdout + res.stderr
  last = res.stdout.strip().splitlines()[-1]
  assert last.startswith("FAIL") and "(tolerance -1)" in last, res.stdout
