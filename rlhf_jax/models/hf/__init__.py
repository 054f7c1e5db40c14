"""Hugging Face checkpoints: import, export and a logit checker.

  from rlhf_jax.models import hf
  config, params = hf.load_pretrained("/ckpt/qwen2.5-0.5b", mesh=mesh, param_dtype="float32")
  logits = Transformer(config).apply({"params": params}, tokens, mask).logits_BxTxV
  hf.save_pretrained("/out/dir", config, params, tokenizer="/ckpt/qwen2.5-0.5b")
  config = hf.config_from_hf(json.load(open("/ckpt/qwen2.5-0.5b/config.json")))

  python -m rlhf_jax.models.hf check --path=DIR   # our logits vs transformers'

Supported architectures: `SUPPORTED_ARCHITECTURES` (GPT-2, Llama 2/3.x, Mistral, Qwen2, Qwen3,
Gemma, Gemma 2). See `families.py` for the math of each and `checkpoint.py` for the lazy, born
sharded loading.
"""

from rlhf_jax.models.hf.checkpoint import (INDEX_FILE, SINGLE_FILE, HFCheckpointError,
                                           load_pretrained, read_config, save_pretrained,
                                           tensor_index)
from rlhf_jax.models.hf.families import (SUPPORTED_ARCHITECTURES, HFConfigError, config_from_hf,
                                         config_to_hf, infer_architecture)

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "SUPPORTED_ARCHITECTURES",
    "HFCheckpointError",
    "HFConfigError",
    "config_from_hf",
    "config_to_hf",
    "infer_architecture",
    "load_pretrained",
    "read_config",
    "save_pretrained",
    "tensor_index",]
