"""RLAIF's data steps: sample pairs from the SFT policy, label them (AI evaluator, simulated humans),
write pairwise JSONL, measure label alignment with the gold preference; d-RLAIF's PPO models.

Lee et al., 2023 (arXiv:2309.00267): an off-the-shelf LLM labels pairs of SFT samples; a reward
model is trained on its soft labels (*distilled* RLAIF) or the LLM rates responses during RL
(*direct* RLAIF). The pieces here are what ``experiments/rlaif.py`` chains:

* :func:`sample_pairs` — two responses per prompt from a policy (``rlhf_jax.sampling``).
* :func:`ai_labels` / :func:`human_labels` — soft AI labels (``feedback.evaluator``, both orders)
  and simulated-human hard labels (Bradley–Terry over the gold reward, ``feedback.annotators``).
* :func:`pairwise_records` — ``{"prompt", "chosen", "rejected", "preference_prob"}`` (chosen = the
  preferred side, ``preference_prob`` = P(chosen ≻ rejected) ≥ ½); every offline method reads it,
  the reward model trains on the soft probability (``losses.bradley_terry_loss``).
* :func:`alignment` — AI-labeller alignment (Lee et al. §3.3): the fraction of pairs with distinct
  gold rewards on which the label's preferred side has the higher gold reward.
* :func:`direct_rlaif_models` — PPO's models with the evaluator's rating as the reward
  (``scoring.evaluator_reward``), the critic from the SFT policy.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from rlhf_jax import fileio, sampling
from rlhf_jax.data import batching, synthetic
from rlhf_jax.feedback import annotators

__all__ = [
    "Pairs", "sample_pairs", "human_labels", "ai_labels", "pairwise_records", "write_jsonl",
    "alignment", "head_to_head", "direct_rlaif_models"]


class Pairs(NamedTuple):
  prompts: list
  a: list
  b: list
  gold_a: np.ndarray
  gold_b: np.ndarray


def sample_pairs(model: Any, params: Any, tokenizer: Any, prompts: Sequence[str], *,
                 max_prompt_len: int, max_new_tokens: int, temperature: float = 1.0, seed: int = 0,
                 chunk: int = 64, gold_reward_fn=synthetic.gold_rewards) -> Pairs:
  """Two samples per prompt (the pairs to label) and their gold rewards."""
  samp = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                 num_samples=2, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  prompts = list(prompts)
  texts: list[str] = []
  for i, start in enumerate(range(0, len(prompts), chunk)):
    part = prompts[start:start + chunk]
    n = len(part)
    part = part + [part[-1]] * (min(chunk, len(prompts)) - n)
    enc = batching.encode_prompts(tokenizer, part, max_prompt_len=max_prompt_len,
                                  buckets=(max_prompt_len,))
    out = sampling.sample(model, params, enc["prompt_tokens"], enc["prompt_mask"],
                          jax.random.fold_in(jax.random.PRNGKey(seed), i), samp)
    toks, mask = jax.device_get((out.response_tokens_BxR, out.response_mask_BxR))
    texts += [tokenizer.decode(t[m > 0]) for t, m in zip(toks[:2 * n], mask[:2 * n])]
  a, b = texts[0::2], texts[1::2]
  return Pairs(prompts, a, b, np.asarray(gold_reward_fn(prompts, a), np.float64),
               np.asarray(gold_reward_fn(prompts, b), np.float64))


def human_labels(pairs: Pairs, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``(p_N, first_wins_N)``: the simulated humans' P(a ≻ b) and their sampled hard labels."""
  p_N = synthetic.preference_prob(pairs.gold_a, pairs.gold_b, temperature)
  return p_N, annotators.sample_labels(np.random.default_rng([seed, 15]), p_N)


def ai_labels(ev: Any, pairs: Pairs, **kwargs):
  """The evaluator's ``PairLabels`` of the pairs (``feedback.evaluator.pair_labels`` kwargs)."""
  from rlhf_jax.feedback import evaluator as ev_lib  # pylint: disable=import-outside-toplevel
  return ev_lib.pair_labels(ev, pairs.prompts, pairs.a, pairs.b, **kwargs)


def pairwise_records(pairs: Pairs, p_N: np.ndarray, *, soft: bool = True) -> list[dict]:
  """Pairwise records from P(a ≻ b): chosen = the preferred side (ties: a), with
  ``preference_prob`` = max(p, 1 - p) when ``soft`` (else a hard label, no field). Pairs whose two
  responses are the same text carry no preference and are left out."""
  rows = []
  for x, a, b, p, ga, gb in zip(pairs.prompts, pairs.a, pairs.b, p_N, pairs.gold_a, pairs.gold_b):
    if a == b or not a.strip() or not b.strip():
      continue
    first = bool(p >= 0.5)
    row = {
        "prompt": x, "chosen": a if first else b, "rejected": b if first else a,
        "gold_chosen": round(float(ga if first else gb),
                             4), "gold_rejected": round(float(gb if first else ga), 4)}
    if soft:
      row["preference_prob"] = float(max(p, 1.0 - p))
    rows.append(row)
  return rows


def write_jsonl(path: str, rows: Sequence[dict]) -> str:
  """Writes ``rows`` as JSON lines atomically (``fileio.atomic_write_text``: a local path or a URL
  such as ``gs://``; its folder is created)."""
  text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  fileio.atomic_write_text(path, text)
  return path


def alignment(p_N: np.ndarray, gold_a: np.ndarray, gold_b: np.ndarray) -> float:
  """Fraction of pairs with distinct gold rewards whose preferred side (p > ½ → a) is the one with
  the higher gold reward; a label of exactly ½ counts as half right."""
  p_N, gold_a, gold_b = (np.asarray(x, np.float64) for x in (p_N, gold_a, gold_b))
  keep = gold_a != gold_b
  if not np.any(keep):
    return float("nan")
  right = np.where(p_N == 0.5, 0.5, ((p_N > 0.5) == (gold_a > gold_b)).astype(np.float64))
  return float(np.mean(right[keep]))


def head_to_head(samples_a: str, samples_b: str) -> float:
  """Win rate of run A's final held-out samples over run B's (``samples.jsonl`` of two policy runs
  evaluated on the same prompts): gold ``>`` counts 1, ``=`` counts ½."""
  from rlhf_jax.eval import policy as policy_eval  # pylint: disable=import-outside-toplevel

  def last(path):
    rows = fileio.read_jsonl(path)
    step = max(r["step"] for r in rows)
    return [r for r in rows if r["step"] == step]

  rows_a, rows_b = last(samples_a), last(samples_b)
  if [r["prompt"] for r in rows_a] != [r["prompt"] for r in rows_b]:
    raise ValueError(f"head_to_head: {samples_a} and {samples_b} are not on the same prompts")
  return policy_eval.win_rate(np.asarray([r["gold"] for r in rows_a]),
                              np.asarray([r["gold"] for r in rows_b]))


def direct_rlaif_models(config: Any, sft_workdir: str, evaluator_source: str, template: str, *,
                        seed: int = 0, mesh: Any = None, rules: Any = None):
  """``ppo_models.PPOModels`` for d-RLAIF: the SFT policy (and reference), the evaluator's rating
  as the reward handle, the critic from the SFT policy (``config.ppo.critic_init`` must be
  ``sft``: there is no reward model to start it from). ``mesh`` / ``rules``: PPO's placement (the
  rating then scores rollouts where they live, on every process of a multi-process job; default
  this process's first device)."""
  # pylint: disable=import-outside-toplevel  (the trainer stack is only needed here)
  from rlhf_jax import parallel, train
  from rlhf_jax.algorithms.online import models as ppo_models
  from rlhf_jax.algorithms.online import ppo
  from rlhf_jax.feedback import evaluator as ev_lib
  from rlhf_jax.scoring import evaluator_reward
  parsed = ppo.parse_config(config)
  if parsed.ppo.uses_critic and parsed.ppo.critic_init != "sft":
    raise ValueError(f"config.ppo.critic_init={parsed.ppo.critic_init!r} is invalid for direct "
                     "RLAIF; allowed: sft (no reward model to initialise the critic from)")
  if parsed.eval.max_new_tokens != parsed.limits.max_response_len:
    raise ValueError(f"config.eval.max_new_tokens={parsed.eval.max_new_tokens} must equal "
                     f"config.limits.max_response_len={parsed.limits.max_response_len} for direct "
                     "RLAIF (the evaluator reward splits rows at the response width)")
  policy = train.load_sft_params(sft_workdir)
  ev = ev_lib.load_evaluator(evaluator_source, template, policy_tokenizer=policy.tokenizer)
  reward = evaluator_reward.evaluator_reward_handle(ev, policy.tokenizer,
                                                    response_len=parsed.limits.max_response_len,
                                                    max_prompt_len=parsed.limits.max_prompt_len,
                                                    mesh=mesh,
                                                    rules=rules or parallel.DEFAULT_RULES)
  from rlhf_jax import models  # pylint: disable=import-outside-toplevel
  value_model, value_params = ppo_models.init_value_params(parsed.ppo, policy.model_config,
                                                           policy.params, reward,
                                                           jax.random.PRNGKey(seed + 1))
  return ppo_models.PPOModels(tokenizer=policy.tokenizer,
                              policy=models.Transformer(policy.model_config),
                              policy_params=policy.params, ref_params=policy.params, reward=reward,
                              value_model=value_model, value_params=value_params)
