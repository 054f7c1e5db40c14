"""Online RLHF (InstructGPT step 3): PPO with a per-token KL penalty, or RLOO / GRPO / Dr. GRPO.

A bandit environment: a prompt x is shown, the policy answers y ~ π_θ(·|x), the reward model scores
the whole answer, and a per-token KL penalty to the SFT model keeps the policy close:

    R_t = -β (log π_θ(y_t|x, y_<t) - log π_ref(y_t|x, y_<t)) + [t = |y|] · (r_φ(x, y) - penalty·[no EOS])

Each iteration (:func:`run`): draw ``rollout_batch_size`` prompts, sample ``num_samples`` answers
each with the jitted KV-cache sampler, score them, compute old / reference log-probs and values,
shape rewards and advantages (``rollout.compute_advantages``), then run ``num_ppo_epochs`` ×
``num_minibatches`` clipped updates in one jitted call (``ppo_update.make_update_fn``); β follows a
fixed or adaptive controller. Each phase ends with ``block_until_ready`` so its wall time is real.

Logged every iteration (``<workdir>/metrics.jsonl``, split ``train``): gold reward of the rollout
samples (synthetic task), reward-model score, KL(π‖π_ref) per sequence, β, entropy, clip fraction,
approx. KL(π_old‖π), value explained variance, response length, EOS fraction, losses, gradient
norm, and per-phase seconds + tokens/s. Held-out evaluations (split ``eval``; ``eval.policy``)
run before the first iteration (the SFT baseline), every ``eval_every`` iterations and at the end.

Sharding: the run lives on the mesh of ``config.mesh`` (``parallel.MeshConfig``; default one
device) with ``parallel.DEFAULT_RULES``: policy, reference, value and reward-model params are placed
per the rules table, rollout rows are split over ``data`` × ``fsdp``, and every phase is jitted
with explicit in/out shardings (``parallel.Placement``), so each compiles once per run (the
``compiles`` metric counts XLA compilations inside each iteration's phases: 0 after the first).

Faults: NaN/inf rewards, values, log-probs or loss raise :class:`NonFiniteError` before anything is
saved, so the last good checkpoint stays the latest; SIGTERM finishes the current iteration,
checkpoints it and returns; rerunning resumes with the same prompt order and RNG stream.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, Mapping, NamedTuple

import jax
import ml_collections
import numpy as np

from rlhf_jax import losses, parallel, sampling, train
from rlhf_jax.algorithms.online import models as ppo_models
from rlhf_jax import scoring
from rlhf_jax.algorithms.online.config import PPOConfig, PPODataConfig, PPOLoopConfig
from rlhf_jax.algorithms.online.update import PPOState, make_update_fn, place_state, state_shardings
from rlhf_jax.parallel import Placement
from rlhf_jax.algorithms.online.rollout import (Rollout, make_advantage_fn, make_generate_fn,
                                         make_logprob_fn, make_score_fn)
from rlhf_jax.data import batching, records, synthetic, synthetic_files
from rlhf_jax.data import dataset as ds_lib
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.train import config_dicts

logger = logging.getLogger(__name__)

FINAL_METRICS_FILE = train.FINAL_METRICS_FILE
PHASES = ("generation", "scoring", "logprobs", "advantages", "update")


class NonFiniteError(FloatingPointError):
  """A reward, value, log-prob or loss was NaN/inf; the run stopped before saving it."""


_COMPILES = [0]  # XLA compilations in this process (jax.monitoring listener, registered once)


def _count_compile(event: str, duration_secs: float, **kwargs) -> None:
  del duration_secs, kwargs
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


class RunResult(NamedTuple):
  metrics: dict  # final_metrics.json content
  state: PPOState  # policy (and value) params after the last iteration


@dataclasses.dataclass
class Prompts:
  train: batching.BatchIterator  # left-padded [BOS] prompt batches, resumable
  eval_texts: list  # held-out prompt strings
  gold_reward_fn: Any  # (prompts, responses) -> [B] or None


def prepare_prompts(data: PPODataConfig, config: PPOConfig, tokenizer, workdir: str, *,
                    vocab_size: int) -> Prompts:
  """Train prompt iterator (TFDS prompt dataset under ``<workdir>/data``) and eval prompt texts."""
  data_dir = os.path.join(workdir, "data")
  gold_fn = None
  if data.prompts == "synthetic":
    task_dir = os.path.join(data_dir, "synthetic")
    wanted = synthetic_files.SyntheticConfig(seed=data.synthetic_seed,
                                             num_prompts=data.synthetic_num_prompts,
                                             num_test_prompts=data.synthetic_num_test_prompts)
    if not os.path.exists(os.path.join(task_dir, "metadata.json")):
      synthetic_files.write_task(task_dir, wanted, overwrite=True)
    meta = train.read_json(os.path.join(task_dir, "metadata.json"))
    for key in ("seed", "num_prompts", "num_test_prompts"):
      if meta["config"][key] != getattr(wanted, key):
        raise ValueError(f"{task_dir} holds a synthetic task with {key}={meta['config'][key]}, the "
                         f"config asks for {getattr(wanted, key)}; use a fresh --workdir")
    train_jsonl = os.path.join(task_dir, "prompts.jsonl")
    eval_jsonl = os.path.join(task_dir, "prompts_test.jsonl")
    gold_fn = synthetic.gold_rewards
  else:
    train_jsonl, eval_jsonl = data.prompts_jsonl, data.eval_prompts_jsonl
  dataset = ds_lib.prepare_dataset(train_jsonl, "prompt", tokenizer,
                                   os.path.join(data_dir, "prompts_train"),
                                   max_prompt_len=data.max_prompt_len,
                                   max_response_len=config.max_new_tokens + 1)
  iterator = batching.BatchIterator(dataset, config.rollout_batch_size, seed=data.shuffle_seed,
                                    buckets=(data.max_prompt_len,), vocab_size=vocab_size)
  eval_texts = []
  if eval_jsonl:
    eval_texts = [r.prompt for r in records.read_records(eval_jsonl, "prompt",
                                                         chat_template=tokenizer.chat_template)]
  return Prompts(iterator, eval_texts, gold_fn)


class _StopFlag:
  """Records SIGTERM while the loop runs (main thread only); previous handler restored after."""

  def __init__(self):
    self.signum, self._previous = None, None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(iteration: int, last_good: int | None, **arrays) -> None:
  """Raises :class:`NonFiniteError` naming the first array with NaN/inf and its bad rows."""
  for name, value in arrays.items():
    array = np.asarray(value)
    rows_BxX = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    bad = np.flatnonzero(~np.all(np.isfinite(rows_BxX), axis=1)).tolist()
    if bad:
      raise NonFiniteError(
          f"iteration {iteration + 1}: non-finite {name} (NaN/inf in rows {bad[:8]}"
          f"{'...' if len(bad) > 8 else ''}); stopping without saving this iteration. "
          f"The last good checkpoint (iteration {last_good if last_good is not None else 'none'}) "
          "is intact; lower the learning rate / check the reward model before resuming.")


def _kl_controller(config: PPOConfig):
  if config.kl_controller == "adaptive":
    return losses.AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
  return losses.FixedKLController(config.kl_coef)


def run(*, workdir: str, config: PPOConfig, loop: PPOLoopConfig, optim: train.OptimConfig,
        eval_config: policy_eval.PolicyEvalConfig, data: PPODataConfig, models_: ppo_models.PPOModels,
        seed: int = 0, run_config: Mapping[str, Any] | None = None,
        placement: Placement | None = None) -> RunResult:
  """Runs (or resumes) online RL in ``workdir``; returns the final metrics (also written to
  ``<workdir>/final_metrics.json``) and the final state. ``models_`` from :func:`ppo_models.load_models` or built
  in-process (iterated RLHF); ``placement``: mesh + rules (default: one device)."""
  os.makedirs(workdir, exist_ok=True)
  if run_config is not None:
    train.atomic_write_json(os.path.join(workdir, "config.json"), dict(run_config))
  tok, policy = models_.tokenizer, models_.policy
  prompts = prepare_prompts(data, config, tok, workdir, vocab_size=policy.config.vocab_size)
  prompt_len = data.max_prompt_len
  if prompt_len + config.max_new_tokens > policy.config.max_seq_len:
    raise ValueError(f"config.data.max_prompt_len + config.ppo.max_new_tokens = "
                     f"{prompt_len + config.max_new_tokens} exceeds the policy's max_seq_len="
                     f"{policy.config.max_seq_len}")

  total_updates = loop.num_iterations * config.updates_per_iteration
  optimizer, schedule = train.make_optimizer(optim, total_updates)
  params = {"policy": models_.policy_params}
  if models_.value_model is not None:
    params["value"] = models_.value_params
  controller = _kl_controller(config)
  # Everything the jitted phases read is placed (committed) with the shardings their jit declares,
  # and every phase returns exactly those shardings: jit's cache key includes each argument's
  # sharding and committed-ness, so anything looser compiles the phases again in iteration 2.
  placement = placement or Placement(parallel.mesh_from_config(None))
  ways = int(np.prod([placement.mesh.shape[a] for a in np.atleast_1d(
      parallel.batch_axes(placement.rules))]))
  if config.rollout_batch_size % ways:
    raise ValueError(f"config.ppo.rollout_batch_size={config.rollout_batch_size} must be a multiple "
                     f"of the mesh's batch ways ({ways}: the product of the "
                     f"{parallel.batch_axes(placement.rules)} axes of config.mesh); prompts are "
                     "split over them")
  shardings = state_shardings(policy, models_.value_model, optim, total_updates, placement)
  state = place_state(params, optimizer, float(controller.initial()), jax.random.PRNGKey(seed),
                      shardings)
  ref_params = jax.device_put(models_.ref_params, shardings.params["policy"])
  fingerprint = {"method": "ppo", "algorithm": config.algorithm,
                 "model": dataclasses.asdict(policy.config), "tokenizer": tok.fingerprint(),
                 "value_model": (dataclasses.asdict(models_.value_model.config)
                                 if models_.value_model is not None else None)}
  checkpointer = train.Checkpointer(workdir, fingerprint=fingerprint, keep=loop.keep_checkpoints)
  start = checkpointer.latest_step()
  if start is not None:
    logger.info("resuming PPO from iteration %d in %s", start, workdir)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    state, data_state = checkpointer.restore(abstract)
    prompts.train.set_state(data_state)
  start = start or 0
  end = loop.num_iterations if not loop.stop_after_iterations else min(
      loop.num_iterations, start + loop.stop_after_iterations)

  samp_cfg = sampling.SamplingConfig(
      max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
      top_p=config.top_p, num_samples=config.num_samples, eos_id=tok.eos_id, pad_id=tok.pad_id)
  phases = _Phases(
      generate=make_generate_fn(policy, samp_cfg, placement),
      score=make_score_fn(models_.reward.model, eos_id=tok.eos_id,
                          missing_eos_penalty=config.missing_eos_penalty,
                          attribute_weights=models_.reward.attribute_weights, placement=placement),
      logprob=make_logprob_fn(policy, models_.value_model, prompt_len, config.temperature,
                              placement),
      advantage=make_advantage_fn(config, placement),
      placement=placement)
  update_fn = make_update_fn(config, policy, models_.value_model, optim, total_updates, prompt_len,
                             placement)
  # The RM handle may live on another mesh (its own default is one device): copy its params onto
  # this run's mesh with the rules table's shardings (a no-op when they are already there).
  rm_args = (jax.device_put(models_.reward.params, placement.params(models_.reward.model)),
             jax.device_put(np.asarray(models_.reward.info.mean, np.float32), placement.replicated),
             jax.device_put(np.asarray(models_.reward.info.std, np.float32), placement.replicated))

  evaluator = None
  if prompts.eval_texts:
    eval_prompts = policy_eval.make_eval_prompts(tok, prompts.eval_texts, max_prompt_len=prompt_len)
    evaluator = policy_eval.PolicyEvaluator(
        policy, ref_params, tok, eval_prompts, eval_config,
        reward_fn=scoring.sample_reward_fn(models_.reward), gold_reward_fn=prompts.gold_reward_fn,
        sample_path=os.path.join(workdir, "samples.jsonl"))

  writer = train.MetricsWriter(workdir, resume_step=start)
  eval_metrics: dict = {}
  initial_metrics: dict = {}
  initial_path = os.path.join(workdir, "initial_eval.json")

  def evaluate(at: int, params_) -> dict:
    metrics = dict(evaluator(params_, at))
    writer.write(at, metrics, split="eval")
    logger.info("eval @%d: %s", at, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics

  preempted, it = False, start
  try:
    if evaluator is not None:
      if os.path.exists(initial_path):
        initial_metrics = train.read_json(initial_path)
      else:
        initial_metrics = evaluate(0, ref_params if models_.policy_params is models_.ref_params
                                   else state.params["policy"])
        train.atomic_write_json(initial_path, initial_metrics)
    with _StopFlag() as stop:
      while it < end:
        compiles_before = _COMPILES[0]
        rollout, metrics = _rollout(it, state, prompts, tok, ref_params, rm_args, phases,
                                    checkpointer.latest_step())
        t0 = time.perf_counter()
        state, upd = update_fn(state, rollout)
        upd = jax.device_get(upd)
        metrics["time_update"] = time.perf_counter() - t0
        metrics["compiles"] = float(_COMPILES[0] - compiles_before)
        _check_finite(it, checkpointer.latest_step(), loss=upd["loss"], grad_norm=upd["grad_norm"])
        metrics.update({k: float(v) for k, v in upd.items()})
        n_rows = config.rollout_size
        new_beta = controller.update(state.kl_coef, metrics["kl"], n_rows)
        state = state.replace(iteration=state.iteration + 1, kl_coef=new_beta)
        metrics["lr"] = float(schedule((it + 1) * config.updates_per_iteration - 1))
        tokens_seq = rollout.tokens_BxT.shape[1]
        metrics["update_tokens_per_s"] = (n_rows * tokens_seq * config.num_ppo_epochs
                                          / max(metrics["time_update"], 1e-9))
        metrics["time_iteration"] = sum(metrics[f"time_{p}"] for p in PHASES)
        metrics["tokens_per_s"] = metrics["generated_tokens"] / metrics["time_iteration"]
        it += 1
        writer.write(it, metrics, split="train")
        if it % loop.log_every == 0 or it == end or it == start + 1:
          _log_line(it, loop.num_iterations, metrics)
        signalled = stop.signum is not None
        if it % loop.checkpoint_every == 0 or it == end or signalled:
          checkpointer.save(it, state, prompts.train.get_state())
        if signalled:
          logger.warning("SIGTERM received: checkpointed iteration %d, stopping", it)
          preempted = True
          break
        if evaluator is not None and loop.eval_every and it % loop.eval_every == 0 \
            and it < loop.num_iterations:
          eval_metrics = evaluate(it, state.params["policy"])
      if it < loop.num_iterations:
        preempted = True
      elif evaluator is not None:
        eval_metrics = evaluate(it, state.params["policy"])
  finally:
    checkpointer.close()
    writer.close()
  final = {"iteration": it, "preempted": preempted, **eval_metrics,
           **{f"initial_{k}": v for k, v in initial_metrics.items()},
           "final_kl_coef": float(state.kl_coef)}
  if not preempted:
    train.atomic_write_json(os.path.join(workdir, FINAL_METRICS_FILE), final)
  return RunResult(final, state)


class _Phases(NamedTuple):
  generate: Any  # rollout.make_generate_fn
  score: Any  # rollout.make_score_fn
  logprob: Any  # rollout.make_logprob_fn
  advantage: Any  # rollout.make_advantage_fn
  placement: Placement


def _rollout(it, state: PPOState, prompts: Prompts, tok, ref_params, rm_args, phases: _Phases,
             last_good):
  """Rollout phases of iteration ``it`` → ``(rollout, metrics)`` (the update is not run here)."""
  metrics: dict[str, float] = {}
  batch = next(prompts.train)
  placement = phases.placement
  prompt_tokens, prompt_mask = parallel.shard_batch(
      (np.asarray(batch["prompt_tokens"]), np.asarray(batch["prompt_mask"])), placement.mesh,
      placement.rules)

  t0 = time.perf_counter()
  tokens_BxT, mask_BxT, response_mask = jax.block_until_ready(phases.generate(
      state.params["policy"], prompt_tokens, prompt_mask, state.rng))
  t1 = time.perf_counter()
  scores_B, rm_B = jax.block_until_ready(phases.score(*rm_args, tokens_BxT, mask_BxT, response_mask))
  t2 = time.perf_counter()
  old_logps, ref_logps, values, entropy = jax.block_until_ready(phases.logprob(
      state.params["policy"], ref_params, state.params.get("value"), tokens_BxT, mask_BxT))
  t3 = time.perf_counter()
  _check_finite(it, last_good, rewards=scores_B, values=values, policy_logprobs=old_logps,
                reference_logprobs=ref_logps)
  advantages, returns, adv_metrics = jax.block_until_ready(phases.advantage(
      scores_B, old_logps, ref_logps, values, response_mask, state.kl_coef))
  t4 = time.perf_counter()
  _check_finite(it, last_good, advantages=advantages, returns=returns)
  rollout = Rollout(tokens_BxT, mask_BxT, response_mask, old_logps, ref_logps, values, advantages,
                    returns)

  resp_mask_host = np.asarray(response_mask)
  n_tokens = float(resp_mask_host.sum())
  metrics.update(time_generation=t1 - t0, time_scoring=t2 - t1, time_logprobs=t3 - t2,
                 time_advantages=t4 - t3, generated_tokens=n_tokens,
                 generation_tokens_per_s=n_tokens / max(t1 - t0, 1e-9))
  metrics.update({k: float(v) for k, v in jax.device_get(adv_metrics).items()})
  # Host-side statistics in numpy: no small device ops (and no compilations) in the loop.
  metrics["rm_score"] = float(np.mean(np.asarray(rm_B)))
  metrics["score"] = float(np.mean(np.asarray(scores_B)))
  metrics["kl_coef"] = float(state.kl_coef)
  metrics["entropy"] = float(np.sum(np.asarray(entropy)) / max(n_tokens, 1.0))
  metrics["response_length"] = float(resp_mask_host.sum(-1).mean())
  tokens_host, mask_host = np.asarray(tokens_BxT), np.asarray(mask_BxT)
  p = tokens_host.shape[1] - resp_mask_host.shape[1]
  resp_tokens = tokens_host[:, p:]
  metrics["eos_fraction"] = float(np.mean(np.any((resp_tokens == tok.eos_id) & (resp_mask_host > 0),
                                                 axis=1)))
  if prompts.gold_reward_fn is not None:
    golds = synthetic.score_samples(tok, tokens_host[:, :p], mask_host[:, :p], resp_tokens,
                                    resp_mask_host)
    metrics["gold_reward"] = float(np.mean(golds))
  return rollout, metrics


def _log_line(it: int, total: int, m: Mapping[str, float]) -> None:
  gold = f"gold {m['gold_reward']:+.3f} | " if "gold_reward" in m else ""
  logger.info("iter %d/%d | %srm %+.3f | kl %.3f (β %.3g) | ent %.3f | clip %.3f | len %.1f | "
              "gen %.2fs score %.2fs logp %.2fs upd %.2fs | %.0f tok/s", it, total, gold,
              m["rm_score"], m["kl"], m["kl_coef"], m["entropy"], m["clipfrac"],
              m["response_length"], m["time_generation"], m["time_scoring"], m["time_logprobs"],
              m["time_update"], m["tokens_per_s"])


KNOWN_KEYS = ("seed", "ppo", "data", "loop", "optim", "eval", "mesh")


def parse_config(config: ml_collections.ConfigDict):
  """``(ppo, data, loop, optim, eval)`` dataclasses from an experiment config (errors name keys)."""
  unknown = sorted(set(config.keys()) - set(KNOWN_KEYS))
  if unknown:
    raise ValueError(f"unknown config key(s) {[f'config.{k}' for k in unknown]}; allowed top-level "
                     f"keys: {list(KNOWN_KEYS)}")
  return (config_dicts.to_dataclass(PPOConfig, config.ppo, "ppo"),
          config_dicts.to_dataclass(PPODataConfig, config.data, "data"),
          config_dicts.to_dataclass(PPOLoopConfig, config.loop, "loop"),
          config_dicts.to_dataclass(train.OptimConfig, config.optim, "optim"),
          config_dicts.to_dataclass(policy_eval.PolicyEvalConfig, config.eval, "eval"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       models_: ppo_models.PPOModels | None = None,
                       rules: parallel.Rules = parallel.DEFAULT_RULES) -> dict[str, Any]:
  """Runs (or resumes) the experiment ``config`` (see ``experiments/configs/ppo_synthetic.py``);
  ``models_`` overrides loading the models from ``config.data`` workdirs; ``rules``: the
  logical-axis rules table on ``config.mesh``."""
  ppo_cfg, data_cfg, loop_cfg, optim_cfg, eval_cfg = parse_config(config)
  placement = Placement(parallel.mesh_from_config(config.get("mesh")), tuple(rules))
  if models_ is None:
    models_ = ppo_models.load_models(ppo_cfg, data_cfg, jax.random.PRNGKey(config.seed + 1),
                                     mesh=placement.mesh, rules=placement.rules)
  return run(workdir=workdir, config=ppo_cfg, loop=loop_cfg, optim=optim_cfg, eval_config=eval_cfg,
             data=data_cfg, models_=models_, seed=config.seed, run_config=config.to_dict(),
             placement=placement).metrics
