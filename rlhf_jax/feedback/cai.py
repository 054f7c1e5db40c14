"""Constitutional AI (Bai et al., 2022, arXiv:2212.08073) as pure pieces over the shared stack.

SL-CAI (§3): for red-team prompts x the policy answers y_0; then for r = 1..n_revisions a principle
p_r is drawn from the constitution (:mod:`.constitution`) and the feedback model writes

    c_r ~ π_F(· | critique_prompt(x, y_{r-1}, p_r))                       (the critique)
    y_r ~ π_F(· | revision_prompt(x, y_{r-1}, p_r, c_r))                 (the revised answer)

(:func:`critique_revision_loop`, sampled with ``rlhf_jax.sampling`` through the evaluator's
generator; an empty revision keeps the previous answer). A model is then fine-tuned (the SFT
code) on ``{(x, y_n)}`` for the red-team prompts mixed with helpfulness samples on the other
prompts (:func:`sl_cai_rows`).

RL-CAI (§4): pairs (y_a, y_b) of the SL-CAI model's samples on red-team prompts are compared by the
feedback model on a harmlessness principle ("Which response is more harmless? (A) … (B) … The answer
is: ", ``templates/cai_harmless.json``). The label is the soft one of ``feedback.evaluator``
(softmax over the label tokens' log-probs, both orders averaged). With chain of thought the
evaluator first writes a rationale; such labels are near 0 or 1, so they are **clamped**
(:func:`clamp_labels`)

    p ← min(max(p, lo), hi)            (the paper: lo, hi = 0.4, 0.6; ``HarmlessLabelConfig.clamp``)

and ``soft=False`` turns any label into a hard one (1[p > ½], ½ at ties). The preference model is
trained (the reward-model trainer, soft Bradley–Terry) on those AI harmlessness labels plus
simulated-human *helpfulness* labels on the other prompts (:func:`helpful_only_rewards`), then PPO
optimises the SL-CAI model against it.

Evaluation against the exact gold (:func:`safety_metrics`): compliance with harmful requests (an
answer naming at least one harmful item), refusal rates on harmful / safe requests (a refusal of a
safe request is evasiveness), helpfulness on safe requests, harmlessness on harmful ones, gold
reward. :func:`evaluate_feedback_model` measures the feedback model itself on the teacher's held-out
records: judgement accuracy per criterion vs the exact gold, critique correctness, revision gain.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from rlhf_jax.data import synthetic as syn
from rlhf_jax.feedback import constitution as const_lib
from rlhf_jax.feedback import evaluator as ev_lib
from rlhf_jax.feedback import teacher as teacher_lib
from rlhf_jax.feedback import templates as tmpl

__all__ = [
    "RevisionConfig", "HarmlessLabelConfig", "generate", "critique_revision_loop", "sl_cai_rows",
    "clamp_labels", "harmlessness_labels", "helpful_only_rewards", "safety_metrics",
    "evaluate_feedback_model"]


@dataclasses.dataclass(frozen=True)
class RevisionConfig:
  """SL-CAI's critique → revision loop.

  Attributes:
    n_revisions: critique/revision rounds per answer (a fresh principle each round).
    max_critique_tokens, max_revision_tokens: generation budgets (both stop at a newline or EOS).
    temperature, greedy: the feedback model's decoding.
    seed: base seed of the sampler and of the principle draws.
  """

  n_revisions: int = 1
  max_critique_tokens: int = 64
  max_revision_tokens: int = 48
  temperature: float = 1.0
  greedy: bool = False
  seed: int = 0

  def __post_init__(self):
    for name in ("n_revisions", "max_critique_tokens", "max_revision_tokens"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"RevisionConfig.{name}={value!r} is invalid; allowed: an int >= 1")
    if not self.temperature > 0:
      raise ValueError(f"RevisionConfig.temperature={self.temperature!r}; allowed: a float > 0")


@dataclasses.dataclass(frozen=True)
class HarmlessLabelConfig:
  """RL-CAI's AI harmlessness labels.

  Attributes:
    template: the comparison template (a shipped name or a file).
    both_orders: average the two presentation orders (``feedback.evaluator.pair_labels``).
    cot: chain of thought (the feedback model writes a rationale first).
    cot_max_tokens: rationale budget.
    clamp: ``(lo, hi)`` band CoT labels are clamped to (``()`` = off); the paper uses 40–60 %.
    soft: soft labels (the probability) or hard ones (1[p > ½]).
  """

  template: str = "cai_harmless"
  both_orders: bool = True
  cot: bool = False
  cot_max_tokens: int = 96
  clamp: tuple = (0.4, 0.6)
  soft: bool = True

  def __post_init__(self):
    object.__setattr__(self, "clamp", tuple(self.clamp))
    if self.clamp and not (len(self.clamp) == 2 and
                           0.0 <= self.clamp[0] <= 0.5 <= self.clamp[1] <= 1.0):
      raise ValueError(f"HarmlessLabelConfig.clamp={self.clamp!r} is invalid; allowed: () (off) "
                       "or (lo, hi) with 0 <= lo <= 0.5 <= hi <= 1, e.g. (0.4, 0.6)")
    if isinstance(self.cot_max_tokens,
                  bool) or not isinstance(self.cot_max_tokens, int) or self.cot_max_tokens < 1:
      raise ValueError(f"HarmlessLabelConfig.cot_max_tokens={self.cot_max_tokens!r}; allowed: an "
                       "int >= 1")


def generate(ev: ev_lib.Evaluator, queries: Sequence[str], *, max_tokens: int,
             temperature: float = 1.0, greedy: bool = False, seed: int = 0) -> list[str]:
  """The feedback model's continuation of each query (stops at a newline or EOS)."""
  cfg = ev_lib.CotConfig(max_tokens=max_tokens, temperature=temperature, greedy=greedy, seed=seed)
  return ev_lib.rationales(ev, list(queries), cfg)


def critique_revision_loop(
    fm: ev_lib.Evaluator, constitution: const_lib.Constitution, prompts: Sequence[str],
    responses: Sequence[str], config: RevisionConfig = RevisionConfig()) -> list[dict]:
  """SL-CAI's loop (module docstring) over N answers; one record per answer::

      {"prompt", "initial", "revisions": [{"principle", "critique", "revision"}, ...], "final"}
  """
  if len(prompts) != len(responses):
    raise ValueError(f"critique_revision_loop: {len(prompts)} prompts but {len(responses)} "
                     "responses; allowed: one response per prompt")
  rng = np.random.default_rng([config.seed, 212])
  current = [str(y) for y in responses]
  records = [{"prompt": x, "initial": y, "revisions": []} for x, y in zip(prompts, current)]
  for r in range(config.n_revisions):
    principles = [constitution.sample(rng) for _ in prompts]
    critiques = generate(
        fm, [const_lib.critique_prompt(x, y, p) for x, y, p in zip(prompts, current, principles)],
        max_tokens=config.max_critique_tokens, temperature=config.temperature, greedy=config.greedy,
        seed=config.seed * 1000 + 2 * r)
    revisions = generate(fm, [
        const_lib.revision_prompt(x, y, p, c)
        for x, y, p, c in zip(prompts, current, principles, critiques)],
                         max_tokens=config.max_revision_tokens, temperature=config.temperature,
                         greedy=config.greedy, seed=config.seed * 1000 + 2 * r + 1)
    for i, (p, c, y) in enumerate(zip(principles, critiques, revisions)):
      records[i]["revisions"].append({"principle": p.name, "critique": c, "revision": y})
      if y.strip():
        current[i] = y
  for record, y in zip(records, current):
    record["final"] = y
  return records


def sl_cai_rows(records: Sequence[dict], helpful_rows: Sequence[dict]) -> list[dict]:
  """SL-CAI's SFT data: ``(x, final revision)`` per red-team record, then the helpfulness rows."""
  rows = [{"prompt": r["prompt"], "response": r["final"], "task": "revision"} for r in records]
  rows += [
      {"prompt": r["prompt"], "response": r["response"], "task": "helpful"} for r in helpful_rows]
  return rows


def clamp_labels(p_N: np.ndarray, band: Sequence[float]) -> np.ndarray:
  """``min(max(p, lo), hi)``; ``band=()`` leaves ``p`` unchanged. Clamping is symmetric about ½
  when ``lo + hi = 1``, so label(a, b) + label(b, a) = 1 survives it."""
  p_N = np.asarray(p_N, np.float64)
  if not band:
    return p_N
  lo, hi = band
  return np.clip(p_N, lo, hi)


def harden(p_N: np.ndarray) -> np.ndarray:
  """Hard labels ``1[p > ½]`` (½ stays ½: a tie carries no preference)."""
  p_N = np.asarray(p_N, np.float64)
  return np.where(p_N == 0.5, 0.5, (p_N > 0.5).astype(np.float64))


def harmlessness_labels(
    fm: ev_lib.Evaluator, prompts: Sequence[str], responses_a: Sequence[str],
    responses_b: Sequence[str],
    config: HarmlessLabelConfig = HarmlessLabelConfig()) -> dict[str, Any]:
  """RL-CAI's labels P(a more harmless than b) (module docstring) and the raw evaluator output.

  ``fm`` must carry the harmlessness template (``ev_lib.make_evaluator(..., config.template)``).
  Returns ``{"p_N": final labels, "raw_p_N": before clamping / hardening, "labels": PairLabels}``.
  """
  cot = ev_lib.CotConfig(max_tokens=config.cot_max_tokens) if config.cot else None
  labels = ev_lib.pair_labels(fm, list(prompts), list(responses_a), list(responses_b),
                              both_orders=config.both_orders, cot=cot)
  p_N = labels.p_N
  if config.cot:
    p_N = clamp_labels(p_N, config.clamp)
  if not config.soft:
    p_N = harden(p_N)
  return {"p_N": p_N, "raw_p_N": labels.p_N, "labels": labels}


def helpful_only_rewards(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
  """The gold reward without its harmlessness term, ``helpful + enthusiasm``: what simulated
  annotators asked only for helpfulness prefer (helpful-only RLHF, RL-CAI's helpfulness labels)."""
  attrs = syn.gold_attribute_arrays(prompts, responses)
  return (attrs["helpful"] + attrs["enthusiasm"]).astype(np.float64)


def safety_metrics(prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
  """Exact harmlessness / helpfulness numbers of a policy's answers (module docstring).

  ``harmful_compliance``: answers to harmful requests naming >= 1 harmful item;
  ``harmful_refusal_rate`` / ``safe_refusal_rate`` (evasiveness); ``safe_helpfulness``: mean
  ``helpful`` on safe requests; ``harmlessness``: mean ``harmless`` on harmful requests;
  ``gold_reward`` over all answers (and per kind).
  """
  if len(prompts) != len(responses) or not prompts:
    raise ValueError(f"safety_metrics: {len(prompts)} prompts and {len(responses)} responses; "
                     "allowed: the same number, at least one")
  requests = [syn.parse_prompt(x) for x in prompts]
  views = [teacher_lib.read(None, q, y) for q, y in zip(requests, responses)]
  gold = np.asarray([syn.gold_reward(q, y) for q, y in zip(requests, responses)], np.float64)
  harmful = np.asarray([q.harmful for q in requests])
  refusal = np.asarray([v.refusal for v in views])
  harmless = np.asarray([v.harmless for v in views])
  helpful = np.asarray([v.helpful for v in views])

  def mean(x, m):
    return float(np.mean(x[m])) if np.any(m) else float("nan")

  return {
      "num_harmful": int(harmful.sum()), "num_safe": int(
          (~harmful).sum()), "harmful_compliance": mean(harmless < 1.0, harmful),
      "harmful_refusal_rate": mean(refusal, harmful), "harmlessness": mean(harmless, harmful),
      "safe_helpfulness": mean(helpful, ~harmful), "safe_refusal_rate": mean(refusal, ~harmful),
      "gold_reward": float(np.mean(gold)), "gold_reward_harmful": mean(gold, harmful),
      "gold_reward_safe": mean(gold, ~harmful)}


_CRITIQUE_RE = re.compile(r"^Request: (.*)\nAnswer: (.*)\nCritique request: ", re.S)


def _request_and_answer(critique_query: str) -> tuple[str, str]:
  match = _CRITIQUE_RE.match(critique_query)
  if match is None:
    raise ValueError(f"not a critique prompt of constitution.critique_prompt: {critique_query!r}")
  return match.group(1), match.group(2)


def evaluate_feedback_model(fm_pair: ev_lib.Evaluator, rows: Sequence[dict], *,
                            constitution: const_lib.Constitution, max_per_task: int = 256,
                            seed: int = 0, cot_max_tokens: int = 112) -> dict[str, Any]:
  """The feedback model against the exact gold on the teacher's held-out records
  (``feedback_sft_test.jsonl``).

  * ``judge_accuracy/<criterion>``: P(label of the gold-preferred side) > ½ on the ``judge:<c>``
    records the exact gold does not tie (one order, as the record presents it; the template's
    label tokens are the same for every pair template, so one evaluator scores them all);
  * ``judge_cot_accuracy/<criterion>``: the same on the ``judge_cot:<c>`` records, the label
    scored after the model's own greedy rationale (up to ``cot_max_tokens``) and the
    criterion template's ``cot_answer``;
  * ``critique_exact_match``: greedy critiques equal to the noise-free teacher's;
    ``critique_harm_detection``: the critique names harm ("harmful:") iff the answer has a harmful
    item; ``teacher_critique_exact_match``: the noisy teacher's own rate on the same answers;
  * ``revision_gold_gain``: mean gold(revision) - gold(answer) over one greedy critique → revision
    round of the model itself on those answers (``teacher_revision_gold_gain``: the teacher's).
  """
  out: dict[str, Any] = {}
  by_task: dict[tuple[str, str], list[dict]] = {}
  for row in rows:
    task, _, criterion = row.get("task", "").partition(":")
    if task in ("judge", "judge_cot") and row.get("gold_label") is not None:
      by_task.setdefault((task, criterion), []).append(row)
  for (task, criterion), items in sorted(by_task.items()):
    items = items[:max_per_task]
    queries = [r["prompt"] for r in items]
    if task == "judge_cot":
      t = teacher_lib.criterion_template(criterion)
      made = ev_lib.rationales(fm_pair, queries,
                               ev_lib.CotConfig(max_tokens=cot_max_tokens, greedy=True, seed=seed))
      queries = [tmpl.cot_answer_text(t, q, r) for q, r in zip(queries, made)]
    probs, mass = ev_lib.label_probs(fm_pair, queries)
    gold_first = np.asarray([r["gold_label"] == fm_pair.template.labels[0] for r in items])
    p_gold = np.where(gold_first, probs[:, 0], probs[:, 1])
    out[f"{task}_accuracy/{criterion}"] = float(np.mean(p_gold > 0.5))
    out[f"{task}_label_mass/{criterion}"] = float(np.mean(mass))
    out[f"{task}_count/{criterion}"] = len(items)
  crit_rows = [r for r in rows if r.get("task") == "critique"][:max_per_task]
  rev_rows = [r for r in rows if r.get("task") == "revision"][:max_per_task]
  if crit_rows:
    pairs = [_request_and_answer(r["prompt"]) for r in crit_rows]
    made = generate(fm_pair, [r["prompt"] for r in crit_rows], max_tokens=64, greedy=True,
                    seed=seed)
    exact = [
        teacher_lib.critique_text(teacher_lib.read(None, syn.parse_prompt(x), y)) for x, y in pairs]
    has_harm = [
        teacher_lib.read(None, syn.parse_prompt(x), y, teacher_lib.EXACT).harmless < 1
        for x, y in pairs]
    out["critique_exact_match"] = float(np.mean([m == e for m, e in zip(made, exact)]))
    out["critique_harm_detection"] = float(
        np.mean([("harmful:" in m) == h for m, h in zip(made, has_harm)]))
    out["teacher_critique_exact_match"] = float(
        np.mean([r["response"] == e for r, e in zip(crit_rows, exact)]))
    out["critique_count"] = len(crit_rows)
  if rev_rows:
    pairs = [_request_and_answer(r["prompt"]) for r in rev_rows]
    records = critique_revision_loop(fm_pair, constitution, [x for x, _ in pairs],
                                     [y for _, y in pairs],
                                     RevisionConfig(n_revisions=1, greedy=True, seed=seed))
    before = np.asarray([syn.gold_reward(x, y) for x, y in pairs])
    after = np.asarray([syn.gold_reward(r["prompt"], r["final"]) for r in records])
    out["revision_gold_gain"] = float(np.mean(after - before))
    out["teacher_revision_gold_gain"] = float(np.mean([r["gold_gain"] for r in rev_rows]))
    out["revision_count"] = len(rev_rows)
    out["revision_examples"] = [{
        "prompt": r["prompt"], "initial": r["initial"], "critique": r["revisions"][0]["critique"],
        "final": r["final"]} for r in records[:5]]
  return out
