"""Listwise preference optimisation on ranked candidate lists: PRO and RRHF.

A batch holds B prompts with up to K candidates each (``tokens [B, K, T]``, ``candidate_mask
[B, K]``, ``scores [B, K]``, higher is better). All B·K sequences go through the policy in one
forward pass (reshaped to ``[B·K, T]``):

    s_BxK = Σ_t log π_θ(y_bk,t | x_b, y_bk,<t),   n_BxK = |y_bk| (response tokens incl. EOS)
    p_BxK = s / n^α                          (losses.length_normalized_scores, α = length_penalty)
    best_b = argmax_k scores_bk              (losses.best_candidate_index)

    PRO   ℓ_b = losses.pro_loss(p, scores)_b + w · (m_b - 1)² · (-s_b,best)
          (Song et al., 2023: the SFT term is the summed NLL of the top candidate, scaled by
          (N - 1)² to keep pace with the N - 1 ranking terms; m_b = real candidates of prompt b)
    RRHF  ℓ_b = losses.rrhf_loss(p, scores)_b + w · (-s_b,best / n_b,best)
          (Yuan et al., 2023, Eq. 3: rank hinge + token-mean NLL of the best candidate, w = 1)

The lists come from the data (``ranked.jsonl``: ``scores`` or ``ranks``) or are generated
(``candidates = "generated"``): K samples per training prompt from the initial (SFT) policy, scored
by the reward model, written as a ranked JSONL file in the workdir and then read like data. Lists
whose scores are all equal carry no ranking (the rank terms are constant) and would only add SFT
on an arbitrary candidate, so they are dropped before tokenisation and counted
(``skipped_tied_lists``). Each evaluation reports the policy metrics of ``rlhf_jax.eval.policy`` and,
on held-out ranked lists, the loss's metrics (``lists/top1_accuracy``, ``lists/violation_rate``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import losses, models, parallel, train
from rlhf_jax.algorithms.offline import dpo
from rlhf_jax.algorithms import common
from rlhf_jax import scoring
from rlhf_jax.data import batching
from rlhf_jax.data import dataset as ds_lib
from rlhf_jax.data import records as rec
from rlhf_jax.eval import policy as policy_eval
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
      raise ValueError(f"ListwiseLossConfig.sft_weight={self.sft_weight!r} is invalid; allowed: >= 0")
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
    sft_B = (m_B - 1.0) ** 2 * (-best_sum_B)
  else:
    sft_B = -best_sum_B / best_len_B
  per_B = rank_B + cfg.sft_weight * sft_B
  metrics = dict(metrics)
  metrics.update(rank_loss=jnp.mean(rank_B), sft_loss=jnp.mean(sft_B), loss=jnp.mean(per_B),
                 best_nll_per_token=jnp.mean(-best_sum_B / best_len_B))
  return per_B, metrics


def make_loss_fn(model: models.Transformer, cfg: ListwiseLossConfig) -> train.loop.LossFn:
  def loss_fn(params, batch, rng):
    del rng
    b, k, t = batch["tokens"].shape
    flat = lambda x: x.reshape(b * k, t)  # noqa: E731
    logps = models.sequence_logprobs(model, params, flat(batch["tokens"]), flat(batch["mask"]),
                                     flat(batch["loss_mask"]))
    sums_BxK = jnp.sum(logps, axis=-1).reshape(b, k)
    lens_BxK = jnp.sum(batch["loss_mask"], axis=-1).astype(jnp.float32)
    per_B, metrics = list_loss(cfg, sums_BxK, lens_BxK, batch["scores"], batch["candidate_mask"])
    return jnp.mean(per_B), metrics

  return loss_fn


@dataclasses.dataclass(frozen=True)
class RankedDataConfig:
  """Ranked lists and batching.

  Attributes:
    source, synthetic_dir, train_jsonl, eval_jsonl, eval_prompts_jsonl: as ``dpo.PairwiseDataConfig``
      (files ``ranked.jsonl`` / ``ranked_test.jsonl``; ``train_jsonl`` may hold prompts only when
      ``candidates = "generated"``).
    candidates: ``data`` (the lists in the file) or ``generated`` (K policy samples scored by the RM).
    num_candidates: K of generated lists; for data lists, keep at most this many (0 = all).
    num_generation_prompts: training prompts that get a generated list.
    generation_temperature: sampling temperature of the generated candidates.
    max_prompt_len, max_response_len, batch_size, shuffle_seed, buckets: as for pairs.
    num_eval_lists: held-out lists for the loss metrics (whole batches).
  """

  source: str = "synthetic"
  synthetic_dir: str = ""
  train_jsonl: str = ""
  eval_jsonl: str = ""
  eval_prompts_jsonl: str = ""
  candidates: str = "data"
  num_candidates: int = 4
  num_generation_prompts: int = 512
  generation_temperature: float = 1.0
  max_prompt_len: int = 32
  max_response_len: int = 48
  batch_size: int = 8
  shuffle_seed: int = 0
  buckets: tuple = ()
  num_eval_lists: int = 64

  def __post_init__(self):
    if self.source not in dpo.SOURCES:
      raise ValueError(f"RankedDataConfig.source={self.source!r} is invalid; allowed: "
                       f"{' | '.join(dpo.SOURCES)}")
    if self.candidates not in CANDIDATES:
      raise ValueError(f"RankedDataConfig.candidates={self.candidates!r} is invalid; allowed: "
                       f"{' | '.join(CANDIDATES)}")
    if self.source == "jsonl" and not os.path.isfile(self.train_jsonl):
      raise ValueError(f"RankedDataConfig.train_jsonl={self.train_jsonl!r} is invalid; allowed: an "
                       "existing JSONL file (required with source='jsonl')")
    for name in ("max_prompt_len", "max_response_len", "batch_size", "num_eval_lists",
                 "num_generation_prompts"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < (2 if "len" in name else 1):
        raise ValueError(f"RankedDataConfig.{name}={value!r} is invalid; allowed: an int >= "
                         f"{2 if 'len' in name else 1}")
    if self.num_candidates < (2 if self.candidates == "generated" else 0) or self.num_candidates == 1:
      raise ValueError(f"RankedDataConfig.num_candidates={self.num_candidates!r} is invalid; allowed: "
                       "an int >= 2 (or 0 = all, for data lists)")
    if not self.generation_temperature > 0:
      raise ValueError(f"RankedDataConfig.generation_temperature={self.generation_temperature!r} is "
                       "invalid; allowed: > 0")


def filter_lists(src: str, dst: str, max_candidates: int = 0) -> tuple[int, int]:
  """Copies ranked records to ``dst`` (at most ``max_candidates`` each), dropping all-tied lists.

  Returns (kept, skipped_tied). A list cut to its first ``max_candidates`` is checked for ties after
  the cut.
  """
  kept, skipped = [], 0
  for record in rec.iter_records(src, "ranked"):
    responses, scores = list(record.responses), list(record.scores)
    if max_candidates:
      responses, scores = responses[:max_candidates], scores[:max_candidates]
    if len(set(scores)) < 2:
      skipped += 1
      continue
    kept.append({"prompt": record.prompt, "responses": responses, "scores": scores})
  if not kept:
    raise ValueError(f"{src}: all {skipped} candidate lists have all-equal scores; nothing to rank")
  rec.write_jsonl(dst, kept)
  if skipped:
    logger.warning("%s: skipped %d candidate list(s) whose scores are all equal", src, skipped)
  return len(kept), skipped


def generate_lists(loaded: common.LoadedModels, prompts: list[str], cfg: RankedDataConfig,
                   path: str, seed: int) -> None:
  """K samples per prompt from the initial policy, scored by the reward model, as ranked JSONL.

  Sampling and scoring are ``scoring.sample_candidates`` (the loop RAFT and best-of-n share); each
  score is the RM reward of the response as sampled.
  """
  if os.path.exists(path):
    return  # deterministic given the SFT checkpoint and seed; written atomically
  tok, k = loaded.tokenizer, cfg.num_candidates
  cands = scoring.sample_candidates(
      loaded.model, loaded.ref_params, tok, prompts, reward=loaded.reward, num_samples=k,
      max_prompt_len=cfg.max_prompt_len, max_new_tokens=cfg.max_response_len,
      temperature=cfg.generation_temperature, rng=jax.random.PRNGKey(seed))
  rows, empty = [], 0
  for i, prompt in enumerate(prompts):
    # Empty (immediate-EOS) samples cannot be stored as records; a list needs 2 candidates.
    kept = [(cands.texts[j], float(cands.rewards_N[j])) for j in range(i * k, (i + 1) * k)
            if cands.texts[j].strip()]
    if len(kept) < 2:
      empty += 1
      continue
    rows.append({"prompt": prompt, "responses": [t for t, _ in kept],
                 "scores": [round(r, 5) for _, r in kept]})
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  rec.write_jsonl(path, rows)
  if not rows:
    raise ValueError(f"generate_lists: every one of {len(prompts)} prompts got < 2 non-empty samples")
  logger.info("generated %d candidate lists of %d samples -> %s (%d prompts dropped: < 2 non-empty "
              "samples)", len(rows), cfg.num_candidates, path, empty)


class ListData(NamedTuple):
  train: batching.BatchIterator
  eval_batches: list
  eval_prompts: list
  num_train_lists: int
  skipped_tied_lists: int


def prepare_lists(cfg: RankedDataConfig, sources: common.ModelSources, loaded: common.LoadedModels,
                  workdir: str, num_prompts: int, seed: int) -> ListData:
  train_src, eval_src, prompts_src = dpo.resolve_files(cfg, sources, "ranked")
  data_dir = os.path.join(workdir, "data")
  os.makedirs(data_dir, exist_ok=True)
  if cfg.candidates == "generated":
    if loaded.reward is None:
      raise ValueError("config.data.candidates='generated' needs config.sources.reward_model_workdir")
    gen_prompts = cfg.train_jsonl or (os.path.join(os.path.dirname(train_src), "prompts.jsonl"))
    generated = os.path.join(data_dir, "generated_ranked.jsonl")
    generate_lists(loaded, common.read_prompts(gen_prompts, cfg.num_generation_prompts), cfg,
                   generated, seed)
    train_src = generated
  limits = dict(max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len)
  datasets, skipped = {}, 0
  for split, src in (("train", train_src), ("eval", eval_src)):
    if split == "eval" and not (src and os.path.isfile(src)):
      continue
    filtered = os.path.join(data_dir, f"ranked_{split}.jsonl")
    _, n_skipped = filter_lists(src, filtered, cfg.num_candidates)
    skipped += n_skipped if split == "train" else 0
    datasets[split] = ds_lib.prepare_dataset(filtered, "ranked", loaded.tokenizer,
                                             os.path.join(data_dir, f"ranked_{split}"), **limits)
  train_it = batching.BatchIterator(datasets["train"], cfg.batch_size, seed=cfg.shuffle_seed,
                                    buckets=cfg.buckets or None,
                                    vocab_size=loaded.model_config.vocab_size)
  eval_batches = []
  if "eval" in datasets:
    n_eval = min(cfg.num_eval_lists, len(datasets["eval"])) // cfg.batch_size
    eval_it = batching.BatchIterator(datasets["eval"], cfg.batch_size, shuffle=False, num_epochs=1,
                                     buckets=(cfg.max_prompt_len + cfg.max_response_len,),
                                     process_index=0, process_count=1)
    eval_batches = [next(eval_it) for _ in range(n_eval)]
    # one candidate axis for train and eval (the eval file may hold longer lists): pad / cut to K
    k = train_it.num_candidates
    eval_batches = [_fit_candidates(b, k) for b in eval_batches]
  prompts = common.read_prompts(prompts_src, num_prompts)
  return ListData(train_it, eval_batches, prompts, len(datasets["train"]), skipped)


def _fit_candidates(batch: dict, k: int) -> dict:
  out = {}
  for key, value in batch.items():
    if value.ndim >= 2 and key != "valid":
      if value.shape[1] >= k:
        value = value[:, :k]
      else:
        pad = [(0, 0), (0, k - value.shape[1])] + [(0, 0)] * (value.ndim - 2)
        value = np.pad(value, pad)
    out[key] = value
  return out


KNOWN_KEYS = {"seed", "sources", "model", "tokenizer", "loss", "data", "optim", "loop", "eval", "mesh"}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) PRO / RRHF; see ``experiments/configs/pro_synthetic.py`` for the keys."""
  common.check_config_keys(config, KNOWN_KEYS, "pro/rrhf")
  sources = config_dicts.to_dataclass(common.ModelSources, config.sources, "sources")
  loss_cfg = config_dicts.to_dataclass(ListwiseLossConfig, config.loss, "loss")
  data_cfg = config_dicts.to_dataclass(RankedDataConfig, config.data, "data")
  optim_cfg = config_dicts.to_dataclass(train.OptimConfig, config.optim, "optim")
  loop_cfg = config_dicts.to_dataclass(train.LoopConfig, config.loop, "loop")
  eval_cfg = config_dicts.to_dataclass(policy_eval.PolicyEvalConfig, config.eval, "eval")
  mesh = parallel.mesh_from_config(config.mesh)
  os.makedirs(workdir, exist_ok=True)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  loaded = common.load_models(sources, mesh, model_section=config.get("model"),
                              tokenizer_spec=config.get("tokenizer", "byte"), rng=init_rng,
                              need_reward=data_cfg.candidates == "generated")
  data = prepare_lists(data_cfg, sources, loaded, workdir, eval_cfg.num_prompts, config.seed)

  optimizer, schedule = train.make_optimizer(optim_cfg, loop_cfg.num_steps)
  state = train.create_train_state(loaded.policy_params, optimizer, state_rng, mesh)
  loss_fn = make_loss_fn(loaded.model, loss_cfg)
  step_fn = train.make_train_step(loss_fn, optimizer, schedule,
                                  grad_accum_steps=optim_cfg.grad_accum_steps)
  evaluator = common.policy_evaluator(loaded, data.eval_prompts, data_cfg.max_prompt_len, eval_cfg,
                                      workdir)
  list_eval = dpo.make_pair_eval_fn(loss_fn, data.eval_batches, mesh)

  def eval_fn(state: train.TrainState, step: int) -> dict[str, float]:
    extra = {k.replace("pairs/", "lists/", 1): v for k, v in list_eval(state.params).items()}
    return {**evaluator(state.params, step), **extra}

  fingerprint = {"method": loss_cfg.method, "model": dataclasses.asdict(loaded.model_config),
                 "tokenizer": loaded.tokenizer.fingerprint(), "loss": dataclasses.asdict(loss_cfg)}
  result = train.train(workdir=workdir, config=loop_cfg, state=state, step_fn=step_fn,
                       data=data.train, fingerprint=fingerprint, mesh=mesh, eval_fn=eval_fn,
                       run_config=config.to_dict(),
                       token_count=lambda batch: float(np.sum(batch["mask"])))
  final = {"method": loss_cfg.method, "step": result.step, "preempted": result.preempted,
           **result.eval_metrics, "num_train_lists": data.num_train_lists,
           "skipped_tied_lists": data.skipped_tied_lists, "candidates": data_cfg.candidates}
  if result.preempted:
    return final
  return common.write_final(workdir, final, loss_cfg.method)
