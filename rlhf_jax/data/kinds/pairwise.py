"""``pairwise``: ``{"prompt", "chosen", "rejected"}``, optionally ``"preference_prob"``.

``preference_prob`` (a number in [0, 1]; default 1) is the probability that ``chosen`` ≻
``rejected`` — a soft label, e.g. an AI evaluator's (RLAIF writes its labels this way: ``chosen``
is the response it prefers, ``preference_prob`` how sure it is). The batch carries it as
``preference_prob [B]`` float32 (1 for filler rows); the reward model's Bradley–Terry objective
trains on it (``losses.bradley_terry_loss(preference_prob=)``), other methods use the hard label.

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
  preference_prob: float = 1.0  # P(chosen ≻ rejected)


def parse(ctx: base.ParseContext, obj) -> PairwiseRecord:
  prompt = ctx.prompt(obj)
  prob = 1.0
  if obj.get("preference_prob") is not None:
    prob = ctx.number(obj["preference_prob"], "preference_prob")
    if not 0.0 <= prob <= 1.0:
      raise ctx.error("preference_prob", "a probability in [0, 1] (P(chosen > rejected))", prob)
  return PairwiseRecord(prompt, ctx.string(obj, "chosen", non_empty=True),
                        ctx.string(obj, "rejected", non_empty=True), prob)


def encode(record, enc: base.Encoder) -> dict[str, np.ndarray]:
  return {
      "chosen": enc.response(record.chosen,
                             "chosen"), "rejected": enc.response(record.rejected, "rejected"),
      "preference_prob": np.float32(record.preference_prob)}


def collate(examples, specials, length, **_) -> dict[str, np.ndarray]:
  rows = []
  for ex in examples:
    rows += [(ex["prompt"], ex["chosen"]), (ex["prompt"], ex["rejected"])] if ex is not None \
        else [None, None]
  # Datasets written before the field existed have no preference_prob: hard labels (1).
  prob_B = np.asarray([1.0 if ex is None else ex.get("preference_prob", 1.0) for ex in examples],
                      np.float32)
  return {**base.pack_sequences(rows, specials, length), "preference_prob": prob_B}


def split(x_2B):
  """``[2B, ...]`` rows of a pairwise batch -> ``(chosen [B, ...], rejected [B, ...])``.

  Works on NumPy and JAX arrays (a reshape, no gather).
  """
  x_Bx2 = x_2B.reshape((x_2B.shape[0] // ROWS, ROWS) + tuple(x_2B.shape[1:]))
  return x_Bx2[:, 0], x_Bx2[:, 1]


KIND = base.register_kind(
    base.RecordKind(
        name="pairwise", record_type=PairwiseRecord, parse=parse, features={
            "chosen": base.INT_SEQ, "rejected": base.INT_SEQ,
            "preference_prob": base.FLOAT_SCALAR}, encode=encode,
        length=lambda ex: len(ex["prompt"]) + max(len(ex["chosen"]), len(ex["rejected"])) + 2,
        collate=collate, file_stem="pairwise", informative=lambda r: r.chosen != r.rejected,
        uninformative="chosen == rejected"))
