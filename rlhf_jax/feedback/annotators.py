"""Annotators: who says which of two responses is better.

An annotator is one callable (``DESIGN.md``)::

    label_fn(prompts, responses_a, responses_b) -> P(a ≻ b)      # float64 array [N]

returning the *probability* that ``responses_a[i]`` is preferred to ``responses_b[i]``; a
comparison's binary label is then drawn from it (:func:`sample_labels`), so a noisy human, a
calibrated reward model and an AI evaluator plug into iterated RLHF the same way. Every annotator
here is antisymmetric: ``label_fn(p, a, b) + label_fn(p, b, a) = 1``.

* :func:`synthetic_annotator` — the simulated human of the synthetic task: Bradley–Terry over the
  gold reward, ``P = σ((g_a - g_b) / T)`` (``data.synthetic.preference_prob``).
* :func:`reward_model_annotator` — a trained reward model as the labeller (e.g. a stronger "gold"
  RM): ``P = σ((r̂_a - r̂_b) / T)`` over its normalised scores ``r̂ = (r - μ) / σ``
  (``scoring.score_texts``; the responses are complete, as in any comparison dataset).
* ``kind="evaluator"`` — an AI evaluator (RLAIF): a causal LM queried through a template file,
  ``P(a ≻ b)`` = its soft label, both orders averaged (:mod:`rlhf_jax.feedback.evaluator`).
* :class:`AnnotatorConfig` / :func:`make_label_fn` — the ``config.annotator`` section that picks one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from rlhf_jax.data import synthetic

LabelFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], np.ndarray]
KINDS = ("synthetic", "reward_model", "evaluator")


def _check_lengths(prompts, responses_a, responses_b) -> None:
  if not len(prompts) == len(responses_a) == len(responses_b):
    raise ValueError(f"label_fn: {len(prompts)} prompts, {len(responses_a)} responses_a and "
                     f"{len(responses_b)} responses_b; allowed: one of each per comparison")


def _sigmoid_of_difference(a_N: np.ndarray, b_N: np.ndarray, temperature: float) -> np.ndarray:
  # tanh form: overflow-free, and σ(d) + σ(-d) = 1 exactly (tanh is odd), so swapping a and b
  # gives the complementary probability bit for bit.
  delta_N = (np.asarray(a_N, np.float64) - np.asarray(b_N, np.float64)) / temperature
  return 0.5 * (1.0 + np.tanh(0.5 * delta_N))


def synthetic_annotator(
    temperature: float, gold_reward_fn: Callable[[Sequence[str], Sequence[str]],
                                                 np.ndarray] = synthetic.gold_rewards
) -> LabelFn:
  """Bradley–Terry over the gold reward: ``P(a ≻ b) = σ((g_a - g_b) / temperature)``."""
  if not temperature > 0:
    raise ValueError(f"synthetic_annotator: temperature={temperature!r}; allowed: a float > 0")

  def label_fn(prompts, responses_a, responses_b) -> np.ndarray:
    _check_lengths(prompts, responses_a, responses_b)
    return synthetic.preference_prob(gold_reward_fn(prompts, responses_a),
                                     gold_reward_fn(prompts, responses_b), temperature)

  return label_fn


def reward_model_annotator(handle, tokenizer=None, *, temperature: float = 1.0) -> LabelFn:
  """A reward model as the labeller: ``P(a ≻ b) = σ((r̂_a - r̂_b) / temperature)`` with ``r̂`` its
  normalised score (``scoring.score_texts``; ``tokenizer``, if given, must be the RM's)."""
  from rlhf_jax import scoring  # pylint: disable=import-outside-toplevel  (loads models / jax)
  if not temperature > 0:
    raise ValueError(f"reward_model_annotator: temperature={temperature!r}; allowed: a float > 0")

  def label_fn(prompts, responses_a, responses_b) -> np.ndarray:
    _check_lengths(prompts, responses_a, responses_b)
    prompts = list(prompts)
    a_N = scoring.score_texts(handle, tokenizer, prompts, list(responses_a))
    b_N = scoring.score_texts(handle, tokenizer, prompts, list(responses_b))
    return _sigmoid_of_difference(a_N, b_N, temperature)

  return label_fn


def sample_labels(rng: np.random.Generator, p_N: np.ndarray) -> np.ndarray:
  """Binary labels ``[N]`` (True: a preferred) drawn from the annotator's ``P(a ≻ b)``."""
  p_N = np.asarray(p_N, np.float64)
  if p_N.ndim != 1 or np.any(~np.isfinite(p_N)) or np.any((p_N < 0) | (p_N > 1)):
    raise ValueError(f"label_fn returned {p_N!r}; allowed: a 1-D array of probabilities in [0, 1]")
  return rng.random(p_N.shape[0]) < p_N


@dataclasses.dataclass(frozen=True)
class AnnotatorConfig:
  """Which annotator labels new comparisons (``config.annotator``).

  Attributes:
    kind: ``synthetic`` (Bradley–Terry over the synthetic task's gold reward), ``reward_model``
      (a trained RM in ``reward_model_workdir``) or ``evaluator`` (an AI evaluator, RLAIF).
    temperature: the Bradley–Terry noise temperature T (smaller = less noisy labels); not used by
      ``evaluator`` (its soft label is the probability).
    reward_model_workdir: the labelling RM's run (``kind="reward_model"`` only).
    evaluator: the evaluator model (``kind="evaluator"``): a run workdir (e.g. the synthetic
      feedback model), ``hf:DIR`` or ``preset:NAME``.
    evaluator_template: its template file or a shipped name (``feedback.templates``).
    both_orders: score each pair in both orders and average (position-bias mitigation).
    cot: sample a chain-of-thought rationale before the label (the template's ``cot_ending``).
    cot_max_tokens: the rationale budget.
  """

  kind: str = "synthetic"
  temperature: float = 0.25
  reward_model_workdir: str = ""
  evaluator: str = ""
  evaluator_template: str = "synthetic_pair"
  both_orders: bool = True
  cot: bool = False
  cot_max_tokens: int = 32

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(
          f"AnnotatorConfig.kind={self.kind!r} is invalid; allowed: {' | '.join(KINDS)}")
    if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
      raise ValueError(f"AnnotatorConfig.temperature={self.temperature!r} is invalid; allowed: a "
                       "float > 0")
    if self.kind == "reward_model" and not self.reward_model_workdir:
      raise ValueError(
          "AnnotatorConfig.reward_model_workdir='' is invalid with kind='reward_model'; "
          "allowed: the workdir of a trained reward model")
    if self.kind == "evaluator" and not self.evaluator:
      raise ValueError("AnnotatorConfig.evaluator='' is invalid with kind='evaluator'; allowed: a "
                       "trained run's workdir (e.g. the feedback model), 'hf:DIR' or 'preset:NAME'")


def make_label_fn(config: AnnotatorConfig, tokenizer=None) -> LabelFn:
  """The annotator ``config`` names (a reward model or an evaluator is loaded from its source)."""
  if config.kind == "synthetic":
    return synthetic_annotator(config.temperature)
  if config.kind == "evaluator":
    from rlhf_jax.feedback import evaluator as ev_lib  # pylint: disable=import-outside-toplevel
    ev = ev_lib.load_evaluator(config.evaluator, config.evaluator_template,
                               policy_tokenizer=tokenizer)
    cot = ev_lib.CotConfig(max_tokens=config.cot_max_tokens) if config.cot else None
    return ev_lib.evaluator_annotator(ev, both_orders=config.both_orders, cot=cot)
  from rlhf_jax import scoring  # pylint: disable=import-outside-toplevel
  handle = scoring.load_reward_model(config.reward_model_workdir, policy_tokenizer=tokenizer)
  return reward_model_annotator(handle, tokenizer, temperature=config.temperature)
