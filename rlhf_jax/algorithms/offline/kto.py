"""KTO (Ethayarajh et al. 2024, arXiv:2402.01306) over the offline shell: unpaired feedback.

Data: ``unpaired`` records ``{"prompt", "completion", "label": true|false}`` (TRL's format), or a
pairwise file split into both (``data.unpair=True``: chosen → desirable, rejected → undesirable,
TRL's ``unpair_preference_dataset``; pairs with chosen == rejected are dropped and counted). The
synthetic task's ``unpaired.jsonl`` is that split of the very comparisons DPO trains on
(``pairwise.jsonl``), so KTO and DPO see the same labels; a task generated before that file existed
is split on the fly.

A batch of B examples holds ``[2B, T]`` rows (``data.kinds.unpaired``): row 2b the example
``(x_b, y_b)``, row 2b+1 its mismatched KL row ``(x_b, y_{b−1})``. One policy forward and one
reference forward (``algorithms.reference``, on the fly) over the 2B rows give

    (π_B, π'_B) = split(Σ_t log π_θ · loss_mask),   (ref_B, ref'_B) = split(batch["ref_logps"])
    z₀ = losses.kto_reference_point(π'_B, ref'_B)            (clamped at 0, no gradient)
    loss = mean_b losses.kto_loss(π_B, ref_B, label_B, kl_ref_point=z₀, β, λ_D, λ_U)

(formulas in ``rlhf_jax/losses/kto.py``). ``apo_zero_unpaired`` has no z₀: the policy then runs
on the matched rows only. Reference log-probs are computed on the fly only: the KL rows depend on
which examples share a batch, which a per-example precomputed table cannot hold (TRL pins the
pairing instead, with sequential sampling). Held-out batches are drawn once from the eval file
with a fixed shuffle (seed 0), so their KL rows pair different prompts, and report
``kto/kl``, ``kto/rewards/{chosen,rejected,margins}``, ``kto/logps/...`` in eval mode;
``kl_unclamped`` is z₀ before the clamp at 0.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, NamedTuple

import jax.numpy as jnp
import ml_collections

from rlhf_jax import fileio, losses, models, train
from rlhf_jax.algorithms import common, reference, sections
from rlhf_jax.algorithms.offline import shell
from rlhf_jax.data import batching
from rlhf_jax.data import dataset as ds_lib
from rlhf_jax.data import records as rec
from rlhf_jax.data.kinds import unpaired
from rlhf_jax.train import config_dicts

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KTOLossConfig:
  """``config.loss`` (names and defaults as TRL's ``KTOConfig``).

  Attributes:
    loss_type: ``kto`` (Eq. 7 with the reference point z₀) | ``apo_zero_unpaired``.
    beta: β, the scale of the implicit reward r = log π_θ/π_ref.
    desirable_weight, undesirable_weight: λ_D, λ_U; with unbalanced data aim for
      λ_D n_D / (λ_U n_U) ∈ [1, 4/3] (the paper's Eq. 8; a warning says when it is not).
    disable_dropout: train without dropout (TRL's default), so policy and reference log-probs are
      the same function of their params; held-out metrics are always deterministic.
  """

  loss_type: str = "kto"
  beta: float = 0.1
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0
  disable_dropout: bool = True

  def __post_init__(self):
    sections.check_choice("KTOLossConfig", "loss_type", self.loss_type, losses.KTO_LOSS_TYPES)
    if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta > 0:
      raise ValueError(f"KTOLossConfig.beta={self.beta!r} is invalid; allowed: a float > 0")
    for name in ("desirable_weight", "undesirable_weight"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"KTOLossConfig.{name}={value!r} is invalid; allowed: a float >= 0")
    if self.desirable_weight == 0 and self.undesirable_weight == 0:
      raise ValueError("KTOLossConfig.desirable_weight=0 and undesirable_weight=0: nothing to "
                       "learn; allowed: at least one weight > 0")
    if not isinstance(self.disable_dropout, bool):
      raise ValueError(f"KTOLossConfig.disable_dropout={self.disable_dropout!r} is invalid; "
                       "allowed: True | False")

  @property
  def uses_kl(self) -> bool:
    return self.loss_type == "kto"

  @property
  def label(self) -> str:
    return "kto" if self.loss_type == "kto" else f"kto:{self.loss_type}"


@dataclasses.dataclass(frozen=True)
class KTOData(sections.DataSource):
  """``sections.DataSource`` (synthetic ``unpaired.jsonl`` / ``unpaired_test.jsonl``, or
  ``train_jsonl`` / ``eval_jsonl`` of unpaired records) plus:

  Attributes:
    unpair: the files are pairwise ``{"prompt", "chosen", "rejected"}``; each pair becomes a
      desirable and an undesirable example (with ``source='synthetic'``: ``pairwise.jsonl``).
    num_eval_examples: held-out examples for the loss metrics (whole batches of batch_size).
  """

  unpair: bool = False
  num_eval_examples: int = 512

  def __post_init__(self):
    super().__post_init__()
    owner = type(self).__name__
    if not isinstance(self.unpair, bool):
      raise ValueError(f"{owner}.unpair={self.unpair!r} is invalid; allowed: True | False")
    sections.check_int(owner, "num_eval_examples", self.num_eval_examples, 1)
    sections.check_int(owner, "batch_size", self.batch_size, 2,
                       " (the KL rows pair each prompt with another example's completion)")


class KTOPrepared(NamedTuple):
  train: Any
  eval_batches: list
  eval_prompts: list
  num_train_examples: int
  num_desirable: int
  num_undesirable: int
  skipped_identical_pairs: int


def unpair_file(src: str, dst: str, tokenizer) -> int:
  """Writes the unpaired split of pairwise ``src`` to ``dst``; returns the identical pairs dropped.

  ``src`` is validated as pairwise first, so a malformed record names its own file and line.
  """
  pairs = rec.read_records(src, "pairwise", chat_template=tokenizer.chat_template)
  kept = [p for p in pairs if p.chosen != p.rejected]
  if not kept:
    raise ValueError(f"{src}: every one of its {len(pairs)} pairs has chosen == rejected; "
                     "nothing to learn from")
  fileio.makedirs(os.path.dirname(fileio.absolute(dst)))
  rec.write_jsonl(dst, unpaired.unpair(kept))
  return len(pairs) - len(kept)


def _unpaired_sources(data: KTOData, sources: sections.Sources, workdir: str, tokenizer):
  """(train, eval, prompts) unpaired files and the identical pairs dropped when splitting pairs."""
  if not data.unpair:
    train_src, eval_src, prompts = common.resolve_files(data, sources, unpaired.KIND.file_stem,
                                                        workdir)
    if data.source == "jsonl" or fileio.isfile(train_src):
      return train_src, eval_src, prompts, 0
    logger.info("%s is missing (a task generated before it existed); splitting pairwise.jsonl",
                train_src)
  train_src, eval_src, prompts = common.resolve_files(data, sources, "pairwise", workdir)
  out = fileio.join(workdir, "data")
  skipped = unpair_file(train_src, fileio.join(out, "unpaired_from_pairs.jsonl"), tokenizer)
  unpair_file(eval_src, fileio.join(out, "unpaired_from_pairs_test.jsonl"), tokenizer)
  return (fileio.join(out, "unpaired_from_pairs.jsonl"),
          fileio.join(out, "unpaired_from_pairs_test.jsonl"), prompts, skipped)


def _check_weights(cfg: KTOLossConfig, n_desirable: int, n_undesirable: int) -> None:
  """TRL's warning (the paper's Eq. 8): λ_D n_D / (λ_U n_U) should lie in [1, 4/3]."""
  if n_desirable == n_undesirable or not n_desirable or not n_undesirable:
    return
  ratio = (cfg.desirable_weight * n_desirable) / max(cfg.undesirable_weight * n_undesirable, 1e-12)
  if not 1.0 <= ratio <= 4 / 3:
    lo = n_undesirable * cfg.undesirable_weight / n_desirable
    logger.warning(
        "KTO: %d desirable vs %d undesirable examples with desirable_weight=%g, "
        "undesirable_weight=%g (weighted ratio %.3f); the paper recommends a ratio in [1, 4/3], "
        "e.g. desirable_weight in [%.2f, %.2f]", n_desirable, n_undesirable, cfg.desirable_weight,
        cfg.undesirable_weight, ratio, lo, lo * 4 / 3)


def prepare_data(cfg: KTOLossConfig, data: KTOData, limits: sections.Limits,
                 sources: sections.Sources, loaded: common.LoadedModels, mesh, workdir: str,
                 num_prompts: int, seed: int = 0) -> KTOPrepared:
  del seed  # reference log-probs are computed on the fly: nothing to key a table on
  train_src, eval_src, prompts_src, skipped = _unpaired_sources(data, sources, workdir,
                                                                loaded.tokenizer)
  data_dir = fileio.join(workdir, "data")
  splits = {
      split: ds_lib.prepare_dataset(src, unpaired.KIND.name, loaded.tokenizer,
                                    fileio.join(data_dir, f"unpaired_{split}"),
                                    max_prompt_len=limits.max_prompt_len,
                                    max_response_len=limits.max_response_len)
      for split, src in (("train", train_src), ("eval", eval_src))}
  train_records = rec.read_records(train_src, unpaired.KIND.name,
                                   chat_template=loaded.tokenizer.chat_template)
  n_desirable, n_undesirable = unpaired.counts(train_records)
  _check_weights(cfg, n_desirable, n_undesirable)
  vocab = loaded.model_config.vocab_size
  train_it = batching.BatchIterator(splits["train"], data.batch_size, seed=data.shuffle_seed,
                                    buckets=limits.buckets or None,
                                    group_by_length=limits.group_by_length, vocab_size=vocab)
  n_eval = min(data.num_eval_examples, len(splits["eval"])) // data.batch_size
  # A fixed shuffle: the eval file may list a pair's two completions next to each other, and a KL
  # row must pair a prompt with another prompt's completion.
  # held-out batches: this process's slice of each (common.make_heldout_eval_fn)
  eval_it = batching.BatchIterator(splits["eval"], data.batch_size, seed=0, shuffle=True,
                                   num_epochs=1, buckets=(limits.max_len,))
  fly = reference.make_transform("on_the_fly", model=loaded.model, params=loaded.ref_params,
                                 mesh=mesh)
  eval_batches = [fly(next(eval_it)) for _ in range(n_eval)]
  prompts = common.read_prompts(prompts_src, num_prompts, loaded.tokenizer.chat_template)
  return KTOPrepared(reference.WithReference(train_it, fly), eval_batches, prompts,
                     len(splits["train"]), n_desirable, n_undesirable, skipped)


def make_loss_fn(model: models.Transformer, cfg: KTOLossConfig) -> train.loop.LossFn:
  """``loss_fn(params, batch, rng)`` over the ``[2B, T]`` unpaired batch (module docstring).

  ``rng=None`` is eval mode. With ``rng`` given, dropout is on only if the model has
  ``dropout_rate > 0`` and ``cfg.disable_dropout`` is False.
  """
  dropout = model.config.dropout_rate > 0 and not cfg.disable_dropout

  def logps(params, tokens, mask, loss_mask, rng):
    if dropout and rng is not None:
      out = model.apply({"params": params}, tokens, mask, deterministic=False,
                        rngs={"dropout": rng})
      return jnp.sum(models.token_logprobs(out.logits_BxTxV, tokens, loss_mask), axis=-1)
    return models.response_logps(model, params, tokens, mask, loss_mask)

  def loss_fn(params, batch, rng):
    valid_B = batch["valid"]
    ref_B, ref_kl_B = unpaired.split(batch[reference.REF_KEY])
    if cfg.uses_kl:
      pi_B, pi_kl_B = unpaired.split(
          logps(params, batch["tokens"], batch["mask"], batch["loss_mask"], rng))
      z0 = losses.kto_reference_point(pi_kl_B, ref_kl_B, mask=valid_B)
    else:  # no reference point: the KL rows are not needed
      tokens, mask, loss_mask = (
          unpaired.split(batch[k])[0] for k in ("tokens", "mask", "loss_mask"))
      pi_B, z0 = logps(params, tokens, mask, loss_mask, rng), 0.0
    _, metrics = losses.kto_loss(pi_B, ref_B, batch["label"], kl_ref_point=z0, beta=cfg.beta,
                                 desirable_weight=cfg.desirable_weight,
                                 undesirable_weight=cfg.undesirable_weight, loss_type=cfg.loss_type,
                                 mask=valid_B)
    if cfg.uses_kl:  # z₀ before the clamp: how far below 0 the mismatched log-ratio sits
      metrics["kl_unclamped"] = jnp.sum(jnp.where(valid_B > 0, pi_kl_B - ref_kl_B,
                                                  0.0)) / jnp.maximum(jnp.sum(valid_B), 1)
    return metrics["loss"], metrics

  return loss_fn


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) KTO as configured; returns and writes the final metrics.

  See ``experiments/configs/kto_synthetic.py`` for every key; the shell (models, loop,
  evaluation) is ``algorithms.offline.shell``.
  """
  loss_cfg = config_dicts.to_dataclass(KTOLossConfig, config.loss, "loss")

  def prepare(data_cfg, limits, sources, loaded, mesh, workdir_, num_prompts, seed):
    return prepare_data(loss_cfg, data_cfg, limits, sources, loaded, mesh, workdir_, num_prompts,
                        seed)

  return shell.train_offline_policy(
      config, workdir, method="kto", label=loss_cfg.label, data_cls=KTOData, prepare_data=prepare,
      make_loss_fn=lambda model: make_loss_fn(model, loss_cfg), eval_prefix="kto",
      fingerprint_extra={"loss": dataclasses.asdict(loss_cfg)}, summary=lambda data_cfg, data: {
          "num_train_examples": data.num_train_examples, "num_desirable": data.num_desirable,
          "num_undesirable": data.num_undesirable,
          "skipped_identical_pairs": data.skipped_identical_pairs})
