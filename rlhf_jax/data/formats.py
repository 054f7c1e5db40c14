"""TRL's dataset formats, normalised into the record kinds' shapes; Parquet files.

Users' preference and SFT data is mostly in the shapes TRL documents (``docs/source/dataset_formats.md``
of huggingface/trl): *standard* (strings) or *conversational* (lists of ``{"role", "content"}``
messages), of the types

==========================  =====================================================================
TRL type                    record (each string field may instead be a list of messages)
==========================  =====================================================================
language modelling          ``{"text"}`` · ``{"messages"}``                      -> kind ``sft``
prompt-only                 ``{"prompt"}``                                       -> kind ``prompt``
prompt-completion           ``{"prompt", "completion"}``                         -> kind ``sft``
preference                  ``{"prompt", "chosen", "rejected"}``                 -> kind ``pairwise``
preference, implicit prompt ``{"chosen", "rejected"}`` (full texts / conversations)
unpaired preference         ``{"prompt", "completion", "label"}``                -> kind ``unpaired``
==========================  =====================================================================

:func:`normalize` turns one decoded record into the plain strings the kind's parser reads, before it
parses (so every kind's own validation and error messages apply afterwards):

* a conversational **prompt** is rendered with the chat template as TRL renders it
  (``ChatTemplate.render_prompt``: the generation prompt after a final user turn; a final assistant
  turn is continued);
* a conversational **completion** (``completion`` / ``chosen`` / ``rejected`` / ``response``, each
  item of ``responses``) becomes the text the template renders after that prompt
  (``ChatTemplate.continuation``, TRL's ``prompt_completion[len(prompt):]``) less one final EOS,
  which the dataset appends as an id;
* an **implicit prompt** (``chosen`` / ``rejected`` without ``prompt``) is their longest shared
  prefix, as TRL's ``extract_prompt``: of characters for strings (a space before the first
  difference goes to the completions), of whole messages for conversations;
* for ``sft``: ``completion`` is the ``response``; ``{"text"}`` is a response with an empty
  prompt; ``{"messages"}`` ending with an assistant turn is prompt + that turn (rendered
  with a checkpoint's Jinja template as above; with the built-in template the turn's content, as
  the ``sft`` kind always read it).

With the byte tokenizer's built-in template a record that was valid before normalises to the same
record (the datasets and fingerprints of existing runs do not change). A list is taken as messages
when its first item is an object (TRL's ``is_conversational``); anything else is left to the
kind, which names the field.

Parquet (``.parquet``, read with pyarrow, one record per row; list-of-struct columns are message
lists) is read by :func:`parquet_rows`; its errors name the file, the 0-based row (as pandas'
``iloc``) and the field: ``train.parquet: row 12: field 'chosen[1].content': expected ...``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

from rlhf_jax.data import tokenizers
from rlhf_jax.data.kinds import base

__all__ = ["normalize", "extract_prompt", "is_parquet", "parquet_rows", "RowContext"]

COMPLETION_FIELDS = ("completion", "chosen", "rejected", "response")
PARQUET_SUFFIXES = (".parquet", ".pq")


def is_messages(value: Any) -> bool:
  """TRL's ``is_conversational`` test on one field: a non-empty list whose first item is an object."""
  return isinstance(value, list) and bool(value) and isinstance(value[0], Mapping)


def _check_messages(ctx: base.ParseContext, value: Any, field: str) -> list[dict]:
  if not isinstance(value, list) or not value:
    raise ctx.error(field, "a non-empty list of {'role', 'content'} messages", value)
  out = []
  for i, message in enumerate(value):
    if not isinstance(message, Mapping):
      raise ctx.error(f"{field}[{i}]", "a message object {'role', 'content'}", message)
    role = message.get("role")
    if not isinstance(role, str) or not role:
      raise ctx.error(f"{field}[{i}].role", "a role string (system | user | assistant | ...)", role)
    content = message.get("content")
    if not isinstance(content, str):
      raise ctx.error(f"{field}[{i}].content", "a string (multimodal content blocks are not "
                      "supported)", base.Desc(f"{type(content).__name__} {base.short(content)}"))
    out.append(dict(message))
  return out


def _template(ctx: base.ParseContext):
  return ctx.options.chat_template


def _call(ctx: base.ParseContext, field: str, fn, *args) -> str:
  """A template call whose ``ValueError`` (a template's ``raise_exception``, a prompt that does not
  prefix the conversation) becomes a record error naming ``field``."""
  try:
    return fn(*args)
  except ValueError as e:
    raise ctx.error(field, f"messages the chat template can render ({e})") from None


def _render_prompt(ctx, messages: list, field: str) -> str:
  return _call(ctx, field, _template(ctx).render_prompt, messages)


def _continuation(ctx, prompt: list, completion: list, field: str) -> str:
  return _call(ctx, field, _template(ctx).continuation, prompt, completion)


def extract_prompt(chosen: Sequence, rejected: Sequence) -> tuple[Any, Any, Any]:
  """TRL's ``extract_prompt`` (``trl/data_utils.py``): ``(prompt, chosen, rejected)``.

  The prompt is the longest common prefix of ``chosen`` and ``rejected`` (characters of strings,
  items of message lists); for strings a space just before the first difference is left to the
  completions. As in TRL, when one side is a prefix of the other the split is at the last
  index of the shorter one. (TRL also reads ``chosen[-1]`` when the very first items differ, moving
  the split to the last character if that is a space; that slip is not reproduced.)
  """
  n = min(len(chosen), len(rejected))
  if n == 0:
    raise ValueError("chosen and rejected must both be non-empty to extract a shared prompt")
  idx = n - 1  # TRL's loop variable when no item differs
  for i in range(n):
    if chosen[i] != rejected[i]:
      idx = i
      if i > 0 and chosen[i - 1] == " ":
        idx = i - 1
      break
  return chosen[:idx], chosen[idx:], rejected[idx:]


def normalize(ctx: base.ParseContext, obj: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
  """``obj`` in the shape ``kind``'s parser reads (module docstring); ``obj`` itself if nothing
  needs changing."""
  conversational = any(
      is_messages(obj.get(k)) for k in ("prompt", "responses") + COMPLETION_FIELDS) or (
          kind == "sft" and "messages" in obj and "prompt" not in obj and "response" not in obj)
  implicit = "prompt" not in obj and "messages" not in obj and "chosen" in obj and \
      "rejected" in obj
  trl_sft = kind == "sft" and "response" not in obj and ("completion" in obj or "text" in obj)
  if not (conversational or implicit or trl_sft):
    return obj
  out = dict(obj)
  prompt_messages: list | None = None
  if implicit:
    chosen, rejected = obj["chosen"], obj["rejected"]
    if is_messages(chosen) != is_messages(rejected):
      raise ctx.error(
          "rejected", "the same format as 'chosen' (both strings or both message "
          "lists) to extract the shared prompt")
    if is_messages(chosen):
      chosen = _check_messages(ctx, chosen, "chosen")
      rejected = _check_messages(ctx, rejected, "rejected")
    elif not isinstance(chosen, str) or not isinstance(rejected, str):
      return obj  # the kind names the field that is not a string
    try:
      prompt, out["chosen"], out["rejected"] = extract_prompt(chosen, rejected)
    except ValueError as e:
      raise ctx.error("chosen", f"a completion sharing a prompt with 'rejected' ({e})") from None
    if is_messages(chosen):
      if not prompt:
        raise ctx.error(
            "chosen", "conversations sharing their first message(s) with 'rejected' "
            "(the implicit prompt is the shared leading messages)")
      prompt_messages = prompt
      out["prompt"] = _render_prompt(ctx, prompt, "chosen")
    else:
      out["prompt"] = prompt
  elif is_messages(obj.get("prompt")):
    prompt_messages = _check_messages(ctx, obj["prompt"], "prompt")
    out["prompt"] = _render_prompt(ctx, prompt_messages, "prompt")

  if kind == "sft" and "messages" in obj and "prompt" not in obj and "response" not in obj:
    messages = _check_messages(ctx, obj["messages"], "messages")
    last = len(messages) - 1
    if messages[last].get("role") != "assistant":
      raise ctx.error(f"messages[{last}]", "the last message to have role 'assistant'",
                      messages[last])
    if not messages[last]["content"].strip():
      raise ctx.error(f"messages[{last}].content", "a non-empty string", messages[last]["content"])
    out.pop("messages")
    # A lone assistant turn has an empty prompt under a checkpoint's template (which may index
    # messages[0]); the built-in template renders its generation prompt, as it always did.
    jinja = isinstance(_template(ctx), tokenizers.JinjaChatTemplate)
    out["prompt"] = "" if jinja and not last else _call(ctx, "messages",
                                                        _template(ctx).render, messages[:last],
                                                        True)
    out["response"] = _continuation(ctx, messages[:last], messages[last:], "messages")
    return out

  for field in COMPLETION_FIELDS:
    value = out.get(field)
    if is_messages(value):
      if prompt_messages is None and ("prompt" in obj or "messages" in obj):
        raise ctx.error(
            field, "a string: a conversational completion needs a conversational "
            "'prompt' (a list of messages) too", base.Desc("a list of messages"))
      completion = _check_messages(ctx, value, field)
      out[field] = _continuation(ctx, prompt_messages or [], completion, field)
  if is_messages(out.get("responses")) or (isinstance(out.get("responses"), list) and
                                           any(is_messages(r) for r in out["responses"])):
    responses = []
    for i, value in enumerate(out["responses"]):
      if is_messages(value):
        completion = _check_messages(ctx, value, f"responses[{i}]")
        value = _continuation(ctx, prompt_messages or [], completion, f"responses[{i}]")
      responses.append(value)
    out["responses"] = responses

  if trl_sft:
    if "completion" in obj:
      out["response"] = out.pop("completion")
      out.setdefault("prompt", "")
    else:
      text = obj["text"]
      if not isinstance(text, str):
        raise ctx.error("text", "a string (TRL's language-modelling format)",
                        base.Desc(f"{type(text).__name__} {base.short(text)}"))
      out.pop("text")
      out["prompt"], out["response"] = "", text
  return out


# ----------------------------------------------------------------------------------------------------
# Parquet
# ----------------------------------------------------------------------------------------------------


def is_parquet(path: str) -> bool:
  return str(path).lower().endswith(PARQUET_SUFFIXES)


class RowContext(base.ParseContext):
  """A ParseContext whose errors read ``FILE: row N: ...`` (N = 0-based Parquet row)."""

  def error(self, field: str | None, expected: str,
            got: Any = dataclasses.MISSING) -> base.RecordError:
    err = base.RecordError(self.path, self.line, field, expected, got)
    err.args = (str(err).replace(f"{self.path}:{self.line}:", f"{self.path}: row {self.line}:", 1),)
    return err


def parquet_rows(path: str, batch_rows: int = 1024) -> Iterator[tuple[int, dict]]:
  """``(row index, record dict)`` of a Parquet file, read a batch of rows at a time.

  Nested columns come back as Python lists / dicts (a ``list<struct<role, content>>`` column is
  a message list), booleans as ``bool``, nulls as ``None`` (dropped, so a missing value reads as a
  missing field, as in JSON Lines).
  """
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("reading Parquet needs the 'pyarrow' package: pip install pyarrow") from e
  try:
    file = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses
    raise base.RecordError(path, 0, None, "a readable Parquet file",
                           base.Desc(f"{type(e).__name__}: {e}")) from None
  row = 0
  for batch in file.iter_batches(batch_size=batch_rows):
    for record in batch.to_pylist():
      yield row, {k: v for k, v in record.items() if v is not None}
      row += 1
