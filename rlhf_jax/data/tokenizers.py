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
import datetime
import functools
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
    "JinjaChatTemplate",
    "ChatTemplateError",
    "load_tokenizer",
    "check_token_ids",
    "check_vocab",]

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

  def render_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
    """A prompt: the conversation followed by the generation prompt."""
    return self.render(messages, add_generation_prompt=True)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def continuation(self, prompt_messages: Sequence[Mapping[str, Any]],
                   completion_messages: Sequence[Mapping[str, Any]]) -> str:
    """The response text of ``completion_messages`` after ``prompt_messages``.

    One assistant message is its ``content`` (what the ``sft`` kind has always trained on); longer
    completions are the rendering of the whole conversation past the rendered prompt.
    """
    if len(completion_messages) == 1 and completion_messages[0].get("role") == "assistant":
      content = completion_messages[0].get("content")
      if not isinstance(content, str):
        raise ValueError(f"messages[0].content must be a string, got {type(content).__name__}")
      return content
    prompt = self.render(prompt_messages, add_generation_prompt=True)
    full = self.render(list(prompt_messages) + list(completion_messages))
    if not full.startswith(prompt):
      raise ValueError("the rendering of prompt + completion does not start with the rendering of "
                       "the prompt followed by the generation prompt")
    return full[len(prompt):]


# ----------------------------------------------------------------------------------------------------
# Jinja chat templates (Hugging Face tokenizer_config.json / chat_template.jinja)
# ----------------------------------------------------------------------------------------------------

# The names transformers passes to a template besides ``messages`` / ``add_generation_prompt``
# (``PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES``: its ``special_tokens_map``).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")


class ChatTemplateError(ValueError):
  """A chat template that does not compile, or that refused a conversation (``raise_exception``)."""


@functools.lru_cache(maxsize=32)
def _compile_jinja(template: str, source: str):
  """The template compiled in the environment transformers uses (``chat_template_utils``).

  An immutable sandbox with ``trim_blocks`` / ``lstrip_blocks`` and the ``loopcontrols``
  extension, and transformers' globals: ``raise_exception``, ``strftime_now``, a ``tojson`` that
  does not HTML-escape (Jinja's own does), ``dict`` and a ``namespace`` without underscore names.
  transformers' ``{% generation %}`` tag (assistant-token masks) renders its body unchanged here.
  """
  try:
    import jinja2  # optional extra
    import jinja2.ext
    import jinja2.sandbox
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("chat templates need the 'jinja2' package: pip install 'rlhf_jax[hf]'") from e

  class _Generation(jinja2.ext.Extension):
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  class _Dict:

    def __call__(self, *args, **kwargs):
      return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
      return dict.fromkeys(*args, **kwargs)

  class _Namespace(jinja2.utils.Namespace):

    def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
      self, args = args[0], args[1:]
      attrs = dict(*args, **kwargs)
      for name in attrs:
        _Namespace.check(name)
      jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
      _Namespace.check(name)
      jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def check(name):
      if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates cannot store underscore-prefixed attributes, got {name!r}")

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=_Dict(),
                     namespace=_Namespace)
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ChatTemplateError(
        f"{source}: the chat template does not compile: {e.message} (template line {e.lineno})"
    ) from None


def _plain(value: Any) -> Any:
  """JSON-like data for the template: dicts / lists / scalars; ``None``-valued message keys dropped
  (transformers drops them: templates test ``'key' in message``, not ``message.key is none``)."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


@dataclasses.dataclass(frozen=True)
class JinjaChatTemplate:
  """A Hugging Face chat template (Jinja), rendered the way ``transformers`` renders it.

  :meth:`apply` is ``transformers.PreTrainedTokenizerBase.apply_chat_template(..., tokenize=False)``
  on the same files: the template sees ``messages``, ``add_generation_prompt``, the tokenizer's
  special-token strings (``bos_token``, ``eos_token``, ...) and any extra keyword. :meth:`render`
  is what the record readers use: the same text without a leading ``bos_token``, because the
  dataset writes ``[BOS] prompt response [EOS]`` as ids itself (so ``[BOS] + encode(render(m))``
  equals transformers' ids for ``m``, and BOS is never doubled).

  Attributes:
    template: the Jinja source.
    special_tokens: ``((name, string), ...)`` the template receives (``SPECIAL_TOKEN_NAMES``).
    source: where the template came from (named in errors).
  """

  template: str
  special_tokens: tuple[tuple[str, str], ...] = ()
  source: str = "<chat_template>"

  def __post_init__(self):
    if not isinstance(self.template, str) or not self.template.strip():
      raise ValueError(f"JinjaChatTemplate.template={self.template!r} is invalid; allowed: a "
                       "non-empty Jinja template string")
    object.__setattr__(self, "special_tokens",
                       tuple((str(k), str(v)) for k, v in self.special_tokens))
    unknown = [k for k, _ in self.special_tokens if k not in SPECIAL_TOKEN_NAMES]
    if unknown:
      raise ValueError(f"JinjaChatTemplate.special_tokens names {unknown}; allowed: "
                       f"{' | '.join(SPECIAL_TOKEN_NAMES)}")
    _compile_jinja(self.template, self.source)  # a syntax error fails here, at load

  def token(self, name: str) -> str:
    return dict(self.special_tokens).get(name, "")

  def apply(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
            continue_final_message: bool = False, **kwargs: Any) -> str:
    """The text transformers' ``apply_chat_template(messages, tokenize=False, ...)`` returns."""
    import jinja2  # pylint: disable=import-outside-toplevel
    if not isinstance(messages, (list, tuple)) or not messages:
      raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    chat = []
    for i, message in enumerate(messages):
      if not isinstance(message, Mapping):
        raise ValueError(
            f"messages[{i}] must be an object with 'role' and 'content', got {message!r}")
      chat.append({k: _plain(v) for k, v in message.items() if v is not None})
    if continue_final_message and add_generation_prompt:
      raise ValueError("continue_final_message and add_generation_prompt are exclusive")
    tag = "CONTINUE_FINAL_MESSAGE_TAG "
    final = ""
    if continue_final_message:
      final = chat[-1].get("content")
      if not isinstance(final, str):
        raise ValueError("continue_final_message: the final message has no string content")
      chat[-1]["content"] = final + tag
    variables = {**dict(self.special_tokens), **_plain(kwargs)}
    try:
      text = _compile_jinja(self.template,
                            self.source).render(messages=chat,
                                                add_generation_prompt=add_generation_prompt,
                                                tools=None, documents=None, **variables)
    except jinja2.exceptions.TemplateError as e:
      raise ChatTemplateError(f"{self.source}: the chat template refused the conversation: {e}") \
          from None
    if continue_final_message:
      # transformers' rule: cut at the tag; a template that trims content loses the trailing space.
      if final.strip() not in text or tag.strip() not in text:
        raise ChatTemplateError(f"{self.source}: continue_final_message: the final message does "
                                "not appear in the rendered chat")
      at = text.rindex(tag.strip())
      text = text[:at] if text[at:at + len(tag)] == tag else text[:at].rstrip()
    return text

  def render(self, messages: Sequence[Mapping[str, Any]],
             add_generation_prompt: bool = False) -> str:
    """:meth:`apply` without a leading ``bos_token`` (the dataset writes BOS as an id)."""
    text = self.apply(messages, add_generation_prompt=add_generation_prompt)
    bos = self.token("bos_token")
    return text[len(bos):] if bos and text.startswith(bos) else text

  def render_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
    """A prompt as TRL renders it: ending in a user turn, the generation prompt is added; ending
    in an assistant turn, that message is continued (``continue_final_message``)."""
    last = messages[-1].get("role") if messages and isinstance(messages[-1], Mapping) else None
    if last == "assistant":
      text = self.apply(messages, continue_final_message=True)
    else:
      text = self.apply(messages, add_generation_prompt=True)
    bos = self.token("bos_token")
    return text[len(bos):] if bos and text.startswith(bos) else text

  def continuation(self, prompt_messages: Sequence[Mapping[str, Any]],
                   completion_messages: Sequence[Mapping[str, Any]]) -> str:
    """The completion as TRL's ``apply_chat_template`` cuts it: the rendering of prompt +
    completion past the rendered prompt, less one final ``eos_token`` (and the whitespace after
    it), because the dataset appends EOS as an id. A turn end that is not EOS (Gemma's
    ``<end_of_turn>``) stays in the text: the model learns to emit it before EOS."""
    prompt = self.apply(prompt_messages, add_generation_prompt=True) if prompt_messages else ""
    full = self.apply(list(prompt_messages) + list(completion_messages))
    if not full.startswith(prompt):
      raise ChatTemplateError(
          f"{self.source}: the rendering of prompt + completion does not start with the rendering "
          "of the prompt followed by the generation prompt; this template cannot split a "
          f"conversation (prompt {prompt[-40:]!r}, full {full[:len(prompt)][-40:]!r})")
    text = full[len(prompt):]
    if not prompt_messages:
      bos = self.token("bos_token")
      text = text[len(bos):] if bos and text.startswith(bos) else text
    eos = self.token("eos_token")
    stripped = text.rstrip()
    if eos and stripped.endswith(eos):
      text = stripped[:-len(eos)]
    return text

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
  """A Hugging Face tokenizer read with the ``tokenizers`` package: a ``tokenizer.json`` file, or a
  checkpoint / tokenizer directory.

  A directory is read as ``transformers.AutoTokenizer.from_pretrained`` reads it (local files only):
  ``tokenizer.json``; ``tokenizer_config.json`` for the special tokens (``bos_token`` /
  ``eos_token`` / ``pad_token`` ..., strings or ``AddedToken`` objects) and the ``chat_template``
  (a string, or a list of named templates whose ``default`` is used), overridden by
  ``chat_template.jinja`` when present; ``special_tokens_map.json`` (which, as in transformers,
  overrides the config's specials when the config has no ``added_tokens_decoder``); and
  ``generation_config.json`` for the ids the config does not name (Qwen2 names no BOS token; its
  generation config's ``bos_token_id`` is ``<|endoftext|>``) and the stop ids (``stop_ids``).
  The chat template becomes a :class:`JinjaChatTemplate` rendered exactly as transformers does.

  A bare ``tokenizer.json`` finds its specials among common names (``<s>``, ``</s>``,
  ``<|endoftext|>``, ``<pad>`` ...). EOS is required; a missing BOS or PAD falls back to EOS
  (GPT-2 style), which is safe because masks, not ids, mark padding. Explicit ``bos_token=`` /
  ``eos_token=`` / ``pad_token=`` strings override both.

  ``vocab_size`` is one past the largest id (added tokens included), so ``check_token_ids``
  accepts every id the tokenizer can emit; :func:`check_vocab` refuses a model with fewer
  embedding rows.
  """

  kind = "hf"

  def __init__(
      self,
      path: str,
      *,
      bos_token: str | None = None,
      eos_token: str | None = None,
      pad_token: str | None = None,
      chat_template: ChatTemplate | JinjaChatTemplate | None = None,
  ):
    try:
      import tokenizers  # optional extra
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise ImportError(
          "HFTokenizer needs the 'tokenizers' package: pip install 'rlhf_jax[tokenizers]'") from e
    self.directory = path if os.path.isdir(path) else ""
    file = os.path.join(path, "tokenizer.json") if self.directory else path
    if not os.path.isfile(file):
      raise FileNotFoundError(f"HFTokenizer: no tokenizer.json at {file!r}" + (
          " (the directory has no tokenizer.json; only fast tokenizers are supported)" if self.
          directory else ""))
    self.path = file
    self._tok = tokenizers.Tokenizer.from_file(file)
    hashed = [file]
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(int(self._tok.get_vocab_size(with_added_tokens=True)),
                          max(vocab.values(), default=-1) + 1)
    self.stop_ids: tuple[int, ...] = ()
    named: dict[str, str] = {}
    template = None
    if self.directory:
      named, template, generation, files = _read_hf_directory(self.directory)
      hashed += files
    else:
      generation = {}
    self._file_hash = (_file_sha256(file) if len(hashed) == 1 else hashlib.sha256("".join(
        f"{os.path.basename(f)}:{_file_sha256(f)};" for f in hashed).encode()).hexdigest())
    gen_ids = {k: _ids(generation.get(f"{k}_token_id")) for k in ("bos", "eos", "pad")}
    if self.directory:
      self.eos_id = self._special("eos_token", eos_token or named.get("eos_token"), gen_ids["eos"],
                                  _EOS_CANDIDATES, fallback=None)
      self.bos_id = self._special("bos_token", bos_token or named.get("bos_token"), gen_ids["bos"],
                                  _BOS_CANDIDATES, fallback=self.eos_id)
      self.pad_id = self._special("pad_token", pad_token or named.get("pad_token"), gen_ids["pad"],
                                  _PAD_CANDIDATES, fallback=self.eos_id)
    else:  # a bare tokenizer.json: unchanged rules (the fingerprints of existing runs)
      self.eos_id = self._find_special("eos_token", eos_token, _EOS_CANDIDATES, fallback=None)
      self.bos_id = self._find_special("bos_token", bos_token, _BOS_CANDIDATES,
                                       fallback=self.eos_id)
      self.pad_id = self._find_special("pad_token", pad_token, _PAD_CANDIDATES,
                                       fallback=self.eos_id)
    self.stop_ids = tuple(dict.fromkeys([self.eos_id] + gen_ids["eos"]))
    for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token",
                                                                             pad_token)):
      if token is not None:
        named[name] = token
    self.special_tokens = {k: v for k, v in named.items() if k in SPECIAL_TOKEN_NAMES}
    if chat_template is None and template is not None:
      chat_template = JinjaChatTemplate(template[0],
                                        special_tokens=tuple(sorted(self.special_tokens.items())),
                                        source=template[1])
    self.chat_template = chat_template or ChatTemplate()

  def _special(self, name: str, token: str | None, generation_ids: list[int],
               candidates: Sequence[str], fallback: int | None) -> int:
    """A directory's special id: the named token, else generation_config.json's id, else a
    common name, else ``fallback``."""
    if token is not None:
      return self._find_special(name, token, candidates, fallback)
    if generation_ids:
      if not 0 <= generation_ids[0] < self.vocab_size:
        raise ValueError(f"{self.directory}/generation_config.json: {name}_id={generation_ids[0]} "
                         f"is outside the tokenizer's ids [0, {self.vocab_size})")
      return generation_ids[0]
    return self._find_special(name, None, candidates, fallback)

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

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = False, **kwargs: Any) -> str:
    """The checkpoint's template as transformers renders it (a ``ChatTemplate`` otherwise)."""
    if isinstance(self.chat_template, JinjaChatTemplate):
      return self.chat_template.apply(messages, add_generation_prompt=add_generation_prompt,
                                      **kwargs)
    return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    ids = self._as_int_list(ids)
    if self.directory:
      # A checkpoint pads its embedding past the tokenizer (Qwen2.5: 151936 rows, 151665 ids) and
      # a sampler can emit those rows: they decode to nothing, as in transformers.
      ids = [i for i in ids if i < self.vocab_size]
    check_token_ids(ids, self.vocab_size, where="HFTokenizer.decode")
    if skip_special_tokens:
      # The tokenizer's own notion of "special" may not include our BOS/EOS/PAD choices.
      ids = [i for i in ids if i not in self.special_ids]
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _ids(value: Any) -> list[int]:
  """``generation_config.json``'s ``*_token_id``: an int, a list of ints or null."""
  if value is None:
    return []
  values = value if isinstance(value, list) else [value]
  return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _token_string(value: Any) -> str | None:
  """A special token in tokenizer_config.json: a string or an ``AddedToken`` object."""
  if isinstance(value, Mapping):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


def _read_hf_directory(directory: str):
  """-> (special token strings, (chat template, source) or None, generation config, files read)."""
  files = []
  config_path = os.path.join(directory, "tokenizer_config.json")
  config = {}
  if os.path.isfile(config_path):
    config = _read_json(config_path)
    files.append(config_path)
  named = {k: _token_string(config.get(k)) for k in SPECIAL_TOKEN_NAMES}
  map_path = os.path.join(directory, "special_tokens_map.json")
  if os.path.isfile(map_path) and "added_tokens_decoder" not in config:
    files.append(map_path)
    for k, v in _read_json(map_path).items():
      if k in SPECIAL_TOKEN_NAMES and _token_string(v) is not None:
        named[k] = _token_string(v)
  named = {k: v for k, v in named.items() if v is not None}
  template = None
  raw = config.get("chat_template")
  if isinstance(raw, list):  # [{"name": ..., "template": ...}, ...]
    by_name = {t.get("name"): t.get("template") for t in raw if isinstance(t, Mapping)}
    if "default" not in by_name:
      raise ValueError(f"{config_path}: chat_template lists the templates {sorted(by_name)} but no "
                       "'default'; allowed: a string, or a list with a 'default' template")
    raw = by_name["default"]
  if raw is not None:
    if not isinstance(raw, str):
      raise ValueError(f"{config_path}: chat_template must be a string or a list of "
                       f"{{'name', 'template'}}, got {type(raw).__name__}")
    template = (raw, f"{config_path} chat_template")
  jinja_path = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(jinja_path):  # transformers: the .jinja file wins over the config's string
    with open(jinja_path, encoding="utf-8") as f:
      template = (f.read(), jinja_path)
    files.append(jinja_path)
  generation_path = os.path.join(directory, "generation_config.json")
  generation = {}
  if os.path.isfile(generation_path):
    generation = _read_json(generation_path)
    files.append(generation_path)
  return named, template, generation, files


def check_vocab(tokenizer: Tokenizer, embedding_rows: int, where: str = "the model") -> None:
  """Refuses a tokenizer that can emit an id ``>= embedding_rows`` (XLA would clamp it silently:
  the token would train and score on another token's embedding). Fewer tokenizer ids than rows is
  fine (checkpoints pad their embeddings to a multiple of 64 or 128)."""
  if tokenizer.vocab_size > embedding_rows:
    raise TokenIdError(
        f"the tokenizer {tokenizer!r} has ids up to {tokenizer.vocab_size - 1} but {where} has "
        f"{embedding_rows} embedding rows (vocab_size); allowed: a tokenizer whose ids fit the "
        "embedding, e.g. the checkpoint's own")


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
    * ``"hf:PATH"`` (a ``tokenizer.json`` or a checkpoint directory) or a path ending in ``.json``:
      :class:`HFTokenizer`.
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
  if spec.endswith(".json") or os.path.isdir(spec):
    return HFTokenizer(spec, **kwargs)
  if spec.endswith(".model"):
    return SentencePieceTokenizer(spec, **kwargs)
  raise ValueError(
      f"load_tokenizer: unknown spec {spec!r}; expected 'byte', 'hf:PATH', 'sentencepiece:PATH', "
      "a path ending in .json (tokenizer.json) or .model (SentencePiece)")
