"""The synthetic task's noisy, partly ignorant TEACHER: instruction data for a feedback model.

A real feedback model gets its judging skill from instruction data written by people (or stronger
models) who are themselves imperfect. This teacher writes that data for the synthetic task
(:mod:`rlhf_jax.data.synthetic`) and is imperfect in explicit, configurable ways
(:class:`TeacherConfig`):

* **ignorance** — ``unknown_harmful`` words are not known to be harmful (default ``mace``, which is
  also a spice, and ``curare``): an answer listing them looks harmless to the teacher;
* **miscounting** — each time it reads an answer, with prob. ``miscount_prob`` it counts one item
  too many or too few (both its count of correct items and of listed items);
* **label noise** — a judgement's answer is flipped with prob. ``flip_prob``;
* **rating noise** — a 0..9 rating is ``round(9 (g_t - G_LO) / (G_HI - G_LO) + N(0, rating_noise))``.

What the teacher sees (:func:`read`) mirrors the gold attributes with those flaws: with
``EXACT = TeacherConfig(unknown_harmful=(), miscount_prob=0, flip_prob=0, rating_noise=0)`` its
``helpful`` / ``harmless`` / ``overall`` equal ``gold_attributes``' helpful / harmless / gold
exactly (tested), so every teacher output has an exact gold counterpart and the teacher's own
accuracy is computed (:func:`teacher_records` stats).

It writes SFT records ``{"prompt", "response", "task", ...}`` (``data/kinds/sft.py``; extra fields
are ignored by the reader):

=================  ==============================================================================
task               text
=================  ==============================================================================
``assistant``      the ordinary helpfulness SFT record (the ``sft.jsonl`` row for the prompt)
``judge:<c>``      a pair on criterion ``c`` (``CRITERIA``) rendered with the RLAIF template
                   renderer (``templates.render_pair``) → the label token ``A`` / ``B``;
                   ``overall`` uses ``synthetic_pair.json``, ``harmless`` RL-CAI's
                   ``cai_harmless.json``, the others that file's layout with their own question
``judge_cot:<c>``  the same with a rationale (``cot_ending`` … ``cot_answer`` + label)
                   (with ``swap_pairs``, both kinds are written in both orders: answer flipped)
``rating``         ``synthetic_rating.json`` → one digit 0..9 (d-RLAIF)
``critique``       ``constitution.critique_prompt`` → e.g. ``harmful: gun, ricin; 3 asked, 2
                   listed`` or ``no problems``
``revision``       ``constitution.revision_prompt`` → the repaired answer
=================  ==============================================================================

Revisions repair what the teacher found: an answer to a harmful request that it sees breaking
a principle becomes a refusal; on a safe request harmful and off-topic items are dropped and the
list refilled to the asked count (which it may miscount); more than two ``!`` are cut to two.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import NamedTuple, Sequence

import numpy as np

from rlhf_jax.data import synthetic as syn
from rlhf_jax.feedback import constitution as const_lib
from rlhf_jax.feedback import templates as tmpl

__all__ = [
    "TeacherConfig", "EXACT", "CRITERIA", "View", "read", "criterion_score", "criterion_template",
    "critique_text", "revise", "rationale_text", "rating_label", "teacher_records"]

_WORD_TO_CATEGORY = {w: c for c, words in syn.CATEGORIES.items() for w in words}
_SPLIT_RE = re.compile(r"[\s,]+")
HARMLESS_TEMPLATE = "cai_harmless"
# criterion -> the question of its judgement template ('overall' is RLAIF's synthetic_pair.json).
CRITERIA = {
    "overall": None,
    "helpful": "Which response is more helpful?\n",
    "harmless": None,  # RL-CAI's own template file, cai_harmless.json
    "count": "Which response lists the number of items asked for?\n",
    "category": "Which response keeps to the category asked for?\n",
    "enthusiasm": "Which response has the better number of '!'?\n",}
TASKS = ("assistant", "judge", "judge_cot", "rating", "critique", "revision")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """The teacher's flaws and how much of each task it writes.

  Attributes:
    unknown_harmful: harmful words the teacher does not know are harmful.
    miscount_prob: prob. of counting one item off (each reading of an answer, and each revision).
    flip_prob: prob. a pairwise judgement's answer is flipped.
    rating_noise: std of the Gaussian noise on the 0..9 rating scale.
    weights: task -> expected records per prompt (each in [0, 1]; ``TASKS``).
    criteria: the judgement criteria drawn uniformly (``CRITERIA``).
    harmful_oversample: prob. of extra critique + revision + harmlessness-judgement records for a
      harmful prompt (SL-CAI critiques red-team answers, RL-CAI compares them on harmlessness).
    swap_pairs: write every judgement a second time with the pair swapped and the answer (and the
      CoT rationale's two critiques) swapped with it. Each pair then appears with "A" once and "B"
      once, so a model that ignores the responses and answers one letter (or any constant
      distribution) scores exactly log 2 nats per judgement, and only reading the responses lowers
      the loss; without it a small model fits the answer's marginal first and may never leave it
      (session 7: the feedback model answered "A" to every pair, position-bias rate 1.0).
  """

  unknown_harmful: tuple[str, ...] = ("mace", "curare")
  miscount_prob: float = 0.1
  flip_prob: float = 0.05
  rating_noise: float = 0.5
  weights: tuple[tuple[str, float], ...] = (("assistant", 1.0), ("judge", 0.6), ("judge_cot", 0.2),
                                            ("rating", 0.3), ("critique", 0.5), ("revision", 0.5))
  criteria: tuple[str, ...] = tuple(CRITERIA)
  harmful_oversample: float = 1.0
  swap_pairs: bool = True

  def __post_init__(self):
    object.__setattr__(self, "unknown_harmful", tuple(self.unknown_harmful))
    object.__setattr__(self, "weights", tuple((str(k), float(v)) for k, v in self.weights))
    object.__setattr__(self, "criteria", tuple(self.criteria))
    bad = [
        w for w in self.unknown_harmful if _WORD_TO_CATEGORY.get(w) not in syn.HARMFUL_CATEGORIES]
    if bad:
      raise ValueError(f"TeacherConfig.unknown_harmful={self.unknown_harmful}: {bad} are not "
                       f"harmful words; allowed: words of {syn.HARMFUL_CATEGORIES}")
    for name in ("miscount_prob", "flip_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"TeacherConfig.{name}={getattr(self, name)}; allowed: [0, 1]")
    if self.rating_noise < 0:
      raise ValueError(f"TeacherConfig.rating_noise={self.rating_noise}; allowed: >= 0")
    for task, w in self.weights:
      if task not in TASKS or not 0.0 <= w <= 1.0:
        raise ValueError(f"TeacherConfig.weights: ({task!r}, {w}); allowed: tasks "
                         f"{' | '.join(TASKS)} with weights in [0, 1]")
    unknown = [c for c in self.criteria if c not in CRITERIA]
    if unknown or not self.criteria:
      raise ValueError(f"TeacherConfig.criteria={self.criteria}; allowed: a non-empty subset of "
                       f"{' | '.join(CRITERIA)}")
    if not 0.0 <= self.harmful_oversample <= 1.0:
      raise ValueError(
          f"TeacherConfig.harmful_oversample={self.harmful_oversample}; allowed: [0, 1]")


EXACT = TeacherConfig(unknown_harmful=(), miscount_prob=0.0, flip_prob=0.0, rating_noise=0.0)


class View(NamedTuple):
  """What the teacher sees in one answer (exact with ``EXACT``)."""

  refusal: bool
  asked: int
  listed: int  # items listed (as counted)
  correct: int  # distinct on-category items (as counted)
  harmful: tuple[str, ...]  # harmful items it recognises, in order
  off_topic: tuple[str, ...]  # listed items of another (safe) category or unknown words
  exclamations: int
  helpful: float
  harmless: float
  enthusiasm: float
  overall: float  # helpful + 1.5 (harmless - 1) + enthusiasm: the teacher's gold


def read(rng: np.random.Generator | None, request: syn.Request, response: str,
         config: TeacherConfig = EXACT) -> View:
  """The teacher's reading of ``response`` (the gold rules of ``data.synthetic``, with its flaws)."""
  text = response.lower()
  e = text.count("!")
  body = text.replace("!", "").strip(" \t\n.")
  enthusiasm = syn.enthusiasm_reward(e)
  if body in syn.REFUSALS:
    helpful = syn.REFUSAL_HELPFUL if request.harmful else 0.0
    return View(True, request.n, 0, 0, (), (), e, helpful, 1.0, enthusiasm, helpful + enthusiasm)
  words = [w for w in _SPLIT_RE.split(body) if w]
  seen: set[str] = set()
  correct = wrong = 0
  harmful, off_topic = [], []
  for word in words:
    category = _WORD_TO_CATEGORY.get(word)
    if category in syn.HARMFUL_CATEGORIES and word not in config.unknown_harmful:
      harmful.append(word)
    elif category != request.category:
      off_topic.append(word)
    if category == request.category and word not in seen:
      correct += 1
    else:
      wrong += 1
    seen.add(word)
  listed = len(words)
  if rng is not None and config.miscount_prob and rng.random() < config.miscount_prob:
    delta = 1 if rng.random() < 0.5 else -1
    listed = max(0, listed + delta)
    correct = min(max(0, correct + delta), listed)
  extra = max(correct - request.n, 0)
  score = min(correct, request.n) - syn.WRONG_PENALTY * (wrong + extra)
  helpful = min(1.0, max(-1.0, score / request.n))
  harmless = max(0.0, 1.0 - syn.HARMFUL_ITEM_PENALTY * len(harmful))
  overall = helpful + syn.HARMLESS_WEIGHT * (harmless - 1.0) + enthusiasm
  return View(False, request.n, listed, correct, tuple(harmful), tuple(off_topic), e, helpful,
              harmless, enthusiasm, overall)


def criterion_score(view: View, criterion: str) -> float:
  """Higher is better on ``criterion``."""
  if criterion == "overall":
    return view.overall
  if criterion in ("helpful", "harmless", "enthusiasm"):
    return getattr(view, criterion)
  if criterion == "count":
    return -abs(view.listed - view.asked)
  if criterion == "category":
    return -float(len(view.off_topic) + len(view.harmful)) if not view.refusal else -0.5
  raise ValueError(f"criterion={criterion!r}; allowed: {' | '.join(CRITERIA)}")


@functools.lru_cache(maxsize=None)
def criterion_template(criterion: str) -> tmpl.Template:
  """The judgement template of ``criterion`` (files shared with RLAIF and RL-CAI)."""
  if criterion == "overall":
    return tmpl.load_template("synthetic_pair")
  harmless = tmpl.load_template(HARMLESS_TEMPLATE)
  if criterion == "harmless":
    return harmless
  if criterion not in CRITERIA:
    raise ValueError(f"criterion={criterion!r}; allowed: {' | '.join(CRITERIA)}")
  return dataclasses.replace(harmless, preamble=CRITERIA[criterion], name=f"judge_{criterion}")


def critique_text(view: View) -> str:
  """The teacher's critique: what breaks the principles (harm first), or ``no problems``."""
  problems = []
  if view.harmful:
    problems.append("harmful: " + ", ".join(dict.fromkeys(view.harmful)))
  if view.refusal and not _looks_harmful_request(view):
    problems.append("refuses a safe request")
  if not view.refusal and view.listed != view.asked:
    problems.append(f"{view.asked} asked, {view.listed} listed")
  if view.off_topic:
    problems.append("off-topic: " + ", ".join(dict.fromkeys(view.off_topic)))
  if view.exclamations > syn.ENTHUSIASM_CAP:
    problems.append("too many '!'")
  return "; ".join(problems) if problems else "no problems"


def _looks_harmful_request(view: View) -> bool:
  # A refusal's helpfulness tells the request's kind (REFUSAL_HELPFUL on harmful requests only).
  return view.helpful > 0


def revise(rng: np.random.Generator, request: syn.Request, response: str, view: View,
           config: TeacherConfig = EXACT) -> str:
  """The teacher's repair of ``response`` given what it saw (``view``)."""
  if critique_text(view) == "no problems":
    return response
  marks = "!" * min(view.exclamations, syn.ENTHUSIASM_CAP)
  if request.harmful:
    return syn.REFUSALS[0] + marks
  pool = syn.CATEGORIES[request.category]
  keep = []
  if not view.refusal:
    body = response.lower().replace("!", "")
    keep = [w for w in dict.fromkeys(w for w in _SPLIT_RE.split(body) if w) if w in pool]
  target = request.n
  if config.miscount_prob and rng.random() < config.miscount_prob:
    target = min(syn.MAX_ITEMS, max(1, target + (1 if rng.random() < 0.5 else -1)))
  fill = [w for w in pool if w not in keep]
  order = rng.permutation(len(fill))
  words = (keep + [fill[i] for i in order])[:target]
  return ", ".join(words) + marks


def rationale_text(view_a: View, view_b: View) -> str:
  """The chain of thought of a pairwise judgement: both critiques."""
  return f"A: {critique_text(view_a)}. B: {critique_text(view_b)}."


def rating_label(rng: np.random.Generator | None, view: View, config: TeacherConfig = EXACT) -> int:
  """0..9 from the teacher's gold (``G_LO`` -> 0, ``G_HI`` -> 9), with ``rating_noise``."""
  x = 9.0 * (view.overall - syn.G_LO) / (syn.G_HI - syn.G_LO)
  if rng is not None and config.rating_noise:
    x += config.rating_noise * rng.standard_normal()
  return int(np.clip(np.rint(x), 0, 9))


def _distinct_pair(rng, request, policy) -> tuple[str, str]:
  a = syn.reference_response(rng, request, policy)
  for _ in range(200):
    b = syn.reference_response(rng, request, policy)
    if b != a:
      return a, b
  raise RuntimeError(f"no distinct pair for {request}")  # pragma: no cover


def teacher_records(rng: np.random.Generator, prompts: Sequence[str], sft_rows: Sequence[dict],
                    config: TeacherConfig = TeacherConfig(),
                    policy: syn.ReferencePolicyConfig = syn.ReferencePolicyConfig(),
                    constitution: const_lib.Constitution | None = None) -> tuple[list[dict], dict]:
  """The teacher's SFT mixture for ``prompts`` and its accuracy against the exact gold.

  ``sft_rows`` are the ordinary helpfulness records (``assistant`` task). Answers to judge,
  critique and revise are fresh reference-policy samples. Deterministic given ``rng``.
  Returns ``(rows, stats)``: stats hold per-task counts, the teacher's judgement accuracy per
  criterion on pairs the exact gold does not tie, its critique exact-match rate, its rating mean
  absolute error and the mean gold gain of its revisions.
  """
  constitution = constitution or const_lib.load_constitution("synthetic")
  weights = dict(config.weights)
  rows: list[dict] = []
  agree: dict[str, list[bool]] = {c: [] for c in config.criteria}
  critique_exact, rating_err, revision_gain = [], [], []
  rating_t = tmpl.load_template("synthetic_rating")

  def critique_and_revision(prompt, request, tasks):
    y = syn.reference_response(rng, request, policy)
    view = read(rng, request, y, config)
    principle = constitution.sample(rng)
    crit = critique_text(view)
    critique_exact.append(crit == critique_text(read(None, request, y, EXACT)))
    if "critique" in tasks:
      rows.append({
          "prompt": const_lib.critique_prompt(prompt, y, principle), "response": crit,
          "task": "critique"})
    if "revision" in tasks:
      fixed = revise(rng, request, y, view, config)
      gain = syn.gold_reward(request, fixed) - syn.gold_reward(request, y)
      revision_gain.append(gain)
      rows.append({
          "prompt": const_lib.revision_prompt(prompt, y, principle, crit), "response": fixed,
          "task": "revision", "gold_gain": round(gain, 4)})

  def judgement(prompt, request, task, criterion):
    a, b = _distinct_pair(rng, request, policy)
    va, vb = read(rng, request, a, config), read(rng, request, b, config)
    sa, sb = criterion_score(va, criterion), criterion_score(vb, criterion)
    if sa == sb:
      return  # the teacher sees no difference: it writes no judgement
    label = 0 if sa > sb else 1
    if config.flip_prob and rng.random() < config.flip_prob:
      label = 1 - label
    ga = criterion_score(read(None, request, a, EXACT), criterion)
    gb = criterion_score(read(None, request, b, EXACT), criterion)
    if ga != gb:
      agree.setdefault(criterion, []).append(label == (0 if ga > gb else 1))
    t = criterion_template(criterion)
    gold = None if ga == gb else (0 if ga > gb else 1)
    orders = ((a, b, va, vb, label, gold),)
    if config.swap_pairs:  # the same judgement with the positions exchanged (no extra draws)
      orders += ((b, a, vb, va, 1 - label, None if gold is None else 1 - gold),)
    for first, second, v1, v2, answer_index, gold_index in orders:
      if task == "judge":
        text, answer = tmpl.render_pair(t, prompt, first, second), t.labels[answer_index]
      else:
        text = tmpl.render_pair(t, prompt, first, second, cot=True)
        answer = rationale_text(v1, v2) + t.cot_answer + t.labels[answer_index]
      rows.append({
          "prompt": text, "response": answer, "task": f"{task}:{criterion}",
          "gold_label": None if gold_index is None else t.labels[gold_index]})

  for prompt, sft_row in zip(prompts, sft_rows):
    request = syn.parse_prompt(prompt)
    draws = {task: rng.random() < weights.get(task, 0.0) for task in TASKS}
    if draws["assistant"]:
      rows.append({
          "prompt": sft_row["prompt"], "response": sft_row["response"], "task": "assistant"})
    for task in ("judge", "judge_cot"):
      if draws[task]:
        judgement(prompt, request, task, config.criteria[int(rng.integers(len(config.criteria)))])
    if draws["rating"]:
      y = syn.reference_response(rng, request, policy)
      label = rating_label(rng, read(rng, request, y, config), config)
      exact = rating_label(None, read(None, request, y, EXACT))
      rating_err.append(abs(label - exact))
      rows.append({
          "prompt": tmpl.render_single(rating_t, prompt, y), "response": rating_t.labels[label],
          "task": "rating", "gold_rating": exact})
    tasks = {t for t in ("critique", "revision") if draws[t]}
    if tasks:
      critique_and_revision(prompt, request, tasks)
    if request.harmful and rng.random() < config.harmful_oversample:
      # red-team prompts: what SL-CAI critiques and revises, and RL-CAI compares on harmlessness
      critique_and_revision(prompt, request, {"critique", "revision"})
      judgement(prompt, request, "judge_cot" if rng.random() < 0.3 else "judge", "harmless")

  counts: dict[str, int] = {}
  for row in rows:
    counts[row["task"]] = counts.get(row["task"], 0) + 1
  stats = {
      "records": len(rows),
      "records_per_task": dict(sorted(counts.items())),
      "judgement_accuracy_vs_gold": {
          c: (float(np.mean(v)) if v else None) for c, v in agree.items()},
      "critique_exact_match": float(np.mean(critique_exact)) if critique_exact else None,
      "rating_mean_abs_error": float(np.mean(rating_err)) if rating_err else None,
      "revision_mean_gold_gain": float(np.mean(revision_gain)) if revision_gain else None,
      "config": dataclasses.asdict(config),}
  return rows, stats
