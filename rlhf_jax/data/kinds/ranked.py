"""``ranked``: ``{"prompt", "responses": [str, ...], "scores": [num, ...]}`` (higher is better) or
``"ranks": [int, ...]`` (1 is best) instead of ``"scores"``; at least 2 responses.

Ranks are stored as ``score = -rank`` so every :class:`RankedRecord` sorts higher-is-better.
``ParseOptions.max_candidates = K`` keeps each list's first K responses.

Batch (``K`` = ``num_candidates``, the dataset's longest list unless the iterator sets it):
``tokens`` / ``mask`` / ``loss_mask`` ``[B·K, T]`` (candidate ``k`` of list ``b`` in row
``b·K + k``; missing candidates are all padding), ``candidate_mask [B, K]`` int32 and
``scores [B, K]`` float32 (0 where ``candidate_mask`` is 0).

A list with fewer than two distinct scores (all tied) carries no ranking (``informative``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rlhf_jax.data.kinds import base


@dataclasses.dataclass(frozen=True)
class RankedRecord:
  prompt: str
  responses: tuple[str, ...]
  scores: tuple[float, ...]  # higher is better (ranks r are stored as -r)


def parse(ctx: base.ParseContext, obj) -> RankedRecord:
  prompt = ctx.prompt(obj)
  responses = ctx.get(obj, "responses")
  if not isinstance(responses, list):
    raise ctx.error("responses", "a list of strings", responses)
  if len(responses) < 2:
    raise ctx.error("responses", "at least 2 responses to rank", base.Desc(str(len(responses))))
  for i, response in enumerate(responses):
    ctx.check_string(response, f"responses[{i}]", non_empty=True)
  has_scores, has_ranks = "scores" in obj, "ranks" in obj
  if has_scores == has_ranks:
    raise ctx.error("scores", "exactly one of 'scores' (higher is better) or 'ranks' (1 is best)",
                    base.Desc("both" if has_scores else "neither"))
  field = "scores" if has_scores else "ranks"
  values = obj[field]
  if not isinstance(values, list):
    raise ctx.error(field, "a list of numbers", values)
  if len(values) != len(responses):
    raise ctx.error(field, f"{len(responses)} entries, one per response",
                    base.Desc(str(len(values))))
  if has_scores:
    scores = tuple(ctx.number(v, f"scores[{i}]") for i, v in enumerate(values))
  else:
    for i, v in enumerate(values):
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ctx.error(f"ranks[{i}]", "an integer >= 1 (1 is best)", v)
    scores = tuple(-float(v) for v in values)
  k = ctx.options.max_candidates or len(responses)
  return RankedRecord(prompt, tuple(responses[:k]), scores[:k])


def encode(record, enc: base.Encoder) -> dict[str, np.ndarray]:
  parts = [enc.response(text, f"responses[{j}]") for j, text in enumerate(record.responses)]
  return {
      "responses_flat": np.concatenate(parts).astype(np.int32),
      "response_lengths": np.asarray([len(p) for p in parts],
                                     np.int32), "scores": np.asarray(record.scores, np.float32)}


def candidates(ex) -> list[np.ndarray]:
  """The token ids of each response of a stored example."""
  bounds = np.concatenate([[0], np.cumsum(ex["response_lengths"])])
  return [ex["responses_flat"][bounds[j]:bounds[j + 1]] for j in range(len(ex["response_lengths"]))]


def collate(examples, specials, length, *, num_candidates: int = 0, **_) -> dict[str, np.ndarray]:
  b, k = len(examples), num_candidates
  rows: list = [None] * (b * k)
  candidate_mask, scores = np.zeros((b, k), np.int32), np.zeros((b, k), np.float32)
  for i, ex in enumerate(examples):
    if ex is None:
      continue
    parts = candidates(ex)
    if len(parts) > k:
      raise ValueError(f"ranked example has {len(parts)} candidates > num_candidates={k}")
    rows[i * k:i * k + len(parts)] = [(ex["prompt"], p) for p in parts]
    candidate_mask[i, :len(parts)] = 1
    scores[i, :len(parts)] = ex["scores"]
  batch = base.pack_sequences(rows, specials, length)
  batch.update(candidate_mask=candidate_mask, scores=scores)
  return batch


KIND = base.register_kind(
    base.RecordKind(
        name="ranked", record_type=RankedRecord, parse=parse, features={
            "responses_flat": base.INT_SEQ, "response_lengths": base.INT_SEQ,
            "scores": base.FLOAT_SEQ}, encode=encode,
        length=lambda ex: len(ex["prompt"]) + int(np.max(ex["response_lengths"])) + 2,
        collate=collate, file_stem="ranked", options=("max_candidates",),
        informative=lambda r: len(set(r.scores)) >= 2, uninformative="all-equal scores",
        metadata=lambda records, examples: {
            "max_candidates": max(len(ex["response_lengths"]) for ex in examples)}))
