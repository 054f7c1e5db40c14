"""``pairwise``: ``{"prompt", "chosen", "rejected"}``.

Batch: ``tokens`` / ``mask`` / ``loss_mask`` ``[2B, T]``, the chosen and the rejected sequence of
pair ``b`` in rows ``2b`` and ``2b + 1`` (example major, see :mod:`.base`: a pair never straddles
a host slice); :func:`split` undoes it (``[2B, ...] -> ([B, ...], [B, ...])``). One forward of the
``2B`` rows serves both sides.

A pair whose chosen equals its rejected carries no preference (``informative`` is False).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rlhf_jax.data.kinds import base

ROWS = 2  # sequence rows per pair: chosen, rejected


@dataclasses.dataclass(frozen=True)
class PairwiseRecord:
  prompt: str
  chosen: str
  rejected: str


def parse(ctx: base.ParseContext, obj) -> PairwiseRecord:
  prompt = ctx.prompt(obj)
  return PairwiseRecord(prompt, ctx.string(obj, "chosen", non_empty=True),
                        ctx.string(obj, "rejected", non_empty=True))


def encode(record, enc: base.Encoder) -> dict[str, np.ndarray]:
  return {
      "chosen": enc.response(record.chosen, "chosen"),
      "rejected": enc.response(record.rejected, "rejected")}


def collate(examples, specials, length, **_) -> dict[str, np.ndarray]:
  rows = []
  for ex in examples:
    rows += [(ex["prompt"], ex["chosen"]), (ex["prompt"], ex["rejected"])] if ex is not None \
        else [None, None]
  return base.pack_sequences(rows, specials, length)


def split(x_2B):
  """``[2B, ...]`` rows of a pairwise batch -> ``(chosen [B, ...], rejected [B, ...])``.

  Works on NumPy and JAX arrays (a reshape, no gather).
  """
  x_Bx2 = x_2B.reshape((x_2B.shape[0] // ROWS, ROWS) + tuple(x_2B.shape[1:]))
  return x_Bx2[:, 0], x_Bx2[:, 1]


KIND = base.register_kind(
    base.RecordKind(
        name="pairwise", record_type=PairwiseRecord, parse=parse,
        features={"chosen": base.INT_SEQ, "rejected": base.INT_SEQ}, encode=encode,
        length=lambda ex: len(ex["prompt"]) + max(len(ex["chosen"]), len(ex["rejected"])) + 2,
        collate=collate, file_stem="pairwise", informative=lambda r: r.chosen != r.rejected,
        uninformative="chosen == rejected"))
