"""Readers and writers of finished runs: what a later stage needs from an earlier one.

* :func:`load_sft_params` — params, model config and tokenizer of a policy run's checkpoint
  (an SFT run, or any run written by the one loop with a ``model`` fingerprint, e.g. a PPO run,
  whose ``policy`` params are returned).
* :func:`tokenizer_spec` — the tokenizer a run was trained with, from its ``config.json``.
* :data:`FINAL_METRICS_FILE` / :func:`write_final_metrics` / :func:`is_finished` — a run is
  finished once its ``final_metrics.json`` exists (written atomically, last).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, NamedTuple

from rlhf_jax import models
from rlhf_jax.data import tokenizers as tok_lib
from rlhf_jax.train import checkpoint as ckpt_lib

logger = logging.getLogger(__name__)

FINAL_METRICS_FILE = "final_metrics.json"


def is_finished(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, FINAL_METRICS_FILE))


def write_final_metrics(workdir: str, final: Mapping[str, Any], method: str = "") -> dict:
  """Writes ``<workdir>/final_metrics.json`` atomically and logs a one-line summary."""
  final = dict(final)
  ckpt_lib.atomic_write_json(os.path.join(workdir, FINAL_METRICS_FILE), final)
  if method:
    logger.info(
        "%s finished: %s", method,
        ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
  return final


def tokenizer_spec(run_config: Mapping[str, Any]) -> str:
  """The tokenizer spec a run used: ``sources.tokenizer``, else (older runs) ``data.tokenizer``."""
  spec = (run_config.get("sources") or {}).get("tokenizer") or \
      (run_config.get("data") or {}).get("tokenizer")
  return spec or "byte"


class SFTCheckpoint(NamedTuple):
  params: Any
  model_config: models.ModelConfig
  tokenizer: tok_lib.Tokenizer
  step: int


def load_sft_params(workdir: str, step: int | None = None) -> SFTCheckpoint:
  """Params, model config and tokenizer of an SFT run's checkpoint (default: the latest step).

  The model config comes from the run's ``run_fingerprint.json`` and the tokenizer from its
  ``config.json``, so ``Transformer(ckpt.model_config).apply({"params": ckpt.params}, ...)`` and
  ``ckpt.tokenizer`` reproduce the SFT policy exactly.
  """
  needed = (ckpt_lib.FINGERPRINT_FILE, "config.json")
  missing = [name for name in needed if not os.path.isfile(os.path.join(workdir, name))]
  if missing:
    raise FileNotFoundError(
        f"{workdir!r} is not an SFT run's workdir (missing {', '.join(missing)}): train one with "
        "`python experiments/run.py --config=experiments/configs/sft_synthetic.py "
        f"--workdir={workdir}` or point the config's sources.sft_workdir at one")
  fingerprint = ckpt_lib.read_json(os.path.join(workdir, ckpt_lib.FINGERPRINT_FILE))
  run_config = ckpt_lib.read_json(os.path.join(workdir, "config.json"))
  model_config = models.ModelConfig(
      **{k: tuple(v) if isinstance(v, list) else v for k, v in fingerprint["model"].items()})
  spec = tokenizer_spec(run_config)
  tokenizer = tok_lib.load_tokenizer(spec)
  if tokenizer.fingerprint() != fingerprint["tokenizer"]:
    raise ckpt_lib.WorkdirMismatchError(
        f"{workdir}: tokenizer {spec!r} now has fingerprint "
        f"{tokenizer.fingerprint()}, the run used {fingerprint['tokenizer']}")
  step = ckpt_lib.latest_step(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir!r}: the SFT run saved no checkpoint yet; finish it first "
                            "(rerunning its `python experiments/run.py --config=... "
                            f"--workdir={workdir}` resumes it)")
  params = ckpt_lib.restore_params(workdir, step)
  # A run whose state holds several models keeps the policy under "policy" (PPO: policy + value),
  # so a later stage (iterated RLHF's next round) can start from it like from an SFT run.
  if isinstance(params, dict) and "policy" in params:
    params = params["policy"]
  return SFTCheckpoint(params=params, model_config=model_config, tokenizer=tokenizer,
                       step=int(step))
