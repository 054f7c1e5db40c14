"""``sft``: ``{"prompt", "response"}``, or a ``messages`` list ending with the assistant turn.

Batch: ``tokens`` / ``mask`` (1 = real token) / ``loss_mask`` (1 = response token incl. EOS)
``[B, T]``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from rlhf_jax.data.kinds import base


@dataclasses.dataclass(frozen=True)
class SFTRecord:
  prompt: str
  response: str


def parse(ctx: base.ParseContext, obj) -> SFTRecord:
  if "response" not in obj and "messages" in obj and "prompt" not in obj:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
      raise ctx.error("messages", "a non-empty list of {'role', 'content'} objects", messages)
    last = messages[-1]
    if not isinstance(last, Mapping) or last.get("role") != "assistant":
      raise ctx.error(f"messages[{len(messages) - 1}]", "the last message to have role 'assistant'",
                      last)
    prompt = ctx.render(messages[:-1], add_generation_prompt=True)
    response = ctx.string(last, "content", non_empty=True,
                          display=f"messages[{len(messages) - 1}].content")
    return SFTRecord(prompt, response)
  return SFTRecord(ctx.prompt(obj), ctx.string(obj, "response", non_empty=True))


def encode_response(record, enc: base.Encoder) -> dict[str, np.ndarray]:
  return {"response": enc.response(record.response, "response")}


def response_length(ex) -> int:
  return len(ex["prompt"]) + len(ex["response"]) + 2


def collate_responses(examples, specials, length) -> dict[str, np.ndarray]:
  """The ``[B, T]`` sequences of one-response kinds (sft, rated, attributes, unpaired)."""
  rows = [(ex["prompt"], ex["response"]) if ex is not None else None for ex in examples]
  return base.pack_sequences(rows, specials, length)


def collate(examples, specials, length, **_) -> dict[str, np.ndarray]:
  return collate_responses(examples, specials, length)


KIND = base.register_kind(
    base.RecordKind(name="sft", record_type=SFTRecord, parse=parse,
                    features={"response": base.INT_SEQ}, encode=encode_response,
                    length=response_length, collate=collate, file_stem="sft"))
