"""The trainer shell of offline policy methods: everything but the data and the loss.

An offline method (the DPO family and any DPO-style loss, PRO / RRHF, KTO next) contributes its data
preparation and its loss; :func:`train_offline_policy` does the rest, the same for every method:

1. parse the shared sections (``sources``, ``data`` = the method's ``sections.DataSource`` subclass,
   ``limits``, ``optim``, ``loop``, ``eval``, ``mesh``) — the method parses its own ``loss`` key;
2. load the policy, the frozen reference and (when needed) the reward model (``common.load_models``);
3. ``prepare_data(data, limits, sources, loaded, mesh, workdir, num_prompts, seed)`` → an object with
   ``train`` (a resumable batch iterator), ``eval_batches`` (fixed held-out batches) and
   ``eval_prompts`` (held-out prompt texts);
4. run the one loop (``train.train``: checkpoints, exact resume, SIGTERM, NaN guard, metrics) with the
   policy evaluation (gold reward, KL to the reference, win rate, RM reward) plus the loss's own
   held-out metrics (``<eval_prefix>/<metric>``), and write ``final_metrics.json``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_collections

from rlhf_jax import fileio, models, parallel, train
from rlhf_jax.algorithms import common, sections
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.train import config_dicts

KNOWN_KEYS = {
    "method", "seed", "sources", "model", "loss", "data", "limits", "optim", "loop", "eval", "mesh",
    "lora"}


@dataclasses.dataclass
class OfflineSetup:
  """One run, built and not yet trained: what ``train.train`` gets, plus ``finish(result)`` (the
  ``final_metrics.json`` writer). ``capturing()`` hands it to a vectorised sweep
  (``rlhf_jax.train.vectorized``), which trains many such runs as one program."""

  config: ml_collections.ConfigDict
  workdir: str
  loaded: Any  # common.LoadedModels
  data: Any  # the method's prepared data (``.train`` is the resumable batch iterator)
  optim_cfg: Any  # train.OptimConfig
  loop_cfg: Any  # train.LoopConfig
  mesh: Any
  state: Any  # train.TrainState
  step_fn: Callable
  eval_fn: Callable
  fingerprint: dict
  train_kwargs: dict  # the rest of train.train's keyword arguments (token_count)
  finish: Callable[[Any], dict]  # TrainResult -> final metrics (written unless preempted)
  # eval_fn's two parts, for a sweep that evaluates its runs together: the policy evaluation
  # (policy_eval.PolicyEvaluator) and the prefix of the loss's held-out metrics over
  # ``data.eval_batches``
  evaluator: Any = None
  eval_prefix: str = ""


_CAPTURE: contextvars.ContextVar = contextvars.ContextVar("offline_shell_capture", default=None)


@contextlib.contextmanager
def capturing() -> Iterator[list]:
  """Inside, ``train_offline_policy`` returns its :class:`OfflineSetup` instead of training (and
  appends it to the yielded list): how a vectorised sweep gets each grid point's run."""
  captured: list = []
  token = _CAPTURE.set(captured)
  try:
    yield captured
  finally:
    _CAPTURE.reset(token)


def train_offline_policy(
    config: ml_collections.ConfigDict, workdir: str, *, method: str, label: str, data_cls: type,
    prepare_data: Callable[..., Any], make_loss_fn: Callable[[models.Transformer],
                                                             train.loop.LossFn], eval_prefix: str,
    need_reward: Callable[[Any], bool] = lambda data: False,
    fingerprint_extra: Mapping[str, Any] | None = None,
    summary: Callable[[Any, Any], Mapping[str, Any]] = lambda data_cfg, data: {},
    token_count: Callable[[Mapping[str, Any]], float] | None = None) -> dict[str, Any]:
  """Runs (or resumes) an offline policy method (module docstring); returns the final metrics.

  Args:
    method: the registry name (in the run fingerprint and error messages).
    label: short name for tables and logs (``dpo:sigmoid``).
    data_cls: the method's ``sections.DataSource`` subclass for ``config.data``.
    prepare_data: step 3 of the module docstring.
    make_loss_fn: the loss over the method's batches for the loaded policy model
      (``loss_fn(params, batch, rng)``, ``rng=None`` = eval mode).
    eval_prefix: prefix of the loss's held-out metrics (``pairs``, ``lists``).
    need_reward: whether the parsed data config needs ``sources.reward_model_workdir``.
    fingerprint_extra: what else a resumed run must match (e.g. the loss config).
    summary: extra entries of ``final_metrics.json`` from ``(data config, prepared data)``.
    token_count: tokens of a host batch for the throughput line (default: the loop's).
  """
  common.check_config_keys(config, KNOWN_KEYS, method)
  sources = config_dicts.to_dataclass(sections.Sources, config.sources, "sources")
  data_cfg = config_dicts.to_dataclass(data_cls, config.data, "data")
  limits = config_dicts.to_dataclass(sections.Limits, config.limits, "limits")
  optim_cfg = config_dicts.to_dataclass(train.OptimConfig, config.optim, "optim")
  loop_cfg = config_dicts.to_dataclass(train.LoopConfig, config.loop, "loop")
  eval_cfg = config_dicts.to_dataclass(policy_eval.PolicyEvalConfig, config.eval, "eval")
  lora = sections.lora_section(config)
  mesh = parallel.mesh_from_config(config.mesh)
  fileio.makedirs(workdir)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  loaded = common.load_models(sources, mesh, model_section=config.get("model"),
                              tokenizer_spec=sources.tokenizer or "byte", rng=init_rng,
                              need_reward=need_reward(data_cfg), lora=lora)
  limits.check_model(loaded.model_config.max_seq_len)
  data = prepare_data(data_cfg, limits, sources, loaded, mesh, workdir, eval_cfg.num_prompts,
                      config.seed)

  optimizer, schedule = train.make_optimizer(optim_cfg, loop_cfg.num_steps)
  state = train.create_train_state(loaded.policy_params, optimizer, state_rng, mesh)
  loss_fn = make_loss_fn(loaded.model)
  step_fn = train.make_train_step(loss_fn, optimizer, schedule,
                                  grad_accum_steps=optim_cfg.grad_accum_steps)
  evaluator = common.policy_evaluator(loaded, data.eval_prompts, limits.max_prompt_len, eval_cfg,
                                      workdir, mesh=mesh)
  heldout = common.make_heldout_eval_fn(loss_fn, data.eval_batches, mesh, prefix=eval_prefix)

  def eval_fn(state: train.TrainState, step: int) -> dict[str, float]:
    return {**evaluator(state.params, step), **heldout(state.params)}

  fingerprint = {
      "method": method, "model": dataclasses.asdict(loaded.model_config),
      "tokenizer": loaded.tokenizer.fingerprint(), **(fingerprint_extra or {}),
      **common.lora_fingerprint(loaded.lora, loaded.policy_params),
      **common.pretrained_fingerprint(sources)}
  extra = {} if token_count is None else {"token_count": token_count}

  def finish(result: train.TrainResult) -> dict[str, Any]:
    final = {
        "method": label, "step": result.step, "preempted": result.preempted, **result.eval_metrics,
        **summary(data_cfg, data)}
    return final if result.preempted else common.write_final(workdir, final, label, mesh)

  captured = _CAPTURE.get()
  if captured is not None:
    captured.append(
        OfflineSetup(config, workdir, loaded, data, optim_cfg, loop_cfg, mesh, state, step_fn,
                     eval_fn, fingerprint, extra, finish, evaluator, eval_prefix))
    return captured[-1]
  result = train.train(workdir=workdir, config=loop_cfg, state=state, step_fn=step_fn,
                       data=data.train, fingerprint=fingerprint, mesh=mesh, eval_fn=eval_fn,
                       run_config=config.to_dict(), **extra)
  return finish(result)
