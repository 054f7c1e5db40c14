"""``prompt``: ``{"prompt": str}`` (or ``messages``), prompts for on-policy generation.

Batch: ``prompt_tokens [B, P]`` / ``prompt_mask [B, P]``, **left**-padded ``[BOS] prompt`` (the
sampler's convention); ``P`` is the bucket of the longest prompt.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rlhf_jax.data.kinds import base


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  prompt: str


def parse(ctx: base.ParseContext, obj) -> PromptRecord:
  return PromptRecord(ctx.prompt(obj))


def collate(examples, specials, length, **_) -> dict[str, np.ndarray]:
  rows = [[specials["bos_id"]] + ex["prompt"].tolist() if ex is not None else [] for ex in examples]
  tokens, mask = base.left_pad_prompts(rows, pad_id=specials["pad_id"], length=length)
  return {"prompt_tokens": tokens, "prompt_mask": mask}


KIND = base.register_kind(
    base.RecordKind(name="prompt", record_type=PromptRecord, parse=parse, features={},
                    encode=lambda record, enc: {}, length=lambda ex: len(ex["prompt"]) + 1,
                    collate=collate, file_stem="prompts", prompt_only=True))
