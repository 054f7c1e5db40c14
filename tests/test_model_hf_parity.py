"""Our `gpt2` / `llama_1b` presets are exactly Hugging Face's architectures, and the GPT-2 path
through `rlhf_jax.models.hf` (the converter that lived here moved into the package).

The presets are compared field by field with what `hf.config_from_hf` makes of transformers' own
config for the real checkpoints' shapes; a small-width GPT-2 is then loaded through
`hf.load_pretrained` and compared with `transformers.GPT2LMHeadModel` on a left-padded batch
(transformers given the same mask and positions) and token for token against `generate`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch  # test extra (setup.cfg [test]); a missing install should fail, not skip
import transformers

from rlhf_jax.models import Transformer, get_model_config, hf
from rlhf_jax.sampling import SamplingConfig, sample

D, N, L, V, CTX = 64, 4, 2, 101, 32


def test_gpt2_preset_is_hugging_face_gpt2():
  ours = hf.config_from_hf(transformers.GPT2Config().to_dict() |
                           {"architectures": ["GPT2LMHeadModel"]})
  assert ours == get_model_config("gpt2")


def test_llama_1b_preset_has_llama_3_2_1b_shapes():
  # Llama-3.2-1B's config.json shapes (the preset leaves out its llama3 rope scaling on purpose:
  # it is a benchmark shape, see config.py).
  cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                 num_hidden_layers=16, num_attention_heads=32,
                                 num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                                 rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True)
  ours = hf.config_from_hf(cfg.to_dict() | {"architectures": ["LlamaForCausalLM"]},
                           dtype="bfloat16", param_dtype="float32")
  assert ours == get_model_config("llama_1b", head_dim=None)  # 64 = 2048 / 32, derived


def _hf_and_ours(tmp_path):
  torch.manual_seed(0)
  hf_cfg = transformers.GPT2Config(vocab_size=V, n_positions=CTX, n_embd=D, n_layer=L, n_head=N,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = transformers.GPT2LMHeadModel(hf_cfg).eval()
  # Non-trivial norm parameters (HF initialises them to 1 / 0, which would hide a mix-up).
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "ln_" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(str(tmp_path))
  cfg, params = hf.load_pretrained(str(tmp_path))
  assert cfg == get_model_config("gpt2", vocab_size=V, max_seq_len=CTX, d_model=D, n_layers=L,
                                 n_heads=N, d_ff=4 * D)
  return model, Transformer(cfg), params


def test_gpt2_logits_match_transformers(tmp_path):
  model, ours_model, params = _hf_and_ours(tmp_path)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, V, size=(2, 10))
  mask = np.ones_like(tokens)
  mask[0, :3] = 0  # row 0 left-padded by 3
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions)).logits.numpy()
  ours = np.asarray(
      ours_model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask)).logits_BxTxV)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)
  assert np.abs(ref).max() > 0.1  # a non-degenerate comparison


def test_greedy_sampling_matches_transformers_generate(tmp_path):
  """Our KV-cache sampler vs HF `generate` (greedy, left-padded prompts, learned positions)."""
  model, ours_model, params = _hf_and_ours(tmp_path)
  rng = np.random.default_rng(1)
  prompts = rng.integers(3, V, size=(2, 5))
  mask = np.ones_like(prompts)
  prompts[0, :2], mask[0, :2] = 0, 0  # row 0: 3 real tokens, left-padded
  new = 8
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(prompts), attention_mask=torch.tensor(mask),
                         max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                         eos_token_id=None).numpy()[:, prompts.shape[1]:]
  out = sample(ours_model, params, jnp.asarray(prompts), jnp.asarray(mask), jax.random.key(0),
               SamplingConfig(max_new_tokens=new, greedy=True))
  np.testing.assert_array_equal(np.asarray(out.response_tokens_BxR), ref)
