"""Online DPO (Guo et al., 2024, "Direct Language Model Alignment from Online AI Feedback",
arXiv:2402.04792; TRL's ``OnlineDPOTrainer``): DPO on pairs the current policy samples.

Each step (one iteration of the one loop, ``train.train(iteration=...)``) takes ``data.batch_size``
prompts x_i and

1. samples two responses y_i^a, y_i^b ~ π_θ(·|x_i) with the KV-cache sampler
   (``rollout.make_generate_fn``, ``num_samples=2``: rows 2i, 2i+1);
2. lets the judge pick the preferred one: the reward model (``rollout.make_score_fn``; the higher
   score wins, ties go to the first as in TRL) or an annotator
   ``label_fn(prompts, a, b) → P(a ≻ b)`` (``feedback.annotators``; the label is drawn from P, seeded by the step, so a resumed run draws
   the same labels);
3. takes one optimiser step on the DPO-family loss (``losses.dpo_loss`` with ``online_dpo.
   loss_type``) with the SFT model as the frozen reference:

       ℓ_i = ℓ_loss_type(β [(log π_θ(y_w|x) - log π_ref(y_w|x))
                            - (log π_θ(y_l|x) - log π_ref(y_l|x))])

   Pairs whose two responses are identical carry no preference and are left out of the mean.

Labels are counted: ``labels`` per step, ``labels_total`` so far (a comparison is one label), so a
run can be held to an offline DPO run on the same number of comparisons. Held-out evaluation is
the offline methods' (``common.policy_evaluator`` on the distinct held-out prompts: gold reward,
KL to the SFT model, win rate vs the SFT model), so the numbers sit next to offline DPO's.
Checkpoints, exact resume, SIGTERM and the NaN guard are the loop's.

With ``config.lora.enabled`` the policy trains LoRA adapters over the frozen SFT (or pretrained)
params, which are also the reference and sample nothing of their own: one copy of the base
(``models.lora``; checkpoints hold the adapters and the base's fingerprint).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import fileio, losses, models, parallel, sampling, train
from rlhf_jax.algorithms import common, sections
from rlhf_jax.algorithms.online.config import OnlineDPOConfig, PPODataConfig
from rlhf_jax.algorithms.online.rollout import make_generate_fn, make_score_fn
from rlhf_jax.data import batching, synthetic
from rlhf_jax.data import dataset as ds_lib
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.feedback import annotators
from rlhf_jax.train import config_dicts

METHOD = "online_dpo"
KNOWN_KEYS = {
    "method", "seed", "sources", "data", "limits", "online_dpo", "annotator", "loop", "optim",
    "eval", "mesh", "lora"}
PROGRESS_KEYS = ("gold_reward", "chosen_gold_accuracy", "kl", "rewards/margins", "labels_total")


def default_config() -> ml_collections.ConfigDict:
  """Every section at its default (``experiments/configs/online_dpo_synthetic.py`` sets the run)."""
  config = ml_collections.ConfigDict()
  config.method = METHOD
  config.seed = 0
  config.sources = config_dicts.dataclass_section(sections.Sources)
  config.data = config_dicts.dataclass_section(PPODataConfig, source="synthetic", batch_size=32)
  config.limits = config_dicts.dataclass_section(sections.Limits, max_prompt_len=32,
                                                 max_response_len=48)
  config.online_dpo = config_dicts.dataclass_section(OnlineDPOConfig)
  config.annotator = config_dicts.dataclass_section(annotators.AnnotatorConfig)
  config.loop = config_dicts.dataclass_section(train.LoopConfig, num_steps=120, log_every=10,
                                               eval_every=60, checkpoint_every=20,
                                               keep_checkpoints=1)
  # offline DPO's optimiser in the pipeline (dpo_synthetic.py with lr 3e-4)
  config.optim = config_dicts.dataclass_section(train.OptimConfig, lr=3e-4, schedule="cosine",
                                                warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0,
                                                clip_norm=1.0)
  config.eval = config_dicts.dataclass_section(policy_eval.PolicyEvalConfig, num_prompts=128,
                                               max_new_tokens=48)
  config.mesh = config_dicts.dataclass_section(parallel.MeshConfig, data=1, fsdp=1, tensor=1)
  config.lora = config_dicts.dataclass_section(sections.Lora)  # off: --config.lora.enabled=True
  return config


@functools.lru_cache(maxsize=8)
def make_ref_logps_fn(policy: models.Transformer, prompt_len: int):
  """Jitted ``(ref_params, tokens_NxT, mask_NxT) -> [N]`` summed response log-probs (no gradient)."""

  def fn(ref_params, tokens_NxT, mask_NxT):
    logps_NxR, _ = models.response_token_logps(policy, ref_params, tokens_NxT, mask_NxT, prompt_len)
    return jnp.sum(logps_NxR, axis=-1)

  return jax.jit(fn)


def make_loss_fn(config: OnlineDPOConfig, policy: models.Transformer, prompt_len: int):
  """``loss_fn(params, batch, rng) -> (loss, metrics)`` over one step's pairs.

  ``batch``: ``tokens`` / ``mask`` ``[2B, T]`` (rows 2i, 2i+1 = the two answers to prompt i),
  ``response_mask`` ``[2B, R]``, ``ref_logps`` ``[2B]`` (summed), ``first_wins`` ``[B]`` (1: row 2i
  is the chosen one) and ``valid`` ``[B]`` (0: identical answers, left out of the mean).
  """

  def loss_fn(params, batch, rng):
    del rng  # no dropout: DPO's log-probs are the deterministic model's (TRL disables dropout)
    logps_NxR, _ = models.response_token_logps(policy, params, batch["tokens"], batch["mask"],
                                               prompt_len)
    seq_N = jnp.sum(logps_NxR, axis=-1)
    ref_N = batch["ref_logps"]
    len_N = jnp.sum(batch["response_mask"].astype(jnp.float32), axis=-1)
    first = batch["first_wins"] > 0

    def pick(x_N):
      a_B, b_B = x_N[0::2], x_N[1::2]
      return jnp.where(first, a_B, b_B), jnp.where(first, b_B, a_B)

    (pc, pr), (rc, rr), (lc, lr) = pick(seq_N), pick(ref_N), pick(len_N)
    per_pair_B, m = losses.dpo_loss(pc, pr, rc, rr, beta=config.beta, loss_type=config.loss_type,
                                    label_smoothing=config.label_smoothing, chosen_lengths=lc,
                                    rejected_lengths=lr)
    valid_B = batch["valid"].astype(jnp.float32)
    n_valid = jnp.maximum(jnp.sum(valid_B), 1.0)
    loss = jnp.sum(per_pair_B * valid_B) / n_valid
    metrics = {k: v for k, v in m.items() if k != "loss"}
    # KL(π ‖ π_ref) of the sampled answers (k1, per sequence), before this step's update.
    metrics["kl"] = jax.lax.stop_gradient(jnp.mean(seq_N - ref_N))
    return loss, metrics

  return loss_fn


class _Prompts:
  """Training prompt batches (resumable) and held-out prompt texts."""

  def __init__(self, data: PPODataConfig, limits: sections.Limits, sources: sections.Sources,
               tokenizer, vocab_size: int, workdir: str, num_eval_prompts: int):
    train_jsonl, _, eval_prompts = common.resolve_files(data, sources, "prompts", workdir)
    if data.source != "synthetic":
      train_jsonl = data.train_jsonl
      eval_prompts = data.eval_prompts_jsonl or data.eval_jsonl
    dataset = ds_lib.prepare_dataset(train_jsonl, "prompt", tokenizer,
                                     fileio.join(workdir, "data", "prompts_train"),
                                     max_prompt_len=limits.max_prompt_len,
                                     max_response_len=limits.max_response_len)
    self.train = batching.BatchIterator(dataset, data.batch_size, seed=data.shuffle_seed,
                                        buckets=(limits.max_prompt_len,), vocab_size=vocab_size)
    self.eval_texts = common.read_prompts(eval_prompts, num_eval_prompts) if eval_prompts else []
    self.synthetic = data.source == "synthetic"


def _decode(tokenizer, tokens_NxK, mask_NxK) -> list[str]:
  return [tokenizer.decode(t[m == 1]) for t, m in zip(tokens_NxK, mask_NxK)]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) online DPO (module docstring); returns ``final_metrics.json``'s content."""
  common.check_config_keys(config, KNOWN_KEYS, METHOD)
  sources = config_dicts.to_dataclass(sections.Sources, config.sources, "sources")
  data = config_dicts.to_dataclass(PPODataConfig, config.data, "data")
  limits = config_dicts.to_dataclass(sections.Limits, config.limits, "limits")
  odpo = config_dicts.to_dataclass(OnlineDPOConfig, config.online_dpo, "online_dpo")
  annot = config_dicts.to_dataclass(annotators.AnnotatorConfig,
                                    config.get("annotator", {}) or {}, "annotator")
  loop_cfg = config_dicts.to_dataclass(train.LoopConfig, config.loop, "loop")
  optim_cfg = config_dicts.to_dataclass(train.OptimConfig, config.optim, "optim")
  eval_cfg = config_dicts.to_dataclass(policy_eval.PolicyEvalConfig, config.eval, "eval")
  if not sources.policy:
    sources.require("sft_workdir", METHOD, "the policy and the reference start from it (or "
                    "sources.pretrained)")
  if odpo.judge == "reward_model":
    sources.require("reward_model_workdir", METHOD, "online_dpo.judge='reward_model' scores "
                    "the two answers with it")
  mesh = parallel.mesh_from_config(config.mesh)
  fileio.makedirs(workdir)
  loaded = common.load_models(sources, mesh, lora=sections.lora_section(config))
  limits.check_model(loaded.model_config.max_seq_len)
  tok, policy, prompt_len = loaded.tokenizer, loaded.model, limits.max_prompt_len
  prompts = _Prompts(data, limits, sources, tok, loaded.model_config.vocab_size, workdir,
                     eval_cfg.num_prompts)
  label_fn = annotators.make_label_fn(annot, tok) if odpo.judge == "annotator" else None
  if label_fn is None and loaded.reward is None:
    raise ValueError("config.sources.reward_model_workdir is empty; allowed: a reward-model run "
                     "(online_dpo.judge='reward_model')")

  optimizer, schedule = train.make_optimizer(optim_cfg, loop_cfg.num_steps)
  state = train.create_train_state(loaded.policy_params, optimizer, jax.random.PRNGKey(config.seed),
                                   mesh)
  loss_fn = make_loss_fn(odpo, policy, prompt_len)
  step_fn = train.jit_train_step(
      train.make_train_step(loss_fn, optimizer, schedule,
                            grad_accum_steps=optim_cfg.grad_accum_steps), state, mesh)
  samp_cfg = sampling.SamplingConfig(max_new_tokens=limits.max_response_len,
                                     temperature=odpo.temperature, top_k=odpo.top_k,
                                     top_p=odpo.top_p, num_samples=2, eos_id=tok.eos_id,
                                     pad_id=tok.pad_id)
  generate = make_generate_fn(policy, samp_cfg)
  ref_logps_fn = make_ref_logps_fn(policy, prompt_len)
  score = None
  if label_fn is None:
    reward = loaded.reward
    score = make_score_fn(reward.model, eos_id=tok.eos_id,
                          missing_eos_penalty=odpo.missing_eos_penalty,
                          attribute_weights=reward.attribute_weights)
    rm_args = (reward.params, jnp.asarray(np.asarray(reward.info.mean, np.float32)),
               jnp.asarray(np.asarray(reward.info.std, np.float32)))
  n_prompts = data.batch_size

  def iteration(state: train.TrainState, batch) -> tuple[train.TrainState, dict]:
    step = int(jax.device_get(state.step))
    pt, pm = np.asarray(batch["prompt_tokens"]), np.asarray(batch["prompt_mask"])
    t0 = time.perf_counter()
    tokens, mask, resp_mask = jax.block_until_ready(generate(state.params, pt, pm, state.rng))
    t1 = time.perf_counter()
    tokens_h, mask_h, resp_h = (np.asarray(x) for x in (tokens, mask, resp_mask))
    resp_tok = tokens_h[:, prompt_len:]
    metrics: dict[str, float] = {}
    if label_fn is None:
      scores_N, rm_N = score(*rm_args, tokens, mask, resp_mask)
      scores_N = np.asarray(scores_N, np.float64)
      train.check_finite(rewards=scores_N)
      first_wins = scores_N[0::2] >= scores_N[1::2]
      metrics["rm_score"] = float(np.mean(np.asarray(rm_N)))
    else:
      texts_p = _decode(tok, tokens_h[:, :prompt_len], mask_h[:, :prompt_len])[0::2]
      texts_r = _decode(tok, resp_tok, resp_h)
      p_a = label_fn(texts_p, texts_r[0::2], texts_r[1::2])
      # The label's draw is seeded by (seed, step): a resumed run draws the same labels.
      first_wins = annotators.sample_labels(np.random.default_rng([config.seed, step]), p_a)
    t2 = time.perf_counter()
    same_tokens = np.where(resp_h[0::2] > 0, resp_tok[0::2] == resp_tok[1::2], True)
    identical = np.all(resp_h[0::2] == resp_h[1::2], axis=1) & np.all(same_tokens, axis=1)
    valid = ~identical
    ref_N = ref_logps_fn(loaded.ref_params, tokens, mask)
    pair_batch = {
        "tokens": tokens, "mask": mask, "response_mask": resp_mask, "ref_logps": ref_N,
        "first_wins": jnp.asarray(first_wins,
                                  jnp.float32), "valid": jnp.asarray(valid, jnp.float32)}
    state, step_metrics = step_fn(state, parallel.shard_batch(pair_batch, mesh))
    step_metrics = jax.device_get(step_metrics)
    t3 = time.perf_counter()
    metrics.update({k: float(v) for k, v in step_metrics.items()})
    n_labels = float(valid.sum())
    metrics.update(labels=n_labels, labels_total=float(
        (step + 1) * n_prompts), identical_pairs=float(identical.sum()), time_generation=t1 - t0,
                   time_judge=t2 - t1, time_update=t3 - t2, generated_tokens=float(resp_h.sum()),
                   response_length=float(resp_h.sum(-1).mean()))
    if prompts.synthetic:
      golds = synthetic.score_samples(tok, tokens_h[:, :prompt_len], mask_h[:, :prompt_len],
                                      resp_tok, resp_h)
      chosen_gold = np.where(first_wins, golds[0::2], golds[1::2])
      rejected_gold = np.where(first_wins, golds[1::2], golds[0::2])
      metrics["gold_reward"] = float(np.mean(golds))
      # share of the judge's picks the gold reward agrees with (ties count half)
      agree = (chosen_gold > rejected_gold) + 0.5 * (chosen_gold == rejected_gold)
      metrics["chosen_gold_accuracy"] = float(np.mean(agree[valid])) if valid.any() else 0.5
    return state, metrics

  eval_fn = None
  if prompts.eval_texts:
    evaluator = common.policy_evaluator(loaded, prompts.eval_texts, prompt_len, eval_cfg, workdir,
                                        gold=prompts.synthetic)
    eval_fn = lambda st, step: evaluator(st.params, step)  # noqa: E731
  fingerprint = {
      "method": METHOD, "model": dataclasses.asdict(loaded.model_config),
      "tokenizer": tok.fingerprint(), "online_dpo": dataclasses.asdict(odpo),
      "annotator": dataclasses.asdict(annot) if label_fn is not None else None,
      **common.lora_fingerprint(loaded.lora, loaded.policy_params)}
  result = train.train(workdir=workdir, config=loop_cfg, state=state, iteration=iteration,
                       data=prompts.train, fingerprint=fingerprint, mesh=mesh, eval_fn=eval_fn,
                       run_config=config.to_dict(), tokens_metric="generated_tokens",
                       progress_keys=PROGRESS_KEYS)
  final = {
      "method": f"online_dpo:{odpo.loss_type}", "step": result.step, "preempted": result.preempted,
      "judge": odpo.judge, "labels_total": result.step * n_prompts, **result.eval_metrics}
  if result.stop_reason:
    final["stop_reason"] = result.stop_reason
  if result.preempted:
    return final
  return common.write_final(workdir, final, final["method"])
