"""The trainer shell of pairwise preference methods (the DPO family and any new DPO-style loss).

A pairwise method contributes only its loss: ``make_loss_fn(model) -> loss_fn(params, batch, rng)``
over the stacked ``[2B, T]`` batch (pair b's chosen in row 2b, rejected in row 2b+1;
``data.kinds.pairwise.split`` undoes it), ``rng=None`` meaning eval mode. :func:`train_pairwise`
does the rest, the same for every such method:

1. parse the shared sections (``sources``, ``data`` = :class:`PairwiseData`, ``limits``, ``optim``,
   ``loop``, ``eval``, ``mesh``) and the method's own key (``loss``);
2. load the policy and the frozen reference (``common.load_models``);
3. prepare the pairwise datasets (identical pairs dropped by ``prepare_dataset``) and, when the loss
   needs them, attach reference log-probs (``algorithms.reference``: on the fly or a precomputed
   table keyed on everything that made it) to train and held-out batches;
4. run the one loop with the policy evaluation and the loss's own held-out metrics
   (``pairs/<metric>``) — steps 1, 2 and 4 are the offline shell's (``algorithms.offline.shell``), shared
   with PRO / RRHF.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, NamedTuple

import ml_collections

from rlhf_jax import fileio, models, train
from rlhf_jax.algorithms import common, reference, sections
from rlhf_jax.algorithms.offline import shell
from rlhf_jax.data import batching
from rlhf_jax.data import dataset as ds_lib
from rlhf_jax.data.kinds import pairwise

logger = logging.getLogger(__name__)

REF_LOGPS_FILE = "reference_logps.npz"
KNOWN_KEYS = {
    "method", "seed", "sources", "model", "loss", "data", "limits", "optim", "loop", "eval", "mesh"}


@dataclasses.dataclass(frozen=True)
class PairwiseData(sections.DataSource):
  """``sections.DataSource`` (files ``pairwise.jsonl`` / ``pairwise_test.jsonl`` of the synthetic
  task, or ``train_jsonl`` / ``eval_jsonl`` of ``{"prompt", "chosen", "rejected"}``) plus:

  Attributes:
    num_eval_pairs: held-out pairs for the implicit-reward metrics (whole batches of batch_size).
  """

  num_eval_pairs: int = 256

  def __post_init__(self):
    super().__post_init__()
    sections.check_int(type(self).__name__, "num_eval_pairs", self.num_eval_pairs, 1)


class PairData(NamedTuple):
  train: Any  # resumable iterator of batches (with ref_logps when the loss needs them)
  eval_batches: list  # fixed held-out batches (with ref_logps when the loss needs them)
  eval_prompts: list
  num_train_pairs: int
  skipped_identical_pairs: int


def reference_cache_key(loaded: common.LoadedModels, dataset: ds_lib.TokenizedDataset,
                        seed: int) -> dict:
  """What a precomputed table of ``dataset`` under ``loaded``'s reference depends on."""
  return reference.cache_key(reference_run=loaded.ref_workdir, reference_step=loaded.ref_step,
                             model_config=loaded.model_config, tokenizer=loaded.tokenizer,
                             dataset=dataset, rows_per_example=pairwise.ROWS,
                             init_seed=seed if not loaded.ref_workdir else None)


def prepare_pairs(data: PairwiseData, limits: sections.Limits, uses_reference: bool,
                  reference_logps: str, sources: sections.Sources, loaded: common.LoadedModels,
                  mesh, workdir: str, num_prompts: int, seed: int = 0) -> PairData:
  train_src, eval_src, prompts_src = common.resolve_files(data, sources, "pairwise", workdir)
  data_dir = fileio.join(workdir, "data")
  splits = {
      split: ds_lib.prepare_dataset(
          src, "pairwise", loaded.tokenizer, fileio.join(data_dir, f"pairwise_{split}"),
          max_prompt_len=limits.max_prompt_len, max_response_len=limits.max_response_len,
          drop_uninformative=True) for split, src in (("train", train_src), ("eval", eval_src))}
  skipped = int(splits["train"].metadata.get("dropped_uninformative", 0))
  if skipped:
    logger.warning("%s: skipped %d pair(s) whose chosen and rejected are identical", train_src,
                   skipped)
  vocab = loaded.model_config.vocab_size
  train_it = batching.BatchIterator(splits["train"], data.batch_size, seed=data.shuffle_seed,
                                    buckets=limits.buckets or None,
                                    group_by_length=limits.group_by_length, vocab_size=vocab)
  n_eval = min(data.num_eval_pairs, len(splits["eval"])) // data.batch_size
  # held-out batches: this process's slice of each (common.make_heldout_eval_fn)
  eval_it = batching.BatchIterator(splits["eval"], data.batch_size, shuffle=False, num_epochs=1,
                                   buckets=(limits.max_len,))
  eval_batches = [next(eval_it) for _ in range(n_eval)]
  train_data: Any = train_it
  if uses_reference:
    # Held-out batches are fixed: their reference log-probs are computed once, here.
    fly = reference.make_transform("on_the_fly", model=loaded.model, params=loaded.ref_params,
                                   mesh=mesh)
    eval_batches = [fly(b) for b in eval_batches]
    transform = reference.make_transform(reference_logps, model=loaded.model,
                                         params=loaded.ref_params, mesh=mesh,
                                         dataset=splits["train"],
                                         path=fileio.join(data_dir, REF_LOGPS_FILE),
                                         key=reference_cache_key(loaded, splits["train"], seed),
                                         batch_size=data.batch_size, buckets=limits.buckets)
    train_data = reference.WithReference(train_it, transform)
  prompts = common.read_prompts(prompts_src, num_prompts, loaded.tokenizer.chat_template)
  return PairData(train_data, eval_batches, prompts, len(splits["train"]), skipped)


def train_pairwise(config: ml_collections.ConfigDict, workdir: str, *, method: str, label: str,
                   make_loss_fn: Callable[[models.Transformer], train.loop.LossFn],
                   uses_reference: bool, reference_logps: str = "on_the_fly",
                   fingerprint_extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Runs (or resumes) a pairwise preference method (module docstring); returns the final metrics.

  Args:
    method: the registry name (goes into the run fingerprint).
    label: short name for tables and logs (``dpo:sigmoid``).
    make_loss_fn: builds the loss over the stacked ``[2B, T]`` batch for the loaded policy model.
    uses_reference: whether the loss reads ``batch["ref_logps"]`` (SimPO / ORPO do not).
    reference_logps: ``on_the_fly`` | ``precomputed`` (``algorithms.reference``).
    fingerprint_extra: what else a resumed run must match (e.g. the loss config).
  """
  sections.check_choice("loss", "reference_logps", reference_logps, reference.MODES)

  def prepare(data_cfg, limits, sources, loaded, mesh, workdir_, num_prompts, seed):
    return prepare_pairs(data_cfg, limits, uses_reference, reference_logps, sources, loaded, mesh,
                         workdir_, num_prompts, seed)

  return shell.train_offline_policy(
      config, workdir, method=method, label=label, data_cls=PairwiseData, prepare_data=prepare,
      make_loss_fn=make_loss_fn, eval_prefix="pairs", fingerprint_extra=fingerprint_extra,
      summary=lambda data_cfg, data: {
          "num_train_pairs": data.num_train_pairs,
          "skipped_identical_pairs": data.skipped_identical_pairs})
