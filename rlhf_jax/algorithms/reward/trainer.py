"""Reward modelling (step 2 of RLHF): a transformer with K scalar heads learns human preferences.

    r_θ(x, y) = w_kᵀ h_θ(x, y)_last + b_k,   k = 1..K     (``models.RewardModel``)

initialised from an SFT checkpoint (``config.sources.sft_workdir``: backbone = the SFT params,
head ~ N(0, 1/(D+1))) or from scratch, and trained with one objective of :mod:`.reward_objectives` (Bradley–Terry pairs,
InstructGPT all-pairs or Plackett–Luce over K-way rankings, Likert regression, multi-attribute
heads) through the generic loop. Regularisation: dropout (``rm.dropout_rate``), decoupled weight
decay (``optim.weight_decay``), and early stopping on the held-out objective loss (every
``loop.eval_every`` steps; after ``rm.early_stopping_patience`` evaluations without an improvement
of more than ``rm.early_stopping_min_delta`` training stops and the best params are kept).

With ``config.lora.enabled`` (``rm.init=sft``) the backbone stays frozen: the RM trains LoRA
adapters on it (``models.lora``) and its head in full; only those get gradients and optimizer
state, checkpoints and the saved artifact hold them plus the backbone's fingerprint and source
(``scoring.reward_model``), and scoring merges them over that backbone.

After training the rewards are normalised: on ``eval.num_normalization_prompts`` training prompts
the SFT model samples ``eval.samples_per_prompt`` responses, and μ_k, σ_k of r_k over them are
stored with the params in ``<workdir>/reward_model/`` (see :mod:`.reward_scoring`), so that
``score`` returns (r_k - μ_k) / σ_k: mean 0, std 1 on SFT samples.

Evaluation (:mod:`.reward_eval`, :mod:`rlhf_jax.eval.reward_metrics`) ends in a report
(``rm_report.json`` + ``rm_report.md``, printed) with held-out pairwise / ranking / rating metrics,
on the synthetic task the gold agreement and Bayes-optimal accuracy side by side, and the
correlation of the learned reward with the gold reward on fresh SFT samples.

The scoring API (``load_reward_model``, ``score``, ``score_texts``, ...) is re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from rlhf_jax import fileio, losses, models, parallel, train
from rlhf_jax.algorithms.reward import data as reward_data
from rlhf_jax.algorithms.reward import evaluation as reward_eval
from rlhf_jax.algorithms.reward import objectives as reward_objectives
from rlhf_jax import scoring
from rlhf_jax.algorithms import common, registry, sections
from rlhf_jax.algorithms.reward.data import RMDataConfig
from rlhf_jax.algorithms.reward.objectives import DATA_KIND, OBJECTIVES
from rlhf_jax.scoring.reward_model import (
    RewardModelHandle,
    RewardModelInfo,  # noqa: F401
    TokenizerMismatchError,
    check_tokenizer,
    encode_pairs,
    load_reward_model,
    make_handle,
    normalize_rewards,
    read_reward_model_info,
    reward_fn,
    save_reward_model,
    score,
    score_sequences,
    score_texts)
from rlhf_jax.algorithms.reward.stats import RMEvalConfig, normalization_and_gold
from rlhf_jax.data import tokenizers as tok_lib
from rlhf_jax.eval import reward_report
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.train import config_dicts

logger = logging.getLogger(__name__)

FINAL_METRICS_FILE = train.FINAL_METRICS_FILE
EARLY_STOPPING_FILE = "early_stopping.json"
BEST_PARAMS_DIR = "best_params"
INITS = ("sft", "scratch")
KNOWN_KEYS = frozenset({
    "method", "seed", "model", "sources", "rm", "optim", "loop", "data", "limits", "eval", "mesh",
    "lora"})


@dataclasses.dataclass(frozen=True)
class RMConfig:
  """The reward-model method (the SFT run it starts from is ``config.sources.sft_workdir``).

  Attributes:
    objective: one of ``OBJECTIVES`` (``reward_objectives`` docstring); fixes the data kind.
    init: ``sft`` (backbone from ``sources.sft_workdir``'s latest checkpoint, same model config and
      tokenizer) or ``scratch`` (``config.model``; normalisation still samples from
      ``sources.sft_workdir`` if it holds a checkpoint, else uses held-out responses).
    dropout_rate: dropout of the backbone while training the RM (overrides the model config's).
    compute_dtype: activation / matmul dtype of the RM (overrides the model config's ``dtype``;
      empty = keep it). Params, norms, softmax and the head stay float32. ``bfloat16`` halves the
      step time of the synthetic default on a 2-core CPU at the same accuracy (BUILD_NOTES.md); the
      stored model config records it, so scoring runs in the dtype the RM was trained in.
    center_coef: Bradley–Terry reward-centering coefficient η (Eisenstein et al., 2023).
    attribute_weights: multi-attribute loss weights, one per attribute (empty = all 1).
    early_stopping_patience: evaluations without improvement before stopping; 0 disables.
    early_stopping_min_delta: an improvement must lower the held-out loss by more than this.
  """

  objective: str = "bradley_terry"
  init: str = "sft"
  dropout_rate: float = 0.0
  compute_dtype: str = ""
  center_coef: float = 0.0
  attribute_weights: tuple[float, ...] = ()
  early_stopping_patience: int = 0
  early_stopping_min_delta: float = 0.0

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f"RMConfig.objective={self.objective!r} is invalid; allowed: "
                       f"{' | '.join(OBJECTIVES)}")
    if self.init not in INITS:
      raise ValueError(f"RMConfig.init={self.init!r} is invalid; allowed: {' | '.join(INITS)}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"RMConfig.dropout_rate={self.dropout_rate!r} is invalid; allowed: [0, 1)")
    if self.compute_dtype and self.compute_dtype not in models.DTYPES:
      raise ValueError(
          f"RMConfig.compute_dtype={self.compute_dtype!r} is invalid; allowed: '' (the "
          f"model config's) | {' | '.join(models.DTYPES)}")
    if not self.center_coef >= 0:
      raise ValueError(f"RMConfig.center_coef={self.center_coef!r} is invalid; allowed: >= 0")
    if any(not w >= 0 for w in self.attribute_weights) or (self.attribute_weights and
                                                           not sum(self.attribute_weights) > 0):
      raise ValueError(
          f"RMConfig.attribute_weights={self.attribute_weights!r} is invalid; allowed: "
          "() or non-negative weights with a positive sum")
    if not (isinstance(self.early_stopping_patience, int) and self.early_stopping_patience >= 0):
      raise ValueError(f"RMConfig.early_stopping_patience={self.early_stopping_patience!r} is "
                       "invalid; allowed: an int >= 0 (0 = off)")
    if not self.early_stopping_min_delta >= 0:
      raise ValueError(f"RMConfig.early_stopping_min_delta={self.early_stopping_min_delta!r} is "
                       "invalid; allowed: a float >= 0")


class EarlyStop(Exception):
  """Raised from the evaluation hook to leave the generic loop when patience runs out."""


class EarlyStopping:
  """Tracks the best held-out loss; saves the best params; persists its state for resumes."""

  def __init__(self, workdir: str, patience: int, min_delta: float):
    self.path = fileio.join(workdir, EARLY_STOPPING_FILE)
    self.params_dir = fileio.join(fileio.absolute(workdir), BEST_PARAMS_DIR)
    self.patience, self.min_delta = patience, min_delta
    self.state = {"best_step": None, "best_loss": None, "bad_evals": 0, "stopped": False}
    if fileio.exists(self.path):
      self.state = train.read_json(self.path)

  def update(self, step: int, loss: float, params: Any) -> None:
    best = self.state["best_loss"]
    if best is None or loss < best - self.min_delta:  # a LoRA RM: adapters + head, no backbone
      _save_params_atomic(self.params_dir, train.state.split_frozen(params)[0])
      self.state.update(best_step=step, best_loss=loss, bad_evals=0)
    elif step != self.state["best_step"]:
      self.state["bad_evals"] += 1
    if self.state["bad_evals"] >= self.patience:
      self.state["stopped"] = True
    parallel.write_on_coordinator(train.atomic_write_json, self.path, self.state)
    if self.state["stopped"]:
      raise EarlyStop(f"held-out loss has not improved for {self.state['bad_evals']} evaluations "
                      f"(best {self.state['best_loss']:.4f} at step {self.state['best_step']})")

  def best_params(self, abstract_params: Any, frozen: Any = None) -> Any:
    """The best params (``abstract_params``: the live part's tree, ``frozen``: the rest)."""
    with ocp.StandardCheckpointer() as ckptr:
      return train.state.join_frozen(ckptr.restore(fileio.path(self.params_dir), abstract_params),
                                     frozen)


def _save_params_atomic(path: str, params: Any) -> None:
  # Multi-process: orbax saves collectively (every process, one path: process 0's pid), process 0
  # swaps the folder in, and the others wait for it.
  tmp = f"{path}.tmp-{parallel.agree(os.getpid())}"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(fileio.path(tmp), params, force=True)
    ckptr.wait_until_finished()
  parallel.write_on_coordinator(fileio.replace_dir, tmp, path, barrier="rm_best_params_saved")


def resolve_model_and_tokenizer(config: ml_collections.ConfigDict, rm_cfg: RMConfig,
                                sources: sections.Sources, mesh: Any = None):
  """(model config, tokenizer, tokenizer spec, SFT checkpoint or None) for this run.

  With ``sources.pretrained`` the checkpoint plays the SFT run's part: the backbone (under a new
  head) and the policy whose samples normalise the rewards; its tokenizer unless
  ``sources.tokenizer`` overrides it.
  """
  sft_ckpt = None
  sft_workdir = sources.policy
  if train.runs.is_pretrained(sft_workdir):
    sft_ckpt = train.load_sft_params(
        sft_workdir,
        **common.pretrained_kwargs(sources, mesh,
                                   config.get("model") if config else None))
    spec = sources.tokenizer or train.runs.pretrained_tokenizer_spec(sft_workdir)
    model_cfg = sft_ckpt.model_config
    if rm_cfg.init != "sft":
      raise ValueError(f"config.rm.init={rm_cfg.init!r} with config.sources.pretrained: allowed "
                       "'sft' (the backbone is the checkpoint's, under a new head)")
    model_cfg = model_cfg.replace(dropout_rate=rm_cfg.dropout_rate)
    if rm_cfg.compute_dtype:
      model_cfg = model_cfg.replace(dtype=rm_cfg.compute_dtype)
    return model_cfg, sft_ckpt.tokenizer, spec, sft_ckpt
  if sft_workdir and train.latest_step(sft_workdir) is not None:
    sft_ckpt = train.load_sft_params(sft_workdir)
  elif rm_cfg.init == "sft":
    raise FileNotFoundError(
        f"config.sources.sft_workdir={sft_workdir!r} holds no SFT checkpoint. Run SFT first:\n"
        "  python experiments/run.py --config=experiments/configs/sft_synthetic.py "
        f"--workdir={sft_workdir or 'workdirs/sft_synthetic'}\n"
        "(the synthetic RM config does this for you), point config.sources.sft_workdir at an SFT "
        "run, or set config.rm.init=scratch.")
  if rm_cfg.init == "sft":
    spec = train.tokenizer_spec(train.read_json(fileio.join(sft_workdir, "config.json")))
    model_cfg = sft_ckpt.model_config
  else:
    spec = sources.tokenizer or "byte"
    model_cfg = config_dicts.build_model_config(config.model)
  if sources.tokenizer and rm_cfg.init == "sft":
    requested = tok_lib.load_tokenizer(sources.tokenizer)
    if requested.fingerprint() != sft_ckpt.tokenizer.fingerprint():
      raise TokenizerMismatchError(
          f"config.sources.tokenizer={sources.tokenizer!r} (fingerprint {requested.fingerprint()}) "
          f"differs from the SFT run's {spec!r} ({sft_ckpt.tokenizer.fingerprint()}); a reward "
          "model initialised from SFT must use the SFT tokenizer (leave config.sources.tokenizer "
          "empty)")
  tokenizer = tok_lib.load_tokenizer(spec)
  if sft_ckpt is not None and tokenizer.fingerprint() != sft_ckpt.tokenizer.fingerprint():
    raise TokenizerMismatchError(
        f"tokenizer {spec!r} ({tokenizer.fingerprint()}) differs from the SFT run's "
        f"({sft_ckpt.tokenizer.fingerprint()}) whose samples normalise the rewards")
  model_cfg = model_cfg.replace(dropout_rate=rm_cfg.dropout_rate)
  if rm_cfg.compute_dtype:
    model_cfg = model_cfg.replace(dtype=rm_cfg.compute_dtype)
  return model_cfg, tokenizer, spec, sft_ckpt


def _train_sft(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The SFT stage, through the registry (no method module imports another)."""
  return registry.get("sft")(config, workdir)


def _sft_default_config() -> ml_collections.ConfigDict:
  """The synthetic SFT default (``experiments/configs/sft_synthetic.py``)."""
  return registry.default_config("sft")


def ensure_sft_run(config: ml_collections.ConfigDict) -> bool:
  """Makes sure ``config.sources.sft_workdir`` holds a finished SFT run; False if SFT was preempted.

  With ``rm.init=sft`` and the synthetic source, the default synthetic SFT run (the SFT method's
  ``default_config()``, i.e. ``experiments/configs/sft_synthetic.py``, run through the registry) is
  trained when the workdir has no checkpoint, and *resumed* when it holds an unfinished run of
  that same config (no ``final_metrics.json``: e.g. a SIGTERM during SFT), so a reward model
  never starts from a half-trained SFT model. When SFT itself is stopped by SIGTERM this returns
  False and the reward model is not trained (a re-run resumes SFT). Other sources need an
  existing SFT run.
  """
  sft_workdir = config.sources.sft_workdir
  if config.rm.init != "sft" or config.sources.get("pretrained"):
    return True  # no SFT run (scratch), or a pretrained checkpoint in its place
  if not sft_workdir:
    raise ValueError(
        "config.sources.sft_workdir is empty; rm.init=sft needs the SFT run the reward "
        "model starts from (or set config.rm.init=scratch)")
  has_ckpt = train.latest_step(sft_workdir) is not None
  if config.data.source != "synthetic":
    if not has_ckpt:
      raise FileNotFoundError(
          f"config.sources.sft_workdir={sft_workdir!r} holds no SFT run; train one first "
          "(python experiments/run.py --config=experiments/configs/sft_jsonl.py --workdir=...)")
    return True
  if has_ckpt and train.is_finished(sft_workdir):
    return True
  sft_config = _sft_default_config()
  if has_ckpt:
    config_path = fileio.join(sft_workdir, "config.json")
    stored = train.read_json(config_path) if fileio.exists(config_path) else None
    if stored != json.loads(json.dumps(sft_config.to_dict())):
      logger.warning(
          "%s holds an unfinished SFT run of another config; using its latest checkpoint",
          sft_workdir)
      return True
    logger.info("resuming the unfinished default SFT run in %s", sft_workdir)
  else:
    logger.info("no SFT run in %s: training it first (experiments/configs/sft_synthetic.py)",
                sft_workdir)
  result = _train_sft(sft_config, sft_workdir)
  if result.get("preempted"):
    logger.warning(
        "SFT was stopped at step %s (signal); not training the reward model. Re-run the "
        "same command to resume.", result.get("step"))
    return False
  return True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) a reward model, normalises it, evaluates it and writes the report.

  With ``rm.init=sft`` on the synthetic task a missing (or unfinished default) SFT run in
  ``sources.sft_workdir`` is trained first (:func:`ensure_sft_run`); if that SFT stage is stopped
  by SIGTERM this returns ``{"preempted": True, "stage": "sft"}`` without training the RM.
  Returns the final metrics (also ``<workdir>/final_metrics.json``). Keys of ``config``: see
  ``experiments/configs/rm_synthetic.py``.
  """
  known = KNOWN_KEYS
  unknown = sorted(set(config.keys()) - known)
  if unknown:
    raise ValueError(f"unknown config key(s) {[f'config.{k}' for k in unknown]}; allowed top-level "
                     f"keys: {sorted(known)}")
  if config.get("method", "reward_model") != "reward_model":
    raise ValueError(f"config.method={config.method!r} is invalid here; allowed: reward_model")
  rm_cfg = config_dicts.to_dataclass(RMConfig, config.rm, "rm")
  lora_cfg = sections.lora_section(config).config()
  if lora_cfg is not None and rm_cfg.init != "sft":
    raise ValueError(
        f"config.lora.enabled=True with config.rm.init={rm_cfg.init!r}; allowed: "
        "rm.init='sft' (LoRA trains adapters over the frozen SFT / pretrained backbone)")
  if not ensure_sft_run(config):
    return {"step": 0, "preempted": True, "stage": "sft"}
  sources = config_dicts.to_dataclass(sections.Sources, config.sources, "sources")
  limits = config_dicts.to_dataclass(sections.Limits, config.limits, "limits")
  optim_cfg = config_dicts.to_dataclass(train.OptimConfig, config.optim, "optim")
  loop_cfg = config_dicts.to_dataclass(train.LoopConfig, config.loop, "loop")
  data_cfg = config_dicts.to_dataclass(RMDataConfig, config.data, "data")
  eval_cfg = config_dicts.to_dataclass(RMEvalConfig, config.eval, "eval")
  if rm_cfg.early_stopping_patience and not loop_cfg.eval_every:
    raise ValueError("config.rm.early_stopping_patience > 0 needs config.loop.eval_every > 0")
  mesh = parallel.mesh_from_config(config.mesh)
  fileio.makedirs(workdir)

  model_cfg, tokenizer, tok_spec, sft_ckpt = resolve_model_and_tokenizer(
      config, rm_cfg, sources, mesh)
  limits.check_model(model_cfg.max_seq_len)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"the tokenizer's vocab_size={tokenizer.vocab_size} exceeds the model's "
                     f"vocab_size={model_cfg.vocab_size}")
  data = reward_data.prepare(data_cfg, limits, rm_cfg.objective, tokenizer, workdir,
                             vocab_size=model_cfg.vocab_size)
  output_names = tuple(
      data.attribute_names) if rm_cfg.objective == "multi_attribute" else ("reward",)
  if rm_cfg.attribute_weights and len(rm_cfg.attribute_weights) != len(output_names):
    raise ValueError(f"config.rm.attribute_weights has {len(rm_cfg.attribute_weights)} entries; "
                     f"allowed: one per attribute {list(output_names)}")
  model = models.RewardModel(model_cfg, num_outputs=len(output_names))
  if lora_cfg is not None:  # adapters on the frozen backbone, the head trained in full
    model = lora_lib.LoraModel(model, lora_cfg, trained=("head",))
  data.held_out.output_names = output_names

  # -- state: head ~ N(0, 1/(D+1)), backbone from SFT ------------------------------------------
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  dummy = jnp.ones((1, 8), jnp.int32)
  params = parallel.create_sharded(functools.partial(model.init, init_rng, dummy, dummy), mesh)
  params = params["params"]
  if rm_cfg.init == "sft":
    params = scoring.place_params(models.with_backbone(params, sft_ckpt.params),
                                  lora_lib.unwrap(model), mesh)
    if lora_cfg is not None:  # the backbone is the SFT arrays themselves: never donated
      params = lora_lib.make_params(model, params, lora_cfg, mesh)
      params = params.replace(trained=jax.tree.map(jnp.copy, params.trained))
    else:
      # device_put may alias the SFT buffers; the train step donates its state, and the SFT
      # params are still needed afterwards for the normalisation samples.
      params = jax.tree.map(jnp.copy, params)
  optimizer, schedule = train.make_optimizer(optim_cfg, loop_cfg.num_steps)
  state = train.create_train_state(params, optimizer, state_rng, mesh)
  # Taken before training: the loop donates `state`, after which only the loop's result is live.
  live_params, frozen_params = train.state.split_frozen(state.params)
  abstract_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), live_params)
  objective_fn = reward_objectives.make_objective(model, rm_cfg.objective,
                                                  center_coef=rm_cfg.center_coef,
                                                  rating_scale=data.rating_scale,
                                                  attribute_weights=rm_cfg.attribute_weights)
  step_fn = train.make_train_step(reward_objectives.make_loss_fn(objective_fn), optimizer, schedule,
                                  grad_accum_steps=optim_cfg.grad_accum_steps)
  scorer = reward_eval.make_raw_scorer(model, data_cfg.eval_batch_size, mesh)
  eval_loss_fn = reward_eval.make_eval_loss_fn(objective_fn, mesh)
  pair_loss_fn = None
  if rm_cfg.objective == "bradley_terry":  # its held-out split is the held-out pairs: score once
    pair_loss_fn = lambda rc, rr: losses.bradley_terry_loss(  # noqa: E731
        jnp.asarray(rc, jnp.float32), jnp.asarray(rr, jnp.float32), center_coef=rm_cfg.center_coef)[
            0]
  stopper = (EarlyStopping(workdir, rm_cfg.early_stopping_patience, rm_cfg.early_stopping_min_delta)
             if rm_cfg.early_stopping_patience else None)
  early_stop_reason: list = [None]

  def eval_fn(st: train.TrainState, step: int) -> dict[str, float]:
    with train.SigtermWatch() as watch:
      try:
        metrics = reward_eval.evaluate(st.params, data.held_out, scorer, eval_loss_fn, full=False,
                                       ece_bins=eval_cfg.ece_bins, pair_loss_fn=pair_loss_fn,
                                       should_stop=lambda: watch.received)
      except reward_eval.EvalInterrupted:
        # The loop's own handler has seen the signal too: it checkpoints and stops after the next
        # step. Early stopping is not updated from a partial evaluation.
        logger.warning("SIGTERM during the evaluation at step %d: evaluation abandoned", step)
        return {"eval_interrupted": 1.0}
    if stopper is not None:
      try:
        stopper.update(step, metrics["eval_loss"], st.params)
      except EarlyStop as stop:  # ends the run through the loop's should_stop hook
        early_stop_reason[0] = f"early stopping: {stop}"
    return metrics

  fingerprint = {
      "method": "reward_model", "objective": rm_cfg.objective,
      "model": dataclasses.asdict(model_cfg), "tokenizer": tokenizer.fingerprint(),
      "num_outputs": len(output_names), **common.pretrained_fingerprint(sources),
      **common.lora_fingerprint(lora_cfg, params)}
  run_config = config.to_dict()
  stopped_early, step = False, train.latest_step(workdir) or 0
  if stopper is not None and stopper.state["stopped"]:
    stopped_early = True
    logger.info("this run already stopped early at step %s; finalising", stopper.state["best_step"])
  else:
    result = train.train(workdir=workdir, config=loop_cfg, state=state, step_fn=step_fn,
                         data=data.train_batches, fingerprint=fingerprint, mesh=mesh,
                         eval_fn=eval_fn, run_config=run_config,
                         should_stop=lambda step, metrics: early_stop_reason[0])
    if result.preempted:
      return {"step": result.step, "preempted": True}
    state, step, stopped_early = result.state, result.step, result.stop_reason is not None
  if stopper is not None:
    final_params = stopper.best_params(abstract_params, frozen_params)
    final_step = int(stopper.state["best_step"])
  else:
    final_params, final_step = state.params, step

  # -- final evaluation, normalisation, artifact, report ---------------------------------------
  with parallel.use_mesh(mesh):
    held_out = reward_eval.evaluate(final_params, data.held_out, scorer, eval_loss_fn, full=True,
                                    ece_bins=eval_cfg.ece_bins, pair_loss_fn=pair_loss_fn)
  policy = (models.Transformer(sft_ckpt.model_config), sft_ckpt.params) if sft_ckpt else None
  stats = normalization_and_gold(eval_cfg, scorer, final_params, policy, tokenizer, data,
                                 output_names, max_response_len=limits.max_response_len)
  info = RewardModelInfo(
      model=dataclasses.asdict(model_cfg.replace(dropout_rate=0.0)), output_names=output_names,
      tokenizer_spec=tok_spec, tokenizer_fingerprint=tokenizer.fingerprint(),
      max_prompt_len=limits.max_prompt_len, max_response_len=limits.max_response_len,
      mean=stats["mean"], std=stats["std"], normalization=stats["normalization"],
      objective=rm_cfg.objective, step=final_step, lora=_lora_info(config, sources, fingerprint))
  save_reward_model(workdir, final_params, info)
  final = {
      "step": step, "final_params_step": final_step, "stopped_early": stopped_early,
      "preempted": False, "objective": rm_cfg.objective, **data.stats, **held_out,
      **stats["metrics"], **parallel.topology(mesh)}
  parallel.write_on_coordinator(train.atomic_write_json, fileio.join(workdir, FINAL_METRICS_FILE),
                                {k: reward_report.json_value(v) for k, v in final.items()})
  text = parallel.write_on_coordinator(reward_report.write_report, workdir, final, info.to_json())
  if text is not None:
    print(text, flush=True)
  return final


def _lora_info(config: ml_collections.ConfigDict, sources: sections.Sources,
               fingerprint: dict) -> dict:
  """``RewardModelInfo.lora`` of a LoRA run ({} otherwise): its config and backbone fingerprint
  (the run's ``fingerprint["lora"]``), and where scoring reads that backbone again."""
  if "lora" not in fingerprint:
    return {}
  source = sources.policy
  kwargs = {}
  if train.runs.is_pretrained(source):  # loaded again as this run loaded it
    kwargs = {
        "tokenizer": sources.tokenizer,
        "model_overrides": common.model_overrides(config.get("model"))}
  else:
    source = fileio.absolute(source)
  return {**fingerprint["lora"], "base_source": source, "base_kwargs": kwargs}


__all__ = [
    "RMConfig",
    "RMDataConfig",
    "RMEvalConfig",
    "OBJECTIVES",
    "DATA_KIND",
    "EarlyStopping",
    "train_and_evaluate",
    "ensure_sft_run",
    "resolve_model_and_tokenizer",
    "RewardModelHandle",
    "RewardModelInfo",
    "TokenizerMismatchError",
    "check_tokenizer",
    "encode_pairs",
    "load_reward_model",
    "make_handle",
    "normalize_rewards",
    "read_reward_model_info",
    "reward_fn",
    "save_reward_model",
    "score",
    "score_sequences",
    "score_texts",]
