"""JSON Lines record readers with validation that names the file, the line and the field.

One JSON object per line (blank lines are skipped; unknown keys are ignored so users can keep ids and
metadata next to the data). The shapes:

=============  ====================================================================================
kind           object
=============  ====================================================================================
``prompt``     ``{"prompt": str}`` (prompts for on-policy generation: PPO, RAFT, best-of-n)
``sft``        ``{"prompt": str, "response": str}``  or  ``{"messages": [... , {"role": "assistant", ...}]}``
``pairwise``   ``{"prompt": str, "chosen": str, "rejected": str}``
``ranked``     ``{"prompt": str, "responses": [str, ...], "scores": [num, ...]}`` (higher is better)
               or ``"ranks": [int, ...]`` (1 is best) instead of ``"scores"``; at least 2 responses
``rated``      ``{"prompt": str, "response": str, "rating": num}`` with the rating inside a declared scale
``attributes`` ``{"prompt": str, "response": str, "attributes": {name: num, ...}}``
=============  ====================================================================================

Chat: every kind accepts ``"messages"`` (a list of ``{"role", "content"}``) in place of ``"prompt"``; the
prompt becomes ``chat_template.render(messages, add_generation_prompt=True)``, i.e. the conversation so
far followed by the opening of an assistant turn. For ``sft`` a ``messages`` list may instead end with
the assistant turn to learn, which becomes the response.

Ranks are converted to scores as ``score = -rank`` so every :class:`RankedRecord` sorts higher-is-better.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterator, Mapping, Sequence

from rlhf_jax.data.tokenizers import ChatTemplate

__all__ = [
    "KINDS",
    "RecordError",
    "PromptRecord",
    "SFTRecord",
    "PairwiseRecord",
    "RankedRecord",
    "RatedRecord",
    "AttributeRecord",
    "iter_records",
    "read_records",
    "parse_record",
    "write_jsonl",
]

KINDS = ("prompt", "sft", "pairwise", "ranked", "rated", "attributes")


class RecordError(ValueError):
    """A malformed record. ``str(e)`` reads ``FILE:LINE: field 'F': expected X, got Y``."""

    def __init__(self, path: str, line: int, field: str | None, expected: str, got: Any = dataclasses.MISSING):
        self.path, self.line, self.field, self.expected = path, line, field, expected
        where = f"{path}:{line}"
        what = f"field '{field}': " if field else ""
        got_str = "" if got is dataclasses.MISSING else f", got {_short(got)}"
        super().__init__(f"{where}: {what}expected {expected}{got_str}")


class _Desc(str):
    """A description of the offending value (printed as is, not repr'd)."""


def _short(value: Any, limit: int = 60) -> str:
    text = str(value) if isinstance(value, _Desc) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    prompt: str


@dataclasses.dataclass(frozen=True)
class SFTRecord:
    prompt: str
    response: str


@dataclasses.dataclass(frozen=True)
class PairwiseRecord:
    prompt: str
    chosen: str
    rejected: str


@dataclasses.dataclass(frozen=True)
class RankedRecord:
    prompt: str
    responses: tuple[str, ...]
    scores: tuple[float, ...]  # higher is better (ranks r are stored as -r)


@dataclasses.dataclass(frozen=True)
class RatedRecord:
    prompt: str
    response: str
    rating: float


@dataclasses.dataclass(frozen=True)
class AttributeRecord:
    prompt: str
    response: str
    attributes: tuple[tuple[str, float], ...]  # sorted by name; dict(record.attributes) to look up

    def attribute(self, name: str) -> float:
        return dict(self.attributes)[name]


Record = PromptRecord | SFTRecord | PairwiseRecord | RankedRecord | RatedRecord | AttributeRecord


class _Ctx:
    """Location of the record being parsed, for error messages."""

    def __init__(self, path: str, line: int):
        self.path, self.line = path, line

    def error(self, field: str | None, expected: str, got: Any = dataclasses.MISSING) -> RecordError:
        return RecordError(self.path, self.line, field, expected, got)

    def get(self, obj: Mapping[str, Any], field: str, *, display: str | None = None) -> Any:
        if field not in obj:
            raise self.error(display or field, "a value (the field is missing)")
        return obj[field]

    def string(self, obj: Mapping[str, Any], field: str, *, non_empty: bool, display: str | None = None) -> str:
        name = display or field
        return self.check_string(self.get(obj, field, display=name), name, non_empty=non_empty)

    def check_string(self, value: Any, name: str, *, non_empty: bool) -> str:
        if not isinstance(value, str):
            raise self.error(name, "a string", _Desc(f"{type(value).__name__} {_short(value)}"))
        if non_empty and not value.strip():
            raise self.error(name, "a non-empty string", value)
        return value

    def number(self, value: Any, field: str) -> float:
        if value is None:
            raise self.error(field, "a number (it is missing / null)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(field, "a number", _Desc(f"{type(value).__name__} {_short(value)}"))
        if not math.isfinite(value):
            raise self.error(field, "a finite number", value)
        return float(value)


def _prompt(ctx: _Ctx, obj: Mapping[str, Any], template: ChatTemplate) -> str:
    if "prompt" in obj:
        return ctx.string(obj, "prompt", non_empty=False)
    if "messages" in obj:
        return _render(ctx, obj["messages"], template, add_generation_prompt=True)
    raise ctx.error("prompt", "a string (or a 'messages' list); the field is missing")


def _render(ctx: _Ctx, messages: Any, template: ChatTemplate, add_generation_prompt: bool) -> str:
    if not isinstance(messages, list):
        raise ctx.error("messages", "a list of {'role', 'content'} objects", messages)
    try:
        return template.render(messages, add_generation_prompt=add_generation_prompt)
    except ValueError as e:
        raise ctx.error("messages", f"valid chat messages ({e})") from None


def _parse_prompt(ctx: _Ctx, obj: Mapping[str, Any], template: ChatTemplate, **_) -> PromptRecord:
    return PromptRecord(_prompt(ctx, obj, template))


def _parse_sft(ctx: _Ctx, obj: Mapping[str, Any], template: ChatTemplate, **_) -> SFTRecord:
    if "response" not in obj and "messages" in obj and "prompt" not in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ctx.error("messages", "a non-empty list of {'role', 'content'} objects", messages)
        last = messages[-1]
        if not isinstance(last, Mapping) or last.get("role") != "assistant":
            raise ctx.error(f"messages[{len(messages) - 1}]", "the last message to have role 'assistant'", last)
        prompt = _render(ctx, messages[:-1], template, add_generation_prompt=True)
        response = ctx.string(last, "content", non_empty=True, display=f"messages[{len(messages) - 1}].content")
        return SFTRecord(prompt, response)
    return SFTRecord(_prompt(ctx, obj, template), ctx.string(obj, "response", non_empty=True))


def _parse_pairwise(ctx: _Ctx, obj: Mapping[str, Any], template: ChatTemplate, **_) -> PairwiseRecord:
    prompt = _prompt(ctx, obj, template)
    return PairwiseRecord(prompt, ctx.string(obj, "chosen", non_empty=True), ctx.string(obj, "rejected", non_empty=True))


def _parse_ranked(ctx: _Ctx, obj: Mapping[str, Any], template: ChatTemplate, **_) -> RankedRecord:
    prompt = _prompt(ctx, obj, template)
    responses = ctx.get(obj, "responses")
    if not isinstance(responses, list):
        raise ctx.error("responses", "a list of strings", responses)
    if len(responses) < 2:
        raise ctx.error("responses", "at least 2 responses to rank", _Desc(str(len(responses))))
    for i, response in enumerate(responses):
        ctx.check_string(response, f"responses[{i}]", non_empty=True)
    has_scores, has_ranks = "scores" in obj, "ranks" in obj
    if has_scores == has_ranks:
        raise ctx.error("scores", "exactly one of 'scores' (higher is better) or 'ranks' (1 is best)",
                        _Desc("both" if has_scores else "neither"))
    field = "scores" if has_scores else "ranks"
    values = obj[field]
    if not isinstance(values, list):
        raise ctx.error(field, "a list of numbers", values)
    if len(values) != len(responses):
        raise ctx.error(field, f"{len(responses)} entries, one per response", _Desc(str(len(values))))
    if has_scores:
        scores = tuple(ctx.number(v, f"scores[{i}]") for i, v in enumerate(values))
    else:
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ctx.error(f"ranks[{i}]", "an integer >= 1 (1 is best)", v)
        scores = tuple(-float(v) for v in values)
    return RankedRecord(prompt, tuple(responses), scores)


def _parse_rated(ctx: _Ctx, obj: Mapping[str, Any], template: ChatTemplate, *, scale=None, **_) -> RatedRecord:
    prompt = _prompt(ctx, obj, template)
    response = ctx.string(obj, "response", non_empty=True)
    rating = ctx.number(ctx.get(obj, "rating"), "rating")
    if scale is not None and not scale[0] <= rating <= scale[1]:
        raise ctx.error("rating", f"a rating within the declared scale [{scale[0]}, {scale[1]}]", rating)
    return RatedRecord(prompt, response, rating)


def _parse_attributes(
    ctx: _Ctx, obj: Mapping[str, Any], template: ChatTemplate, *, scale=None, attribute_names=None, **_
) -> AttributeRecord:
    prompt = _prompt(ctx, obj, template)
    response = ctx.string(obj, "response", non_empty=True)
    attributes = ctx.get(obj, "attributes")
    if not isinstance(attributes, Mapping) or not attributes:
        raise ctx.error("attributes", "a non-empty object {name: number}", attributes)
    if attribute_names is not None:
        missing = [n for n in attribute_names if n not in attributes]
        if missing:
            raise ctx.error(f"attributes.{missing[0]}", f"a value for every attribute in {list(attribute_names)}")
    values = {}
    for name, value in attributes.items():
        values[name] = ctx.number(value, f"attributes.{name}")
        if scale is not None and not scale[0] <= values[name] <= scale[1]:
            raise ctx.error(f"attributes.{name}", f"a value within the declared scale [{scale[0]}, {scale[1]}]", value)
    return AttributeRecord(prompt, response, tuple(sorted(values.items())))


_PARSERS = {
    "prompt": _parse_prompt,
    "sft": _parse_sft,
    "pairwise": _parse_pairwise,
    "ranked": _parse_ranked,
    "rated": _parse_rated,
    "attributes": _parse_attributes,
}


def _check_options(kind: str, scale: Sequence[float] | None) -> tuple[float, float] | None:
    if kind not in _PARSERS:
        raise ValueError(f"record kind={kind!r}; expected one of {KINDS}")
    if scale is None:
        return None
    if len(scale) != 2 or not float(scale[0]) < float(scale[1]):
        raise ValueError(f"scale={scale!r}; expected (low, high) with low < high")
    return float(scale[0]), float(scale[1])


def parse_record(
    obj: Any,
    kind: str,
    *,
    path: str = "<record>",
    line: int = 0,
    chat_template: ChatTemplate | None = None,
    scale: Sequence[float] | None = None,
    attribute_names: Sequence[str] | None = None,
) -> Record:
    """Validates one decoded JSON object as a ``kind`` record (see the module docstring)."""
    scale = _check_options(kind, scale)
    ctx = _Ctx(path, line)
    if not isinstance(obj, Mapping):
        raise ctx.error(None, "a JSON object per line", _Desc(type(obj).__name__))
    return _PARSERS[kind](ctx, obj, chat_template or ChatTemplate(), scale=scale, attribute_names=attribute_names)


def iter_records(
    path: str,
    kind: str,
    *,
    chat_template: ChatTemplate | None = None,
    scale: Sequence[float] | None = None,
    attribute_names: Sequence[str] | None = None,
) -> Iterator[Record]:
    """Yields validated records from a JSONL file; raises :class:`RecordError` at the first bad line.

    ``scale=(low, high)`` declares the rating scale (``rated``) or the attribute value range
    (``attributes``); values outside it are errors. ``attribute_names`` requires those attributes.
    """
    scale = _check_options(kind, scale)
    template = chat_template or ChatTemplate()
    parser = _PARSERS[kind]
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            ctx = _Ctx(path, line_no)
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ctx.error(None, f"valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, Mapping):
                raise ctx.error(None, "a JSON object per line", _Desc(type(obj).__name__))
            yield parser(ctx, obj, template, scale=scale, attribute_names=attribute_names)


def read_records(path: str, kind: str, **kwargs) -> list[Record]:
    """All records of a JSONL file as a list (see :func:`iter_records`); an empty file is an error."""
    records = list(iter_records(path, kind, **kwargs))
    if not records:
        raise RecordError(path, 0, None, f"at least one {kind} record", _Desc("an empty file"))
    return records


def write_jsonl(path: str, rows: Sequence[Mapping[str, Any]] | Iterator[Mapping[str, Any]]) -> int:
    """Writes dicts (or record dataclasses) as JSON Lines atomically (temp file + rename); returns the count."""
    tmp = f"{path}.tmp-{os.getpid()}"
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            if dataclasses.is_dataclass(row):
                row = dataclasses.asdict(row)
                if "attributes" in row:
                    row["attributes"] = dict(row["attributes"])
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count
