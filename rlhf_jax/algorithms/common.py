"""Pieces shared by the offline trainers (DPO family, PRO / RRHF, RAFT, best-of-n).

* :func:`load_models` (from a ``sections.Sources``) — the policy starts from an SFT run, the frozen
  reference is that run (or ``reference_workdir``), and an optional reward model scores samples.
  A reference whose model config or tokenizer differs from the policy's is refused
  (:class:`ReferenceMismatchError`): its log-probs would be of other token ids or another function.
* :func:`resolve_files` — a method's (train, eval, eval-prompts) record files from its
  ``config.data`` section (the synthetic task, generated when missing, or JSONL files).
* :func:`make_heldout_eval_fn` — a loss's metrics averaged over fixed held-out batches, in eval
  mode (``loss_fn(params, batch, rng=None)``: deterministic, no dropout).
* :func:`nll_loss_fn` — SFT's prompt-masked NLL as a ``train`` loss function (SFT, RAFT).
* Small I/O helpers: prompt lists, eval-prompt batches, ``final_metrics.json`` (written by process 0,
  with the topology the run used: ``process_count``, ``device_count``, ``mesh_shape``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax import fileio, losses, models, parallel, train
from rlhf_jax import scoring
from rlhf_jax.algorithms import sections
from rlhf_jax.data import records as rec
from rlhf_jax.data import tokenizers as tok_lib
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.train import config_dicts

logger = logging.getLogger(__name__)

FINAL_METRICS_FILE = train.FINAL_METRICS_FILE
SOURCES = sections.DATA_SOURCES  # where records come from: synthetic | jsonl


class ReferenceMismatchError(ValueError):
  """The reference checkpoint's model config or tokenizer differs from the policy's."""


class LoadedModels(NamedTuple):
  model_config: models.ModelConfig
  tokenizer: tok_lib.Tokenizer
  model: models.Transformer
  policy_params: Any  # unboxed, placed on the mesh
  ref_params: Any  # unboxed, placed on the mesh (equal to, but not the buffers of, policy_params)
  reward: scoring.RewardModelHandle | None
  sft_step: int  # step of the SFT checkpoint (-1: fresh init)
  ref_workdir: str = ""  # the run the reference params came from ('' = fresh init)
  ref_step: int = -1  # that run's checkpoint step (-1: fresh init); reference caches key on both
  lora: Any = None  # models.lora.LoraConfig when the policy trains LoRA adapters (policy_params
  # is then a LoraParams whose base *is* ref_params unless reference_workdir is another run)


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
    diff = {
        f.name: (getattr(ref_config, f.name), getattr(policy_config, f.name))
        for f in dataclasses.fields(models.ModelConfig)
        if getattr(ref_config, f.name) != getattr(policy_config, f.name)}
    raise ReferenceMismatchError(
        f"the {where} model config differs from the policy's in {sorted(diff)} "
        f"((reference, policy) = {diff}); the reference must have the policy's architecture.")


def place_params(params: Any, model: models.Transformer, mesh: jax.sharding.Mesh,
                 rules=parallel.DEFAULT_RULES) -> Any:
  """Puts an unboxed param tree onto ``mesh`` with the logical-axis rules."""
  shardings = parallel.logical_shardings(models.abstract_variables(model), mesh, rules)["params"]
  return parallel.device_put_global(nn.meta.unbox(params), shardings)


def load_models(sources: sections.Sources, mesh: jax.sharding.Mesh, *, model_section: Any = None,
                tokenizer_spec: str = "byte", rng: jax.Array | None = None,
                need_reward: bool = False, lora: sections.Lora | None = None) -> LoadedModels:
  """Loads policy, reference and (optionally) reward model; checks they read the same token ids.

  With ``lora`` enabled the model is a ``models.lora.LoraModel`` and the policy params are
  ``LoraParams(base, fresh adapters)``: the base is the loaded policy, not copied, and it is also
  the reference (the same arrays) unless ``sources.reference_workdir`` names another run.
  """
  if sources.policy:  # an SFT run, or a Hugging Face checkpoint (sources.pretrained)
    spec = getattr(sources, "tokenizer", "")  # sections.Sources: must match the SFT run's
    policy = train.load_sft_params(sources.policy,
                                   **pretrained_kwargs(sources, mesh, model_section))
    model_config, tokenizer, sft_step = policy.model_config, policy.tokenizer, policy.step
    model = models.Transformer(model_config)
    policy_params = place_params(policy.params, model, mesh)
    if spec and tok_lib.load_tokenizer(spec).fingerprint() != tokenizer.fingerprint():
      raise ReferenceMismatchError(
          f"config.sources.tokenizer={spec!r} differs from the tokenizer of the SFT run "
          f"{sources.sft_workdir} ({tokenizer!r}); allowed: '' (use the run's) or the same one")
    ref_params, ref_workdir, ref_step = policy_params, sources.policy, sft_step
    if sources.reference_workdir and (fileio.absolute(sources.reference_workdir) != fileio.absolute(
        sources.sft_workdir)):
      ref = train.load_sft_params(sources.reference_workdir)
      check_reference(model_config, tokenizer, ref.model_config, ref.tokenizer,
                      where=f"reference ({sources.reference_workdir})")
      ref_params = place_params(ref.params, model, mesh)
      ref_workdir, ref_step = sources.reference_workdir, ref.step
  else:
    if model_section is None:
      raise ValueError("config.sources.sft_workdir is empty and there is no config.model section; "
                       "allowed: an SFT run directory, or a model section for a fresh policy")
    model_config = config_dicts.build_model_config(model_section)
    tokenizer = tok_lib.load_tokenizer(tokenizer_spec)
    model = models.Transformer(model_config)
    dummy = jnp.ones((1, 8), jnp.int32)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    policy_params = parallel.create_sharded(functools.partial(model.init, rng, dummy, dummy),
                                            mesh)["params"]
    ref_params, sft_step, ref_workdir, ref_step = policy_params, -1, "", -1
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ValueError(f"the model's vocab_size={model_config.vocab_size} is smaller than the "
                     f"tokenizer's vocab_size={tokenizer.vocab_size}")
  lora_cfg = lora.config() if lora is not None else None
  if lora_cfg is not None:
    # The base is not donated to the train step (train.state.split_frozen): no copy needed.
    model = lora_lib.LoraModel(model, lora_cfg)
    policy_params = lora_lib.make_params(model, policy_params, lora_cfg, mesh)
  else:
    # The train state is donated to every step: the policy needs buffers of its own, or the first
    # step would free the reference's.
    policy_params = jax.tree.map(jnp.copy, policy_params)
  reward = None
  if sources.reward_model_workdir:
    reward = scoring.load_reward_model(sources.reward_model_workdir, policy_tokenizer=tokenizer,
                                       mesh=mesh,
                                       attribute_weights=getattr(sources, "attribute_weights",
                                                                 ""))  # sections.Sources has it
  elif need_reward:
    raise ValueError("config.sources.reward_model_workdir is empty; allowed: the workdir of a "
                     "trained reward model (this method scores samples with it)")
  return LoadedModels(model_config, tokenizer, model, policy_params, ref_params, reward, sft_step,
                      _abs_source(ref_workdir), ref_step, lora_cfg)


def _abs_source(source: str) -> str:
  if not source or train.runs.is_pretrained(source):
    return source
  return fileio.absolute(source)


def model_overrides(model_section: Any) -> dict:
  """The fields a ``config.model`` section sets explicitly (not ``None``; ``preset`` aside)."""
  if model_section is None:
    return {}
  values = model_section.to_dict() if hasattr(model_section, "to_dict") else dict(model_section)
  return {k: v for k, v in values.items() if k != "preset" and v is not None}


def pretrained_kwargs(sources: sections.Sources, mesh: Any, model_section: Any = None) -> dict:
  """``train.load_sft_params`` keywords for ``sources.policy`` ({} for an SFT run): the mesh the
  checkpoint is born sharded on, ``sources.tokenizer`` and ``config.model``'s runtime fields."""
  if not train.runs.is_pretrained(sources.policy):
    return {}
  return {
      "mesh": mesh, "tokenizer": sources.tokenizer,
      "model_overrides": model_overrides(model_section)}


def pretrained_fingerprint(sources: sections.Sources) -> dict:
  """What a run's fingerprint records of ``sources.pretrained`` ({} when unset)."""
  return train.runs.pretrained_fingerprint(getattr(sources, "pretrained", ""))


def lora_fingerprint(lora_cfg: Any, params: Any) -> dict:
  """``{"lora": {its config, "base": fingerprint of the base}}`` for a run's fingerprint ({} without
  LoRA): a resumed LoRA run must find the same adapters' config and the very same base."""
  if lora_cfg is None or not lora_lib.is_lora(params):
    return {}
  return {"lora": {**dataclasses.asdict(lora_cfg), "base": lora_lib.base_fingerprint(params.base)}}


def check_config_keys(config: Any, known: set[str], method: str) -> None:
  unknown = sorted(set(config.keys()) - known)
  if unknown:
    raise ValueError(f"unknown config key(s) {[f'config.{k}' for k in unknown]} for {method}; "
                     f"allowed top-level keys: {sorted(known)}")


# ----------------------------------------------------------------------------------------------------
# Log-probs of frozen models
# ----------------------------------------------------------------------------------------------------


def nll_loss_fn(model: models.Transformer, aggregation: str = "token_mean",
                norm_len: int | None = None) -> train.loop.LossFn:
  """The prompt-masked NLL of SFT and RAFT: ``loss_fn(params, batch, rng) -> (loss, metrics)``.

  With ``logp_t = log π_θ(x_t | x_<t)`` and ``m_t`` = ``batch["loss_mask"]`` (1 on response
  tokens, EOS included), ``losses.sft_loss`` reduces ``-m_t logp_t`` by ``aggregation``
  (``losses.TOKEN_AGGREGATIONS``; ``token_mean`` = Σ m (-logp) / Σ m; ``norm_len`` is
  ``seq_mean_token_sum_norm``'s constant, SFT's ``limits.max_len``). Dropout is on when the model
  has ``dropout_rate > 0`` and ``rng`` is a key; ``rng=None`` is eval mode (deterministic).
  """
  if aggregation not in losses.TOKEN_AGGREGATIONS:
    raise ValueError(f"aggregation={aggregation!r} is invalid; allowed: "
                     f"{' | '.join(losses.TOKEN_AGGREGATIONS)}")
  dropout = lora_lib.uses_dropout(model)  # model dropout, or LoRA's on the adapters' inputs

  def loss_fn(params, batch, rng):
    if dropout and rng is not None:
      out = model.apply({"params": params}, batch["tokens"], batch["mask"], deterministic=False,
                        rngs={"dropout": rng})
      logps_BxT = models.token_logprobs(out.logits_BxTxV, batch["tokens"], batch["loss_mask"])
    else:
      logps_BxT = models.sequence_logprobs(model, params, batch["tokens"], batch["mask"],
                                           batch["loss_mask"])
    per_example_B, metrics = losses.sft_loss(logps_BxT, batch["loss_mask"], aggregation=aggregation,
                                             norm_len=norm_len)
    return jnp.mean(per_example_B), {
        "nll_per_token": metrics["nll_per_token"], "num_tokens": metrics["num_tokens"]}

  return loss_fn


# ----------------------------------------------------------------------------------------------------
# Record files and held-out metrics
# ----------------------------------------------------------------------------------------------------


def resolve_files(data: Any, sources: Any, stem: str, workdir: str = "") -> tuple[str, str, str]:
  """(train, eval, eval-prompts) JSONL paths of record files ``stem`` (``pairwise``, ``ranked``, ...).

  ``data`` is a ``sections.DataSource`` (or a section with its fields). ``synthetic``: the task in
  ``data.synthetic_dir``, else ``<sources.sft_workdir>/data/synthetic`` (the SFT run's), else it is
  generated into ``<workdir>/data/synthetic`` from ``data.synthetic_*``. ``jsonl``: the files given
  (eval prompts default to the prompts of ``eval_jsonl``).
  """
  if data.source != "synthetic":
    return data.train_jsonl, data.eval_jsonl, data.eval_prompts_jsonl or data.eval_jsonl
  from rlhf_jax.data import synthetic_files  # pylint: disable=import-outside-toplevel

  candidates = [data.synthetic_dir] if data.synthetic_dir else [
      fileio.join(sources.sft_workdir, "data", "synthetic") if sources.sft_workdir else "",
      fileio.join(workdir, "data", "synthetic") if workdir else ""]
  task = next((c for c in candidates if c and fileio.isfile(fileio.join(c, "metadata.json"))), "")
  # Every process must take the same branch (process 0 writes, the others wait for it).
  found = parallel.agree(bool(task))
  if not found:
    if data.synthetic_dir or not workdir:
      raise ValueError(
          f"config.data.synthetic_dir={data.synthetic_dir!r}: no synthetic task there; "
          "allowed: the folder `python -m rlhf_jax.data.synthetic --out DIR` wrote "
          "(default: the SFT run's <sft_workdir>/data/synthetic)")
    task = candidates[-1]
    logger.info("no synthetic task found; generating one into %s", task)
    parallel.write_on_coordinator(synthetic_files.write_task, task, data.synthetic_task(),
                                  overwrite=True, barrier="synthetic_task_written")
  prompts = data.eval_prompts_jsonl or fileio.join(task, "prompts_test.jsonl")
  return fileio.join(task, f"{stem}.jsonl"), fileio.join(task, f"{stem}_test.jsonl"), prompts


def make_heldout_eval_fn(loss_fn: Callable, batches: list, mesh: jax.sharding.Mesh,
                         prefix: str = "pairs", rules=parallel.DEFAULT_RULES) -> Callable:
  """``fn(params) -> {f"{prefix}/<metric>": mean over the held-out batches}``.

  ``loss_fn(params, batch, rng) -> (loss, metrics)`` runs in eval mode (``rng=None``: dropout
  off), so the held-out numbers are a deterministic function of the params. ``batches`` are this
  process's slices (``BatchIterator``'s default per-host slicing); each metric is a scalar over the global batch.
  """
  if not batches:
    return lambda params: {}
  jitted = jax.jit(lambda params, batch: loss_fn(params, batch, None)[1])

  def fn(params):
    sums: dict[str, float] = {}
    with parallel.use_mesh(mesh, rules):
      for batch in batches:
        metrics = parallel.to_host(jitted(params, parallel.shard_batch(batch, mesh, rules)))
        for k, v in metrics.items():
          sums[k] = sums.get(k, 0.0) + float(v)
    return {f"{prefix}/{k}": v / len(batches) for k, v in sums.items()}

  return fn


# ----------------------------------------------------------------------------------------------------
# Prompts and final metrics
# ----------------------------------------------------------------------------------------------------


def read_prompts(path: str, limit: int | None = None, chat_template: Any = None) -> list[str]:
  """Distinct ``prompt`` strings of a JSONL file (any record kind with a prompt), in file order.

  Conversational prompts are rendered with ``chat_template`` (pass the policy tokenizer's: a
  checkpoint's Jinja template; default: the built-in one).
  """
  seen: dict[str, None] = {}
  for record in rec.iter_records(path, "prompt", chat_template=chat_template):
    seen.setdefault(record.prompt, None)
    if limit is not None and len(seen) >= limit:
      break
  if not seen:
    raise ValueError(f"{path}: no prompts")
  return list(seen)


def policy_evaluator(loaded: LoadedModels, prompt_texts: list[str], max_prompt_len: int,
                     config: policy_eval.PolicyEvalConfig, workdir: str, gold: bool = True,
                     mesh: jax.sharding.Mesh | None = None) -> policy_eval.PolicyEvaluator:
  """The held-out policy evaluation; the synthetic gold reward only when every prompt is one of
  the synthetic task's (users' own prompts, e.g. chat-templated ones, have no gold reward)."""
  if gold and not all(_is_synthetic_prompt(p) for p in prompt_texts):
    logger.info("the eval prompts are not the synthetic task's: no gold reward")
    gold = False
  prompts = policy_eval.make_eval_prompts(loaded.tokenizer, prompt_texts,
                                          max_prompt_len=max_prompt_len)
  return policy_eval.PolicyEvaluator(
      loaded.model, loaded.ref_params, loaded.tokenizer, prompts, config,
      reward_fn=scoring.sample_reward_fn(loaded.reward) if loaded.reward is not None else None,
      gold_reward_fn=policy_eval.synthetic.gold_rewards if gold else None,
      sample_path=fileio.join(workdir, "samples.jsonl"), mesh=mesh)


def _is_synthetic_prompt(text: str) -> bool:
  try:
    policy_eval.synthetic.parse_prompt(text)
  except ValueError:
    return False
  return True


def write_final(workdir: str, final: dict, method: str,
                mesh: jax.sharding.Mesh | None = None) -> dict:
  """``<workdir>/final_metrics.json`` (process 0 writes it): ``final`` plus the run's topology
  (``parallel.topology``: ``process_count``, ``device_count`` of the mesh, ``mesh_shape``)."""
  final = {**final, **parallel.topology(mesh)}
  parallel.write_on_coordinator(train.atomic_write_json, fileio.join(workdir, FINAL_METRICS_FILE),
                                final)
  logger.info(
      "%s finished: %s", method,
      ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
  return final
