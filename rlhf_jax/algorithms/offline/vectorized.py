"""Vectorised sweeps: the offline methods that share the offline shell (the DPO family with every
``loss_type``, SimPO, ORPO; PRO / RRHF; KTO), SFT and the reward model.

``train_sweep(configs, workdirs)`` takes one config per grid point (what ``experiments/run.py``
would get) and trains them as one program (``rlhf_jax.train.vectorized``):

* each grid point is set up exactly as its sequential run (``shell.capturing()``: the method's own
  ``train_and_evaluate`` parses, loads the models, prepares the data, builds the state and the
  evaluation, and hands them over instead of training);
* the keys that may differ between grid points are: the numeric hyperparameters of
  ``VECTOR_KEYS`` (arrays over the run axis inside the step), ``seed`` (each run's RNG stream and,
  without an SFT / pretrained source, its init), ``data.shuffle_seed`` (each run's data order) and
  any other key of the ``loss`` section (e.g. ``loss.loss_type``, ``loss.method``: runs that agree
  on them form one group, one ``vmap``). Any other difference is refused with the key's name.
* SFT and the reward model (``CAPTURED``) have no shell to capture: each grid point's own
  ``train_and_evaluate`` runs in its own thread up to its ``train.train`` call
  (``train.vectorized.capture_runs``), the sweep trains them, and each goes on from the result it
  gets back (final metrics; the RM's normalisation, artifact and report). Their grid may vary
  ``optim.lr``, ``seed`` (init and RNG stream) and ``data.shuffle_seed``; RM early stopping
  (``rm.early_stopping_patience``) cannot be vectorised (one run cannot stop alone).
* PPO / GRPO / RLOO, online DPO, iterated RLHF, RAFT and best-of-n are refused: their step is a
  host loop (sampling, reward scoring, text decoding), not one jitted step.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from rlhf_jax import train
from rlhf_jax.algorithms import reference, registry
from rlhf_jax.algorithms.offline import dpo, kto, listwise, shell
from rlhf_jax.train import config_dicts
from rlhf_jax.train import vectorized as vec

logger = logging.getLogger(__name__)

# method -> (loss config class, make_loss_fn(model, cfg), {config key: loss config field})
LOSSES: dict[str, tuple[type, Callable, dict[str, str]]] = {
    "dpo": (dpo.DPOLossConfig, dpo.make_loss_fn, {
        "loss.beta": "beta", "loss.label_smoothing": "label_smoothing",
        "loss.simpo_gamma": "simpo_gamma", "loss.orpo_lambda": "orpo_lambda"}),
    "listwise":
        (listwise.ListwiseLossConfig, listwise.make_loss_fn, {"loss.sft_weight": "sft_weight"}),
    "kto": (kto.KTOLossConfig, kto.make_loss_fn, {
        "loss.beta": "beta", "loss.desirable_weight": "desirable_weight",
        "loss.undesirable_weight": "undesirable_weight"}),}
OPTIM_KEYS = {"optim.lr": "lr"}
PER_RUN_KEYS = ("seed", "data.shuffle_seed")  # a run's own state / data order
# Methods swept by capturing their train.train call (train.vectorized.capture_runs).
CAPTURED = ("sft", "reward_model")
METHODS = (*LOSSES, *CAPTURED)
# Their step is a host loop: the refusal says so.
HOST_LOOP = ("ppo", "online_dpo", "iterated_rlhf", "raft", "best_of_n")


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def differing_keys(configs: Sequence[ml_collections.ConfigDict]) -> list[str]:
  """Config keys (``section.name``) whose values are not the same in every config."""
  flats = [_flat(c.to_dict()) for c in configs]
  keys = sorted(set().union(*flats))
  return [k for k in keys if any(f.get(k, "<unset>") != flats[0].get(k, "<unset>") for f in flats)]


def check_vectorisable(method: str, keys: Sequence[str]) -> None:
  """Raises naming a differing key a vectorised sweep of ``method`` cannot put on the run axis."""
  if method in HOST_LOOP:
    raise ValueError(f"config.method={method!r} cannot be vectorised: its step is a host loop "
                     "(rollout sampling, reward scoring, text decoding), not one jitted step; "
                     "sweep it without --vectorize")
  if method not in METHODS:
    raise ValueError(f"config.method={method!r} cannot be vectorised; allowed: "
                     f"{' | '.join(METHODS)} (run the others without --vectorize)")
  if method in CAPTURED:
    allowed, any_loss = set(OPTIM_KEYS) | set(PER_RUN_KEYS), ""
    bad = [k for k in keys if k not in allowed]
  else:
    allowed, any_loss = set(
        LOSSES[method][2]) | set(OPTIM_KEYS) | set(PER_RUN_KEYS), " and any loss.* key"
    bad = [k for k in keys if k not in allowed and not k.startswith("loss.")]
  if bad:
    raise ValueError(
        f"grid key(s) {bad} cannot be vectorised (they change shapes, data, models or the loss "
        f"of {method}); allowed: {sorted(allowed)}{any_loss}; sweep them without --vectorize")


def check_sweep(configs: Sequence[ml_collections.ConfigDict]) -> tuple[str, list[str]]:
  """``(method, differing keys)`` of a sweep that can be vectorised; else raises ``ValueError``
  naming what cannot (the method, a key, RM early stopping) before anything is trained."""
  methods = sorted({c.method for c in configs})
  if len(methods) != 1:
    raise ValueError(f"a vectorised sweep trains one method; got {methods}")
  method, keys = methods[0], differing_keys(configs)
  check_vectorisable(method, keys)
  if method == "reward_model":
    stopping = [i for i, c in enumerate(configs) if c.rm.get("early_stopping_patience", 0)]
    if stopping:
      raise ValueError(f"rm.early_stopping_patience > 0 (grid points {stopping}) cannot be "
                       "vectorised: one run cannot stop alone; set it to 0 or sweep without "
                       "--vectorize")
  return method, keys


def _seeded_init(config: ml_collections.ConfigDict) -> bool:
  """Whether the policy (and so the reference) is a fresh init of ``config.seed``."""
  sources = config.get("sources", {})
  return not any(sources.get(k) for k in ("sft_workdir", "pretrained", "policy"))


def build_runs(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
               names: Sequence[str], *, share_eval: bool = True) -> list[vec.Run]:
  """One :class:`vec.Run` per config, set up exactly as its sequential run, sorted by group.

  With ``share_eval`` (the default) what the runs' evaluations share is computed once per sweep:
  the SFT model's samples and their scores (runs with the same data, sources and ``eval``
  section: same reference, prompts and sampler), and the loss's held-out metrics are computed
  for a group's runs in one vmapped program (``Run.heldout_for``); without it each run is
  evaluated by its own ``eval_fn``, as its sequential run (the comparison the tests make).
  """
  method, keys = check_sweep(configs)
  if method not in LOSSES:
    raise ValueError(f"config.method={method!r} has no offline shell; use train_sweep")
  loss_cls, make_loss_fn, loss_fields = LOSSES[method]
  vector = [k for k in keys if k in loss_fields or k in OPTIM_KEYS]
  runs = []
  evaluators: dict[str, Any] = {}  # eval key -> the evaluator that draws the SFT samples
  for config, workdir, name in zip(configs, workdirs, names):
    os.makedirs(workdir, exist_ok=True)
    with shell.capturing():
      setup = registry.get(method)(config, workdir)
    if not isinstance(setup, shell.OfflineSetup):
      raise ValueError(f"method {method!r} did not go through the offline shell")
    loss_cfg = config_dicts.to_dataclass(loss_cls, config.loss, "loss")
    flat = _flat(config.to_dict())
    hparams = {k: float(flat[k]) for k in vector}
    group = json.dumps(
        {k: v for k, v in _flat(config.loss.to_dict(), "loss.").items() if k not in loss_fields},
        sort_keys=True, default=str)
    data_key = json.dumps(
        {
            "data": config.data.to_dict(), "limits": config.limits.to_dict(), "sources":
                config.sources.to_dict(), "reference_logps": flat.get("loss.reference_logps"),
            "seed": config.seed if _seeded_init(config) else None}, sort_keys=True, default=str)
    # The policy evaluation stays per run (each run samples from its own params); the loss's
    # held-out metrics are computed per group by the sweep (Run.heldout_for).
    evaluator = setup.evaluator
    if evaluator is not None and share_eval:
      # Same reference, prompts, sampler and reward model: the SFT samples are drawn once.
      eval_key = json.dumps({"data": data_key, "eval": config.eval.to_dict()}, sort_keys=True,
                            default=str)
      if eval_key in evaluators:
        evaluator.share_reference(evaluators[eval_key])
      else:
        evaluators[eval_key] = evaluator
    split_eval = evaluator is not None and share_eval
    runs.append(
        vec.Run(
            name=name, workdir=workdir, state=setup.state,
            step_for=_step_builder(setup, loss_cfg, make_loss_fn, loss_fields), hparams=hparams,
            group=group, data=setup.data.train, data_key=data_key, loop=setup.loop_cfg,
            mesh=setup.mesh, fingerprint=setup.fingerprint, run_config=config.to_dict(),
            eval_fn=(lambda state, step, e=evaluator: e(state.params, step))
            if split_eval else setup.eval_fn, finish=setup.finish,
            **({"token_count": setup.train_kwargs["token_count"]}
               if "token_count" in setup.train_kwargs else {}),
            **({
                "heldout_for": _heldout_builder(setup, loss_cfg, make_loss_fn, loss_fields),
                "heldout_batches": list(setup.data.eval_batches),
                "heldout_prefix": setup.eval_prefix} if split_eval else {})))
  # One iterator serves the runs of a data_key; one whose batches carry reference log-probs
  # serves those that ignore them (SimPO, ORPO).
  feeds: dict[str, Any] = {}
  for run in runs:
    if run.data_key not in feeds or isinstance(run.data, reference.WithReference):
      feeds.setdefault(run.data_key, run.data)
      if isinstance(run.data, reference.WithReference):
        feeds[run.data_key] = run.data
  for run in runs:
    run.data = feeds[run.data_key]
  order = {g: i for i, g in reversed(list(enumerate(r.group for r in runs)))}
  return sorted(runs, key=lambda r: order[r.group])


def _step_builder(setup: shell.OfflineSetup, loss_cfg: Any, make_loss_fn: Callable,
                  loss_fields: Mapping[str, str]) -> Callable:
  """``step_for(hp)``: the run's train step with the hyperparameters ``hp`` (traced) in place."""
  model, optim_cfg, num_steps = setup.loaded.model, setup.optim_cfg, setup.loop_cfg.num_steps

  def step_for(hp: Mapping[str, Any]) -> Callable:
    loss = vec.with_traced(loss_cfg,
                           **{loss_fields[k]: v for k, v in hp.items() if k in loss_fields})
    optim = vec.with_traced(optim_cfg,
                            **{OPTIM_KEYS[k]: v for k, v in hp.items() if k in OPTIM_KEYS})
    optimizer, schedule = train.make_optimizer(optim, num_steps)
    return train.make_train_step(make_loss_fn(model, loss), optimizer, schedule,
                                 grad_accum_steps=optim_cfg.grad_accum_steps)

  return step_for


def _heldout_builder(setup: shell.OfflineSetup, loss_cfg: Any, make_loss_fn: Callable,
                     loss_fields: Mapping[str, str]) -> Callable:
  """``heldout_for(hp)``: the run's held-out metrics ``fn(params, batch)`` (eval mode: ``rng``
  None) with the loss hyperparameters ``hp`` traced (``common.make_heldout_eval_fn``'s)."""
  model = setup.loaded.model

  def heldout_for(hp: Mapping[str, Any]) -> Callable:
    loss_fn = make_loss_fn(
        model,
        vec.with_traced(loss_cfg, **{loss_fields[k]: v for k, v in hp.items() if k in loss_fields}))
    return lambda params, batch: loss_fn(params, batch, None)[1]

  return heldout_for


def _captured_step_builder(step_fn: Callable, optim_cfg: Any, num_steps: int) -> Callable:
  """``step_for(hp)`` of a captured run: its own step, or rebuilt with a traced ``optim.lr``
  (``train.make_train_step`` over the step's own ``loss_fn``)."""

  def step_for(hp: Mapping[str, Any]) -> Callable:
    if not hp:
      return step_fn
    optim = vec.with_traced(optim_cfg,
                            **{OPTIM_KEYS[k]: v for k, v in hp.items() if k in OPTIM_KEYS})
    optimizer, schedule = train.make_optimizer(optim, num_steps)
    return train.make_train_step(step_fn.loss_fn, optimizer, schedule,
                                 grad_accum_steps=optim_cfg.grad_accum_steps)

  return step_for


def _train_captured(method: str, configs: Sequence[ml_collections.ConfigDict],
                    workdirs: Sequence[str], names: Sequence[str], keys: Sequence[str],
                    run_devices: int) -> list[vec.RunOutcome]:
  """SFT / RM: every point's own ``train_and_evaluate``, its training vectorised (docstring)."""
  vector = [k for k in keys if k in OPTIM_KEYS]
  fn = registry.get(method)
  captured = vec.capture_runs([(name, workdir, lambda c=config, w=workdir: fn(c, w))
                               for config, workdir, name in zip(configs, workdirs, names)])
  outcomes: dict[str, vec.RunOutcome] = {}
  try:
    runs = []
    for c, config in zip(captured, configs):
      if c.kwargs is None:  # returned without training (e.g. its SFT stage was preempted)
        value = c.value or {}
        outcomes[c.name] = vec.RunOutcome(c.name, None if value.get("preempted") else value, None,
                                          int(value.get("step", 0)), bool(value.get("preempted")))
        continue
      flat = _flat(config.to_dict())
      optim_cfg = config_dicts.to_dataclass(train.OptimConfig, config.optim, "optim")
      data_key = json.dumps(
          {k: config[k].to_dict() for k in ("data", "limits", "sources") if k in config},
          sort_keys=True, default=str)
      runs.append(
          vec.run_from_capture(
              c, step_for=_captured_step_builder(c.kwargs["step_fn"], optim_cfg,
                                                 c.kwargs["config"].num_steps),
              hparams={k: float(flat[k]) for k in vector}, group=method, data_key=data_key))
    if runs:
      for outcome in vec.train_vectorized(runs, run_devices=run_devices):
        outcomes[outcome.name] = outcome
  finally:
    for c in captured:  # frozen runs end as their sequential run would: NonFiniteLossError
      record = outcomes[c.name].frozen if c.name in outcomes else None
      if record is not None and c.waiting:
        vec.release([c],
                    train.NonFiniteLossError(record["cause"], record["detail"], step=record["step"],
                                             last_good=record["last_checkpoint"],
                                             workdir=c.workdir))
    vec.release(captured)
  return [outcomes[n] for n in names]


def train_sweep(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
                names: Sequence[str] | None = None, *, run_devices: int = 1,
                share_eval: bool = True) -> list[vec.RunOutcome]:
  """Trains every config as one vectorised program; one outcome per config, in input order.

  ``configs[i]`` is what ``experiments/run.py`` would get for ``workdirs[i]``; all share
  ``config.method`` (one of ``METHODS``) and differ only in the keys ``check_vectorisable``
  allows. Each run's files are its sequential run's (plus ``vectorized.json``, the layout).
  ``share_eval``: :func:`build_runs`'s (offline-shell methods only).
  """
  names = list(names) if names is not None else [os.path.basename(w) for w in workdirs]
  method, keys = check_sweep(configs)
  if method in CAPTURED:
    for workdir in workdirs:
      os.makedirs(workdir, exist_ok=True)
    return _train_captured(method, configs, workdirs, names, keys, run_devices)
  runs = build_runs(configs, workdirs, names, share_eval=share_eval)
  outcomes = {o.name: o for o in vec.train_vectorized(runs, run_devices=run_devices)}
  return [outcomes[n] for n in names]
