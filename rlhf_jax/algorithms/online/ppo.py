"""Online RLHF (InstructGPT step 3): PPO with a per-token KL penalty, or RLOO / GRPO (and TRL's GRPO
loss types: dapo, bnpo, cispo, GSPO's sequence ratio) / Dr. GRPO / REINFORCE++-baseline.

A bandit environment: a prompt x is shown, the policy answers y ~ π_θ(·|x), the reward model scores
the whole answer, and a per-token KL penalty to the SFT model keeps the policy close:

    R_t = -β (log π_θ(y_t|x, y_<t) - log π_ref(y_t|x, y_<t)) + [t = |y|] · (r_φ(x, y) - penalty·[no EOS])

One iteration is one step of the one training loop (``train.train(iteration=...)``): it gets a
batch of ``data.batch_size`` prompts, samples ``num_samples`` answers each with the jitted
KV-cache sampler, scores them, computes old / reference log-probs and values, shapes rewards and
advantages (``rollout.compute_advantages``), then runs ``num_ppo_epochs`` × ``num_minibatches``
clipped updates in one jitted call (``update.make_update_fn``); β follows a fixed or adaptive
controller. Each phase ends with ``block_until_ready`` so its wall time is real. Checkpoints,
resume, SIGTERM, the NaN guard, metrics and the evaluation cadence are the loop's, as for every
other method (``config.loop`` is a ``train.LoopConfig``; ``num_steps`` = iterations).

Logged every iteration with ``loop.log_every=1`` (``<workdir>/metrics.jsonl``, split ``train``):
gold reward of the rollout samples (synthetic task), reward-model score, KL(π‖π_ref) per sequence,
β, entropy, clip fraction, approx. KL(π_old‖π), value explained variance, response length, EOS
fraction, losses, gradient norm, per-phase seconds + tokens/s, and ``compiles`` (XLA compilations
inside the iteration's phases: 0 after the first). Held-out evaluations (split ``eval``;
``eval.policy``) run before the first iteration (the SFT baseline, step 0), every ``eval_every``
iterations and at the end.

Sharding: the run lives on the mesh of ``config.mesh`` (``parallel.mesh_from_config``; default one
device) with ``parallel.DEFAULT_RULES``: policy, reference, value and reward-model params are placed
per the rules table, rollout rows are split over ``data`` × ``fsdp``, and every phase is jitted
with explicit in/out shardings (``parallel.Placement``), so each compiles once per run.

Faults: NaN/inf rewards, values, log-probs, advantages or loss raise ``train.NonFiniteLossError``
(naming the iteration and the array) before anything is saved, so the last good checkpoint stays
the latest; SIGTERM finishes the current iteration, checkpoints it and returns; rerunning resumes
with the same prompt order and RNG stream.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Mapping, NamedTuple

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import fileio, losses, parallel, sampling, scoring, train
from rlhf_jax.algorithms import common, sections
from rlhf_jax.algorithms.online import models as ppo_models
from rlhf_jax.algorithms.online.config import PPOConfig, PPODataConfig
from rlhf_jax.algorithms.online.rollout import (Rollout, make_advantage_fn, make_generate_fn,
                                                make_logprob_fn, make_score_fn)
from rlhf_jax.algorithms.online.update import (PPOState, make_update_fn, place, place_state,
                                               state_shardings)
from rlhf_jax.data import batching, records, synthetic, synthetic_files
from rlhf_jax.data import dataset as ds_lib
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.parallel import Placement
from rlhf_jax.train import config_dicts

logger = logging.getLogger(__name__)

FINAL_METRICS_FILE = train.FINAL_METRICS_FILE
PHASES = ("generation", "scoring", "logprobs", "advantages", "update")
# Shown in the console progress line of every iteration (all of them are in metrics.jsonl).
PROGRESS_KEYS = ("gold_reward", "rm_score", "kl", "kl_coef", "entropy", "response_length",
                 "time_generation", "time_update")

# XLA compilations in this process, counted by a jax.monitoring listener that the first run
# registers (never at import: importing a module must not change global JAX state).
_COMPILES = {"count": 0, "listening": False}


def _count_compile(event: str, duration_secs: float, **kwargs) -> None:
  del duration_secs, kwargs
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES["count"] += 1


def compile_count() -> int:
  """XLA compilations so far (registers the listener on first use, once per process)."""
  if not _COMPILES["listening"]:
    jax.monitoring.register_event_duration_secs_listener(_count_compile)
    _COMPILES["listening"] = True
  return _COMPILES["count"]


class RunResult(NamedTuple):
  metrics: dict  # final_metrics.json content
  state: PPOState  # policy (and value) params after the last iteration


class Sections(NamedTuple):
  """The parsed experiment config (:func:`parse_config`)."""

  ppo: PPOConfig
  sources: sections.Sources
  data: PPODataConfig
  limits: sections.Limits
  loop: train.LoopConfig
  optim: train.OptimConfig
  eval: policy_eval.PolicyEvalConfig


@dataclasses.dataclass
class Prompts:
  train: batching.BatchIterator  # left-padded [BOS] prompt batches, resumable
  eval_texts: list  # held-out prompt strings
  gold_reward_fn: Any  # (prompts, responses) -> [B] or None


def prepare_prompts(data: PPODataConfig, limits: sections.Limits, config: PPOConfig, tokenizer,
                    workdir: str, *, vocab_size: int) -> Prompts:
  """Train prompt iterator (TFDS prompt dataset under ``<workdir>/data``) and eval prompt texts."""
  data_dir = fileio.join(workdir, "data")
  gold_fn = None
  if data.source == "synthetic":
    task_dir = data.synthetic_dir or fileio.join(data_dir, "synthetic")
    wanted = data.synthetic_task()
    # Every process takes process 0's branch; process 0 writes, the others wait for the files.
    if not parallel.agree(fileio.exists(fileio.join(task_dir, "metadata.json"))):
      parallel.write_on_coordinator(synthetic_files.write_task, task_dir, wanted, overwrite=True,
                                    barrier="ppo_synthetic_task")
    meta = train.read_json(fileio.join(task_dir, "metadata.json"))
    for key in ("seed", "num_prompts", "num_test_prompts"):
      if meta["config"][key] != getattr(wanted, key):
        raise ValueError(f"{task_dir} holds a synthetic task with {key}={meta['config'][key]}, the "
                         f"config asks for {getattr(wanted, key)}; use a fresh --workdir")
    train_jsonl = fileio.join(task_dir, "prompts.jsonl")
    eval_jsonl = data.eval_prompts_jsonl or fileio.join(task_dir, "prompts_test.jsonl")
    gold_fn = synthetic.gold_rewards
  else:
    train_jsonl, eval_jsonl = data.train_jsonl, data.eval_prompts_jsonl or data.eval_jsonl
  dataset = ds_lib.prepare_dataset(train_jsonl, "prompt", tokenizer,
                                   fileio.join(data_dir, "prompts_train"),
                                   max_prompt_len=limits.max_prompt_len,
                                   max_response_len=limits.max_response_len)
  iterator = batching.BatchIterator(dataset, config.rollout_batch_size, seed=data.shuffle_seed,
                                    buckets=(limits.max_prompt_len,), vocab_size=vocab_size)
  eval_texts = []
  if eval_jsonl:
    eval_texts = [
        r.prompt
        for r in records.read_records(eval_jsonl, "prompt", chat_template=tokenizer.chat_template)]
  return Prompts(iterator, eval_texts, gold_fn)


def _kl_controller(config: PPOConfig):
  if config.kl_controller == "adaptive":
    return losses.AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
  return losses.FixedKLController(config.kl_coef)


def run(*, workdir: str, config: PPOConfig, loop: train.LoopConfig, optim: train.OptimConfig,
        eval_config: policy_eval.PolicyEvalConfig, data: PPODataConfig, limits: sections.Limits,
        models_: ppo_models.PPOModels, seed: int = 0, run_config: Mapping[str, Any] | None = None,
        placement: Placement | None = None) -> RunResult:
  """Runs (or resumes) ``loop.num_steps`` RL iterations in ``workdir``; returns the final metrics
  (also written to ``<workdir>/final_metrics.json``) and the final state. ``models_`` from
  :func:`ppo_models.load_models` or built in-process (iterated RLHF); ``placement``: mesh + rules
  (default: one device)."""
  fileio.makedirs(workdir)
  tok, policy = models_.tokenizer, models_.policy
  if config.max_new_tokens != limits.max_response_len:
    raise ValueError(f"PPOConfig.max_new_tokens={config.max_new_tokens} differs from "
                     f"config.limits.max_response_len={limits.max_response_len}; allowed: equal "
                     "(parse_config sets it from the limits)")
  limits.check_model(policy.config.max_seq_len)
  prompts = prepare_prompts(data, limits, config, tok, workdir, vocab_size=policy.config.vocab_size)
  prompt_len = limits.max_prompt_len
  compile_count()  # the listener must see the first iteration's compilations

  total_updates = loop.num_steps * config.updates_per_iteration
  optimizer, schedule = train.make_optimizer(optim, total_updates)
  params = {"policy": models_.policy_params}
  if models_.value_model is not None:
    params["value"] = models_.value_params
  controller = _kl_controller(config)
  # Everything the jitted phases read is placed (committed) with the shardings their jit declares,
  # and every phase returns exactly those shardings: jit's cache key includes each argument's
  # sharding and committed-ness, so anything looser compiles the phases again in iteration 2.
  placement = placement or Placement(parallel.mesh_from_config(None))
  ways = int(
      np.prod([
          placement.mesh.shape[a] for a in np.atleast_1d(parallel.batch_axes(placement.rules))]))
  if config.rollout_batch_size % ways:
    raise ValueError(
        f"config.data.batch_size={config.rollout_batch_size} (rollout_batch_size) must "
        f"be a multiple of the mesh's batch ways ({ways}: the product of the "
        f"{parallel.batch_axes(placement.rules)} axes of config.mesh); prompts are "
        "split over them")
  shardings = state_shardings(policy, models_.value_model, optim, total_updates, placement)
  state = place_state(params, optimizer, float(controller.initial()), jax.random.PRNGKey(seed),
                      shardings)
  policy_state = state.params["policy"]
  if lora_lib.is_lora(policy_state) and models_.ref_params is models_.policy_params.base:
    ref_params = policy_state.base  # LoRA: the reference is the frozen base, the same arrays
  else:
    ref_params = place(models_.ref_params, placement.params(lora_lib.unwrap(policy)))
  fingerprint = {
      "method": "ppo",
      "algorithm": config.algorithm,
      "model": dataclasses.asdict(policy.config),
      **common.lora_fingerprint(getattr(policy, "lora", None), policy_state),
      **{
          f"value_{k}": v for k, v in common.lora_fingerprint(  # a LoRA critic's config and base
              getattr(models_.value_model, "lora", None), state.params.get("value")).items()},
      "tokenizer": tok.fingerprint(),
      "value_model": (dataclasses.asdict(models_.value_model.config)
                      if models_.value_model is not None else None),
      **train.runs.pretrained_fingerprint(getattr(models_, "pretrained", ""))}

  samp_cfg = sampling.SamplingConfig(max_new_tokens=config.max_new_tokens,
                                     temperature=config.temperature, top_k=config.top_k,
                                     top_p=config.top_p, num_samples=config.num_samples,
                                     eos_id=tok.eos_id, pad_id=tok.pad_id)
  phases = _Phases(
      generate=make_generate_fn(policy, samp_cfg, placement),
      score=make_score_fn(models_.reward.model, eos_id=tok.eos_id,
                          missing_eos_penalty=config.missing_eos_penalty,
                          attribute_weights=models_.reward.attribute_weights, placement=placement),
      logprob=make_logprob_fn(policy, models_.value_model, prompt_len, config.temperature,
                              placement), advantage=make_advantage_fn(config, placement),
      placement=placement)
  update_fn = make_update_fn(config, policy, models_.value_model, optim, total_updates, prompt_len,
                             placement)
  # The RM handle may live on another mesh (its own default is one device): copy its params onto
  # this run's mesh with the rules table's shardings (a no-op when they are already there).
  rm_args = (place(models_.reward.params, placement.params(models_.reward.model)),
             jax.device_put(np.asarray(models_.reward.info.mean, np.float32), placement.replicated),
             jax.device_put(np.asarray(models_.reward.info.std, np.float32), placement.replicated))

  def iteration(state: PPOState, batch) -> tuple[PPOState, dict]:
    """One RL iteration: rollout phases, then the update (the loop's non-jitted step)."""
    compiles_before = compile_count()
    it = int(jax.device_get(state.iteration))
    rollout, metrics = _rollout(state, batch, prompts, tok, ref_params, rm_args, phases, config)
    t0 = time.perf_counter()
    state, upd = update_fn(state, rollout)
    upd = jax.device_get(upd)
    metrics["time_update"] = time.perf_counter() - t0
    metrics["compiles"] = float(compile_count() - compiles_before)
    metrics.update({k: float(v) for k, v in upd.items()})  # the loop checks loss / grad_norm
    n_rows = config.rollout_size
    new_beta = controller.update(state.kl_coef, metrics["kl"], n_rows)
    state = state.replace(iteration=state.iteration + 1, kl_coef=new_beta)
    metrics["lr"] = float(schedule((it + 1) * config.updates_per_iteration - 1))
    tokens_seq = rollout.tokens_BxT.shape[1]
    metrics["update_tokens_per_s"] = (n_rows * tokens_seq * config.num_ppo_epochs /
                                      max(metrics["time_update"], 1e-9))
    metrics["time_iteration"] = sum(metrics[f"time_{p}"] for p in PHASES)
    metrics["tokens_per_s"] = metrics["generated_tokens"] / metrics["time_iteration"]
    return state, metrics

  eval_fn = None
  if prompts.eval_texts:
    eval_prompts = policy_eval.make_eval_prompts(tok, prompts.eval_texts, max_prompt_len=prompt_len)
    evaluator = policy_eval.PolicyEvaluator(policy, ref_params, tok, eval_prompts, eval_config,
                                            reward_fn=scoring.sample_reward_fn(models_.reward),
                                            gold_reward_fn=prompts.gold_reward_fn,
                                            sample_path=fileio.join(workdir, "samples.jsonl"),
                                            mesh=placement.mesh)
    eval_fn = lambda st, step: evaluator(st.params["policy"], step)  # noqa: E731

  result = train.train(workdir=workdir, config=loop, state=state, iteration=iteration,
                       data=prompts.train, fingerprint=fingerprint, eval_fn=eval_fn,
                       initial_eval=True, run_config=run_config, tokens_metric="generated_tokens",
                       progress_keys=PROGRESS_KEYS)
  state = result.state
  final = {
      "iteration": result.step, "preempted": result.preempted, **result.eval_metrics,
      **{f"initial_{k}": v for k, v in result.initial_eval_metrics.items()}, "final_kl_coef": float(
          state.kl_coef), **parallel.topology(placement.mesh)}
  if result.stop_reason:
    final["stop_reason"] = result.stop_reason
  if not result.preempted and parallel.is_coordinator():
    train.write_final_metrics(workdir, final, method=config.algorithm)
  return RunResult(final, state)


class _Phases(NamedTuple):
  generate: Any  # rollout.make_generate_fn
  score: Any  # rollout.make_score_fn
  logprob: Any  # rollout.make_logprob_fn
  advantage: Any  # rollout.make_advantage_fn
  placement: Placement


def _generate_and_score(params, batch, rng, rm_args, phases: _Phases):
  """Generation and scoring of one prompt batch → ``(arrays, seconds generating, seconds
  scoring)``; arrays = (tokens_BxT, mask_BxT, response_mask_BxR, scores_B, rm_B)."""
  placement = phases.placement
  prompt_tokens, prompt_mask = parallel.shard_batch(
      (np.asarray(batch["prompt_tokens"]), np.asarray(batch["prompt_mask"])), placement.mesh,
      placement.rules)
  t0 = time.perf_counter()
  tokens_BxT, mask_BxT, response_mask = jax.block_until_ready(
      phases.generate(params, prompt_tokens, prompt_mask, rng))
  t1 = time.perf_counter()
  scores_B, rm_B = jax.block_until_ready(phases.score(*rm_args, tokens_BxT, mask_BxT,
                                                      response_mask))
  return (tokens_BxT, mask_BxT, response_mask, scores_B, rm_B), t1 - t0, time.perf_counter() - t1


def _shaped_scores(config: PPOConfig, scores_B, response_mask_BxR) -> np.ndarray:
  """Host copy of the scores the advantages see (DAPO's overlong penalty included)."""
  scores = np.asarray(scores_B, np.float64)
  if config.overlong_buffer_len:
    lengths = np.asarray(response_mask_BxR).sum(axis=1)
    expected = config.max_new_tokens - config.overlong_buffer_len
    exceed = np.minimum(lengths - expected, config.overlong_buffer_len)
    scores = scores + np.where(
        exceed > 0, -exceed / config.overlong_buffer_len * config.overlong_penalty_factor, 0.0)
  return scores


def per_host_rows(fn, *arrays_B: np.ndarray) -> np.ndarray:
  """``fn(*arrays)`` ``[B]`` computed on this process's rows only and gathered in row order.

  ``arrays_B`` are host copies of the whole rollout (every process holds them); process p takes
  rows ``[p·B/n, (p+1)·B/n)`` — its slice of the global batch — so host work such as decoding text
  and the gold reward is split over the hosts, not repeated on each. One process (or B not a
  multiple of the process count): ``fn`` over all rows.
  """
  n, b = parallel.process_count(), len(arrays_B[0])
  if n == 1 or b % n:
    return np.asarray(fn(*arrays_B))
  lo, hi = parallel.process_index() * (b // n), (parallel.process_index() + 1) * (b // n)
  local = np.asarray(fn(*(a[lo:hi] for a in arrays_B)), np.float32)
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def dynamic_sample(config: PPOConfig, first, next_generation):
  """DAPO's dynamic sampling: the groups of a full batch whose rewards are not all equal.

  ``first``: the arrays of the iteration's first generation (:func:`_generate_and_score`);
  ``next_generation(k)``: the arrays of generation k = 1, 2, ... (each a fresh prompt batch).
  Groups with all-equal shaped scores (``losses.degenerate_groups``) are dropped and replaced from
  further generations, at most ``dynamic_sampling_max_batches`` in all; a batch still short is
  filled with dropped groups (zero advantage: they only carry the KL term) so the batch is never
  empty and keeps its shape. Returns ``(host arrays, stats)``; stats: ``generations``,
  ``kept_fraction`` (non-degenerate share of every generated group) and ``shortfall``
  (degenerate groups left in the batch).
  """
  g = config.num_samples
  n_groups = config.rollout_batch_size
  # Every process reads the whole generation (parallel.to_host), so every process takes the same
  # decision on the same scores: a resampling decision taken per host would send the hosts into
  # different numbers of sampler calls and hang them in a collective.
  gens = [tuple(parallel.to_host(tuple(first)))]
  kept, dropped = [], []
  while True:
    k = len(gens) - 1
    scores = _shaped_scores(config, gens[k][3], gens[k][2]).reshape(n_groups, g)
    degenerate = losses.degenerate_groups(scores, tol=config.dynamic_sampling_tol)
    kept += [(k, i) for i in np.flatnonzero(~degenerate)]
    dropped += [(k, i) for i in np.flatnonzero(degenerate)]
    if len(kept) >= n_groups or len(gens) >= config.dynamic_sampling_max_batches:
      break
    gens.append(tuple(parallel.to_host(tuple(next_generation(len(gens))))))
  chosen = (kept + dropped)[:n_groups]
  rows = [(k, i * g + j) for k, i in chosen for j in range(g)]
  arrays = tuple(np.stack([gens[k][a][r] for k, r in rows]) for a in range(len(first)))
  stats = {
      "generations": float(len(gens)), "kept_fraction": len(kept) / (len(gens) * n_groups),
      "shortfall": float(max(n_groups - len(kept), 0))}
  return arrays, stats


def _rollout(state: PPOState, batch, prompts: Prompts, tok, ref_params, rm_args, phases: _Phases,
             config: PPOConfig):
  """Rollout phases on one prompt batch → ``(rollout, metrics)`` (the update is not run here).

  With ``config.dynamic_sampling`` further prompt batches are drawn from ``prompts.train`` (the
  loop checkpoints its position after the iteration, so a resumed run draws the same ones).
  Raises ``train.NonFiniteLossError`` (the loop adds the iteration) on NaN/inf rewards, values,
  log-probs, advantages or returns, before anything of this iteration is kept.
  """
  metrics: dict[str, float] = {}
  placement = phases.placement
  params = state.params["policy"]
  first, t_gen, t_score = _generate_and_score(params, batch, state.rng, rm_args, phases)
  tokens_BxT, mask_BxT, response_mask, scores_B, rm_B = first
  if config.dynamic_sampling:
    times = [t_gen, t_score]

    def next_generation(k):
      rng = jax.device_put(jax.random.fold_in(state.rng, 1000 + k), placement.replicated)
      arrays, t_g, t_s = _generate_and_score(params, next(prompts.train), rng, rm_args, phases)
      times[0] += t_g
      times[1] += t_s
      return arrays

    host, stats = dynamic_sample(config, first, next_generation)
    if stats["generations"] > 1 or stats["shortfall"] > 0:
      # every process holds all rows: each places its own slice of the global batch
      tokens_BxT, mask_BxT, response_mask, scores_B, rm_B = parallel.shard_rows(
          host, placement.mesh, placement.rules)
    t_gen, t_score = times
    metrics.update({f"dynamic_sampling_{k}": v for k, v in stats.items()})
  t2 = time.perf_counter()
  old_logps, ref_logps, values, entropy = jax.block_until_ready(
      phases.logprob(state.params["policy"], ref_params, state.params.get("value"), tokens_BxT,
                     mask_BxT))
  t3 = time.perf_counter()
  train.check_finite(rewards=scores_B, values=values, policy_logprobs=old_logps,
                     reference_logprobs=ref_logps)
  advantages, returns, adv_metrics = jax.block_until_ready(
      phases.advantage(scores_B, old_logps, ref_logps, values, response_mask, state.kl_coef))
  t4 = time.perf_counter()
  train.check_finite(advantages=advantages, returns=returns)
  # Host copies of the whole rollout on every process (one collective): the statistics below are
  # then the same numbers on every host, and the same as on one host.
  tokens_host, mask_host, resp_mask_host, rm_host, scores_host, entropy_host = parallel.to_host(
      (tokens_BxT, mask_BxT, response_mask, rm_B, scores_B, entropy))
  p = tokens_host.shape[1] - resp_mask_host.shape[1]
  resp_tokens = tokens_host[:, p:]
  finished_B = np.any((resp_tokens == tok.eos_id) & (resp_mask_host > 0), axis=1)
  loss_mask = response_mask
  if config.mask_truncated_completions:
    # DAPO's overlong filtering (TRL's mask_truncated_completions): answers that never emitted EOS
    # stay in their group's baseline but leave the loss (and the dapo token count).
    metrics["truncated_fraction"] = float(1.0 - finished_B.mean())
    (loss_mask,) = parallel.shard_rows(
        (resp_mask_host * finished_B[:, None].astype(resp_mask_host.dtype),), placement.mesh,
        placement.rules)
  rollout = Rollout(tokens_BxT, mask_BxT, loss_mask, old_logps, ref_logps, values, advantages,
                    returns)

  n_tokens = float(resp_mask_host.sum())
  metrics.update(time_generation=t_gen, time_scoring=t_score, time_logprobs=t3 - t2,
                 time_advantages=t4 - t3, generated_tokens=n_tokens,
                 generation_tokens_per_s=n_tokens / max(t_gen, 1e-9))
  metrics.update({k: float(v) for k, v in jax.device_get(adv_metrics).items()})
  # Host-side statistics in numpy: no small device ops (and no compilations) in the loop.
  metrics["rm_score"] = float(np.mean(rm_host))
  metrics["score"] = float(np.mean(scores_host))
  metrics["kl_coef"] = float(state.kl_coef)
  metrics["entropy"] = float(np.sum(entropy_host) / max(n_tokens, 1.0))
  metrics["response_length"] = float(resp_mask_host.sum(-1).mean())
  metrics["eos_fraction"] = float(np.mean(finished_B))
  if prompts.gold_reward_fn is not None:
    # Text decoding and the gold reward on this host's rows only, gathered (in row order).
    golds = per_host_rows(lambda pt, pm, rt, rm: synthetic.score_samples(tok, pt, pm, rt, rm),
                          tokens_host[:, :p], mask_host[:, :p], resp_tokens, resp_mask_host)
    metrics["gold_reward"] = float(np.mean(golds))
  return rollout, metrics


KNOWN_KEYS = ("seed", "method", "sources", "data", "limits", "ppo", "loop", "optim", "eval", "mesh",
              "lora")
# PPOConfig fields an experiment config sets in the shared sections instead (one key per concept).
FROM_SECTIONS = {
    "rollout_batch_size": "config.data.batch_size (prompts per iteration)",
    "max_new_tokens": "config.limits.max_response_len (the response budget)"}


def parse_config(config: ml_collections.ConfigDict) -> Sections:
  """The frozen sections of an experiment config (errors name the config keys).

  ``PPOConfig.rollout_batch_size`` comes from ``config.data.batch_size`` and ``max_new_tokens``
  from ``config.limits.max_response_len``; setting them in ``config.ppo`` is an error.
  """
  unknown = sorted(set(config.keys()) - set(KNOWN_KEYS))
  if unknown:
    raise ValueError(f"unknown config key(s) {[f'config.{k}' for k in unknown]}; allowed top-level "
                     f"keys: {list(KNOWN_KEYS)}")
  if config.get("method", "ppo") != "ppo":
    raise ValueError(f"config.method={config.method!r} is invalid for the online RL trainer; "
                     "allowed: ppo (config.ppo.algorithm picks ppo | rloo | grpo | dr_grpo | "
                     "reinforce_baseline)")
  for name, where in FROM_SECTIONS.items():
    if name in config.ppo:
      raise ValueError(f"config.ppo.{name} is not a key of its own; set {where}")
  data = config_dicts.to_dataclass(PPODataConfig, config.data, "data")
  limits = config_dicts.to_dataclass(sections.Limits, config.limits, "limits")
  ppo_values = dict(config.ppo.to_dict(), rollout_batch_size=data.batch_size,
                    max_new_tokens=limits.max_response_len)
  return Sections(ppo=config_dicts.to_dataclass(PPOConfig, ppo_values, "ppo"),
                  sources=config_dicts.to_dataclass(sections.Sources, config.sources,
                                                    "sources"), data=data, limits=limits,
                  loop=config_dicts.to_dataclass(train.LoopConfig, config.loop, "loop"),
                  optim=config_dicts.to_dataclass(train.OptimConfig, config.optim, "optim"),
                  eval=config_dicts.to_dataclass(policy_eval.PolicyEvalConfig, config.eval, "eval"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       models_: ppo_models.PPOModels | None = None,
                       rules: parallel.Rules = parallel.DEFAULT_RULES) -> dict[str, Any]:
  """Runs (or resumes) the experiment ``config`` (see ``experiments/configs/ppo_synthetic.py``);
  ``models_`` overrides loading the models from ``config.sources``; ``rules``: the logical-axis
  rules table on ``config.mesh``."""
  parsed = parse_config(config)
  placement = Placement(parallel.mesh_from_config(config.get("mesh")), tuple(rules))
  if models_ is None:
    models_ = ppo_models.load_models(parsed.ppo, parsed.sources,
                                     jax.random.PRNGKey(config.seed + 1), mesh=placement.mesh,
                                     rules=placement.rules, lora=sections.lora_section(config))
  return run(workdir=workdir, config=parsed.ppo, loop=parsed.loop, optim=parsed.optim,
             eval_config=parsed.eval, data=parsed.data, limits=parsed.limits, models_=models_,
             seed=config.seed, run_config=config.to_dict(), placement=placement).metrics
