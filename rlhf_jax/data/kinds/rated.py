"""``rated``: ``{"prompt", "response", "rating": num}`` with the rating inside ``ParseOptions.scale``.

Batch: the sft keys + ``rating [B]`` float32.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rlhf_jax.data.kinds import base, sft


@dataclasses.dataclass(frozen=True)
class RatedRecord:
  prompt: str
  response: str
  rating: float


def parse(ctx: base.ParseContext, obj) -> RatedRecord:
  prompt = ctx.prompt(obj)
  response = ctx.string(obj, "response", non_empty=True)
  rating = ctx.in_scale(ctx.number(ctx.get(obj, "rating"), "rating"), "rating", "a rating")
  return RatedRecord(prompt, response, rating)


def encode(record, enc: base.Encoder) -> dict[str, np.ndarray]:
  return {**sft.encode_response(record, enc), "rating": np.float32(record.rating)}


def collate(examples, specials, length, **_) -> dict[str, np.ndarray]:
  batch = sft.collate_responses(examples, specials, length)
  batch["rating"] = np.asarray([ex["rating"] if ex is not None else 0.0 for ex in examples],
                               np.float32)
  return batch


KIND = base.register_kind(
    base.RecordKind(name="rated", record_type=RatedRecord, parse=parse,
                    features={"response": base.INT_SEQ, "rating": base.FLOAT_SCALAR}, encode=encode,
                    length=sft.response_length, collate=collate, file_stem="rated",
                    options=("scale",)))
