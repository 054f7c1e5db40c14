"""Offline pairwise preference optimisation: the DPO family (every TRL ``loss_type``), SimPO and ORPO.

One trainer driven by :class:`DPOLossConfig`. For a batch of B pairs ``(x, y_c, y_r)`` the chosen
and rejected sequences ``[BOS] x y [EOS]`` (one padded length T) are stacked into ``[2B, T]`` and go
through the policy in **one** forward pass:

    logp_2BxT = log π_θ(tokens_t | tokens_<t) · loss_mask          (models.sequence_logprobs, f32)
    s_2B = Σ_t logp_2BxT,   n_2B = Σ_t loss_mask                    (response tokens incl. EOS)
    (π_c, π_r) = split(s_2B),  (n_c, n_r) = split(n_2B)

then ``method`` picks the loss (formulas in ``rlhf_jax/losses``):

    dpo    losses.dpo_loss(π_c, π_r, ref_c, ref_r, beta, loss_type, label_smoothing, loss_weights,
                           f_divergence, alpha, reference_free, lengths n_c / n_r)
    simpo  losses.simpo_loss(π_c / n_c, π_r / n_r, beta, gamma)        (reference-free)
    orpo   losses.orpo_loss(π_c / n_c, π_r / n_r, lam)                 (reference-free, SFT term inside)

plus, with ``sft_weight = w > 0``, ``w · (-π_c / n_c)`` (RPO; TRL's ``rpo_alpha``). The batch loss
is the mean over pairs.

Reference log-probs ``ref_c, ref_r`` (Σ_t log π_ref over the same tokens) come from the frozen
reference params in one of two ways (``reference_logps``):

* ``on_the_fly`` — a separate jitted forward of π_ref over the same ``[2B, T]`` batch, dispatched
  by the data iterator right before the train step (params passed as an argument, not baked into
  the step as constants), exactly TRL's default;
* ``precomputed`` — one pass over the training set before training, stored next to the dataset
  (``<workdir>/data/reference_logps.npz``, keyed by dataset index and checked against the
  reference checkpoint and the dataset) and looked up per batch, TRL's
  ``precompute_ref_log_probs``; it also works multi-host, where on-the-fly does not.

Reference-free losses (SimPO, ORPO, ``reference_free=True``) never touch the reference.

Pairs whose chosen and rejected are identical carry no preference (every loss is constant in θ or,
for ORPO / RPO, pure SFT on an arbitrary side) — they are dropped before tokenisation and counted
(``skipped_identical_pairs``). Each evaluation reports the policy metrics of
``rlhf_jax.eval.policy`` and, on held-out pairs, the loss's implicit-reward metrics
(``pairs/rewards/margins``, ``pairs/rewards/accuracies``, ...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import losses, models, parallel, train
from rlhf_jax.algorithms import common
from rlhf_jax.data import batching
from rlhf_jax.data import dataset as ds_lib
from rlhf_jax.data import records as rec
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.train import config_dicts

logger = logging.getLogger(__name__)

METHODS = ("dpo", "simpo", "orpo")
REFERENCE_MODES = ("on_the_fly", "precomputed")
SOURCES = ("synthetic", "jsonl")
REF_LOGPS_FILE = "reference_logps.npz"


@dataclasses.dataclass(frozen=True)
class DPOLossConfig:
  """Which pairwise loss, with its hyper-parameters (names follow TRL's ``DPOConfig``).

  Attributes:
    method: ``dpo`` (the family selected by ``loss_type``), ``simpo`` or ``orpo``.
    loss_type: one TRL name (``losses.DPO_LOSS_TYPES``) or several joined by commas, e.g.
      ``"sigmoid,bco_pair"`` (summed with ``loss_weights``, TRL's list form; a string so that
      command-line and sweep overrides stay plain values).
    loss_weights: one weight per loss type; () = all 1.
    beta: β of DPO / SimPO (for ``ipo`` the regulariser τ).
    label_smoothing: ε of cDPO / rDPO / EXO / AOT (and SimPO's smoothing).
    f_divergence, alpha: TRL's ``f_divergence_type`` and its α.
    reference_free: DPO against a uniform reference (no reference forward).
    discopop_tau: τ of DiscoPOP.
    simpo_gamma: SimPO's target margin γ.
    orpo_lambda: ORPO's λ (TRL's ``beta`` for ORPO).
    sft_weight: w of the extra chosen-NLL term (RPO / TRL's ``rpo_alpha``); 0 = off.
    reference_logps: ``on_the_fly`` or ``precomputed`` (module docstring).
  """

  method: str = "dpo"
  loss_type: str = "sigmoid"
  loss_weights: tuple = ()
  beta: float = 0.1
  label_smoothing: float = 0.0
  f_divergence: str = "reverse_kl"
  alpha: float = 1.0
  reference_free: bool = False
  discopop_tau: float = 0.05
  simpo_gamma: float = 0.5
  orpo_lambda: float = 0.1
  sft_weight: float = 0.0
  reference_logps: str = "on_the_fly"

  def __post_init__(self):
    if not isinstance(self.loss_type, str):
      raise ValueError(f"DPOLossConfig.loss_type={self.loss_type!r} is invalid; allowed: a string "
                       "of comma-separated names")
    object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
    if self.method not in METHODS:
      raise ValueError(f"DPOLossConfig.method={self.method!r} is invalid; allowed: {' | '.join(METHODS)}")
    if self.reference_logps not in REFERENCE_MODES:
      raise ValueError(f"DPOLossConfig.reference_logps={self.reference_logps!r} is invalid; allowed: "
                       f"{' | '.join(REFERENCE_MODES)}")
    bad = [t for t in self.loss_types if t not in losses.DPO_LOSS_TYPES]
    if not self.loss_types or bad:
      raise ValueError(f"DPOLossConfig.loss_type={self.loss_type!r} is invalid; allowed: one or more "
                       f"of {list(losses.DPO_LOSS_TYPES)}")
    if self.loss_weights and len(self.loss_weights) != len(self.loss_types):
      raise ValueError(f"DPOLossConfig.loss_weights={self.loss_weights!r} is invalid; allowed: () or "
                       f"one weight per loss_type ({len(self.loss_types)})")
    if not self.beta > 0:
      raise ValueError(f"DPOLossConfig.beta={self.beta!r} is invalid; allowed: a float > 0")
    if not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(f"DPOLossConfig.label_smoothing={self.label_smoothing!r} is invalid; allowed: "
                       "[0, 0.5)")
    if self.f_divergence not in losses.F_DIVERGENCES:
      raise ValueError(f"DPOLossConfig.f_divergence={self.f_divergence!r} is invalid; allowed: "
                       f"{' | '.join(losses.F_DIVERGENCES)}")
    for name in ("discopop_tau", "orpo_lambda"):
      if not getattr(self, name) > 0:
        raise ValueError(f"DPOLossConfig.{name}={getattr(self, name)!r} is invalid; allowed: > 0")
    if not self.sft_weight >= 0:
      raise ValueError(f"DPOLossConfig.sft_weight={self.sft_weight!r} is invalid; allowed: >= 0")

  @property
  def loss_types(self) -> tuple[str, ...]:
    return tuple(t.strip() for t in self.loss_type.split(",") if t.strip())

  @property
  def uses_reference(self) -> bool:
    return self.method == "dpo" and not self.reference_free

  @property
  def label(self) -> str:
    """Short name for tables: ``dpo:sigmoid``, ``dpo:ipo+sft``, ``simpo``, ``orpo``."""
    name = self.method if self.method != "dpo" else "dpo:" + "+".join(self.loss_types)
    return name + ("+rpo" if self.sft_weight > 0 else "")


def pair_loss(cfg: DPOLossConfig, pc_B, pr_B, nc_B, nr_B, ref_c_B=None, ref_r_B=None):
  """Per-pair loss ``[B]`` and metrics from summed log-probs (π) and response lengths (n)."""
  avg_c, avg_r = pc_B / jnp.maximum(nc_B, 1.0), pr_B / jnp.maximum(nr_B, 1.0)
  if cfg.method == "dpo":
    per_B, metrics = losses.dpo_loss(
        pc_B, pr_B, ref_c_B, ref_r_B, beta=cfg.beta, loss_type=cfg.loss_types,
        label_smoothing=cfg.label_smoothing, chosen_lengths=nc_B, rejected_lengths=nr_B,
        loss_weights=cfg.loss_weights or None, f_divergence=cfg.f_divergence, alpha=cfg.alpha,
        reference_free=cfg.reference_free, discopop_tau=cfg.discopop_tau)
  elif cfg.method == "simpo":
    per_B, metrics = losses.simpo_loss(avg_c, avg_r, beta=cfg.beta, gamma=cfg.simpo_gamma,
                                       label_smoothing=cfg.label_smoothing)
  else:
    per_B, metrics = losses.orpo_loss(avg_c, avg_r, lam=cfg.orpo_lambda)
  metrics = dict(metrics)
  if cfg.sft_weight > 0:
    nll_B = -avg_c
    per_B = per_B + cfg.sft_weight * nll_B
    metrics["rpo_nll"] = jnp.mean(nll_B)
  metrics["loss"] = jnp.mean(per_B)
  return per_B, metrics


def make_loss_fn(model: models.Transformer, cfg: DPOLossConfig) -> train.loop.LossFn:
  """``loss_fn(params, batch, rng)``: chosen and rejected stacked into one ``[2B, T]`` forward."""
  dropout = model.config.dropout_rate > 0

  def loss_fn(params, batch, rng):
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    loss_mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]], axis=0)
    if dropout:
      out = model.apply({"params": params}, tokens, mask, deterministic=False, rngs={"dropout": rng})
      logps_2BxT = models.token_logprobs(out.logits_BxTxV, tokens, loss_mask)
    else:
      logps_2BxT = models.sequence_logprobs(model, params, tokens, mask, loss_mask)
    sums_2B = jnp.sum(logps_2BxT, axis=-1)
    lens_2B = jnp.sum(loss_mask, axis=-1).astype(jnp.float32)
    pc_B, pr_B = jnp.split(sums_2B, 2)
    nc_B, nr_B = jnp.split(lens_2B, 2)
    ref_c = batch.get("ref_chosen_logps") if cfg.uses_reference else None
    ref_r = batch.get("ref_rejected_logps") if cfg.uses_reference else None
    per_B, metrics = pair_loss(cfg, pc_B, pr_B, nc_B, nr_B, ref_c, ref_r)
    return jnp.mean(per_B), metrics

  return loss_fn


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PairwiseDataConfig:
  """Pairwise records and batching.

  Attributes:
    source: ``synthetic`` (the task the SFT run generated, ``<sft_workdir>/data/synthetic`` or
      ``synthetic_dir``: ``pairwise.jsonl`` / ``pairwise_test.jsonl`` / ``prompts_test.jsonl``) or
      ``jsonl`` (``train_jsonl`` / ``eval_jsonl`` of ``{"prompt", "chosen", "rejected"}``).
    eval_prompts_jsonl: held-out prompts for the policy metrics ('' = the synthetic
      ``prompts_test.jsonl``, or the prompts of ``eval_jsonl``).
    max_prompt_len, max_response_len: token limits incl. BOS / EOS.
    batch_size: pairs per optimiser step. shuffle_seed: per-epoch shuffling.
    buckets: allowed padded lengths; () = powers of two up to the max.
    num_eval_pairs: held-out pairs for the implicit-reward metrics (whole batches of batch_size).
  """

  source: str = "synthetic"
  synthetic_dir: str = ""
  train_jsonl: str = ""
  eval_jsonl: str = ""
  eval_prompts_jsonl: str = ""
  max_prompt_len: int = 32
  max_response_len: int = 48
  batch_size: int = 32
  shuffle_seed: int = 0
  buckets: tuple = ()
  num_eval_pairs: int = 256

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"PairwiseDataConfig.source={self.source!r} is invalid; allowed: "
                       f"{' | '.join(SOURCES)}")
    if self.source == "jsonl":
      for name in ("train_jsonl", "eval_jsonl"):
        if not os.path.isfile(getattr(self, name)):
          raise ValueError(f"PairwiseDataConfig.{name}={getattr(self, name)!r} is invalid; allowed: "
                           "an existing JSONL file (required with source='jsonl')")
    for name in ("max_prompt_len", "max_response_len", "batch_size", "num_eval_pairs"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < (2 if "len" in name else 1):
        raise ValueError(f"PairwiseDataConfig.{name}={value!r} is invalid; allowed: an int >= "
                         f"{2 if 'len' in name else 1}")
    if self.buckets and max(self.buckets) < self.max_prompt_len + self.max_response_len:
      raise ValueError(f"PairwiseDataConfig.buckets={self.buckets!r} is invalid; allowed: () or "
                       "lengths whose largest is >= max_prompt_len + max_response_len")


def resolve_files(cfg: Any, sources: common.ModelSources, stem: str) -> tuple[str, str, str]:
  """(train, eval, eval-prompts) JSONL paths for ``stem`` (``pairwise`` / ``ranked``)."""
  if cfg.source == "synthetic":
    task = cfg.synthetic_dir or (os.path.join(sources.sft_workdir, "data", "synthetic")
                                 if sources.sft_workdir else "")
    if not task or not os.path.isfile(os.path.join(task, "metadata.json")):
      raise ValueError(f"config.data.synthetic_dir={task!r}: no synthetic task there; allowed: the "
                       "folder `python -m rlhf_jax.data.synthetic --out DIR` wrote (default: the SFT "
                       "run's <sft_workdir>/data/synthetic)")
    prompts = cfg.eval_prompts_jsonl or os.path.join(task, "prompts_test.jsonl")
    return os.path.join(task, f"{stem}.jsonl"), os.path.join(task, f"{stem}_test.jsonl"), prompts
  return cfg.train_jsonl, cfg.eval_jsonl, cfg.eval_prompts_jsonl or cfg.eval_jsonl


def drop_identical_pairs(src: str, dst: str) -> tuple[int, int]:
  """Copies the pairwise records of ``src`` whose chosen != rejected to ``dst``; returns (kept, skipped)."""
  kept, skipped = [], 0
  for record in rec.iter_records(src, "pairwise"):
    if record.chosen == record.rejected:
      skipped += 1
    else:
      kept.append({"prompt": record.prompt, "chosen": record.chosen, "rejected": record.rejected})
  if not kept:
    raise ValueError(f"{src}: every one of its {skipped} pairs has chosen == rejected; nothing to learn")
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  rec.write_jsonl(dst, kept)
  if skipped:
    logger.warning("%s: skipped %d pair(s) whose chosen and rejected are identical", src, skipped)
  return len(kept), skipped


class _RefLogps:
  """Adds ``ref_chosen_logps`` / ``ref_rejected_logps`` [B] to each pairwise batch (docstring)."""

  def __init__(self, inner: batching.BatchIterator, logps_fn, ref_params, table=None):
    self.inner, self.logps_fn, self.ref_params, self.table = inner, logps_fn, ref_params, table

  def __iter__(self):
    return self

  def _host_rows(self) -> np.ndarray:
    st = self.inner.get_state()
    epoch, b = st["epoch"], st["batch_in_epoch"]
    if b >= self.inner.batches_per_epoch:
      epoch, b = epoch + 1, 0
    rows = self.inner.global_indices(epoch, b)
    lo = self.inner.process_index * self.inner.host_batch_size
    return rows[lo:lo + self.inner.host_batch_size]

  def __next__(self):
    rows = self._host_rows() if self.table is not None else None
    batch = dict(next(self.inner))
    if self.table is not None:
      ok = rows >= 0
      for side in ("chosen", "rejected"):
        batch[f"ref_{side}_logps"] = np.where(ok, self.table[side][np.maximum(rows, 0)], 0.0
                                              ).astype(np.float32)
    else:
      both = self.logps_fn(self.ref_params, *pair_arrays(batch))
      batch["ref_chosen_logps"], batch["ref_rejected_logps"] = jnp.split(both, 2)
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def pair_arrays(batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``[2B, T]`` tokens / mask / loss_mask: chosen rows then rejected rows."""
  return tuple(np.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
               for k in ("tokens", "mask", "loss_mask"))


def precompute_reference_logps(dataset: ds_lib.TokenizedDataset, logps_fn, ref_params, path: str,
                               *, batch_size: int, buckets, key: dict) -> dict[str, np.ndarray]:
  """Σ_t log π_ref of every pair's chosen / rejected, computed once and stored at ``path``.

  ``key`` (reference checkpoint + dataset identity) is stored alongside; a stored table with
  another key is recomputed, never silently reused.
  """
  key = json.loads(json.dumps(key))
  if os.path.exists(path):
    stored = np.load(path)
    if json.loads(str(stored["key"])) == key and len(stored["chosen"]) == len(dataset):
      return {"chosen": stored["chosen"], "rejected": stored["rejected"]}
    logger.warning("%s was computed for another reference or dataset; recomputing", path)
  it = batching.BatchIterator(dataset, batch_size, shuffle=False, drop_remainder=False, num_epochs=1,
                              buckets=buckets or None, process_index=0, process_count=1)
  chosen, rejected = [], []
  for batch in it:
    both = np.asarray(jax.device_get(logps_fn(ref_params, *pair_arrays(batch))))
    c, r = np.split(both, 2)
    valid = batch["valid"] > 0
    chosen.append(c[valid])
    rejected.append(r[valid])
  table = {"chosen": np.concatenate(chosen), "rejected": np.concatenate(rejected)}
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez(tmp, key=json.dumps(key), **table)
  os.replace(tmp, path)
  logger.info("precomputed reference log-probs of %d pairs -> %s", len(dataset), path)
  return table


class PairData(NamedTuple):
  train: Any  # iterator of batches with reference log-probs (when needed)
  eval_batches: list  # fixed held-out batches (with reference log-probs when needed)
  eval_prompts: list
  num_train_pairs: int
  skipped_identical_pairs: int


def prepare_pairs(cfg: PairwiseDataConfig, loss_cfg: DPOLossConfig, sources: common.ModelSources,
                  loaded: common.LoadedModels, logps_fn, workdir: str, num_prompts: int) -> PairData:
  train_src, eval_src, prompts_src = resolve_files(cfg, sources, "pairwise")
  data_dir = os.path.join(workdir, "data")
  limits = dict(max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len)
  splits = {}
  skipped = 0
  for split, src in (("train", train_src), ("eval", eval_src)):
    filtered = os.path.join(data_dir, f"pairwise_{split}.jsonl")
    _, n_skipped = drop_identical_pairs(src, filtered)
    skipped += n_skipped if split == "train" else 0
    splits[split] = ds_lib.prepare_dataset(filtered, "pairwise", loaded.tokenizer,
                                           os.path.join(data_dir, f"pairwise_{split}"), **limits)
  vocab = loaded.model_config.vocab_size
  train_it = batching.BatchIterator(splits["train"], cfg.batch_size, seed=cfg.shuffle_seed,
                                    buckets=cfg.buckets or None, vocab_size=vocab)
  n_eval = min(cfg.num_eval_pairs, len(splits["eval"])) // cfg.batch_size * cfg.batch_size
  eval_it = batching.BatchIterator(splits["eval"], cfg.batch_size, shuffle=False, num_epochs=1,
                                   buckets=(cfg.max_prompt_len + cfg.max_response_len,),
                                   process_index=0, process_count=1)
  eval_batches = [next(eval_it) for _ in range(n_eval // cfg.batch_size)]
  if loss_cfg.uses_reference:
    for batch in eval_batches:
      both = np.asarray(jax.device_get(logps_fn(loaded.ref_params, *pair_arrays(batch))))
      batch["ref_chosen_logps"], batch["ref_rejected_logps"] = np.split(both, 2)
    table = None
    if loss_cfg.reference_logps == "precomputed":
      key = {"reference": os.path.abspath(sources.reference_workdir or sources.sft_workdir or ""),
             "sft_step": loaded.sft_step, "dataset": splits["train"].metadata.get("settings", {})}
      table = precompute_reference_logps(splits["train"], logps_fn, loaded.ref_params,
                                         os.path.join(data_dir, REF_LOGPS_FILE),
                                         batch_size=cfg.batch_size, buckets=cfg.buckets, key=key)
    train_it = _RefLogps(train_it, logps_fn, loaded.ref_params, table)
  prompts = common.read_prompts(prompts_src, num_prompts)
  return PairData(train_it, eval_batches, prompts, len(splits["train"]), skipped)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def make_pair_eval_fn(loss_fn, batches: list, mesh, rules=parallel.DEFAULT_RULES):
  """``fn(params) -> {"pairs/<metric>": mean over the held-out batches}`` (implicit rewards etc.)."""
  if not batches:
    return lambda params: {}
  jitted = jax.jit(lambda params, batch: loss_fn(params, batch, jax.random.PRNGKey(0))[1])

  def fn(params):
    sums: dict[str, float] = {}
    with parallel.use_mesh(mesh, rules):
      for batch in batches:
        metrics = jax.device_get(jitted(params, parallel.shard_batch(batch, mesh, rules)))
        for k, v in metrics.items():
          sums[k] = sums.get(k, 0.0) + float(v)
    return {f"pairs/{k}": v / len(batches) for k, v in sums.items()}

  return fn


KNOWN_KEYS = {"seed", "sources", "model", "tokenizer", "loss", "data", "optim", "loop", "eval", "mesh"}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) DPO / SimPO / ORPO as configured; returns and writes the final metrics.

  See ``experiments/configs/dpo_synthetic.py`` for every key.
  """
  common.check_config_keys(config, KNOWN_KEYS, "dpo")
  sources = config_dicts.to_dataclass(common.ModelSources, config.sources, "sources")
  loss_cfg = config_dicts.to_dataclass(DPOLossConfig, config.loss, "loss")
  data_cfg = config_dicts.to_dataclass(PairwiseDataConfig, config.data, "data")
  optim_cfg = config_dicts.to_dataclass(train.OptimConfig, config.optim, "optim")
  loop_cfg = config_dicts.to_dataclass(train.LoopConfig, config.loop, "loop")
  eval_cfg = config_dicts.to_dataclass(policy_eval.PolicyEvalConfig, config.eval, "eval")
  mesh = parallel.mesh_from_config(config.mesh)
  os.makedirs(workdir, exist_ok=True)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  loaded = common.load_models(sources, mesh, model_section=config.get("model"),
                              tokenizer_spec=config.get("tokenizer", "byte"), rng=init_rng)
  if data_cfg.max_prompt_len + data_cfg.max_response_len > loaded.model_config.max_seq_len:
    raise ValueError("config.data.max_prompt_len + max_response_len exceeds the model's max_seq_len="
                     f"{loaded.model_config.max_seq_len}")
  logps_fn = common.response_logps_fn(loaded.model, mesh)
  data = prepare_pairs(data_cfg, loss_cfg, sources, loaded, logps_fn, workdir, eval_cfg.num_prompts)

  optimizer, schedule = train.make_optimizer(optim_cfg, loop_cfg.num_steps)
  state = train.create_train_state(loaded.policy_params, optimizer, state_rng, mesh)
  loss_fn = make_loss_fn(loaded.model, loss_cfg)
  step_fn = train.make_train_step(loss_fn, optimizer, schedule,
                                  grad_accum_steps=optim_cfg.grad_accum_steps)
  evaluator = common.policy_evaluator(loaded, data.eval_prompts, data_cfg.max_prompt_len, eval_cfg,
                                      workdir)
  pair_eval = make_pair_eval_fn(loss_fn, data.eval_batches, mesh)

  def eval_fn(state: train.TrainState, step: int) -> dict[str, float]:
    return {**evaluator(state.params, step), **pair_eval(state.params)}

  fingerprint = {"method": "dpo", "model": dataclasses.asdict(loaded.model_config),
                 "tokenizer": loaded.tokenizer.fingerprint(), "loss": dataclasses.asdict(loss_cfg)}
  result = train.train(workdir=workdir, config=loop_cfg, state=state, step_fn=step_fn,
                       data=data.train, fingerprint=fingerprint, mesh=mesh, eval_fn=eval_fn,
                       run_config=config.to_dict())
  final = {"method": loss_cfg.label, "step": result.step, "preempted": result.preempted,
           **result.eval_metrics, "num_train_pairs": data.num_train_pairs,
           "skipped_identical_pairs": data.skipped_identical_pairs}
  if result.preempted:
    return final
  return common.write_final(workdir, final, loss_cfg.label)
