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

TRL's dataset formats (conversational ``prompt`` / ``chosen`` / ``rejected`` / ``completion``,
implicit prompts, prompt-completion, ``text``) and Parquet files (``.parquet``, one record a row)
are read too: :mod:`rlhf_jax.data.formats` normalises each record into its kind's shape first.

Ranks are converted to scores as ``score = -rank`` so every :class:`RankedRecord` sorts higher-is-better.

Each kind is a module of :mod:`rlhf_jax.data.kinds` (its parser, features, encoder, collator); this
module reads files and dispatches by name, so a registered new kind is read here too.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Iterator, Mapping, Sequence

from rlhf_jax import fileio
from rlhf_jax.data import formats
from rlhf_jax.data import kinds as kinds_lib
from rlhf_jax.data.kinds import base
from rlhf_jax.data.kinds.attributes import AttributeRecord
from rlhf_jax.data.kinds.pairwise import PairwiseRecord
from rlhf_jax.data.kinds.prompt import PromptRecord
from rlhf_jax.data.kinds.ranked import RankedRecord
from rlhf_jax.data.kinds.rated import RatedRecord
from rlhf_jax.data.kinds.sft import SFTRecord
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
    "jsonl_lines",
    "read_records",
    "parse_record",
    "write_jsonl",]

KINDS = kinds_lib.kind_names()  # the built-in kinds; kinds.kind_names() includes registered ones
RecordError = base.RecordError

Record = PromptRecord | SFTRecord | PairwiseRecord | RankedRecord | RatedRecord | AttributeRecord


def _options(kind: str, chat_template: ChatTemplate | None, scale: Sequence[float] | None,
             attribute_names: Sequence[str] | None,
             max_candidates: int) -> tuple[kinds_lib.RecordKind, base.ParseOptions]:
  spec = kinds_lib.get_kind(kind)
  options = base.ParseOptions(chat_template=chat_template or ChatTemplate(),
                              scale=tuple(scale) if scale is not None else None,
                              attribute_names=attribute_names, max_candidates=max_candidates)
  return spec, options


def parse_record(
    obj: Any,
    kind: str,
    *,
    path: str = "<record>",
    line: int = 0,
    chat_template: ChatTemplate | None = None,
    scale: Sequence[float] | None = None,
    attribute_names: Sequence[str] | None = None,
    max_candidates: int = 0,
) -> Record:
  """Validates one decoded JSON object as a ``kind`` record (see the module docstring)."""
  spec, options = _options(kind, chat_template, scale, attribute_names, max_candidates)
  ctx = base.ParseContext(path, line, options)
  if not isinstance(obj, Mapping):
    raise ctx.error(None, "a JSON object per line", base.Desc(type(obj).__name__))
  return spec.parse(ctx, formats.normalize(ctx, obj, kind))


def iter_records(
    path: str,
    kind: str,
    *,
    chat_template: ChatTemplate | None = None,
    scale: Sequence[float] | None = None,
    attribute_names: Sequence[str] | None = None,
    max_candidates: int = 0,
) -> Iterator[Record]:
  """Yields validated records from a JSONL file; raises :class:`RecordError` at the first bad line.

  ``scale=(low, high)`` declares the rating scale (``rated``) or the attribute value range
  (``attributes``); values outside it are errors. ``attribute_names`` requires those attributes.
  ``max_candidates`` keeps the first that many responses of each ``ranked`` list (0 = all).
  """
  spec, options = _options(kind, chat_template, scale, attribute_names, max_candidates)
  if formats.is_parquet(path):  # one record a row (data.formats: errors name the row)
    for row, obj in formats.parquet_rows(path):
      ctx = formats.RowContext(path, row, options)
      yield spec.parse(ctx, formats.normalize(ctx, obj, kind))
    return
  for line_no, text in jsonl_lines(path):
    ctx = base.ParseContext(path, line_no, options)
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      raise ctx.error(None, f"valid JSON ({e.msg} at column {e.colno})") from None
    if "\\u" in text:  # an escaped lone surrogate decodes, then fails every later encode
      _check_surrogates(ctx, obj)
    if not isinstance(obj, Mapping):
      raise ctx.error(None, "a JSON object per line", base.Desc(type(obj).__name__))
    yield spec.parse(ctx, formats.normalize(ctx, obj, kind))  # TRL's formats -> the kind's


def _encoding_hint(head: bytes) -> str:
  if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head[:200].count(b"\x00") > 10:
    return " (the file looks UTF-16: re-save it as UTF-8)"
  return " (re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`)"


def jsonl_lines(path: str) -> Iterator[tuple[int, str]]:
  """``(line number, text)`` of the non-blank lines of a UTF-8 file (a UTF-8 BOM is skipped).

  Raises:
    RecordError: a line is not valid UTF-8 (naming the file, the line and the byte column, and a
      hint for UTF-16 / Latin-1 files), instead of a bare ``UnicodeDecodeError`` at a buffer offset.
  """
  with fileio.open_file(path, "rb") as f:  # a local path or a URL (gs://...)
    head = f.read(4096)
    f.seek(0)
    for line_no, raw in enumerate(f, start=1):
      if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise RecordError(path, line_no, None, f"UTF-8 text{_encoding_hint(head)}",
                          base.Desc(f"byte 0x{raw[e.start]:02x} at column {e.start + 1}")) from None
      if text.strip():
        yield line_no, text


def _check_surrogates(ctx: base.ParseContext, obj: Any) -> None:
  try:
    json.dumps(obj, ensure_ascii=False).encode("utf-8")
  except UnicodeEncodeError as e:
    raise ctx.error(
        None, "text without lone UTF-16 surrogates",
        base.Desc(f"the escape of a lone surrogate {e.object[e.start:e.end]!a}")) from None


def read_records(path: str, kind: str, **kwargs) -> list[Record]:
  """All records of a JSONL file as a list (see :func:`iter_records`); an empty file is an error."""
  records = list(iter_records(path, kind, **kwargs))
  if not records:
    raise RecordError(path, 0, None, f"at least one {kind} record", base.Desc("an empty file"))
  return records


def write_jsonl(path: str, rows: Sequence[Mapping[str, Any]] | Iterator[Mapping[str, Any]]) -> int:
  """Writes dicts (or record dataclasses) as JSON Lines atomically (temp file + rename; one object
  upload for a URL); returns the count."""
  remote = fileio.is_remote(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  count = 0
  with (io.StringIO() if remote else open(tmp, "w", encoding="utf-8")) as f:
    for row in rows:
      if dataclasses.is_dataclass(row):
        row = dataclasses.asdict(row)
        if "attributes" in row:
          row["attributes"] = dict(row["attributes"])
      f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
      count += 1
    if remote:
      fileio.atomic_write_text(path, f.getvalue())
  if not remote:
    os.replace(tmp, path)
  return count
