"""``unpaired``: ``{"prompt", "completion", "label": true|false}`` (TRL's unpaired format).

One completion per prompt with a binary label (True = desirable), as KTO trains on. A pairwise file
becomes an unpaired one with :func:`unpair` (TRL's ``unpair_preference_dataset``): each comparison
gives its chosen completion as a desirable example and its rejected one as an undesirable example.

Batch (``B`` examples, ``ROWS = 2`` sequence rows each, example major as every kind):

* row ``2b``:     ``[BOS] x_b y_b [EOS]`` — the example itself (matched row);
* row ``2b + 1``: ``[BOS] x_b y'_b [EOS]`` — the *mismatched* (KL) row: prompt b with the completion
  of the previous valid example of the same host batch, ``y'_b = y_{b−1 mod n}`` (TRL's rotation
  by one, ``[y_n, y_1, ..., y_{n−1}]``), so the KL rows use the same set of completions as the
  matched rows, paired with other prompts;
* ``label [B]`` int32 (1 = desirable, 0 = undesirable or filler).

:func:`split` undoes the row layout (``[2B, ...] -> (matched [B, ...], mismatched [B, ...])``).
The batch length is the longest *matched* row's bucket; a KL row that does not fit it (a long
prompt meeting a long completion) keeps the first completion tokens that fit, as TRL truncates at
``max_length`` (never on the synthetic task with one bucket >= max_prompt_len + max_response_len).
A host batch with a single valid example pairs it with its own completion (TRL requires batch > 1).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Mapping

import numpy as np

from rlhf_jax.data.kinds import base

ROWS = 2  # sequence rows per example: matched, mismatched (KL)


@dataclasses.dataclass(frozen=True)
class UnpairedRecord:
  prompt: str
  completion: str
  label: bool


def parse(ctx: base.ParseContext, obj) -> UnpairedRecord:
  prompt = ctx.prompt(obj)
  completion = ctx.string(obj, "completion", non_empty=True)
  label = ctx.get(obj, "label")
  if not isinstance(label, bool):
    raise ctx.error("label", "true or false (a JSON boolean; true = desirable)",
                    base.Desc(f"{type(label).__name__} {base.short(label)}"))
  return UnpairedRecord(prompt, completion, label)


def encode(record, enc: base.Encoder) -> dict[str, np.ndarray]:
  return {
      "completion": enc.response(record.completion, "completion"), "label": np.int32(record.label)}


def length(ex) -> int:
  return len(ex["prompt"]) + len(ex["completion"]) + 2


def collate(examples, specials, length_, **_) -> dict[str, np.ndarray]:
  valid = [i for i, ex in enumerate(examples) if ex is not None]
  # KL partner of valid example j: the completion of valid example j-1 (cyclically).
  partner = {i: valid[(k - 1) % len(valid)] for k, i in enumerate(valid)}
  rows = []
  for i, ex in enumerate(examples):
    if ex is None:
      rows += [None, None]
      continue
    kl_completion = examples[partner[i]]["completion"]
    room = length_ - len(ex["prompt"]) - 2  # >= len(ex["completion"]) >= 1: the matched row fits
    rows += [(ex["prompt"], ex["completion"]), (ex["prompt"], kl_completion[:room])]
  batch = base.pack_sequences(rows, specials, length_)
  batch["label"] = np.asarray([int(ex["label"]) if ex is not None else 0 for ex in examples],
                              np.int32)
  return batch


def split(x_2B):
  """``[2B, ...]`` rows of an unpaired batch -> ``(matched [B, ...], mismatched [B, ...])``."""
  x_Bx2 = x_2B.reshape((x_2B.shape[0] // ROWS, ROWS) + tuple(x_2B.shape[1:]))
  return x_Bx2[:, 0], x_Bx2[:, 1]


def unpair(pairs: Iterable) -> Iterator[dict]:
  """Pairwise records (``{"prompt", "chosen", "rejected"}`` mappings or ``PairwiseRecord``) ->
  unpaired rows: ``{"prompt", "completion": chosen, "label": True}`` then ``{..., rejected, False}``
  for each pair, in order (TRL's ``unpair_preference_dataset``; other keys are not carried)."""
  for pair in pairs:
    get = pair.get if isinstance(pair, Mapping) else lambda k: getattr(pair, k)
    yield {"prompt": get("prompt"), "completion": get("chosen"), "label": True}
    yield {"prompt": get("prompt"), "completion": get("rejected"), "label": False}


def counts(records) -> tuple[int, int]:
  """(desirable, undesirable) record counts."""
  n_desirable = sum(1 for r in records if r.label)
  return n_desirable, len(records) - n_desirable


KIND = base.register_kind(
    base.RecordKind(name="unpaired", record_type=UnpairedRecord, parse=parse,
                    features={"completion": base.INT_SEQ, "label": ((), np.int32)}, encode=encode,
                    length=length, collate=collate, file_stem="unpaired"))
