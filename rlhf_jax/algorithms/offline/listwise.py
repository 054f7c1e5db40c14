"""Listwise preference optimisation on ranked candidate lists: PRO and RRHF.

A batch holds B prompts with up to K candidates each, stacked once by the collator: ``tokens
[B·K, T]`` (candidate k of list b in row b·K + k), ``candidate_mask [B, K]``, ``scores [B, K]``
(higher is better). All B·K sequences go through the policy in one forward pass (deterministic:
PRO / RRHF train without dropout, like DPO's ``disable_dropout``):

    s_BxK = Σ_t log π_θ(y_bk,t | x_b, y_bk,<t),   n_BxK = |y_bk| (response tokens incl. EOS)
    p_BxK = s / n^α                          (losses.length_normalized_scores, α = length_penalty)
    best_b = argmax_k scores_bk              (losses.best_candidate_index)

    PRO   ℓ_b = losses.pro_loss(p, scores)_b + w · (m_b - 1)² · (-s_b,best)
          (Song et al., 2023: the SFT term is the summed NLL of the top candidate, scaled by
          (N - 1)² to keep pace with the N - 1 ranking terms; m_b = real candidates of prompt b)
    RRHF  ℓ_b = losses.rrhf_loss(p, scores)_b + w · (-s_b,best / n_b,best)
          (Yuan et al., 2023, Eq. 3: rank hinge + token-mean NLL of the best candidate, w = 1)

The lists come from the data (``ranked.jsonl``: ``scores`` or ``ranks``, cut to their first
``num_candidates``) or are generated (``candidates = "generated"``): K samples per training prompt
from the initial (SFT) policy, scored by the reward model, written as a ranked JSONL file in the
workdir and then read like data; the file is reused only while everything that made it matches
(``generated_ranked.key.json``: K, temperature, length limits, the policy run and its step, the
reward model, the prompts and the seed). Lists whose scores are all equal carry no ranking (the
rank terms are constant) and would only add SFT on an arbitrary candidate, so
``prepare_dataset(drop_uninformative=True)`` drops them and counts them (``skipped_tied_lists``). Each evaluation reports the policy metrics of ``rlhf_jax.eval.policy`` and,
on held-out ranked lists, the loss's metrics (``lists/top1_accuracy``, ``lists/violation_rate``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import fileio, losses, models, train
from rlhf_jax.algorithms import common, sections
from rlhf_jax.algorithms.offline import shell
from rlhf_jax import scoring
from rlhf_jax.data import batching
from rlhf_jax.data import dataset as ds_lib
from rlhf_jax.data import records as rec
from rlhf_jax.train import config_dicts

logger = logging.getLogger(__name__)

METHODS = ("pro", "rrhf")
CANDIDATES = ("data", "generated")


@dataclasses.dataclass(frozen=True)
class ListwiseLossConfig:
  """Attributes:
    method: ``pro`` or ``rrhf``.
    sft_weight: w of the SFT term on the best candidate (module docstring for its form).
    length_penalty: α of the length normalisation (RRHF's; PRO uses 1).
    reward_temperature: PRO's reward-difference temperatures (False: plain Plackett-Luce softmax).
  """

  method: str = "pro"
  sft_weight: float = 0.05
  length_penalty: float = 1.0
  reward_temperature: bool = True

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"ListwiseLossConfig.method={self.method!r} is invalid; allowed: "
                       f"{' | '.join(METHODS)}")
    if not self.sft_weight >= 0:
      raise ValueError(
          f"ListwiseLossConfig.sft_weight={self.sft_weight!r} is invalid; allowed: >= 0")
    if not self.length_penalty >= 0:
      raise ValueError(f"ListwiseLossConfig.length_penalty={self.length_penalty!r} is invalid; "
                       "allowed: >= 0")


def list_loss(cfg: ListwiseLossConfig, sums_BxK, lens_BxK, rewards_BxK, cand_mask_BxK):
  """Per-list loss ``[B]`` and metrics from summed log-probs, lengths, rewards and the candidate mask."""
  p_BxK = losses.length_normalized_scores(sums_BxK, lens_BxK, length_penalty=cfg.length_penalty)
  if cfg.method == "pro":
    rank_B, metrics = losses.pro_loss(p_BxK, rewards_BxK, candidate_mask=cand_mask_BxK,
                                      reward_temperature=cfg.reward_temperature)
  else:
    rank_B, metrics = losses.rrhf_loss(p_BxK, rewards_BxK, candidate_mask=cand_mask_BxK)
  best_B = losses.best_candidate_index(rewards_BxK, cand_mask_BxK)
  take = lambda x: jnp.take_along_axis(x, best_B[:, None], axis=1)[:, 0]  # noqa: E731
  best_sum_B, best_len_B = take(sums_BxK), jnp.maximum(take(lens_BxK), 1.0)
  if cfg.method == "pro":
    m_B = jnp.sum(cand_mask_BxK, axis=1).astype(jnp.float32)
    sft_B = (m_B - 1.0)**2 * (-best_sum_B)
  else:
    sft_B = -best_sum_B / best_len_B
  per_B = rank_B + cfg.sft_weight * sft_B
  metrics = dict(metrics)
  metrics.update(rank_loss=jnp.mean(rank_B), sft_loss=jnp.mean(sft_B), loss=jnp.mean(per_B),
                 best_nll_per_token=jnp.mean(-best_sum_B / best_len_B))
  return per_B, metrics


def make_loss_fn(model: models.Transformer, cfg: ListwiseLossConfig) -> train.loop.LossFn:
  """``loss_fn(params, batch, rng)`` over the batch's ``[B·K, T]`` rows in one forward."""

  def loss_fn(params, batch, rng):
    del rng  # deterministic in training and evaluation
    b, k = batch["candidate_mask"].shape
    sums_BxK = models.response_logps(model, params, batch["tokens"], batch["mask"],
                                     batch["loss_mask"]).reshape(b, k)
    lens_BxK = jnp.sum(batch["loss_mask"], axis=-1).astype(jnp.float32).reshape(b, k)
    per_B, metrics = list_loss(cfg, sums_BxK, lens_BxK, batch["scores"], batch["candidate_mask"])
    return jnp.mean(per_B), metrics

  return loss_fn


@dataclasses.dataclass(frozen=True)
class RankedData(sections.DataSource):
  """``sections.DataSource`` (files ``ranked.jsonl`` / ``ranked_test.jsonl`` of the synthetic task, or
  ``train_jsonl`` / optional ``eval_jsonl``; ``train_jsonl`` may hold prompts only when
  ``candidates = "generated"``) plus:

  Attributes:
    candidates: ``data`` (the lists in the file) or ``generated`` (K policy samples scored by the RM).
    num_candidates: K of generated lists; for data lists, keep at most this many (0 = all).
    num_generation_prompts: training prompts that get a generated list.
    generation_temperature: sampling temperature of the generated candidates.
    num_eval_lists: held-out lists for the loss metrics (whole batches).
  """

  batch_size: int = 8
  candidates: str = "data"
  num_candidates: int = 4
  num_generation_prompts: int = 512
  generation_temperature: float = 1.0
  num_eval_lists: int = 64

  OPTIONAL_JSONL = ("eval_jsonl",)

  def __post_init__(self):
    super().__post_init__()
    owner = type(self).__name__
    sections.check_choice(owner, "candidates", self.candidates, CANDIDATES)
    sections.check_int(owner, "num_eval_lists", self.num_eval_lists, 1)
    sections.check_int(owner, "num_generation_prompts", self.num_generation_prompts, 1)
    low = 2 if self.candidates == "generated" else 0
    if isinstance(self.num_candidates,
                  bool) or not isinstance(self.num_candidates, int) or (self.num_candidates < low or
                                                                        self.num_candidates == 1):
      raise ValueError(
          f"{owner}.num_candidates={self.num_candidates!r} is invalid; allowed: an int "
          ">= 2 (or 0 = all, for data lists)")
    if not self.generation_temperature > 0:
      raise ValueError(
          f"{owner}.generation_temperature={self.generation_temperature!r} is invalid; "
          "allowed: > 0")


def generate_lists(loaded: common.LoadedModels, prompts: list[str], cfg: RankedData,
                   limits: sections.Limits, path: str, seed: int) -> None:
  """K samples per prompt from the initial policy, scored by the reward model, as ranked JSONL.

  Sampling and scoring are ``scoring.sample_candidates`` (the loop RAFT and best-of-n share); each
  score is the RM reward of the response as sampled.
  """
  if fileio.exists(path):
    return  # deterministic given the SFT checkpoint and seed; written atomically
  tok, k = loaded.tokenizer, cfg.num_candidates
  cands = scoring.sample_candidates(loaded.model, loaded.ref_params, tok, prompts,
                                    reward=loaded.reward, num_samples=k,
                                    max_prompt_len=limits.max_prompt_len,
                                    max_new_tokens=limits.max_response_len,
                                    temperature=cfg.generation_temperature,
                                    rng=jax.random.PRNGKey(seed))
  rows, empty = [], 0
  for i, prompt in enumerate(prompts):
    # A candidate is kept only if it ended with EOS: the dataset stores it as [BOS] p r [EOS], so a
    # response cut at the budget would be trained as a finished one it never was, and scored
    # differently from how it was ranked. Empty (immediate-EOS) samples cannot be records either;
    # a list needs 2 candidates.
    kept = [(cands.texts[j], float(cands.rewards_N[j]))
            for j in range(i * k, (i + 1) * k)
            if cands.texts[j].strip() and cands.finished_N[j]]
    if len(kept) < 2:
      empty += 1
      continue
    rows.append({
        "prompt": prompt, "responses": [t for t, _ in kept],
        "scores": [round(r, 5) for _, r in kept]})
  fileio.makedirs(fileio.parent(fileio.absolute(path)))
  rec.write_jsonl(path, rows)
  if not rows:
    raise ValueError(
        f"generate_lists: every one of {len(prompts)} prompts got < 2 non-empty finished samples "
        "(raise config.limits.max_response_len or train the SFT model longer)")
  logger.info(
      "generated %d candidate lists of %d samples -> %s (%d prompts dropped: < 2 non-empty "
      "finished samples)", len(rows), cfg.num_candidates, path, empty)


def _sha256(path: str) -> str:
  return hashlib.sha256(fileio.read_bytes(path)).hexdigest()


def generated_lists_key(loaded: common.LoadedModels, sources: sections.Sources, cfg: RankedData,
                        limits: sections.Limits, prompts_path: str, seed: int) -> dict:
  """Everything the generated lists depend on (they are reused only when all of it matches)."""
  reward = loaded.reward
  return json.loads(
      json.dumps(
          {
              "policy_run": loaded.ref_workdir,
              "policy_step": loaded.ref_step,  # lists sample the reference
              "model": dataclasses.asdict(loaded.model_config),
              "tokenizer": loaded.tokenizer.fingerprint(),
              "reward_model": fileio.absolute(sources.reward_model_workdir)
                              if sources.reward_model_workdir else "",
              "reward_info": dataclasses.asdict(reward.info) if reward is not None else None,
              "attribute_weights": list(reward.attribute_weights or
                                        ()) if reward is not None else None,
              "num_candidates": cfg.num_candidates,
              "temperature": cfg.generation_temperature,
              "max_prompt_len": limits.max_prompt_len,
              "max_new_tokens": limits.max_response_len,
              "num_generation_prompts": cfg.num_generation_prompts,
              "prompts_sha256": _sha256(prompts_path),
              "seed": seed,
              "candidates_kept": "finished",  # only samples that ended with EOS (generate_lists)
          },
          sort_keys=True,
          default=str))


def cached_generated_lists(path: str, key: dict, generate) -> bool:
  """Runs ``generate()`` (which writes ``path``) unless ``path`` was made with ``key``; True = reused.

  The key is written next to the lists (``<path stem>.key.json``) after them, so a crash in
  between means regenerating, never reusing unverified lists.
  """
  key_path = os.path.splitext(path)[0] + ".key.json"
  if fileio.exists(path) and fileio.exists(key_path):
    stored = fileio.read_json(key_path)
    if stored == key:
      return True
    diff = sorted(k for k in set(key) | set(stored) if key.get(k) != stored.get(k))
    logger.warning("%s was generated with other settings (%s); regenerating", path, diff)
  for stale in (key_path, path):
    if fileio.exists(stale):
      fileio.remove(stale)
  generate()
  train.atomic_write_json(key_path, key)
  return False


class ListData(NamedTuple):
  train: batching.BatchIterator
  eval_batches: list
  eval_prompts: list
  num_train_lists: int
  skipped_tied_lists: int


def prepare_lists(cfg: RankedData, limits: sections.Limits, sources: sections.Sources,
                  loaded: common.LoadedModels, workdir: str, num_prompts: int,
                  seed: int) -> ListData:
  train_src, eval_src, prompts_src = common.resolve_files(cfg, sources, "ranked", workdir)
  data_dir = fileio.join(workdir, "data")
  fileio.makedirs(data_dir)
  if cfg.candidates == "generated":
    if loaded.reward is None:
      raise ValueError(
          "config.data.candidates='generated' needs config.sources.reward_model_workdir")
    gen_prompts = cfg.train_jsonl or (fileio.join(fileio.parent(train_src), "prompts.jsonl"))
    generated = fileio.join(data_dir, "generated_ranked.jsonl")
    key = generated_lists_key(loaded, sources, cfg, limits, gen_prompts, seed)
    cached_generated_lists(
        generated, key, lambda: generate_lists(
            loaded,
            common.read_prompts(gen_prompts, cfg.num_generation_prompts, loaded.tokenizer.
                                chat_template), cfg, limits, generated, seed))
    train_src = generated
  datasets = {}
  for split, src in (("train", train_src), ("eval", eval_src)):
    if split == "eval" and not (src and fileio.isfile(src)):
      continue
    datasets[split] = ds_lib.prepare_dataset(src, "ranked", loaded.tokenizer,
                                             fileio.join(data_dir, f"ranked_{split}"),
                                             max_prompt_len=limits.max_prompt_len,
                                             max_response_len=limits.max_response_len,
                                             max_candidates=cfg.num_candidates,
                                             drop_uninformative=True)
  skipped = int(datasets["train"].metadata.get("dropped_uninformative", 0))
  if skipped:
    logger.warning("%s: skipped %d candidate list(s) whose scores are all equal", train_src,
                   skipped)
  train_it = batching.BatchIterator(datasets["train"], cfg.batch_size, seed=cfg.shuffle_seed,
                                    buckets=limits.buckets or None,
                                    group_by_length=limits.group_by_length,
                                    vocab_size=loaded.model_config.vocab_size)
  eval_batches = []
  if "eval" in datasets:
    n_eval = min(cfg.num_eval_lists, len(datasets["eval"])) // cfg.batch_size
    # held-out batches: this process's slice of each (common.make_heldout_eval_fn)
    eval_it = batching.BatchIterator(datasets["eval"], cfg.batch_size, shuffle=False, num_epochs=1,
                                     buckets=(limits.max_len,))
    eval_batches = [next(eval_it) for _ in range(n_eval)]
  prompts = common.read_prompts(prompts_src, num_prompts, loaded.tokenizer.chat_template)
  return ListData(train_it, eval_batches, prompts, len(datasets["train"]), skipped)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) PRO / RRHF; see ``experiments/configs/pro_synthetic.py`` for the keys.

  The shell (shared sections, models, loop, evaluation) is ``algorithms.offline.shell``.
  """
  loss_cfg = config_dicts.to_dataclass(ListwiseLossConfig, config.loss, "loss")

  def prepare(data_cfg, limits, sources, loaded, mesh, workdir_, num_prompts, seed):
    del mesh  # list batches need no reference forward
    return prepare_lists(data_cfg, limits, sources, loaded, workdir_, num_prompts, seed)

  return shell.train_offline_policy(
      config,
      workdir,
      method="listwise",
      label=loss_cfg.method,
      data_cls=RankedData,
      prepare_data=prepare,
      make_loss_fn=lambda model: make_loss_fn(model, loss_cfg),
      eval_prefix="lists",
      need_reward=lambda data_cfg: data_cfg.candidates == "generated",
      fingerprint_extra={"loss": dataclasses.asdict(loss_cfg)},
      summary=lambda data_cfg, data: {
          "num_train_lists": data.num_train_lists, "skipped_tied_lists": data.skipped_tied_lists,
          "candidates": data_cfg.candidates},
      # tokens of the candidate sequences (the batch also holds a [B, K] candidate mask)
      token_count=lambda batch: float(np.sum(batch["mask"])))
