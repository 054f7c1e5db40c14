"""SFT on your own JSON Lines files (``{"prompt", "response"}`` or chat ``{"messages": [...]}``)."""

import ml_collections

from rlhf_jax.algorithms import sft


def get_config() -> ml_collections.ConfigDict:
  """SFT on user-supplied train / eval JSONL files.

  Run:
    python experiments/sft.py --config=experiments/configs/sft_jsonl.py \\
        --config.data.train_jsonl=/path/train.jsonl --config.data.eval_jsonl=/path/eval.jsonl \\
        --workdir=workdirs/sft_mine

  Records are validated (a bad line names file, line and field), tokenised once into
  ``<workdir>/data/sft_{train,eval}`` (TFDS array_record) and reused on restart. Other tokenizers:
  ``--config.data.tokenizer=hf:/path/tokenizer.json`` (the model's ``vocab_size`` follows it).
  Samples of held-out prompts are logged and written to ``<workdir>/samples.jsonl``; there is no
  gold reward for your data, so the final metrics are the held-out NLL / perplexity.

  Expected (measured; see notes/BUILD_NOTES_train.md): MEASURED_JSONL_PLACEHOLDER
  """
  config = sft.default_config()
  config.data.source = "jsonl"
  config.data.train_jsonl = ""
  config.data.eval_jsonl = ""
  config.data.buckets = ()  # powers of two up to max_prompt_len + max_response_len
  config.data.max_prompt_len = 256
  config.data.max_response_len = 256
  config.eval.num_sample_prompts = 16
  return config
