"""``attributes``: ``{"prompt", "response", "attributes": {name: num, ...}}``.

``ParseOptions.scale`` bounds every value, ``attribute_names`` requires those names; all records of
a dataset must name the same attributes (stored sorted by name in ``metadata["attribute_names"]``).

Batch: the sft keys + ``attributes [B, A]`` float32.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from rlhf_jax.data.kinds import base, sft


@dataclasses.dataclass(frozen=True)
class AttributeRecord:
  prompt: str
  response: str
  attributes: tuple[tuple[str, float], ...]  # sorted by name; dict(record.attributes) to look up

  def attribute(self, name: str) -> float:
    return dict(self.attributes)[name]


def parse(ctx: base.ParseContext, obj) -> AttributeRecord:
  prompt = ctx.prompt(obj)
  response = ctx.string(obj, "response", non_empty=True)
  attributes = ctx.get(obj, "attributes")
  if not isinstance(attributes, Mapping) or not attributes:
    raise ctx.error("attributes", "a non-empty object {name: number}", attributes)
  names = ctx.options.attribute_names
  if names is not None:
    missing = [n for n in names if n not in attributes]
    if missing:
      raise ctx.error(f"attributes.{missing[0]}", f"a value for every attribute in {list(names)}")
  values = {}
  for name, value in attributes.items():
    values[name] = ctx.in_scale(ctx.number(value, f"attributes.{name}"), f"attributes.{name}")
  return AttributeRecord(prompt, response, tuple(sorted(values.items())))


def encode(record, enc: base.Encoder) -> dict[str, np.ndarray]:
  return {
      **sft.encode_response(record, enc), "attributes": np.asarray(
          [value for _, value in record.attributes], np.float32)}


def check_records(records) -> None:
  names = {tuple(name for name, _ in r.attributes) for r in records}
  if len(names) != 1:
    raise ValueError(f"attributes records must all name the same attributes; found {sorted(names)}")


def collate(examples, specials, length, *, num_attributes: int = 0, **_) -> dict[str, np.ndarray]:
  batch = sft.collate_responses(examples, specials, length)
  attrs = np.zeros((len(examples), num_attributes), np.float32)
  for i, ex in enumerate(examples):
    if ex is not None:
      attrs[i] = ex["attributes"]
  batch["attributes"] = attrs
  return batch


KIND = base.register_kind(
    base.RecordKind(
        name="attributes", record_type=AttributeRecord, parse=parse,
        features={"response": base.INT_SEQ,
                  "attributes": base.FLOAT_SEQ}, encode=encode, length=sft.response_length,
        collate=collate, file_stem="attributes", options=("scale", "attribute_names"),
        check_records=check_records, metadata=lambda records, examples: {
            "attribute_names": [name for name, _ in records[0].attributes]}))
