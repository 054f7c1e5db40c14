"""SFT of the ``small`` model on the embedded synthetic task (the default of ``experiments/sft.py``)."""

import ml_collections

from rlhf_jax.algorithms import sft


def get_config() -> ml_collections.ConfigDict:
  """SFT on the synthetic gold-reward task: byte tokenizer, ``small`` preset (~1.6M params).

  Run:
    python experiments/sft.py --workdir=workdirs/sft_synthetic

  Generates the task into ``<workdir>/data/synthetic`` (4000 train / 500 held-out prompts), builds
  the TFDS datasets next to it, trains 160 steps of 32 sequences (cosine lr 3e-3), evaluates at
  steps 80 and 160 (held-out NLL over 500 responses, 128 sampled responses scored by the gold
  reward) and writes ``<workdir>/final_metrics.json``.

  Expected (measured; see notes/BUILD_NOTES_train.md): MEASURED_PLACEHOLDER
  """
  return sft.default_config()
