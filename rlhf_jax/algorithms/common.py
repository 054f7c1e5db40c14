"""Pieces shared by the offline trainers (DPO family, PRO / RRHF, RAFT, best-of-n).

* :class:`ModelSources` / :func:`load_models` — the policy starts from an SFT run, the frozen
  reference is that run (or ``reference_workdir``), and an optional reward model scores samples.
  A reference whose model config or tokenizer differs from the policy's is refused
  (:class:`ReferenceMismatchError`): its log-probs would be of other token ids or another function.
* :class:`NonFiniteMonitor` — the NaN guard. Inside the jitted step the update is applied only if
  the loss and the gradient norm are finite (``where(ok, new, old)`` on params and optimiser
  state, like ``optax.apply_if_finite``), so a non-finite step never reaches the params or a
  checkpoint. A ``jax.debug.callback`` raises a host flag; the wrapped data iterator checks it
  before handing out the next batch (without blocking the device, so the stop comes at most a
  couple of steps later, each of them guarded too) and raises :class:`NonFiniteLossError`, which
  stops the generic loop; its ``finally`` closes the checkpointer, so the last checkpoint — written
  before or after the bad step, either way with finite params — stays intact.
* :func:`response_logps_fn` — jitted summed response log-probs of a frozen model (the reference's
  on-the-fly / precomputed log-probs, candidate scoring).
* Small I/O helpers: prompt lists, eval-prompt batches, ``final_metrics.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax import models, parallel, train
from rlhf_jax import scoring
from rlhf_jax.data import records as rec
from rlhf_jax.data import tokenizers as tok_lib
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.train import config_dicts

logger = logging.getLogger(__name__)

FINAL_METRICS_FILE = train.FINAL_METRICS_FILE


class ReferenceMismatchError(ValueError):
  """The reference checkpoint's model config or tokenizer differs from the policy's."""


class NonFiniteLossError(FloatingPointError):
  """A step produced a non-finite loss or gradient; the run stopped without applying it."""


@dataclasses.dataclass(frozen=True)
class ModelSources:
  """Where the models come from.

  Attributes:
    sft_workdir: finished SFT run; the policy is initialised from its latest checkpoint and it is
      the frozen reference unless ``reference_workdir`` is set. Empty: a freshly initialised policy
      of ``config.model`` (benchmarks, tests), which is then also the reference.
    reference_workdir: another SFT run as the reference ('' = ``sft_workdir``); it must have the
      policy's model config and tokenizer.
    reward_model_workdir: a trained reward model (``scoring.load_reward_model``); evaluation
      then also reports ``rm_reward``. Required by RAFT, best-of-n and generated candidate lists.
  """

  sft_workdir: str = ""
  reference_workdir: str = ""
  reward_model_workdir: str = ""

  def __post_init__(self):
    for name in ("sft_workdir", "reference_workdir", "reward_model_workdir"):
      path = getattr(self, name)
      if not isinstance(path, str):
        raise ValueError(f"ModelSources.{name}={path!r} is invalid; allowed: a path string or ''")
      if path and not os.path.isdir(path):
        raise ValueError(f"ModelSources.{name}={path!r} is invalid; allowed: an existing run "
                         "directory or '' (no such directory)")
    if self.reference_workdir and not self.sft_workdir:
      raise ValueError("ModelSources.reference_workdir is set but sft_workdir is empty; allowed: "
                       "a reference only together with the SFT run that initialises the policy")


class LoadedModels(NamedTuple):
  model_config: models.ModelConfig
  tokenizer: tok_lib.Tokenizer
  model: models.Transformer
  policy_params: Any  # unboxed, placed on the mesh
  ref_params: Any  # unboxed, placed on the mesh (equal to, but not the buffers of, policy_params)
  reward: scoring.RewardModelHandle | None
  sft_step: int  # step of the SFT checkpoint (-1: fresh init)


def check_reference(policy_config: models.ModelConfig, policy_tokenizer: tok_lib.Tokenizer,
                    ref_config: models.ModelConfig, ref_tokenizer: tok_lib.Tokenizer,
                    where: str = "reference") -> None:
  """Raises :class:`ReferenceMismatchError` naming what differs between policy and reference."""
  if ref_tokenizer.fingerprint() != policy_tokenizer.fingerprint():
    raise ReferenceMismatchError(
        f"the {where} tokenizer {ref_tokenizer!r} (fingerprint {ref_tokenizer.fingerprint()}) differs "
        f"from the policy's {policy_tokenizer!r} ({policy_tokenizer.fingerprint()}): its log-probs "
        "would be of other texts. Use a reference SFT run with the policy's tokenizer.")
  if ref_config != policy_config:
    diff = {f.name: (getattr(ref_config, f.name), getattr(policy_config, f.name))
            for f in dataclasses.fields(models.ModelConfig)
            if getattr(ref_config, f.name) != getattr(policy_config, f.name)}
    raise ReferenceMismatchError(
        f"the {where} model config differs from the policy's in {sorted(diff)} "
        f"((reference, policy) = {diff}); the reference must have the policy's architecture.")


def place_params(params: Any, model: models.Transformer, mesh: jax.sharding.Mesh,
                 rules=parallel.DEFAULT_RULES) -> Any:
  """Puts an unboxed param tree onto ``mesh`` with the logical-axis rules."""
  shardings = parallel.logical_shardings(models.abstract_variables(model), mesh, rules)["params"]
  return jax.device_put(nn.meta.unbox(params), shardings)


def load_models(sources: ModelSources, mesh: jax.sharding.Mesh, *,
                model_section: Any = None, tokenizer_spec: str = "byte", rng: jax.Array | None = None,
                need_reward: bool = False) -> LoadedModels:
  """Loads policy, reference and (optionally) reward model; checks they read the same token ids."""
  if sources.sft_workdir:
    policy = train.load_sft_params(sources.sft_workdir)
    model_config, tokenizer, sft_step = policy.model_config, policy.tokenizer, policy.step
    model = models.Transformer(model_config)
    policy_params = place_params(policy.params, model, mesh)
    ref_params = policy_params
    if sources.reference_workdir and (os.path.abspath(sources.reference_workdir)
                                      != os.path.abspath(sources.sft_workdir)):
      ref = train.load_sft_params(sources.reference_workdir)
      check_reference(model_config, tokenizer, ref.model_config, ref.tokenizer,
                      where=f"reference ({sources.reference_workdir})")
      ref_params = place_params(ref.params, model, mesh)
  else:
    if model_section is None:
      raise ValueError("config.sources.sft_workdir is empty and there is no config.model section; "
                       "allowed: an SFT run directory, or a model section for a fresh policy")
    model_config = config_dicts.build_model_config(model_section)
    tokenizer = tok_lib.load_tokenizer(tokenizer_spec)
    model = models.Transformer(model_config)
    dummy = jnp.ones((1, 8), jnp.int32)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    policy_params = parallel.create_sharded(
        functools.partial(model.init, rng, dummy, dummy), mesh)["params"]
    ref_params, sft_step = policy_params, -1
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ValueError(f"the model's vocab_size={model_config.vocab_size} is smaller than the "
                     f"tokenizer's vocab_size={tokenizer.vocab_size}")
  # The train state is donated to every step: the policy needs buffers of its own, or the first
  # step would free the reference's.
  policy_params = jax.tree.map(jnp.copy, policy_params)
  reward = None
  if sources.reward_model_workdir:
    reward = scoring.load_reward_model(sources.reward_model_workdir,
                                              policy_tokenizer=tokenizer, mesh=mesh)
  elif need_reward:
    raise ValueError("config.sources.reward_model_workdir is empty; allowed: the workdir of a "
                     "trained reward model (this method scores samples with it)")
  return LoadedModels(model_config, tokenizer, model, policy_params, ref_params, reward, sft_step)


def rm_text_reward_fn(handle: scoring.RewardModelHandle | None,
                      tokenizer: tok_lib.Tokenizer) -> policy_eval.TextRewardFn | None:
  """``(prompts, responses) -> [S]`` normalised RM rewards, for :class:`policy_eval.PolicyEvaluator`."""
  if handle is None:
    return None
  return lambda prompts, responses: scoring.score_texts(handle, tokenizer, prompts, responses)


def check_config_keys(config: Any, known: set[str], method: str) -> None:
  unknown = sorted(set(config.keys()) - known)
  if unknown:
    raise ValueError(f"unknown config key(s) {[f'config.{k}' for k in unknown]} for {method}; "
                     f"allowed top-level keys: {sorted(known)}")


# ----------------------------------------------------------------------------------------------------
# Log-probs of frozen models
# ----------------------------------------------------------------------------------------------------


def response_logps_fn(model: models.Transformer, mesh: jax.sharding.Mesh,
                      rules=parallel.DEFAULT_RULES) -> Callable:
  """``fn(params, tokens_NxT, mask_NxT, loss_mask_NxT) -> [N]``: ``models.response_logps`` on
  ``mesh`` (the one summed-log-prob function; jitted once per shape, params an argument)."""
  return functools.partial(models.response_logps, model, mesh=mesh, rules=rules)


# ----------------------------------------------------------------------------------------------------
# NaN guard
# ----------------------------------------------------------------------------------------------------


class NonFiniteMonitor:
  """Host side of the NaN guard (module docstring): ``guard`` the step, ``wrap`` the data."""

  def __init__(self):
    self.bad_steps: list[int] = []

  def _record(self, ok, step) -> None:
    if not bool(ok):
      self.bad_steps.append(int(step) + 1)  # 1-based: the update that would have made step+1

  def guard(self, step_fn: Callable) -> Callable:
    """``step(state, batch)`` that keeps params and optimiser state when loss / grads are not finite."""

    def guarded(state: train.TrainState, batch):
      new_state, metrics = step_fn(state, batch)
      ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
      new_state = new_state.replace(params=keep(new_state.params, state.params),
                                    opt_state=keep(new_state.opt_state, state.opt_state))
      metrics = dict(metrics)
      metrics["skipped_nonfinite"] = 1.0 - ok.astype(jnp.float32)
      jax.debug.callback(self._record, ok, state.step)
      return new_state, metrics

    return guarded

  def check(self, workdir: str | None = None) -> None:
    """Raises :class:`NonFiniteLossError` if any guarded step was non-finite."""
    if self.bad_steps:
      where = f" in {workdir}" if workdir else ""
      raise NonFiniteLossError(
          f"non-finite loss or gradient at step {self.bad_steps[0]}{where}: that update was not "
          "applied and the run stopped; the checkpoints hold the last finite params. Lower the "
          "learning rate / beta, check the data (e.g. empty responses) or the reference log-probs.")

  def wrap(self, data: Any) -> "_GuardedIterator":
    return _GuardedIterator(data, self)


class _GuardedIterator:
  """Delegates to the wrapped iterator; stops the loop once the monitor saw a non-finite step."""

  def __init__(self, inner: Any, monitor: NonFiniteMonitor):
    self.inner, self.monitor = inner, monitor

  def __iter__(self) -> Iterator:
    return self

  def __next__(self):
    self.monitor.check()
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state) -> None:
    self.inner.set_state(state)


def run_guarded(*, monitor: NonFiniteMonitor, workdir: str, **train_kwargs) -> train.TrainResult:
  """``train.train`` with the monitor's data wrapper, re-raising a non-finite stop after the loop."""
  train_kwargs["data"] = monitor.wrap(train_kwargs["data"])
  try:
    result = train.train(workdir=workdir, **train_kwargs)
  except NonFiniteLossError:
    monitor.check(workdir)
    raise
  jax.effects_barrier()  # every step's callback has run
  monitor.check(workdir)
  return result


# ----------------------------------------------------------------------------------------------------
# Prompts and final metrics
# ----------------------------------------------------------------------------------------------------


def read_prompts(path: str, limit: int | None = None) -> list[str]:
  """Distinct ``prompt`` strings of a JSONL file (any record kind with a prompt), in file order."""
  seen: dict[str, None] = {}
  for record in rec.iter_records(path, "prompt"):
    seen.setdefault(record.prompt, None)
    if limit is not None and len(seen) >= limit:
      break
  if not seen:
    raise ValueError(f"{path}: no prompts")
  return list(seen)


def policy_evaluator(loaded: LoadedModels, prompt_texts: list[str], max_prompt_len: int,
                     config: policy_eval.PolicyEvalConfig, workdir: str,
                     gold: bool = True) -> policy_eval.PolicyEvaluator:
  prompts = policy_eval.make_eval_prompts(loaded.tokenizer, prompt_texts,
                                          max_prompt_len=max_prompt_len)
  return policy_eval.PolicyEvaluator(
      loaded.model, loaded.ref_params, loaded.tokenizer, prompts, config,
      reward_fn=rm_text_reward_fn(loaded.reward, loaded.tokenizer),
      gold_reward_fn=policy_eval.synthetic.gold_rewards if gold else None,
      sample_path=os.path.join(workdir, "samples.jsonl"))


def write_final(workdir: str, final: dict, method: str) -> dict:
  train.atomic_write_json(os.path.join(workdir, FINAL_METRICS_FILE), final)
  logger.info("%s finished: %s", method,
              ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in final.items()))
  return final
