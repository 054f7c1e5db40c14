"""RAFT: reward-ranked fine-tuning (Dong et al., 2023, arXiv:2304.06767).

Rounds r = 0 … R-1, each with the current policy π_r:

    1. draw N prompts x_1..x_N (a fresh seeded subset per round) and K samples y_ij ~ π_r(·|x_i)
    2. score them with the reward model: r_ij = r̃_φ(x_i, y_ij)   (normalised RM reward)
    3. keep  per_prompt:  y_i* = argmax_j r_ij for every prompt          (the paper's default)
             global:      the top ⌈f·N·K⌉ samples over all prompts by r_ij
       (samples that never emitted EOS within the budget, or are empty, are not eligible:
       training on them would teach the policy not to stop)
    4. fine-tune π_r on the kept (x, y) with the SFT loss (prompt-masked token-mean NLL) for
       S = loop.num_steps / R optimiser steps → π_{r+1}

The optimiser state and learning-rate schedule run across rounds (one schedule over R·S steps).
Each round is one call of the generic loop whose data are the round's kept samples; a checkpoint is
written at every round boundary, so re-running resumes at the next round with the same samples
(they depend only on the checkpointed params and ``fold_in(seed, round)``). A preemption inside a
round resumes that round from its checkpoint with freshly drawn samples. Every round ends with an
evaluation (``rlhf_jax.eval.policy``) plus the round's statistics: mean RM reward of all samples and
of the kept ones (``round_rm_reward``, ``round_kept_rm_reward``), kept count and eligible share.

Multi-host (one job over several processes, ``config.mesh`` spanning all their devices): every
process draws the same round prompts; each samples and scores its slice of them on its own devices,
and the candidates come back to every process (``scoring.sample_candidates``: ``parallel.to_host``),
so steps 3-4 select the same sequences everywhere. Each fine-tuning batch is the same global batch
on every process, of which each feeds its contiguous ``1 / process_count`` of the rows
(``_RoundData``), so the job trains on exactly the batches one process would. ``samples.jsonl`` and
``final_metrics.json`` (with ``process_count``, ``device_count``, ``mesh_shape``) are written by
process 0.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np

from rlhf_jax import fileio, parallel, scoring, train
from rlhf_jax.algorithms import common, sections
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.train import config_dicts

logger = logging.getLogger(__name__)

SELECTIONS = ("per_prompt", "global")


@dataclasses.dataclass(frozen=True)
class RAFTConfig:
  """The method's own settings (``config.raft``).

  Attributes:
    num_rounds: R; ``loop.num_steps`` must be a multiple (S = num_steps / R steps per round).
    prompts_per_round: N prompts sampled per round.
    samples_per_prompt: K samples per prompt.
    selection: ``per_prompt`` (best of K per prompt) or ``global`` (top ``keep_fraction`` of N·K).
    keep_fraction: f of the global selection.
    temperature: sampling temperature of the candidates.
    require_eos: only samples that emitted EOS are eligible.
  """

  num_rounds: int = 4
  prompts_per_round: int = 256
  samples_per_prompt: int = 8
  selection: str = "per_prompt"
  keep_fraction: float = 0.125
  temperature: float = 1.0
  require_eos: bool = True

  def __post_init__(self):
    for name in ("num_rounds", "prompts_per_round", "samples_per_prompt"):
      sections.check_int("RAFTConfig", name, getattr(self, name), 1)
    sections.check_choice("RAFTConfig", "selection", self.selection, SELECTIONS)
    if not 0.0 < self.keep_fraction <= 1.0:
      raise ValueError(
          f"RAFTConfig.keep_fraction={self.keep_fraction!r} is invalid; allowed: (0, 1]")
    if not self.temperature > 0:
      raise ValueError(f"RAFTConfig.temperature={self.temperature!r} is invalid; allowed: > 0")


@dataclasses.dataclass(frozen=True)
class RAFTDataConfig(sections.DataSource):
  """Prompts and the fine-tuning batch (``config.data``, the shared :class:`sections.DataSource`).

  ``synthetic``: training prompts are the task's ``prompts.jsonl`` and held-out prompts its
  ``prompts_test.jsonl`` (the task in ``synthetic_dir``, default the SFT run's
  ``<sft_workdir>/data/synthetic``). ``jsonl``: training prompts from ``train_jsonl`` (any records
  with a ``prompt``), held-out prompts from ``eval_prompts_jsonl``, else ``eval_jsonl``, else
  ``train_jsonl``. ``batch_size``: fine-tuning sequences per optimiser step.
  """

  OPTIONAL_JSONL: ClassVar[tuple] = ("eval_jsonl",)


def select(rewards_NxK: np.ndarray, eligible_NxK: np.ndarray, selection: str,
           keep_fraction: float) -> np.ndarray:
  """Flat indices (row-major over [N, K]) of the kept samples (module docstring, step 3)."""
  n, k = rewards_NxK.shape
  masked = np.where(eligible_NxK, rewards_NxK, -np.inf)
  if selection == "per_prompt":
    best = np.argmax(masked, axis=1)
    has = np.isfinite(masked[np.arange(n), best])
    return (np.arange(n) * k + best)[has]
  flat = masked.reshape(-1)
  num = min(int(math.ceil(keep_fraction * n * k)), int(np.isfinite(flat).sum()))
  order = np.argsort(-flat, kind="stable")[:num]
  return np.sort(order)


def _host_rows(batch_size: int) -> slice:
  """This process's rows of a global batch of ``batch_size`` (all of them on one process)."""
  count, index = parallel.process_count(), parallel.process_index()
  if batch_size % count:
    raise ValueError(f"config.data.batch_size={batch_size} is not a multiple of the {count} "
                     "processes of this job; allowed: a multiple of the process count")
  local = batch_size // count
  return slice(index * local, (index + 1) * local)


class _RoundData:
  """Shuffled, cycling batches of one round's kept sequences; position saved as ``(round, position)``.

  Every process holds the same kept sequences and draws the same global batch of ``batch_size``
  rows; it yields its own contiguous slice of them (process p: rows ``[p·b/n, (p+1)·b/n)``), the
  per-host batch ``train.train`` assembles into the global one (``parallel.shard_batch``).
  """

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int, round_index: int):
    self.arrays, self.batch_size, self.seed, self.round = arrays, batch_size, seed, round_index
    self.n = len(arrays["tokens"])
    self.position = 0
    self._rows = _host_rows(batch_size)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    per_epoch = max(1, self.n // self.batch_size)
    epoch, b = divmod(self.position, per_epoch)
    perm = np.random.default_rng([self.seed, self.round, epoch]).permutation(self.n)
    if self.n < self.batch_size:  # fewer kept samples than a batch: cycle through them
      perm = np.resize(perm, self.batch_size)
    rows = perm[b * self.batch_size:(b + 1) * self.batch_size][self._rows]
    self.position += 1
    return {k: v[rows] for k, v in self.arrays.items()}

  def get_state(self) -> dict[str, int]:
    return {"round": self.round, "position": self.position}

  def set_state(self, state) -> None:
    # A checkpoint written at the end of the previous round starts this round from its beginning.
    self.position = int(state["position"]) if state.get("round") == self.round else 0


def collect_round(
    loaded: common.LoadedModels, params: Any, prompts: list[str], cfg: RAFTConfig,
    limits: sections.Limits, rng: jax.Array,
    mesh: jax.sharding.Mesh | None = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """Samples, scores and selects one round's training sequences ``[M, P + R]`` (+ statistics).

  Sampling and scoring are ``scoring.sample_candidates`` (the loop best-of-n and generated PRO
  lists share): K samples per prompt, RM rewards on the responses as sampled, the prompts split
  over ``mesh`` (default: the reward model's); every process gets the same arrays back.
  """
  tok = loaded.tokenizer
  cands = scoring.sample_candidates(loaded.model, params, tok, prompts, reward=loaded.reward,
                                    num_samples=cfg.samples_per_prompt,
                                    max_prompt_len=limits.max_prompt_len,
                                    max_new_tokens=limits.max_response_len,
                                    temperature=cfg.temperature, rng=rng, mesh=mesh)
  eligible_N = cands.nonempty_N(tok.eos_id) & (cands.finished_N | (not cfg.require_eos))
  kept = select(cands.grid(cands.rewards_N), cands.grid(eligible_N), cfg.selection,
                cfg.keep_fraction)
  if len(kept) == 0:
    raise ValueError("RAFT: no eligible sample this round (every sample is empty or never emitted "
                     "EOS); raise max_response_len or set require_eos=False")
  tokens, mask, loss_mask = cands.full_sequences()
  arrays = {"tokens": tokens[kept], "mask": mask[kept], "loss_mask": loss_mask[kept]}
  stats = {
      "round_rm_reward": float(np.mean(cands.rewards_N)),
      "round_kept_rm_reward": float(np.mean(cands.rewards_N[kept])), "round_kept": float(len(kept)),
      "round_eligible_fraction": float(np.mean(eligible_N))}
  return arrays, stats


def _prompt_files(data: RAFTDataConfig, sources: sections.Sources) -> tuple[str, str]:
  """(training prompts, held-out prompts) files (:class:`RAFTDataConfig`)."""
  if data.source == "jsonl":
    return data.train_jsonl, data.eval_prompts_jsonl or data.eval_jsonl or data.train_jsonl
  task = data.synthetic_dir or fileio.join(sources.sft_workdir, "data", "synthetic")
  if not fileio.isfile(fileio.join(task, "metadata.json")):
    raise ValueError(f"config.data.synthetic_dir={task!r}: no synthetic task there; allowed: the "
                     "folder `python -m rlhf_jax.data.synthetic --out DIR` wrote (default: the SFT "
                     "run's <sft_workdir>/data/synthetic)")
  return (fileio.join(task, "prompts.jsonl"), data.eval_prompts_jsonl or
          fileio.join(task, "prompts_test.jsonl"))


KNOWN_KEYS = {
    "method", "seed", "sources", "data", "limits", "model", "raft", "optim", "loop", "eval", "mesh",
    "lora"}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) RAFT; see ``experiments/configs/raft_synthetic.py`` for the keys."""
  common.check_config_keys(config, KNOWN_KEYS, "raft")
  if config.get("method", "raft") != "raft":
    raise ValueError(f"config.method={config.method!r} is invalid for raft.train_and_evaluate; "
                     "allowed: 'raft'")
  sources = config_dicts.to_dataclass(sections.Sources, config.sources, "sources")
  sources.require("reward_model_workdir", "RAFT", "it ranks the samples of every round")
  cfg = config_dicts.to_dataclass(RAFTConfig, config.raft, "raft")
  data_cfg = config_dicts.to_dataclass(RAFTDataConfig, config.data, "data")
  limits = config_dicts.to_dataclass(sections.Limits, config.limits, "limits")
  optim_cfg = config_dicts.to_dataclass(train.OptimConfig, config.optim, "optim")
  loop_cfg = config_dicts.to_dataclass(train.LoopConfig, config.loop, "loop")
  eval_cfg = config_dicts.to_dataclass(policy_eval.PolicyEvalConfig, config.eval, "eval")
  if loop_cfg.num_steps % cfg.num_rounds:
    raise ValueError(f"config.loop.num_steps={loop_cfg.num_steps} is not a multiple of "
                     f"config.raft.num_rounds={cfg.num_rounds}; allowed: R x steps per round")
  if loop_cfg.stop_after_steps:
    raise ValueError("config.loop.stop_after_steps is not supported by RAFT (it stops at round "
                     "boundaries only); allowed: 0")
  steps_per_round = loop_cfg.num_steps // cfg.num_rounds
  _host_rows(data_cfg.batch_size)  # before any sampling: the batch must split over the processes
  lora = sections.lora_section(config)
  mesh = parallel.mesh_from_config(config.mesh)
  fileio.makedirs(workdir)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  loaded = common.load_models(sources, mesh, model_section=config.get("model"),
                              tokenizer_spec=sources.tokenizer or "byte", rng=init_rng,
                              need_reward=True, lora=lora)
  limits.check_model(loaded.model_config.max_seq_len)
  train_prompts_path, eval_prompts_path = _prompt_files(data_cfg, sources)
  train_prompts = common.read_prompts(train_prompts_path, None, loaded.tokenizer.chat_template)
  evaluator = common.policy_evaluator(
      loaded,
      common.read_prompts(eval_prompts_path, eval_cfg.num_prompts, loaded.tokenizer.chat_template),
      limits.max_prompt_len, eval_cfg, workdir, mesh=mesh)

  optimizer, schedule = train.make_optimizer(optim_cfg, loop_cfg.num_steps)
  state = train.create_train_state(loaded.policy_params, optimizer, state_rng, mesh)
  step_fn = train.make_train_step(common.nll_loss_fn(loaded.model), optimizer, schedule,
                                  grad_accum_steps=optim_cfg.grad_accum_steps)
  fingerprint = {
      "method": "raft", "model": dataclasses.asdict(loaded.model_config),
      "tokenizer": loaded.tokenizer.fingerprint(), "raft": dataclasses.asdict(cfg),
      "limits": dataclasses.asdict(limits), "batch_size": data_cfg.batch_size,
      **common.lora_fingerprint(loaded.lora, loaded.policy_params),
      **common.pretrained_fingerprint(sources)}
  latest = train.latest_step(workdir)
  params = loaded.policy_params
  if latest and lora_lib.is_lora(params):
    # a LoRA checkpoint holds the adapters only: put them back over the loaded (frozen) base,
    # sharded like the fresh adapters; the fingerprint check of train.train refuses another base
    saved = train.restore_params(workdir, latest)["lora"]
    params = params.replace(lora=parallel.device_put_global(
        saved, jax.tree.map(lambda like: like.sharding, params.lora)))
  elif latest:
    params = common.place_params(train.restore_params(workdir, latest), loaded.model, mesh)
  round_stats: dict[str, float] = {}

  def eval_fn(state: train.TrainState, step: int) -> dict[str, float]:
    return {**evaluator(state.params, step), **round_stats}

  result = None
  for r in range((latest or 0) // steps_per_round, cfg.num_rounds):
    order = np.random.default_rng([config.seed, r]).permutation(len(train_prompts))
    prompts = [train_prompts[i] for i in order[:cfg.prompts_per_round]]
    arrays, stats = collect_round(loaded, params, prompts, cfg, limits,
                                  jax.random.fold_in(jax.random.PRNGKey(config.seed), r), mesh)
    round_stats.clear()
    round_stats.update(stats, round=float(r + 1))
    logger.info("RAFT round %d/%d: kept %d of %d samples (RM reward %.3f -> kept %.3f)", r + 1,
                cfg.num_rounds, len(arrays["tokens"]),
                len(prompts) * cfg.samples_per_prompt, stats["round_rm_reward"],
                stats["round_kept_rm_reward"])
    round_loop = dataclasses.replace(loop_cfg, num_steps=(r + 1) * steps_per_round, eval_every=0,
                                     checkpoint_every=steps_per_round)
    result = train.train(workdir=workdir, config=round_loop, state=state, step_fn=step_fn,
                         data=_RoundData(arrays, data_cfg.batch_size, config.seed,
                                         r), fingerprint=fingerprint, mesh=mesh, eval_fn=eval_fn,
                         run_config=config.to_dict())
    if result.preempted:
      return {"method": "raft", "step": result.step, "preempted": True}
    state, params = result.state, result.state.params
  if result is None:  # every round was already done: evaluate the final checkpoint
    final_metrics = {**evaluator(params, loop_cfg.num_steps)}
  else:
    final_metrics = dict(result.eval_metrics)
  final = {
      "method": "raft", "step": loop_cfg.num_steps, "preempted": False,
      **final_metrics, "rounds": cfg.num_rounds, "selection": cfg.selection}
  return common.write_final(workdir, final, "raft", mesh)
