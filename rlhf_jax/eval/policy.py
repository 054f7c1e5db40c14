"""Policy evaluation on held-out prompts: gold reward, reward-model reward, KL to SFT, length, win rate.

Every trainer that produces a policy (DPO family, PRO / RRHF, RAFT, PPO) reports the same numbers at
each evaluation, so their results sit on one gold-reward-vs-KL frontier. For S held-out prompts x_i
and one sample y_i ~ π(·|x_i) per prompt (the sampler's settings; the KL estimate below assumes
temperature 1 and no top-k / top-p, i.e. samples from π itself):

    gold_reward      = (1/S) Σ_i g(x_i, y_i)                       g = exact synthetic gold reward
    rm_reward        = (1/S) Σ_i r_φ(x_i, y_i)                     r_φ = the reward model (if given),
                       on the sampled tokens as given (``scoring.sample_reward_fn``: EOS iff
                       emitted, the configured attribute reduction), i.e. exactly the reward
                       PPO / RAFT / best-of-n optimise or select by
    kl_to_sft        = (1/S) Σ_i Σ_t [log π(y_it | x_i, y_i<t) - log π_ref(y_it | x_i, y_i<t)]
                       the Monte-Carlo (k1) estimate of KL(π ‖ π_ref) of whole responses, both
                       log-probs under the raw temperature-1 distributions, recomputed by a full
                       forward of each model (so π = π_ref gives exactly 0)
    response_length  = mean response tokens (EOS included)
    win_rate_vs_sft  = (1/S) Σ_i [1(g(x_i, y_i) > g(x_i, y'_i)) + ½ 1(g(x_i, y_i) = g(x_i, y'_i))]
                       with y'_i ~ π_ref(·|x_i) the SFT model's sample for the same prompt

The SFT samples are drawn once (they do not change) with the **same** PRNG key as every policy
evaluation: common random numbers, so at initialisation (π = π_ref) the policy reproduces the SFT
samples token for token, the win rate is exactly 0.5 and the KL exactly 0, and later differences
measure the policy, not sampling noise between the two sides.

Multi-host: with ``mesh`` the prompts are split over its batch axes (each process places its own
slice), the sampler and both log-prob forwards run on the global mesh, and the samples come back to
every process through ``parallel.to_host``, so every process computes the same metrics over all S
prompts; ``samples.jsonl`` is written by process 0.

Public names: :class:`PolicyEvalConfig`, :class:`EvalPrompts`, :func:`make_eval_prompts`,
:class:`PolicyEvaluator` (``evaluator(params, step) -> metrics``), :func:`score_responses`,
:data:`TextRewardFn`, :data:`SampleRewardFn`,
:func:`win_rate`, :func:`best_of_n_kl`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from rlhf_jax import fileio, models, parallel, sampling
from rlhf_jax.data import batching, synthetic
from rlhf_jax.data import tokenizers as tok_lib

logger = logging.getLogger(__name__)

# (prompt_texts, response_texts) -> [S] float rewards: the synthetic gold reward
# (``data.synthetic.gold_rewards``) has this signature.
TextRewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]
# (prompt_tokens_SxP, prompt_mask_SxP, response_tokens_SxR, response_mask_SxR) -> [S] float rewards
# of sampled token ids: the reward model (``scoring.sample_reward_fn``) has this signature, so it
# scores exactly the tokens the policy produced, the way training and selection score them.
SampleRewardFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class PolicyEvalConfig:
  """How a policy is evaluated.

  Attributes:
    num_prompts: held-out prompts sampled at each evaluation (one response each).
    max_new_tokens: response budget of the sampler (EOS included).
    temperature, top_k, top_p: sampler settings; the KL estimate is only unbiased at 1 / 0 / 1.
    seed: the PRNG seed shared by the policy's and the SFT model's samples (common random numbers).
    print_samples: (prompt, response, gold) triples logged at each evaluation.
  """

  num_prompts: int = 128
  max_new_tokens: int = 48
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 1234
  print_samples: int = 2

  def __post_init__(self):
    for name in ("num_prompts", "max_new_tokens"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"PolicyEvalConfig.{name}={value!r} is invalid; allowed: an int >= 1")
    if isinstance(self.print_samples, bool) or not isinstance(self.print_samples, int) \
        or self.print_samples < 0:
      raise ValueError(f"PolicyEvalConfig.print_samples={self.print_samples!r} is invalid; "
                       "allowed: an int >= 0")
    self.sampling_config(eos_id=None, pad_id=0)  # validates temperature / top_k / top_p

  def sampling_config(self, *, eos_id: int | None, pad_id: int,
                      num_samples: int = 1) -> sampling.SamplingConfig:
    try:
      return sampling.SamplingConfig(max_new_tokens=self.max_new_tokens,
                                     temperature=self.temperature, top_k=self.top_k,
                                     top_p=self.top_p, num_samples=num_samples, eos_id=eos_id,
                                     pad_id=pad_id)
    except ValueError as err:
      raise ValueError(f"PolicyEvalConfig: {err}") from err


class EvalPrompts(NamedTuple):
  """Held-out prompts as a left-padded generation batch plus their texts."""

  prompt_tokens: np.ndarray  # [S, P] int32, left-padded [BOS] prompt
  prompt_mask: np.ndarray  # [S, P]
  texts: list  # S prompt strings (what the gold reward and the reward model read)


def make_eval_prompts(tokenizer: tok_lib.Tokenizer, texts: Sequence[str], *,
                      max_prompt_len: int) -> EvalPrompts:
  """Tokenises prompt strings into one fixed ``[S, max_prompt_len]`` batch (one sampler compile)."""
  if not texts:
    raise ValueError("make_eval_prompts: no prompts given")
  batch = batching.encode_prompts(tokenizer, list(texts), max_prompt_len=max_prompt_len,
                                  buckets=(max_prompt_len,))
  return EvalPrompts(batch["prompt_tokens"], batch["prompt_mask"], list(texts))


def win_rate(gold_B: np.ndarray, baseline_gold_B: np.ndarray) -> float:
  """Share of prompts where ``gold > baseline`` (ties count half)."""
  gold_B, baseline_gold_B = np.asarray(gold_B, np.float64), np.asarray(baseline_gold_B, np.float64)
  if gold_B.shape != baseline_gold_B.shape:
    raise ValueError(f"win_rate: shapes {gold_B.shape} and {baseline_gold_B.shape} differ")
  return float(np.mean((gold_B > baseline_gold_B) + 0.5 * (gold_B == baseline_gold_B)))


def best_of_n_kl(n: int) -> float:
  """Analytic KL(π_BoN ‖ π_ref) = log n - (n - 1)/n of best-of-n selection (Stiennon et al., 2020,
  Appendix G.3; an upper bound when rewards tie, Beirami et al., 2024, arXiv:2401.01879)."""
  if n < 1:
    raise ValueError(f"best_of_n_kl: n={n}; allowed: an int >= 1")
  return math.log(n) - (n - 1) / n


class ScoredResponses(NamedTuple):
  """Decoded responses and their per-row scores (all arrays [S])."""

  responses: list
  gold: np.ndarray | None
  rm: np.ndarray | None
  lengths: np.ndarray
  eos: np.ndarray


def score_responses(tokenizer: tok_lib.Tokenizer, prompt_texts: Sequence[str],
                    response_tokens_BxR: np.ndarray, response_mask_BxR: np.ndarray, *,
                    gold_reward_fn: TextRewardFn | None = synthetic.gold_rewards,
                    reward_fn: SampleRewardFn | None = None,
                    prompt_tokens_BxP: np.ndarray | None = None,
                    prompt_mask_BxP: np.ndarray | None = None) -> ScoredResponses:
  """Decodes sampled responses; scores them with the gold reward (on the texts) and the reward
  model (on the tokens: ``reward_fn`` needs the prompt tokens the responses were sampled from)."""
  tokens, mask = np.asarray(response_tokens_BxR), np.asarray(response_mask_BxR)
  responses = [tokenizer.decode(t[m > 0]) for t, m in zip(tokens, mask)]
  gold = None if gold_reward_fn is None else np.asarray(gold_reward_fn(prompt_texts, responses),
                                                        np.float32)
  rm = None
  if reward_fn is not None:
    if prompt_tokens_BxP is None or prompt_mask_BxP is None:
      raise ValueError("score_responses: reward_fn scores tokens; pass prompt_tokens_BxP and "
                       "prompt_mask_BxP (the prompts the responses were sampled from)")
    rm = np.asarray(
        reward_fn(np.asarray(prompt_tokens_BxP), np.asarray(prompt_mask_BxP), tokens, mask),
        np.float32)
    if rm.shape != (len(responses),):
      raise ValueError(f"score_responses: reward_fn returned shape {rm.shape}; allowed: "
                       f"({len(responses)},), one reward per response")
  eos = np.asarray([tokenizer.eos_id in t[m > 0] for t, m in zip(tokens, mask)], np.float32)
  return ScoredResponses(responses, gold, rm, mask.sum(-1).astype(np.float32), eos)


class PolicyEvaluator:
  """``evaluator(params, step) -> metrics``: the module docstring's numbers for a policy.

  Args:
    model: the policy's ``Transformer`` (the reference must share its config).
    ref_params: the SFT (reference) params π_ref.
    tokenizer: decodes samples for the gold reward / reward model.
    prompts: :func:`make_eval_prompts` output (``config.num_prompts`` of them are used).
    config: :class:`PolicyEvalConfig`.
    reward_fn: reward-model scores of the sampled tokens (:data:`SampleRewardFn`, e.g.
      ``scoring.sample_reward_fn(handle)``), or None.
    gold_reward_fn: the exact gold reward (default: the synthetic task's), or None.
    sample_path: if set, every evaluation appends its samples there as JSON lines (process 0).
    mesh: if set, the prompts are placed split over its batch axes (module docstring) when S
      divides evenly (else they are passed whole, replicated).
  """

  def __init__(self, model: models.Transformer, ref_params: Any, tokenizer: tok_lib.Tokenizer,
               prompts: EvalPrompts, config: PolicyEvalConfig, *,
               reward_fn: SampleRewardFn | None = None,
               gold_reward_fn: TextRewardFn | None = synthetic.gold_rewards,
               sample_path: str | None = None, mesh: jax.sharding.Mesh | None = None):
    s = min(config.num_prompts, len(prompts.texts))
    self.model, self.ref_params, self.tokenizer, self.config = model, ref_params, tokenizer, config
    self.prompt_tokens = np.asarray(prompts.prompt_tokens[:s])
    self.prompt_mask = np.asarray(prompts.prompt_mask[:s])
    self.prompt_texts = list(prompts.texts[:s])
    self.reward_fn, self.gold_reward_fn, self.sample_path = reward_fn, gold_reward_fn, sample_path
    self.sampling_config = config.sampling_config(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    self._rng = jax.random.PRNGKey(config.seed)
    self._ref: ScoredResponses | None = None
    self._ref_source: PolicyEvaluator | None = None  # share_reference
    self._placed = self._place(mesh)

  def _place(self, mesh: jax.sharding.Mesh | None) -> tuple:
    """The prompts as the sampler gets them: split over ``mesh``'s batch axes when S allows."""
    if mesh is None:
      return self.prompt_tokens, self.prompt_mask
    placed = parallel.shard_rows({"t": self.prompt_tokens, "m": self.prompt_mask}, mesh)
    return placed["t"], placed["m"]

  def sample(self, params: Any) -> sampling.SampleOutput:
    """One response per prompt from ``params`` with the evaluation key."""
    return sampling.sample(self.model, params, *self._placed, self._rng, self.sampling_config)

  def reference(self) -> ScoredResponses:
    """The SFT model's samples and scores (computed once)."""
    if self._ref is None:
      self._ref = (self._ref_source.reference() if self._ref_source is not None else self._score(
          self.sample(self.ref_params)))
    return self._ref

  def share_reference(self, other: "PolicyEvaluator") -> None:
    """Take the SFT samples and scores from ``other`` (drawn once for both) instead of drawing
    them again: for evaluators of one reference on the same prompts with the same sampler and
    scorers, e.g. a vectorised sweep's runs. Checked here: model, prompts, sampler settings and
    seed; the caller vouches that the reference params and the reward model are the same."""
    same = (self.model == other.model and self.sampling_config == other.sampling_config and
            self.prompt_texts == other.prompt_texts and
            np.array_equal(self.prompt_tokens, other.prompt_tokens) and
            self.config.seed == other.config.seed)
    if not same:
      raise ValueError("share_reference: the evaluators differ in model, prompts, sampler or seed")
    self._ref_source = other

  def _score(self, out: sampling.SampleOutput) -> ScoredResponses:
    prompt_tokens, prompt_mask, tokens, mask = parallel.to_host(
        (out.prompt_tokens, out.prompt_mask, out.response_tokens_BxR, out.response_mask_BxR))
    return score_responses(self.tokenizer, self.prompt_texts, tokens, mask,
                           gold_reward_fn=self.gold_reward_fn, reward_fn=self.reward_fn,
                           prompt_tokens_BxP=prompt_tokens, prompt_mask_BxP=prompt_mask)

  def kl_to_reference(self, params: Any, out: sampling.SampleOutput) -> np.ndarray:
    """``[S]`` Σ_t log π - log π_ref over each sampled response (full forwards of both models)."""
    tokens, mask, loss_mask = out.full_sequences()
    policy = models.response_logps(self.model, params, tokens, mask, loss_mask)
    ref = models.response_logps(self.model, self.ref_params, tokens, mask, loss_mask)
    return np.asarray(parallel.to_host(policy - ref), np.float64)

  def __call__(self, params: Any, step: int = 0) -> dict[str, float]:
    out = self.sample(params)
    kl_S = self.kl_to_reference(params, out)
    scored = self._score(out)
    ref = self.reference()
    metrics = {
        "kl_to_sft": float(np.mean(kl_S)),
        "response_length": float(np.mean(scored.lengths)),
        "eos_fraction": float(np.mean(scored.eos)),
        "sft_response_length": float(np.mean(ref.lengths)),}
    metrics.update(summarize(scored, ref))
    self._write_samples(step, scored, kl_S)
    return metrics

  def _write_samples(self, step: int, scored: ScoredResponses, kl_S: np.ndarray | None) -> None:
    rows = []
    for i, (prompt, response) in enumerate(zip(self.prompt_texts, scored.responses)):
      row = {"step": int(step), "prompt": prompt, "response": response}
      if scored.gold is not None:
        row["gold"] = round(float(scored.gold[i]), 4)
      if scored.rm is not None:
        row["rm"] = round(float(scored.rm[i]), 4)
      if kl_S is not None:
        row["kl"] = round(float(kl_S[i]), 4)
      rows.append(row)
    for row in rows[:self.config.print_samples]:
      logger.info("sample @%d | %r -> %r%s", step, row["prompt"], row["response"],
                  f" (gold {row['gold']:+.2f})" if "gold" in row else "")
    if self.sample_path and parallel.is_coordinator():
      fileio.makedirs(os.path.dirname(fileio.absolute(self.sample_path)))
      fileio.append_text(self.sample_path,
                         "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def summarize(scored: ScoredResponses, ref: ScoredResponses | None) -> dict[str, float]:
  """Gold / reward-model means (+ standard errors), gains over SFT and the win rate vs SFT."""
  metrics: dict[str, float] = {}
  if scored.gold is not None:
    metrics["gold_reward"] = float(np.mean(scored.gold))
    metrics["gold_reward_sem"] = float(np.std(scored.gold) / math.sqrt(len(scored.gold)))
    if ref is not None and ref.gold is not None:
      metrics["sft_gold_reward"] = float(np.mean(ref.gold))
      metrics["gold_reward_gain"] = metrics["gold_reward"] - metrics["sft_gold_reward"]
      metrics["win_rate_vs_sft"] = win_rate(scored.gold, ref.gold)
  if scored.rm is not None:
    metrics["rm_reward"] = float(np.mean(scored.rm))
    if ref is not None and ref.rm is not None:
      metrics["sft_rm_reward"] = float(np.mean(ref.rm))
  return metrics
