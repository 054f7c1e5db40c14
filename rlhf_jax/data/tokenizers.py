"""Tokenizers behind one small interface: bytes (default), Hugging Face ``tokenizer.json``, SentencePiece.

Every tokenizer exposes

* ``encode(text) -> list[int]`` / ``decode(ids) -> str`` and their ``*_batch`` forms. ``encode`` never
  adds special tokens: the dataset code writes ``[BOS] prompt response [EOS]`` itself so that the
  position of every special token is explicit. ``decode`` drops special ids by default.
* ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``.
* ``fingerprint() -> str``: ``"<kind>-v<vocab>-<hash>"`` where the hash covers the kind, the vocabulary
  size, the special ids and the SHA-256 of the tokenizer file. Datasets and checkpoints store it and refuse
  a tokenizer whose fingerprint differs (the same text would map to different ids).
* ``apply_chat_template(messages, add_generation_prompt=False) -> str`` through a :class:`ChatTemplate`.

``check_token_ids`` guards the data boundary: XLA's gather clamps out-of-range indices silently, so an id
``>= vocab_size`` would otherwise train on the wrong embedding row without any error.

The ``tokenizers`` and ``sentencepiece`` packages are optional extras (``pip install rlhf_jax[tokenizers]``)
and are imported only when such a tokenizer is constructed. Everything is read from local paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = [
    "ChatTemplate",
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "TokenIdError",
    "load_tokenizer",
    "check_token_ids",]

# ----------------------------------------------------------------------------------------------------
# Chat template
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """Renders a ``messages`` list (``[{"role": ..., "content": ...}, ...]``) to one string.

    Each message is rendered with ``message_format.format(role=..., content=...)`` (or the per-role
    format in ``role_formats`` when given) and the results are concatenated. With
    ``add_generation_prompt=True`` the ``generation_prompt`` (the opening of an assistant turn) is
    appended, which is what a policy is conditioned on before it generates.

    The default is a small, tokenizer-agnostic template::

        <|user|>
        What is 2+2?
        <|assistant|>
        4

    A user-provided format is any ``str.format`` pattern with ``{role}`` and ``{content}`` fields, e.g.
    ``ChatTemplate(message_format="{role}: {content}\\n", generation_prompt="assistant: ")``.
    """

  message_format: str = "<|{role}|>\n{content}\n"
  generation_prompt: str = "<|assistant|>\n"
  role_formats: tuple[tuple[str, str], ...] = ()
  allowed_roles: tuple[str, ...] = ("system", "user", "assistant")

  def __post_init__(self):
    for name, fmt in (("message_format", self.message_format),) + tuple(
        (f"role_formats[{r!r}]", f) for r, f in self.role_formats):
      if "{content}" not in fmt:
        raise ValueError(f"ChatTemplate.{name}={fmt!r} must contain the field '{{content}}'")
      try:
        fmt.format(role="user", content="x")
      except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"ChatTemplate.{name}={fmt!r} is not a valid format string; only {{role}} and "
            f"{{content}} fields are allowed ({e!r})") from None
    if not self.allowed_roles:
      raise ValueError("ChatTemplate.allowed_roles must name at least one role")

  def render(self, messages: Sequence[Mapping[str, Any]],
             add_generation_prompt: bool = False) -> str:
    formats = dict(self.role_formats)
    parts = []
    for i, message in enumerate(messages):
      if not isinstance(message, Mapping):
        raise ValueError(
            f"messages[{i}] must be an object with 'role' and 'content', got {message!r}")
      role, content = message.get("role"), message.get("content")
      if role not in self.allowed_roles:
        raise ValueError(f"messages[{i}].role={role!r}; expected one of {self.allowed_roles}")
      if not isinstance(content, str):
        raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
      parts.append(formats.get(role, self.message_format).format(role=role, content=content))
    if add_generation_prompt:
      parts.append(self.generation_prompt)
    return "".join(parts)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------
# Protocol and shared helpers
# ----------------------------------------------------------------------------------------------------


@runtime_checkable
class Tokenizer(Protocol):
  """What the rest of the code relies on (see the module docstring)."""

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  chat_template: ChatTemplate

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    ...

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    ...

  def decode_batch(self, batch: Iterable[Iterable[int]],
                   skip_special_tokens: bool = True) -> list[str]:
    ...

  def fingerprint(self) -> str:
    ...

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = False) -> str:
    ...


class TokenIdError(ValueError):
  """A token id outside ``[0, vocab_size)`` reached the data boundary."""


def check_token_ids(ids: Any, vocab_size: int, where: str = "token ids") -> None:
  """Raises :class:`TokenIdError` if any id is outside ``[0, vocab_size)``.

    ``ids`` may be a list, a nested list or an array of any shape; the message names the first offending
    id, its index and ``where`` (e.g. ``"sft.jsonl:12 response"``).
    """
  arr = np.asarray(ids)
  if arr.size == 0:
    return
  if not np.issubdtype(arr.dtype, np.integer):
    raise TokenIdError(f"{where}: token ids must be integers, got dtype {arr.dtype}")
  bad = (arr < 0) | (arr >= vocab_size)
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    index_str = index[0] if len(index) == 1 else index
    raise TokenIdError(
        f"{where}: token id {int(arr[index])} at index {index_str} is outside the model vocabulary "
        f"[0, {vocab_size}) ({int(bad.sum())} offending id(s)); XLA would clamp it silently")


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


class _Base:
  """Batch helpers, fingerprint and chat template shared by the concrete tokenizers."""

  kind: str = ""
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  chat_template: ChatTemplate
  _file_hash: str = ""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode_batch(self, batch: Iterable[Iterable[int]],
                   skip_special_tokens: bool = True) -> list[str]:
    return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

  @property
  def special_ids(self) -> frozenset[int]:
    return frozenset((self.bos_id, self.eos_id, self.pad_id))

  def fingerprint(self) -> str:
    payload = json.dumps(
        {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "file_sha256": self._file_hash,},
        sort_keys=True,
    )
    return f"{self.kind}-v{self.vocab_size}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = False) -> str:
    return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)

  @staticmethod
  def _as_id_array(ids: Iterable[int]) -> np.ndarray:
    """A 1-D int64 array from a list, an iterator, a NumPy or a JAX array."""
    arr = np.asarray(ids) if hasattr(ids, "__array__") else np.asarray(list(ids), dtype=np.int64)
    if arr.ndim != 1:
      raise ValueError(
          f"decode expects a 1-D sequence of ids, got shape {arr.shape}; use decode_batch")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
      raise TokenIdError(f"decode expects integer ids, got dtype {arr.dtype}")
    return arr.astype(np.int64)

  def _as_int_list(self, ids: Iterable[int]) -> list[int]:
    return self._as_id_array(ids).tolist()

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})")


# ----------------------------------------------------------------------------------------------------
# Byte-level tokenizer (the default; no files)
# ----------------------------------------------------------------------------------------------------


class ByteTokenizer(_Base):
  """UTF-8 bytes plus three specials: ``PAD=0, BOS=1, EOS=2`` and byte ``b`` -> id ``b + 3``.

    ``vocab_size = 259``. Padding is id 0 so zero-initialised buffers are already padded. Decoding drops
    special ids and replaces invalid UTF-8 (a model can emit any byte sequence) with U+FFFD.
    """

  kind = "byte"
  OFFSET = 3

  def __init__(self, chat_template: ChatTemplate | None = None):
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
    self.vocab_size = 256 + self.OFFSET
    self.chat_template = chat_template or ChatTemplate()

  def encode(self, text: str) -> list[int]:
    return (np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) +
            self.OFFSET).tolist()

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    arr = self._as_id_array(ids)
    check_token_ids(arr, self.vocab_size, where="ByteTokenizer.decode")
    if skip_special_tokens:
      data = (arr[arr >= self.OFFSET] - self.OFFSET).astype(np.uint8).tobytes()
    else:
      names = {0: b"<pad>", 1: b"<bos>", 2: b"<eos>"}
      data = b"".join(
          names[i] if i < self.OFFSET else bytes((i - self.OFFSET,)) for i in arr.tolist())
    return data.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# ----------------------------------------------------------------------------------------------------

_BOS_CANDIDATES = ("<s>", "<bos>", "<|begin_of_text|>", "[BOS]", "<|bos|>", "<|startoftext|>")
_EOS_CANDIDATES = ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[EOS]", "<|eos|>",
                   "<|im_end|>")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


class HFTokenizer(_Base):
  """A Hugging Face ``tokenizer.json`` read with the ``tokenizers`` package.

    Special tokens are given by their strings (``bos_token`` / ``eos_token`` / ``pad_token``) or found
    among common names (``<s>``, ``</s>``, ``<|endoftext|>``, ``<pad>``, ``[PAD]`` ...). EOS is
    required; a missing BOS or PAD falls back to EOS (GPT-2 style), which is safe because masks, not
    ids, mark padding.
    """

  kind = "hf"

  def __init__(
      self,
      path: str,
      *,
      bos_token: str | None = None,
      eos_token: str | None = None,
      pad_token: str | None = None,
      chat_template: ChatTemplate | None = None,
  ):
    try:
      import tokenizers  # optional extra
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise ImportError(
          "HFTokenizer needs the 'tokenizers' package: pip install 'rlhf_jax[tokenizers]'") from e
    if not os.path.isfile(path):
      raise FileNotFoundError(f"HFTokenizer: no tokenizer.json at {path!r}")
    self.path = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    self._file_hash = _file_sha256(path)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.eos_id = self._find_special("eos_token", eos_token, _EOS_CANDIDATES, fallback=None)
    self.bos_id = self._find_special("bos_token", bos_token, _BOS_CANDIDATES, fallback=self.eos_id)
    self.pad_id = self._find_special("pad_token", pad_token, _PAD_CANDIDATES, fallback=self.eos_id)
    self.chat_template = chat_template or ChatTemplate()

  def _find_special(self, name: str, token: str | None, candidates: Sequence[str],
                    fallback: int | None) -> int:
    if token is not None:
      tid = self._tok.token_to_id(token)
      if tid is None:
        raise ValueError(f"HFTokenizer({self.path!r}): {name}={token!r} is not in the vocabulary")
      return int(tid)
    for cand in candidates:
      tid = self._tok.token_to_id(cand)
      if tid is not None:
        return int(tid)
    if fallback is None:
      raise ValueError(
          f"HFTokenizer({self.path!r}): no {name} found among {list(candidates)}; pass {name}=...")
    return fallback

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    ids = self._as_int_list(ids)
    check_token_ids(ids, self.vocab_size, where="HFTokenizer.decode")
    if skip_special_tokens:
      # The tokenizer's own notion of "special" may not include our BOS/EOS/PAD choices.
      ids = [i for i in ids if i not in self.special_ids]
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


# ----------------------------------------------------------------------------------------------------
# SentencePiece
# ----------------------------------------------------------------------------------------------------


class SentencePieceTokenizer(_Base):
  """A SentencePiece ``.model`` file. Special ids come from the model (``bos_id``/``eos_id``/
    ``pad_id``); a model trained without a pad (``pad_id == -1``, the SentencePiece default) or BOS
    uses EOS in its place. EOS is required."""

  kind = "sentencepiece"

  def __init__(self, path: str, *, chat_template: ChatTemplate | None = None):
    try:
      import sentencepiece  # optional extra
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise ImportError(
          "SentencePieceTokenizer needs the 'sentencepiece' package: pip install 'rlhf_jax[tokenizers]'"
      ) from e
    if not os.path.isfile(path):
      raise FileNotFoundError(f"SentencePieceTokenizer: no model file at {path!r}")
    self.path = path
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self._file_hash = _file_sha256(path)
    self.vocab_size = int(self._sp.get_piece_size())
    eos = int(self._sp.eos_id())
    if eos < 0:
      raise ValueError(f"SentencePieceTokenizer({path!r}): the model has no EOS piece (eos_id=-1)")
    self.eos_id = eos
    self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else eos
    self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else eos
    self.chat_template = chat_template or ChatTemplate()

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text, out_type=int))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(x) for x in self._sp.encode(list(texts), out_type=int)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    ids = self._as_int_list(ids)
    check_token_ids(ids, self.vocab_size, where="SentencePieceTokenizer.decode")
    if skip_special_tokens:
      ids = [i for i in ids if i not in self.special_ids]
    return self._sp.decode(ids)


# ----------------------------------------------------------------------------------------------------
# Loading from a spec
# ----------------------------------------------------------------------------------------------------


def load_tokenizer(spec: Any = "byte", **kwargs) -> Tokenizer:
  """Builds a tokenizer from a spec.

    * ``"byte"`` (or ``None`` / ``""``): :class:`ByteTokenizer`.
    * ``"hf:PATH"`` or a path ending in ``.json``: :class:`HFTokenizer`.
    * ``"sentencepiece:PATH"`` / ``"spm:PATH"`` or a path ending in ``.model``: :class:`SentencePieceTokenizer`.
    * An object that already satisfies :class:`Tokenizer` is returned unchanged.

    ``kwargs`` go to the constructor (``chat_template=``, and ``bos_token=`` etc. for HF).
    """
  if spec is not None and not isinstance(spec, str):
    if isinstance(spec, Tokenizer):
      return spec
    raise TypeError(
        f"load_tokenizer: spec must be a string or a Tokenizer, got {type(spec).__name__}")
  spec = (spec or "byte").strip()
  if spec in ("byte", "bytes"):
    return ByteTokenizer(**kwargs)
  kind, sep, rest = spec.partition(":")
  if sep and kind in ("hf", "huggingface"):
    return HFTokenizer(rest, **kwargs)
  if sep and kind in ("sentencepiece", "spm", "sp"):
    return SentencePieceTokenizer(rest, **kwargs)
  if spec.endswith(".json"):
    return HFTokenizer(spec, **kwargs)
  if spec.endswith(".model"):
    return SentencePieceTokenizer(spec, **kwargs)
  raise ValueError(
      f"load_tokenizer: unknown spec {spec!r}; expected 'byte', 'hf:PATH', 'sentencepiece:PATH', "
      "a path ending in .json (tokenizer.json) or .model (SentencePiece)")
