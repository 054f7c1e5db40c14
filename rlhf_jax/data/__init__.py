"""Data: tokenizers, JSONL records + validation, the synthetic gold-reward task, TFDS datasets, batching.

Submodules are imported on first attribute access (``rlhf_jax.data.dataset`` pulls in
tensorflow_datasets, which the tokenizer or the synthetic task alone should not pay for).
"""

import importlib

_SUBMODULES = ("tokenizers", "records", "synthetic", "synthetic_files", "dataset", "batching")


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_SUBMODULES)
