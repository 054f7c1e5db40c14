"""What a record kind is, and the registry that maps a kind's name to it.

A kind is one :class:`RecordKind`: how a JSON object becomes a validated record (``parse``), which
arrays a tokenised example stores (``features``), how a record becomes those arrays (``encode``),
how long its padded sequences are (``length``) and how examples become a batch (``collate``), plus
optional hooks (a filter predicate, a cross-record check, extra dataset metadata). Every reader and
writer in :mod:`rlhf_jax.data` dispatches through :func:`get_kind`; a new kind is one module that
builds a :class:`RecordKind` and calls :func:`register_kind` (and one import line in
``rlhf_jax/data/kinds/__init__.py`` for the built-in ones).

Batch layout shared by every kind (``B`` examples, ``R`` sequence rows per example):

* example-level arrays have leading dimension ``B`` (``valid``, ``index``, ``scores``, ...);
* sequence arrays (``tokens`` / ``mask`` / ``loss_mask``) have leading dimension ``B·R``, **example
  major**: the rows of example ``b`` are ``b·R .. b·R + R - 1``.

Example-major rows are what make a global batch the plain concatenation of the hosts' slices
(``parallel.shard_batch`` on several processes), so a pair's two rows or a list's K rows never end
up on different sides of a host boundary; :func:`take_examples` selects examples of any kind.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rlhf_jax.data.tokenizers import ChatTemplate, check_token_ids

__all__ = [
    "RecordError",
    "ParseContext",
    "ParseOptions",
    "Encoder",
    "RecordKind",
    "register_kind",
    "get_kind",
    "kind_names",
    "pack_sequences",
    "left_pad_prompts",
    "take_examples",
    "INT_SEQ",
    "FLOAT_SEQ",
    "FLOAT_SCALAR",]

# Feature specs: (shape, dtype); ``None`` in a shape is a ragged axis.
INT_SEQ = ((None,), np.int32)
FLOAT_SEQ = ((None,), np.float32)
FLOAT_SCALAR = ((), np.float32)


class RecordError(ValueError):
  """A malformed record. ``str(e)`` reads ``FILE:LINE: field 'F': expected X, got Y``."""

  def __init__(self, path: str, line: int, field: str | None, expected: str,
               got: Any = dataclasses.MISSING):
    self.path, self.line, self.field, self.expected = path, line, field, expected
    where = f"{path}:{line}"
    what = f"field '{field}': " if field else ""
    got_str = "" if got is dataclasses.MISSING else f", got {short(got)}"
    super().__init__(f"{where}: {what}expected {expected}{got_str}")


class Desc(str):
  """A description of the offending value (printed as is, not repr'd)."""


def short(value: Any, limit: int = 60) -> str:
  text = str(value) if isinstance(value, Desc) else repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class ParseOptions:
  """Reader options; a kind uses those it names in ``RecordKind.options`` and ignores the rest.

  Attributes:
    chat_template: renders ``messages`` lists into prompts.
    scale: ``(low, high)`` rating / attribute range; values outside it are errors.
    attribute_names: attributes every record must have.
    max_candidates: keep the first ``max_candidates`` responses of a ranked list (0 = all).
  """

  chat_template: ChatTemplate = ChatTemplate()
  scale: tuple[float, float] | None = None
  attribute_names: tuple[str, ...] | None = None
  max_candidates: int = 0

  def __post_init__(self):
    if self.scale is not None:
      scale = tuple(self.scale)
      if len(scale) != 2 or not float(scale[0]) < float(scale[1]):
        raise ValueError(f"scale={self.scale!r}; expected (low, high) with low < high")
      object.__setattr__(self, "scale", (float(scale[0]), float(scale[1])))
    if self.attribute_names is not None:
      object.__setattr__(self, "attribute_names", tuple(self.attribute_names))
    if isinstance(self.max_candidates,
                  bool) or not isinstance(self.max_candidates, int) or (self.max_candidates < 0 or
                                                                        self.max_candidates == 1):
      raise ValueError(f"max_candidates={self.max_candidates!r}; expected 0 (all) or an int >= 2")


class ParseContext:
  """Location of the record being parsed (for error messages) and the field readers."""

  def __init__(self, path: str, line: int, options: ParseOptions = ParseOptions()):
    self.path, self.line, self.options = path, line, options

  def error(self, field: str | None, expected: str, got: Any = dataclasses.MISSING) -> RecordError:
    return RecordError(self.path, self.line, field, expected, got)

  def get(self, obj: Mapping[str, Any], field: str, *, display: str | None = None) -> Any:
    if field not in obj:
      raise self.error(display or field, "a value (the field is missing)")
    return obj[field]

  def string(self, obj: Mapping[str, Any], field: str, *, non_empty: bool,
             display: str | None = None) -> str:
    name = display or field
    return self.check_string(self.get(obj, field, display=name), name, non_empty=non_empty)

  def check_string(self, value: Any, name: str, *, non_empty: bool) -> str:
    if not isinstance(value, str):
      raise self.error(name, "a string", Desc(f"{type(value).__name__} {short(value)}"))
    if non_empty and not value.strip():
      raise self.error(name, "a non-empty string", value)
    return value

  def number(self, value: Any, field: str) -> float:
    if value is None:
      raise self.error(field, "a number (it is missing / null)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise self.error(field, "a number", Desc(f"{type(value).__name__} {short(value)}"))
    if not math.isfinite(value):
      raise self.error(field, "a finite number", value)
    return float(value)

  def in_scale(self, value: float, field: str, what: str = "a value") -> float:
    scale = self.options.scale
    if scale is not None and not scale[0] <= value <= scale[1]:
      raise self.error(field, f"{what} within the declared scale [{scale[0]}, {scale[1]}]", value)
    return value

  def render(self, messages: Any, add_generation_prompt: bool) -> str:
    if not isinstance(messages, list):
      raise self.error("messages", "a list of {'role', 'content'} objects", messages)
    try:
      return self.options.chat_template.render(messages,
                                               add_generation_prompt=add_generation_prompt)
    except ValueError as e:
      raise self.error("messages", f"valid chat messages ({e})") from None

  def prompt(self, obj: Mapping[str, Any]) -> str:
    """``prompt``, or ``messages`` rendered with the opening of an assistant turn."""
    if "prompt" in obj:
      return self.string(obj, "prompt", non_empty=False)
    if "messages" in obj:
      return self.render(obj["messages"], add_generation_prompt=True)
    raise self.error("prompt", "a string (or a 'messages' list); the field is missing")


class Drop(Exception):
  """A record exceeded a limit under the ``"drop"`` truncation policy."""


def truncate(ids: list[int], limit: int, mode: str, what: str) -> tuple[list[int], bool]:
  if len(ids) <= limit:
    return ids, False
  if mode == "left":
    return ids[len(ids) - limit:], True
  if mode == "right":
    return ids[:limit], True
  if mode == "drop":
    raise Drop()
  raise ValueError(f"{what} has {len(ids)} tokens > limit {limit} and truncation is 'error'")


class Encoder:
  """Tokenises a record's responses with the response limit and truncation policy, counting cuts.

  ``where`` names the current record in errors (set by the dataset writer per record).
  """

  def __init__(self, tokenizer: Any, response_limit: int, response_truncation: str):
    self.tokenizer, self.limit, self.mode = tokenizer, response_limit, response_truncation
    self.truncated = 0
    self.where = "<record>"

  def response(self, text: str, name: str) -> np.ndarray:
    ids, cut = truncate(self.tokenizer.encode(text), self.limit, self.mode, f"{self.where} {name}")
    self.truncated += cut
    check_token_ids(ids, self.tokenizer.vocab_size, where=f"{self.where} {name}")
    return np.asarray(ids, np.int32)


def _pack(prompt: np.ndarray, response: np.ndarray, bos: int, eos: int, length: int, pad: int):
  """``[BOS] prompt response [EOS]`` right-padded to ``length`` -> tokens, mask, loss_mask rows."""
  n_prompt, n = 1 + len(prompt), 2 + len(prompt) + len(response)
  tokens = np.full(length, pad, np.int32)
  tokens[0] = bos
  tokens[1:n_prompt] = prompt
  tokens[n_prompt:n - 1] = response
  tokens[n - 1] = eos
  mask = np.zeros(length, np.int32)
  mask[:n] = 1
  loss_mask = np.zeros(length, np.int32)
  loss_mask[n_prompt:n] = 1
  return tokens, mask, loss_mask


def pack_sequences(rows: Sequence[tuple[np.ndarray, np.ndarray] | None],
                   specials: Mapping[str, int], length: int) -> dict[str, np.ndarray]:
  """``tokens`` / ``mask`` / ``loss_mask`` ``[len(rows), length]``; ``None`` rows are all padding."""
  tokens = np.full((len(rows), length), specials["pad_id"], np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  loss_mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    if row is not None:
      tokens[i], mask[i], loss_mask[i] = _pack(row[0], row[1], specials["bos_id"],
                                               specials["eos_id"], length, specials["pad_id"])
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def left_pad_prompts(prompts: Sequence[Sequence[int]], *, pad_id: int,
                     length: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads id lists to ``[B, length]``; returns ``(prompt_tokens, prompt_mask)`` int32."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, ids in enumerate(prompts):
    if len(ids) > length:
      raise ValueError(f"prompt {i} has {len(ids)} tokens > length {length}")
    if len(ids):
      tokens[i, length - len(ids):] = ids
      mask[i, length - len(ids):] = 1
  return tokens, mask


def take_examples(batch: Mapping[str, np.ndarray],
                  keep: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
  """The examples ``keep`` of a batch of any kind (module docstring: rows are example major).

  An array whose leading dimension is ``R·B`` (``B = len(batch["valid"])``) is taken ``R`` rows
  per example. Batches concatenate along axis 0 as they are; this then drops e.g. filler rows.
  """
  keep = np.asarray(keep, np.int64)
  b = len(batch["valid"])
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    r = value.shape[0] // b
    if r * b != value.shape[0]:
      raise ValueError(f"take_examples: {key} has {value.shape[0]} rows, not a multiple of {b}")
    out[key] = value.reshape((b, r) + value.shape[1:])[keep].reshape((len(keep) * r,) +
                                                                     value.shape[1:])
  return out


@dataclasses.dataclass(frozen=True)
class RecordKind:
  """One record kind (module docstring).

  Attributes:
    name: the kind's name (``records.read_records(path, name)``, ``dataset.metadata["kind"]``).
    record_type: the frozen dataclass ``parse`` returns.
    parse: ``(ctx: ParseContext, obj: Mapping) -> record``; raise ``ctx.error(field, ...)``.
    features: ``{array name: (shape, dtype)}`` stored per example besides ``prompt``.
    encode: ``(record, enc: Encoder) -> {array name: np.ndarray}`` (the prompt is done already).
    length: ``(example) -> int`` length of the longest padded sequence ``[BOS] prompt resp [EOS]``.
    collate: ``(examples, specials, length, **sizes) -> batch`` with ``None`` for filler rows;
      ``sizes`` holds ``num_candidates`` / ``num_attributes`` from the dataset metadata.
    file_stem: file name stem of the kind in the synthetic task (``<stem>.jsonl``).
    options: the :class:`ParseOptions` fields this kind reads (others are ignored).
    informative: optional predicate; ``prepare_dataset(drop_uninformative=True)`` drops records
      for which it is False and counts them (``uninformative`` says why, for messages).
    check_records: optional ``(records) -> None`` check across records (raise ``ValueError``).
    metadata: optional ``(records, examples) -> dict`` extra dataset metadata.
    prompt_only: the sequences are prompts (left-padded for generation; bucketed by prompt length).
  """

  name: str
  record_type: type
  parse: Callable[..., Any]
  features: Mapping[str, tuple]
  encode: Callable[..., dict]
  length: Callable[[Mapping[str, np.ndarray]], int]
  collate: Callable[..., dict]
  file_stem: str
  options: tuple[str, ...] = ()
  informative: Callable[[Any], bool] | None = None
  uninformative: str = ""
  check_records: Callable[[Sequence[Any]], None] | None = None
  metadata: Callable[[Sequence[Any], Sequence[dict]], dict] | None = None
  prompt_only: bool = False


_REGISTRY: dict[str, RecordKind] = {}


def register_kind(kind: RecordKind, *, replace: bool = False) -> RecordKind:
  """Makes ``kind`` known to every reader / writer by its name; returns it."""
  if not isinstance(kind, RecordKind):
    raise TypeError(f"register_kind: expected a RecordKind, got {type(kind).__name__}")
  if kind.name in _REGISTRY and not replace and _REGISTRY[kind.name] is not kind:
    raise ValueError(f"record kind {kind.name!r} is already registered; pass replace=True")
  _REGISTRY[kind.name] = kind
  return kind


def kind_names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get_kind(name: str) -> RecordKind:
  """The registered kind ``name``; an unknown name lists the known ones."""
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(f"record kind={name!r}; expected one of {kind_names()}") from None
