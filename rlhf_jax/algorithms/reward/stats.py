"""Reward normalisation statistics from SFT samples, and the learned-vs-gold reward correlation.

Normalisation: the SFT policy π_SFT answers P prompts with S samples each (``sampling.sample``,
temperature ``eval.temperature``), the RM scores the N = P·S responses, and

    μ_k = (1/N) Σ_n r_k(x_n, y_n),    σ_k = sqrt((1/N) Σ_n (r_k(x_n, y_n) - μ_k)²)

so that (r_k - μ_k) / σ_k has mean 0 and std 1 over SFT samples: the reward PPO / best-of-n start
from. Without an SFT checkpoint (``rm.init=scratch`` and no ``sft_workdir``) the held-out pairwise
responses stand in, and ``normalization.source`` says so.

Gold correlation (synthetic task): fresh SFT samples on held-out prompts (another seed), scored by
the RM (normalised) and by the exact gold reward; Pearson, Spearman and Kendall's τ_b between them,
per attribute for multi-attribute heads whose names are gold attributes (helpful, harmless).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import numpy as np

from rlhf_jax import parallel, sampling
from rlhf_jax.eval import ranking_metrics

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RMEvalConfig:
  """Normalisation and final-evaluation settings.

  Attributes:
    num_normalization_prompts: prompts the SFT model answers for μ, σ.
    samples_per_prompt: SFT samples per prompt (normalisation and gold correlation).
    temperature: sampling temperature of those samples (1.0 = the SFT distribution itself).
    num_gold_prompts: held-out prompts for the gold correlation (synthetic task; 0 disables).
    sample_batch: prompts per sampler call (bounds memory; one compile).
    ece_bins: bins of the expected calibration error.
    seed: base seed of the samples.
  """

  num_normalization_prompts: int = 256
  samples_per_prompt: int = 2
  temperature: float = 1.0
  num_gold_prompts: int = 256
  sample_batch: int = 128
  ece_bins: int = 10
  seed: int = 1234

  def __post_init__(self):
    for name, low in (("num_normalization_prompts", 1), ("samples_per_prompt", 1),
                      ("num_gold_prompts", 0), ("sample_batch", 1), ("ece_bins", 1)):
      value = getattr(self, name)
      if not (isinstance(value, int) and value >= low):
        raise ValueError(f"RMEvalConfig.{name}={value!r} is invalid; allowed: an int >= {low}")
    if self.num_normalization_prompts * self.samples_per_prompt < 2:
      raise ValueError("RMEvalConfig: num_normalization_prompts * samples_per_prompt must be >= 2 "
                       "(a standard deviation needs two samples)")
    if not self.temperature > 0:
      raise ValueError(f"RMEvalConfig.temperature={self.temperature!r} is invalid; allowed: > 0")


def sample_responses(policy_model: Any, policy_params: Any, prompt_tokens: np.ndarray,
                     prompt_mask: np.ndarray, tokenizer: Any, config: RMEvalConfig,
                     max_new_tokens: int, rng: jax.Array) -> dict[str, np.ndarray]:
  """SFT samples for ``prompt_tokens`` in chunks of ``config.sample_batch`` prompts (the last chunk
  padded by repeating its final prompt, so one compile); returns host ``tokens`` / ``mask`` of the
  full sequences (prompt + response) and ``prompt_*`` / ``response_*`` parts, prompt-major."""
  samp_cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=config.temperature,
                                     num_samples=config.samples_per_prompt, eos_id=tokenizer.eos_id,
                                     pad_id=tokenizer.pad_id)
  n, chunk, s = len(prompt_tokens), min(config.sample_batch,
                                        len(prompt_tokens)), config.samples_per_prompt
  parts = []
  for i, start in enumerate(range(0, n, chunk)):
    tok, msk = prompt_tokens[start:start + chunk], prompt_mask[start:start + chunk]
    real = len(tok)
    if real < chunk:
      tok = np.concatenate([tok, np.repeat(tok[-1:], chunk - real, axis=0)])
      msk = np.concatenate([msk, np.repeat(msk[-1:], chunk - real, axis=0)])
    out = sampling.sample(policy_model, policy_params, tok, msk, jax.random.fold_in(rng, i),
                          samp_cfg)
    host = parallel.to_host(out._asdict())
    parts.append({k: v[:real * s] for k, v in host.items()})
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  out["tokens"] = np.concatenate([out["prompt_tokens"], out["response_tokens_BxR"]], axis=1)
  out["mask"] = np.concatenate([out["prompt_mask"], out["response_mask_BxR"]], axis=1)
  return out


def normalization_and_gold(config: RMEvalConfig, scorer: Callable, params: Any,
                           policy: tuple | None, tokenizer: Any, data: Any,
                           output_names: Sequence[str], *, max_response_len: int) -> dict:
  """μ, σ (module docstring) and, on the synthetic task, gold correlations on fresh samples.

  Returns ``{"mean": [K], "std": [K], "normalization": {...}, "metrics": {...}}``.
  """
  rng = jax.random.PRNGKey(config.seed)
  metrics: dict[str, float] = {}
  if policy is not None:
    prompts = data.normalization_prompts
    p = min(config.num_normalization_prompts, len(prompts["prompt_tokens"]))
    samples = sample_responses(policy[0], policy[1], prompts["prompt_tokens"][:p],
                               prompts["prompt_mask"][:p], tokenizer, config, max_response_len,
                               jax.random.fold_in(rng, 0))
    raw = scorer(params, samples["tokens"], samples["mask"])
    source = f"SFT samples: {p} prompts x {config.samples_per_prompt} (temperature {config.temperature})"
  else:
    pw = data.held_out.pairwise
    if pw is None:
      raise ValueError("no SFT checkpoint to sample from and no held-out pairs: cannot normalise; "
                       "set config.sources.sft_workdir to an SFT run")
    raw = scorer(params, pw["tokens"], pw["mask"])  # every chosen and rejected response
    source = "held-out pairwise responses (no SFT checkpoint to sample from)"
    logger.warning("normalising over %s", source)
  mean_K = raw.mean(axis=0)
  std_K = raw.std(axis=0)
  if np.any(std_K < 1e-6):
    logger.warning(
        "reward std over the normalisation samples is %s (a constant reward model); "
        "clamping to 1e-6", std_K)
    std_K = np.maximum(std_K, 1e-6)
  normalization = {
      "source": source, "num_samples": int(len(raw)), "raw_mean": mean_K.tolist(),
      "raw_std": std_K.tolist()}
  for k, name in enumerate(output_names):
    metrics[f"norm/{name}/raw_mean"] = float(mean_K[k])
    metrics[f"norm/{name}/raw_std"] = float(std_K[k])

  if policy is not None and data.gold_fn is not None and config.num_gold_prompts:
    gp = data.gold_prompts
    g = min(config.num_gold_prompts, len(gp["texts"]))
    fresh = sample_responses(policy[0], policy[1], gp["prompt_tokens"][:g], gp["prompt_mask"][:g],
                             tokenizer, config, max_response_len, jax.random.fold_in(rng, 1))
    reward_NxK = (scorer(params, fresh["tokens"], fresh["mask"]) - mean_K) / std_K
    prompts = [t for t in gp["texts"][:g] for _ in range(config.samples_per_prompt)]
    responses = [
        tokenizer.decode(t[m > 0])
        for t, m in zip(fresh["response_tokens_BxR"], fresh["response_mask_BxR"])]
    gold = data.gold_fn(prompts, responses)
    targets = {"gold": reward_NxK.sum(axis=1)}
    for k, name in enumerate(output_names):
      if name in gold and name != "gold":
        targets[name] = reward_NxK[:, k]
    for name, r_N in targets.items():
      g_N = gold[name]
      metrics[f"gold_corr/{name}/pearson"] = ranking_metrics.pearson(r_N, g_N)
      metrics[f"gold_corr/{name}/spearman"] = ranking_metrics.spearman(r_N, g_N)
      metrics[f"gold_corr/{name}/kendall_tau"] = ranking_metrics.kendall_tau_b(r_N, g_N)
    metrics["gold_corr/num_samples"] = int(len(reward_NxK))
    metrics["gold_corr/sft_sample_mean_gold"] = float(np.mean(gold["gold"]))
    metrics["gold_corr/mean_normalized_reward"] = float(reward_NxK.sum(axis=1).mean())
  return {
      "mean": mean_K.tolist(), "std": std_K.tolist(), "normalization": normalization,
      "metrics": metrics}
