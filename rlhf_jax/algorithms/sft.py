"""Supervised fine-tuning: prompt-masked next-token NLL on ``{"prompt", "response"}`` records.

For a sequence ``x = [BOS] prompt response [EOS]`` with loss mask ``m_t = 1`` on the response tokens
(EOS included) and 0 on BOS, prompt and padding,

    logp_t = log pi_theta(x_t | x_<t)                        (models.sequence_logprobs, float32)
    L      = sum_bt m_bt (-logp_bt) / sum_bt m_bt            (losses.sft_loss, "token_mean")

so the model is never trained to predict the prompt. Evaluation reports the held-out NLL per
response token (the same quantity, over the whole eval split, token-weighted), and samples
responses for held-out prompts with the KV-cache sampler; on the synthetic task their mean gold
reward is exact (``data.synthetic.gold_rewards``) and is compared with the reference policy the
SFT data was drawn from, which is what a perfect SFT model would match.

Entry points: :func:`train_and_evaluate` (registry name ``sft``) and ``train.load_sft_params``,
which later stages (reward models, DPO, PPO) use to start from an SFT run. The loss is
``common.nll_loss_fn`` (RAFT fine-tunes with the same one).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import fileio, models, parallel, sampling, train
from rlhf_jax.algorithms import common, sections
from rlhf_jax.data import batching, synthetic, synthetic_files
from rlhf_jax.data import dataset as ds_lib
from rlhf_jax.data import tokenizers as tok_lib
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.train import config_dicts

logger = logging.getLogger(__name__)

FINAL_METRICS_FILE = train.FINAL_METRICS_FILE


@dataclasses.dataclass(frozen=True)
class SFTEvalConfig:
  """What evaluation measures.

  Attributes:
    num_sample_prompts: held-out prompts sampled at each evaluation (0 disables sampling).
    temperature, top_k, top_p: sampling settings (``sampling.SamplingConfig``).
    print_samples: how many (prompt, response, gold) triples to log at each evaluation.
    seed: base seed of the evaluation samples (``fold_in(seed, step)``: independent of training).
  """

  num_sample_prompts: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  print_samples: int = 3
  seed: int = 1234

  def __post_init__(self):
    if not (isinstance(self.num_sample_prompts, int) and self.num_sample_prompts >= 0):
      raise ValueError(f"SFTEvalConfig.num_sample_prompts={self.num_sample_prompts!r} is invalid; "
                       "allowed: an int >= 0")
    if not (isinstance(self.print_samples, int) and self.print_samples >= 0):
      raise ValueError(f"SFTEvalConfig.print_samples={self.print_samples!r} is invalid; "
                       "allowed: an int >= 0")
    # temperature / top_k / top_p are validated by SamplingConfig when evaluation builds it.
    sampling.SamplingConfig(max_new_tokens=1, temperature=self.temperature, top_k=self.top_k,
                            top_p=self.top_p)


@dataclasses.dataclass(frozen=True)
class SFTDataConfig(sections.DataSource):
  """Where the SFT records come from and how they are batched (``config.data``).

  The shared :class:`sections.DataSource` fields, with: ``source="synthetic"`` uses the task in
  ``synthetic_dir`` if given, else generates it (``synthetic_*``) into ``<workdir>/data/synthetic``;
  ``source="jsonl"`` reads ``train_jsonl`` / ``eval_jsonl`` (``{"prompt", "response"}`` or chat
  ``messages`` records). Held-out prompts for the samples come from the eval split, so
  ``eval_prompts_jsonl`` must stay ''. ``batch_size`` is the global training batch (sequences per
  optimiser step). Limits (and padding buckets) are ``config.limits``.

  Attributes:
    eval_batch_size: batch of the held-out NLL pass; max_eval_examples caps the eval split.
  """

  eval_batch_size: int = 64
  max_eval_examples: int = 512

  def __post_init__(self):
    super().__post_init__()
    for name in ("eval_batch_size", "max_eval_examples"):
      sections.check_int("SFTDataConfig", name, getattr(self, name), 1)
    if self.eval_prompts_jsonl:
      raise ValueError(f"SFTDataConfig.eval_prompts_jsonl={self.eval_prompts_jsonl!r} is invalid; "
                       "allowed: '' (SFT samples held-out prompts from the eval split)")


class SFTData(NamedTuple):
  train_batches: batching.BatchIterator
  eval_dataset: ds_lib.TokenizedDataset
  gold_reward_fn: Any  # (prompts, responses) -> [B] gold rewards, or None
  reference_metrics: dict  # what the data's own policy scores (synthetic task), for comparison


def prepare_data(config: SFTDataConfig, limits: sections.Limits, tokenizer: tok_lib.Tokenizer,
                 workdir: str, *, vocab_size: int) -> SFTData:
  """Builds (once) the train / eval TFDS datasets under ``<workdir>/data`` and the train iterator."""
  data_dir = fileio.join(workdir, "data")
  gold_fn, reference = None, {}
  if config.source == "synthetic":
    task_dir = config.synthetic_dir or fileio.join(data_dir, "synthetic")
    meta_path = fileio.join(task_dir, "metadata.json")
    wanted = config.synthetic_task()
    if config.synthetic_dir and not fileio.exists(meta_path):
      raise ValueError(
          f"config.data.synthetic_dir={config.synthetic_dir!r}: no synthetic task there; "
          "allowed: a folder `python -m rlhf_jax.data.synthetic --out DIR` wrote, or ''")
    if not parallel.agree(fileio.exists(meta_path)):  # one decision: process 0 writes it
      logger.info("generating the synthetic task into %s", task_dir)
      parallel.write_on_coordinator(synthetic_files.write_task, task_dir, wanted, overwrite=True,
                                    barrier="sft_synthetic_task_written")
    meta = train.read_json(meta_path)
    if not config.synthetic_dir:  # a task this run generated must be the one configured
      for key in ("seed", "num_prompts", "num_test_prompts"):
        if meta["config"][key] != getattr(wanted, key):
          raise ValueError(f"{task_dir} holds a synthetic task with {key}={meta['config'][key]}, "
                           f"the config asks for {getattr(wanted, key)}; use a fresh --workdir")
    train_jsonl, eval_jsonl = (fileio.join(task_dir, f) for f in ("sft.jsonl", "sft_test.jsonl"))
    gold_fn = synthetic.gold_rewards
    test = meta["splits"]["test"]
    reference = {
        "reference_policy_gold_reward": test["reference_policy_mean_gold"],
        "best_response_gold_reward": test["best_response_mean_gold"]}
  else:
    train_jsonl, eval_jsonl = config.train_jsonl, config.eval_jsonl
  lengths = dict(max_prompt_len=limits.max_prompt_len, max_response_len=limits.max_response_len)
  train_ds = ds_lib.prepare_dataset(train_jsonl, "sft", tokenizer,
                                    fileio.join(data_dir, "sft_train"), **lengths)
  eval_ds = ds_lib.prepare_dataset(eval_jsonl, "sft", tokenizer, fileio.join(data_dir, "sft_eval"),
                                   **lengths)
  batches = batching.BatchIterator(train_ds, config.batch_size, seed=config.shuffle_seed,
                                   buckets=limits.buckets or None,
                                   group_by_length=limits.group_by_length, vocab_size=vocab_size)
  return SFTData(batches, eval_ds, gold_fn, reference)


class EvalData(NamedTuple):
  batches: list  # fixed-shape sft batches covering the (capped) eval split
  prompt_tokens: np.ndarray  # [S, max_prompt_len] left-padded [BOS] prompt
  prompt_mask: np.ndarray
  prompt_texts: list
  max_response_len: int


def make_eval_data(eval_ds: ds_lib.TokenizedDataset, config: SFTDataConfig, limits: sections.Limits,
                   num_sample_prompts: int, tokenizer: tok_lib.Tokenizer) -> EvalData:
  """Materialises the eval batches and the sampling prompts.

  Every eval batch is padded to the longest sequence of the evaluated examples (rounded up to a
  multiple of 8) and the prompts to the bucket of the longest sampled prompt: one compile each,
  and no work on padding up to the configured maxima.
  """
  num_examples = min(len(eval_ds), config.max_eval_examples)
  num_batches = -(-num_examples // config.eval_batch_size)
  covered = min(len(eval_ds), num_batches * config.eval_batch_size)  # rows the batches read
  longest = -(-int(np.max(eval_ds.lengths[:covered])) // 8) * 8
  # the iterator insists on a bucket for the dataset's maximum; no batch used here reaches it
  buckets = tuple(sorted({longest, eval_ds.max_seq_len}))
  # each process reads its slice of every global eval batch (the mesh sees the single-host batches)
  it = batching.BatchIterator(eval_ds, config.eval_batch_size, shuffle=False, drop_remainder=False,
                              num_epochs=1, buckets=buckets)
  batches = [
      {k: b[k] for k in ("tokens", "mask", "loss_mask")} for _, b in zip(range(num_batches), it)]
  examples = [eval_ds[i] for i in range(min(num_sample_prompts, len(eval_ds)))]
  width = batching.bucket_length(1 + max((len(ex["prompt"]) for ex in examples), default=0),
                                 batching.default_buckets(limits.max_prompt_len))
  prompts = batching.collate(examples, "prompt", eval_ds.special_ids, width)
  texts = [tokenizer.decode(ex["prompt"]) for ex in examples]
  return EvalData(batches, prompts["prompt_tokens"], prompts["prompt_mask"], texts,
                  limits.max_response_len)


def make_eval_fn(model: models.Transformer, tokenizer: tok_lib.Tokenizer, eval_data: EvalData,
                 config: SFTEvalConfig, workdir: str, gold_reward_fn=None, mesh=None):
  """``eval_fn(state, step) -> metrics``: held-out NLL, and sampled responses (+ gold reward).

  ``eval_nll_per_token = sum(-logp over response tokens) / #response tokens`` over the whole eval
  split (fixed-shape batches, so one compile). Samples go to ``<workdir>/samples.jsonl`` (written
  by process 0). Multi-host: ``eval_data.batches`` are this process's slices, placed on ``mesh``
  as global batches; both sums are reduced over the global batch on the devices.
  """
  samp_cfg = sampling.SamplingConfig(max_new_tokens=eval_data.max_response_len,
                                     temperature=config.temperature, top_k=config.top_k,
                                     top_p=config.top_p, eos_id=tokenizer.eos_id,
                                     pad_id=tokenizer.pad_id)
  sample_path = fileio.join(workdir, "samples.jsonl")

  def eval_fn(state: train.TrainState, step: int) -> dict[str, float]:
    total_nll, total_tokens = 0.0, 0.0
    for batch in eval_data.batches:
      logps_B = models.response_logps(model, state.params, batch["tokens"], batch["mask"],
                                      batch["loss_mask"], mesh=mesh)
      nll, tokens = parallel.to_host(
          (jnp.sum(logps_B), jnp.sum(parallel.shard_batch(batch["loss_mask"], mesh))
           if mesh is not None else np.sum(batch["loss_mask"])))
      total_nll -= float(nll)
      total_tokens += float(tokens)
    metrics = {"eval_nll_per_token": total_nll / max(total_tokens, 1.0)}
    metrics["eval_perplexity"] = float(np.exp(metrics["eval_nll_per_token"]))
    if config.num_sample_prompts == 0:
      return metrics
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)
    out = sampling.sample(model, state.params, eval_data.prompt_tokens, eval_data.prompt_mask, rng,
                          samp_cfg)
    tokens, mask = parallel.to_host((out.response_tokens_BxR, out.response_mask_BxR))
    responses = [tokenizer.decode(t[m > 0]) for t, m in zip(tokens, mask)]
    metrics["sample_length"] = float(np.mean(mask.sum(-1)))
    metrics["sample_eos_fraction"] = float(
        np.mean([tokenizer.eos_id in t[m > 0] for t, m in zip(tokens, mask)]))
    golds = None
    if gold_reward_fn is not None:
      golds = gold_reward_fn(eval_data.prompt_texts, responses)
      metrics["sample_gold_reward"] = float(np.mean(golds))
    rows = []
    for i, (prompt, response) in enumerate(zip(eval_data.prompt_texts, responses)):
      row = {"step": step, "prompt": prompt, "response": response}
      if golds is not None:
        row["gold"] = round(float(golds[i]), 4)
      rows.append(row)
    if parallel.is_coordinator():
      fileio.append_text(sample_path,
                         "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    for row in rows[:config.print_samples]:
      logger.info("sample @%d | %r -> %r%s", step, row["prompt"], row["response"],
                  f" (gold {row['gold']:+.2f})" if "gold" in row else "")
    return metrics

  return eval_fn


def default_config() -> ml_collections.ConfigDict:
  """Every key ``train_and_evaluate`` reads, at the synthetic-task defaults.

  Sections: ``sources`` (``sections.Sources``: only ``tokenizer`` applies, SFT starts from a fresh
  ``config.model``), ``data`` (:class:`SFTDataConfig`), ``limits`` (``sections.Limits``),
  ``model`` (preset + ``ModelConfig`` overrides; ``vocab_size`` follows the tokenizer unless set),
  ``optim`` (``train.OptimConfig``), ``loop`` (``train.LoopConfig``), ``eval``
  (:class:`SFTEvalConfig`), ``mesh`` (``parallel.MeshConfig``), plus ``method`` ("sft"), ``seed``
  and ``aggregation`` (``losses.sft_loss``'s token aggregation, ``losses.TOKEN_AGGREGATIONS``).
  """
  config = ml_collections.ConfigDict()
  config.method = "sft"
  config.seed = 0
  config.aggregation = "token_mean"
  config.sources = config_dicts.dataclass_section(sections.Sources, tokenizer="byte")
  config.model = config_dicts.model_section("small")
  config.optim = config_dicts.dataclass_section(train.OptimConfig, lr=3e-3, warmup_steps=20,
                                                schedule="cosine", end_lr_ratio=0.05,
                                                weight_decay=0.05, clip_norm=1.0)
  config.loop = config_dicts.dataclass_section(train.LoopConfig, num_steps=400, log_every=20,
                                               eval_every=200, checkpoint_every=200,
                                               keep_checkpoints=2, progress_every_secs=10.0)
  config.data = config_dicts.dataclass_section(SFTDataConfig, source="synthetic", batch_size=16,
                                               eval_batch_size=128, max_eval_examples=512)
  config.limits = config_dicts.dataclass_section(sections.Limits, max_prompt_len=32,
                                                 max_response_len=48, buckets=(64, 80))
  config.eval = config_dicts.dataclass_section(SFTEvalConfig, num_sample_prompts=128)
  config.mesh = config_dicts.dataclass_section(parallel.MeshConfig, data=1, fsdp=1, tensor=1)
  config.lora = config_dicts.dataclass_section(sections.Lora)  # off: --config.lora.enabled=True
  return config


KNOWN_KEYS = {
    "method", "seed", "sources", "model", "optim", "loop", "data", "limits", "eval", "mesh",
    "aggregation", "lora"}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) SFT as configured and returns the final metrics (also written to
  ``<workdir>/final_metrics.json``). See ``experiments/configs/sft_synthetic.py`` for the keys."""
  common.check_config_keys(config, KNOWN_KEYS, "sft")
  if config.get("method", "sft") != "sft":
    raise ValueError(f"config.method={config.method!r} is invalid for sft.train_and_evaluate; "
                     "allowed: 'sft'")
  sources = config_dicts.to_dataclass(sections.Sources, config.sources, "sources")
  for name in ("sft_workdir", "reference_workdir", "reward_model_workdir", "value_model_workdir",
               "attribute_weights"):
    if getattr(sources, name):
      raise ValueError(f"config.sources.{name}={getattr(sources, name)!r} is invalid for SFT; "
                       "allowed: '' (SFT trains a fresh config.model, or sources.pretrained; only "
                       "sources.tokenizer and sources.pretrained apply)")
  mesh = parallel.mesh_from_config(config.mesh)
  pretrained = None
  if sources.pretrained:  # a Hugging Face checkpoint: its architecture, weights and tokenizer
    pretrained = train.load_sft_params(sources.policy,
                                       **common.pretrained_kwargs(sources, mesh, config.model))
    tokenizer, model_cfg = pretrained.tokenizer, pretrained.model_config
  else:
    tokenizer = tok_lib.load_tokenizer(sources.tokenizer or "byte")
    model_section = config.model.to_dict()
    if model_section.get("vocab_size") is None:  # follow the tokenizer unless set explicitly
      model_section["vocab_size"] = tokenizer.vocab_size
    model_cfg = config_dicts.build_model_config(model_section)
  optim_cfg = config_dicts.to_dataclass(train.OptimConfig, config.optim, "optim")
  loop_cfg = config_dicts.to_dataclass(train.LoopConfig, config.loop, "loop")
  data_cfg = config_dicts.to_dataclass(SFTDataConfig, config.data, "data")
  limits = config_dicts.to_dataclass(sections.Limits, config.limits, "limits")
  eval_cfg = config_dicts.to_dataclass(SFTEvalConfig, config.eval, "eval")
  try:
    # seq_mean_token_sum_norm's constant: the longest sequence, whatever a batch's bucket
    loss_fn = common.nll_loss_fn(models.Transformer(model_cfg), config.aggregation, limits.max_len)
  except ValueError as err:
    raise ValueError(f"config.{err}") from None
  fileio.makedirs(workdir)

  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the "
                     f"tokenizer's vocab_size={tokenizer.vocab_size}")
  lora_cfg = sections.lora_section(config).config()
  if lora_cfg is not None and pretrained is None:
    raise ValueError("config.lora.enabled=True needs config.sources.pretrained: LoRA trains "
                     "adapters over a pretrained base (a fresh config.model has nothing to keep)")
  fingerprint = {
      "method": "sft", "model": dataclasses.asdict(model_cfg), "tokenizer": tokenizer.fingerprint(),
      **common.pretrained_fingerprint(sources)}
  if lora_cfg is not None:
    fingerprint.update(
        common.lora_fingerprint(lora_cfg, lora_lib.LoraParams(base=pretrained.params, lora=None)))
  train.check_fingerprint(workdir, fingerprint)  # refuse a foreign workdir before any work
  limits.check_model(model_cfg.max_seq_len)
  data = prepare_data(data_cfg, limits, tokenizer, workdir, vocab_size=model_cfg.vocab_size)
  eval_data = make_eval_data(data.eval_dataset, data_cfg, limits, eval_cfg.num_sample_prompts,
                             tokenizer)

  model = models.Transformer(model_cfg)
  optimizer, schedule = train.make_optimizer(optim_cfg, loop_cfg.num_steps)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  dummy = jnp.ones((1, 8), jnp.int32)
  if pretrained is not None:
    params = common.place_params(pretrained.params, model, mesh)
  else:
    params = parallel.create_sharded(functools.partial(model.init, init_rng, dummy, dummy),
                                     mesh)["params"]
  if lora_cfg is not None:  # adapters over the frozen pretrained base (models.lora)
    model = lora_lib.LoraModel(model, lora_cfg)
    params = lora_lib.make_params(model, params, lora_cfg, mesh)
    loss_fn = common.nll_loss_fn(model, config.aggregation, limits.max_len)
  state = train.create_train_state(params, optimizer, state_rng, mesh)
  step_fn = train.make_train_step(loss_fn, optimizer, schedule,
                                  grad_accum_steps=optim_cfg.grad_accum_steps)
  eval_fn = make_eval_fn(model, tokenizer, eval_data, eval_cfg, workdir,
                         gold_reward_fn=data.gold_reward_fn, mesh=mesh)
  result = train.train(workdir=workdir, config=loop_cfg, state=state, step_fn=step_fn,
                       data=data.train_batches, fingerprint=fingerprint, mesh=mesh, eval_fn=eval_fn,
                       run_config=config.to_dict())
  final = {"step": result.step, "preempted": result.preempted, **result.eval_metrics}
  final.update(data.reference_metrics)
  if not result.preempted:
    final = common.write_final(workdir, final, "SFT", mesh)
  return final
