"""Our `gpt2` architecture equals Hugging Face GPT-2 (randomly initialised, small widths).

Weights of a `transformers.GPT2LMHeadModel` are copied into our parameter tree; the logits are
compared on a batch with a left-padded row (HF given the same mask and `cumsum(mask) - 1`
positions), and our greedy KV-cache sampler is compared token for token with HF `generate`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch  # test extra (setup.cfg [test]); a missing install should fail, not skip
import transformers

from rlhf_jax.models import Transformer, get_model_config
from rlhf_jax.sampling import SamplingConfig, sample

D, N, L, V, CTX = 64, 4, 2, 101, 32


def _convert_gpt2(state_dict, n_layers, n_heads):
  """HF GPT-2 state dict -> our unrolled param tree (HF Conv1D weights are already [in, out])."""
  w = {k: v.detach().numpy().astype(np.float32) for k, v in state_dict.items()}
  d = w["transformer.wte.weight"].shape[1]
  h = d // n_heads
  params = {
      "embedding": w["transformer.wte.weight"],
      "pos_embedding": w["transformer.wpe.weight"],
      "final_norm": {"scale": w["transformer.ln_f.weight"], "bias": w["transformer.ln_f.bias"]},}
  for i in range(n_layers):
    p = f"transformer.h.{i}."
    q, k, v = np.split(w[p + "attn.c_attn.weight"], 3, axis=1)
    qb, kb, vb = np.split(w[p + "attn.c_attn.bias"], 3)
    params[f"layers_{i}"] = {
        "attn_norm": {"scale": w[p + "ln_1.weight"], "bias": w[p + "ln_1.bias"]},
        "attn": {
            "q_kernel": q.reshape(d, n_heads, h),
            "k_kernel": k.reshape(d, n_heads, h),
            "v_kernel": v.reshape(d, n_heads, h),
            "q_bias": qb.reshape(n_heads, h),
            "k_bias": kb.reshape(n_heads, h),
            "v_bias": vb.reshape(n_heads, h),
            "o_kernel": w[p + "attn.c_proj.weight"].reshape(n_heads, h, d),
            "o_bias": w[p + "attn.c_proj.bias"],},
        "mlp_norm": {"scale": w[p + "ln_2.weight"], "bias": w[p + "ln_2.bias"]},
        "mlp": {
            "up_kernel": w[p + "mlp.c_fc.weight"],
            "up_bias": w[p + "mlp.c_fc.bias"],
            "down_kernel": w[p + "mlp.c_proj.weight"],
            "down_bias": w[p + "mlp.c_proj.bias"],},}
  return params


def _hf_and_ours():
  torch.manual_seed(0)
  hf_cfg = transformers.GPT2Config(vocab_size=V, n_positions=CTX, n_embd=D, n_layer=L, n_head=N,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
  # Non-trivial norm parameters (HF initialises them to 1 / 0, which would hide a mix-up).
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "ln_" in name:
        p.add_(0.1 * torch.randn_like(p))
  cfg = get_model_config("gpt2", vocab_size=V, max_seq_len=CTX, d_model=D, n_layers=L, n_heads=N,
                         d_ff=4 * D)
  return hf, Transformer(cfg), _convert_gpt2(hf.state_dict(), L, N)


def test_gpt2_logits_match_transformers():
  hf, model, params = _hf_and_ours()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, V, size=(2, 10))
  mask = np.ones_like(tokens)
  mask[0, :3] = 0  # row 0 left-padded by 3
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(positions)).logits.numpy()
  ours = np.asarray(
      model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask)).logits_BxTxV)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)
  assert np.abs(ref).max() > 0.1  # a non-degenerate comparison


def test_greedy_sampling_matches_transformers_generate():
  """Our KV-cache sampler vs HF `generate` (greedy, left-padded prompts, learned positions)."""
  hf, model, params = _hf_and_ours()
  rng = np.random.default_rng(1)
  prompts = rng.integers(3, V, size=(2, 5))
  mask = np.ones_like(prompts)
  prompts[0, :2], mask[0, :2] = 0, 0  # row 0: 3 real tokens, left-padded
  new = 8
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(prompts), attention_mask=torch.tensor(mask),
                      max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                      eos_token_id=None).numpy()[:, prompts.shape[1]:]
  out = sample(model, params, jnp.asarray(prompts), jnp.asarray(mask), jax.random.key(0),
               SamplingConfig(max_new_tokens=new, greedy=True))
  np.testing.assert_array_equal(np.asarray(out.response_tokens_BxR), ref)
