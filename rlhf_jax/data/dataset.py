"""Tokenised records written once to a TFDS ``array_record`` dataset and read back through a data source.

Writing (no TensorFlow needed)
------------------------------
``tfds.dataset_builders.store_as_tfds_dataset`` / ``AdhocBuilder`` do not work without TensorFlow in
tfds 4.9.10: ``AdhocBuilder._split_generators`` calls ``isinstance(x, tf.data.Dataset)``, and every
builder defined inside a package touches ``importlib_resources`` through ``DatasetBuilder.code_path``
(not installed with etils >= 1.12). :class:`_RecordsBuilder` is therefore a minimal
``tfds.core.GeneratorBasedBuilder`` whose ``_split_generators`` returns the in-memory examples and
whose ``code_path`` is ``None`` (it has no checksums file to look up). ``download_and_prepare`` then
writes ``array_record`` shards, ``features.json``, ``dataset_info.json`` and ``metadata.json`` with
numpy only. Reading uses ``tfds.builder_from_directory(path).as_data_source("train")`` - an
``ArrayRecordDataSource`` with random access (``ds[i]``, ``ds.__getitems__(indices)``).

Atomicity: the dataset is built in a temporary sibling folder and renamed to ``out_dir`` in one
``os.replace``; a crash leaves at most a ``.tmp-*`` folder that nothing reads.

Remote folders (``gs://...``; paths go through ``rlhf_jax.fileio``): the dataset is built in a local
temporary folder and uploaded with ``dataset_info.json`` last (what :func:`open_dataset` checks
first). ``array_record`` reads local files only, so opening a remote dataset first copies it once
into a local cache (``$RLHF_JAX_CACHE_DIR``, default ``<tmp>/rlhf_jax_cache``), keyed by the URL and
its ``dataset_info.json``; ``TokenizedDataset.path`` stays the URL.

Layout of one example (token ids without specials; int32 unless noted)
---------------------------------------------------------------------
``prompt``        always; truncated to ``max_prompt_len - 1`` ids (one slot is BOS).
the kind's ``features`` (``rlhf_jax.data.kinds``), responses truncated to ``max_response_len - 1``
ids (one slot is EOS):
``response``      sft / rated / attributes.
``chosen``, ``rejected``                                   pairwise.
``responses_flat`` + ``response_lengths`` [K] + ``scores`` [K] float32    ranked (flattened ragged list).
``rating`` float32 scalar                                  rated.
``attributes`` [A] float32, names in metadata              attributes.

Next to the shards, ``lengths.npy`` holds each example's padded-sequence length (``1 + prompt + response
+ 1``, the longest candidate for pairwise / ranked, ``1 + prompt`` for prompts) so every host of a
multi-host job picks the same bucket for a global batch without reading the other hosts' rows.

So a training sequence ``[BOS] prompt response [EOS]`` has at most ``max_prompt_len + max_response_len``
tokens. Truncation is ``"left"`` (keep the end), ``"right"`` (keep the start), ``"error"`` or ``"drop"``
(skip the record; counted in metadata); the defaults are prompts from the left, responses from the right.

Filtering: ``prepare_dataset(drop_uninformative=True)`` drops the records the kind's
``informative`` predicate rejects (pairs with chosen == rejected, ranked lists with all-equal
scores) before tokenisation, and reports the count as ``metadata["dropped_uninformative"]``.

The metadata records the tokenizer fingerprint, the length limits, the truncation policy, the record
kind and the source file's SHA-256; :func:`open_dataset` refuses a tokenizer with another fingerprint
and :func:`prepare_dataset` refuses to reuse a folder built with different settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils
from tensorflow_datasets.core.utils import tqdm_utils

from rlhf_jax import fileio
from rlhf_jax.data import kinds as kinds_lib
from rlhf_jax.data import records as rec
from rlhf_jax.data.kinds import base as kind_base
from rlhf_jax.data.tokenizers import Tokenizer, check_token_ids

__all__ = [
    "FORMAT_VERSION",
    "Truncation",
    "DatasetMismatchError",
    "TokenizedDataset",
    "write_dataset",
    "open_dataset",
    "prepare_dataset",
    "sequence_length",]

FORMAT_VERSION = 1
_SPLIT = "train"
_LENGTHS_FILE = "lengths.npy"
_TRUNCATION_MODES = ("left", "right", "error", "drop")


@dataclasses.dataclass(frozen=True)
class Truncation:
  """How over-long prompts and responses are shortened (see the module docstring)."""

  prompt: str = "left"
  response: str = "right"

  def __post_init__(self):
    for field in ("prompt", "response"):
      if getattr(self, field) not in _TRUNCATION_MODES:
        raise ValueError(
            f"Truncation.{field}={getattr(self, field)!r}; expected one of {_TRUNCATION_MODES}")


class DatasetMismatchError(ValueError):
  """An existing dataset was built with another tokenizer, source or settings."""


# ----------------------------------------------------------------------------------------------------
# The builder
# ----------------------------------------------------------------------------------------------------


def _features(kind: str) -> tfds.features.FeaturesDict:
  specs = {"prompt": kind_base.INT_SEQ, **kinds_lib.get_kind(kind).features}
  return tfds.features.FeaturesDict({
      k: tfds.features.Tensor(shape=shape, dtype=dtype) for k, (shape, dtype) in specs.items()})


class _RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes pre-tokenised examples; see the module docstring for why it exists."""

  name = "rlhf_records"
  VERSION = tfds_utils.Version("1.0.0")

  def __init__(self, *, kind: str, examples: Sequence[dict], metadata: dict, **kwargs):
    self._kind, self._examples, self._metadata = kind, examples, metadata
    super().__init__(**kwargs)

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls):  # no checksums file; avoids the importlib_resources lookup
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"rlhf_jax tokenised {self._kind} records",
        features=_features(self._kind),
        disable_shuffling=True,  # keep file order: index i is the i-th kept record
        metadata=tfds.core.MetadataDict(self._metadata),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {_SPLIT: ((i, ex) for i, ex in enumerate(self._examples))}

  def _generate_examples(self, **kwargs):  # pragma: no cover - _split_generators yields directly
    raise NotImplementedError


@contextlib.contextmanager
def _quiet_tfds():
  previous = tqdm_utils._active  # pylint: disable=protected-access
  tqdm_utils.display_progress_bar(False)
  try:
    # tfds prints "Downloading and preparing ... to <the temporary folder>", which only misleads here.
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tqdm_utils.display_progress_bar(previous)


# ----------------------------------------------------------------------------------------------------
# Opened datasets
# ----------------------------------------------------------------------------------------------------


class TokenizedDataset:
  """A random-access view of a written dataset: ``len(ds)``, ``ds[i]``, ``ds.get_batch(indices)``.

    ``kind``, ``metadata`` (the dict written at build time), ``path`` and the underlying tfds data
    source ``source`` are public.
    """

  def __init__(self, path: str, source: Any, metadata: dict, local_path: str | None = None):
    self.path, self.source, self.metadata = path, source, metadata
    self.local_path = local_path or path  # a remote dataset is read from its local copy
    self.kind: str = metadata["kind"]
    self._lengths: np.ndarray | None = None

  @property
  def lengths(self) -> np.ndarray:
    """``[N]`` int32 padded-sequence length of every example (memory-mapped ``lengths.npy``)."""
    if self._lengths is None:
      self._lengths = np.load(os.path.join(self.local_path, _LENGTHS_FILE), mmap_mode="r")
      if len(self._lengths) != len(self):
        raise DatasetMismatchError(
            f"{self.path}: lengths.npy has {len(self._lengths)} rows, data {len(self)}")
    return self._lengths

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self.source[int(index)]

  def get_batch(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
    indices = [int(i) for i in indices]
    if hasattr(self.source, "__getitems__"):
      return list(self.source.__getitems__(indices))
    return [self.source[i] for i in indices]  # pragma: no cover - other tfds data sources

  @property
  def max_prompt_len(self) -> int:
    return int(self.metadata["max_prompt_len"])

  @property
  def max_response_len(self) -> int:
    return int(self.metadata["max_response_len"])

  @property
  def max_seq_len(self) -> int:
    return self.max_prompt_len + self.max_response_len

  @property
  def special_ids(self) -> dict[str, int]:
    return {k: int(self.metadata["tokenizer"][k]) for k in ("bos_id", "eos_id", "pad_id")}

  def __repr__(self) -> str:
    return f"TokenizedDataset(kind={self.kind!r}, len={len(self)}, path={self.path!r})"


def open_dataset(path: str, tokenizer: Tokenizer | None = None) -> TokenizedDataset:
  """Opens a dataset written by :func:`write_dataset`; refuses a tokenizer with another fingerprint."""
  if not fileio.isfile(fileio.join(path, "dataset_info.json")):
    raise FileNotFoundError(f"no rlhf_jax dataset at {path!r} (dataset_info.json is missing)")
  local = _local_copy(path) if fileio.is_remote(path) else path
  builder = tfds.builder_from_directory(local)
  metadata = dict(builder.info.metadata or {})
  if metadata.get("format_version") != FORMAT_VERSION:
    raise DatasetMismatchError(
        f"{path}: format_version={metadata.get('format_version')!r}, this code reads {FORMAT_VERSION}; rebuild it"
    )
  if tokenizer is not None and tokenizer.fingerprint() != metadata["tokenizer"]["fingerprint"]:
    raise DatasetMismatchError(
        f"{path} was tokenised with {metadata['tokenizer']['fingerprint']} ({metadata['tokenizer']['repr']}) but "
        f"the given tokenizer is {tokenizer.fingerprint()} ({tokenizer!r}); the same text would map to different "
        "ids. Use the tokenizer that built it or rebuild the dataset in another folder.")
  return TokenizedDataset(path, builder.as_data_source(split=_SPLIT), metadata, local_path=local)


def _local_copy(url: str) -> str:
  """A local copy of the remote dataset folder ``url``, made once per URL and content."""
  info = fileio.read_bytes(fileio.join(url, "dataset_info.json"))
  key = hashlib.sha256(url.encode("utf-8") + b"\0" + info).hexdigest()[:24]
  cache = os.environ.get("RLHF_JAX_CACHE_DIR") or os.path.join(tempfile.gettempdir(),
                                                              "rlhf_jax_cache")
  local = os.path.join(cache, "datasets", key)
  if os.path.isfile(os.path.join(local, "dataset_info.json")):
    return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=os.path.dirname(local))
  for folder, _, names in fileio.walk(url):
    target = os.path.normpath(os.path.join(tmp, fileio.relpath(folder, url)))
    os.makedirs(target, exist_ok=True)
    for name in names:
      with open(os.path.join(target, name), "wb") as f:
        f.write(fileio.read_bytes(fileio.join(folder, name)))
  try:
    os.replace(tmp, local)
  except OSError:  # another process made the same copy first
    shutil.rmtree(tmp, ignore_errors=True)
  return local


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def _encode_examples(records: Sequence[Any], kind: str, tokenizer: Tokenizer, max_prompt_len: int,
                     max_response_len: int, truncation: Truncation,
                     where: str) -> tuple[list[dict], dict]:
  """Tokenises and truncates; returns examples and counts (truncated prompts/responses, dropped)."""
  spec = kinds_lib.get_kind(kind)
  prompt_limit = max_prompt_len - 1
  counts = {"truncated_prompts": 0, "truncated_responses": 0, "dropped": 0}
  encoder = kind_base.Encoder(tokenizer, max_response_len - 1, truncation.response)
  prompts = tokenizer.encode_batch([r.prompt for r in records])
  examples = []
  for i, (record, prompt_ids) in enumerate(zip(records, prompts)):
    loc = encoder.where = f"{where} record {i}"
    before = encoder.truncated
    try:
      prompt, cut = kind_base.truncate(prompt_ids, prompt_limit, truncation.prompt, f"{loc} prompt")
      example: dict[str,
                    Any] = {"prompt": np.asarray(prompt, np.int32), **spec.encode(record, encoder)}
    except kind_base.Drop:
      encoder.truncated = before
      counts["dropped"] += 1
      continue
    counts["truncated_prompts"] += cut
    check_token_ids(example["prompt"], tokenizer.vocab_size, where=f"{loc} prompt")
    examples.append(example)
  counts["truncated_responses"] = encoder.truncated
  return examples, counts


def sequence_length(example: Mapping[str, np.ndarray], kind: str) -> int:
  """Length of the padded sequence(s) an example becomes: ``[BOS] prompt response [EOS]``."""
  return int(kinds_lib.get_kind(kind).length(example))


def _tokenizer_info(tokenizer: Tokenizer) -> dict:
  return {
      "fingerprint": tokenizer.fingerprint(),
      "repr": repr(tokenizer),
      "vocab_size": int(tokenizer.vocab_size),
      "bos_id": int(tokenizer.bos_id),
      "eos_id": int(tokenizer.eos_id),
      "pad_id": int(tokenizer.pad_id),
      "chat_template": dataclasses.asdict(tokenizer.chat_template),}


def write_dataset(records: Sequence[Any], kind: str, tokenizer: Tokenizer, out_dir: str, *,
                  max_prompt_len: int, max_response_len: int, truncation: Truncation = Truncation(),
                  extra_metadata: Mapping[str, Any] | None = None,
                  overwrite: bool = False) -> TokenizedDataset:
  """Tokenises validated ``records`` (from :mod:`rlhf_jax.data.records`) and writes them atomically."""
  spec = kinds_lib.get_kind(kind)
  if max_prompt_len < 2 or max_response_len < 2:
    raise ValueError(
        f"max_prompt_len={max_prompt_len}, max_response_len={max_response_len}; both must be >= 2 "
        "(they include the BOS / EOS slot)")
  out_dir = fileio.absolute(out_dir)
  if fileio.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists; pass overwrite=True or choose another folder")
  if spec.check_records is not None:
    spec.check_records(records)
  examples, counts = _encode_examples(records, kind, tokenizer, max_prompt_len, max_response_len,
                                      truncation, where=str((extra_metadata or
                                                             {}).get("source", "<records>")))
  if not examples:
    raise ValueError(
        f"no {kind} examples left to write ({counts['dropped']} dropped by truncation='drop')")
  metadata = {
      "format_version": FORMAT_VERSION,
      "kind": kind,
      "tokenizer": _tokenizer_info(tokenizer),
      "max_prompt_len": int(max_prompt_len),
      "max_response_len": int(max_response_len),
      "truncation": dataclasses.asdict(truncation),
      "num_records": len(records),
      "num_examples": len(examples),
      **counts,}
  if spec.metadata is not None:
    metadata.update(spec.metadata(records, examples))
  metadata.update(extra_metadata or {})

  # Built next to out_dir (one os.replace), or in a local temporary folder for a remote out_dir.
  parent = None if fileio.is_remote(out_dir) else os.path.dirname(out_dir)
  if parent:
    os.makedirs(parent, exist_ok=True)
  tmp_root = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out_dir)}-", dir=parent)
  try:
    builder = _RecordsBuilder(kind=kind, examples=examples, metadata=metadata, data_dir=tmp_root,
                              file_format="array_record")
    with _quiet_tfds():
      builder.download_and_prepare()
    built = str(builder.data_dir)
    lengths = np.asarray([sequence_length(ex, kind) for ex in examples], np.int32)
    np.save(os.path.join(built, _LENGTHS_FILE), lengths)
    # overwrite: the old folder is moved aside first (remote: dataset_info.json uploaded last)
    fileio.replace_dir(built, out_dir, marker="dataset_info.json")
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  return open_dataset(out_dir, tokenizer)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with fileio.open_file(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def prepare_dataset(jsonl_path: str, kind: str, tokenizer: Tokenizer, out_dir: str, *,
                    max_prompt_len: int, max_response_len: int,
                    truncation: Truncation = Truncation(), overwrite: bool = False,
                    scale: Sequence[float] | None = None,
                    attribute_names: Sequence[str] | None = None, max_candidates: int = 0,
                    drop_uninformative: bool = False) -> TokenizedDataset:
  """Reads + validates ``jsonl_path``, builds the dataset at ``out_dir`` once, and opens it.

    ``max_candidates`` keeps the first that many responses of each ranked list (0 = all);
    ``drop_uninformative`` drops the records the kind's ``informative`` predicate rejects (after the
    cut), counted in ``metadata["dropped_uninformative"]``; none left is an error.

    A later call with the same arguments reuses the folder. If the folder was built from another file
    content, kind, tokenizer, chat template, length limits, truncation policy, scale or filter,
    :class:`DatasetMismatchError` names the differing settings (pass ``overwrite=True`` to rebuild).
    Several processes building the same folder concurrently is safe: the rename is atomic and the
    loser reuses the winner's folder.
    """
  spec = kinds_lib.get_kind(kind)
  settings = {
      "kind": kind,
      "source_sha256": _sha256(jsonl_path),
      "tokenizer_fingerprint": tokenizer.fingerprint(),
      "chat_template": json.loads(json.dumps(dataclasses.asdict(tokenizer.chat_template))),
      "max_prompt_len": int(max_prompt_len),
      "max_response_len": int(max_response_len),
      "truncation": dataclasses.asdict(truncation),
      "scale": list(scale) if scale is not None else None,
      "attribute_names": list(attribute_names) if attribute_names is not None else None,}
  # Only non-default new settings are stored, so folders built before they existed still match.
  if max_candidates:
    settings["max_candidates"] = int(max_candidates)
  if drop_uninformative:
    settings["drop_uninformative"] = True
  if fileio.exists(out_dir) and not overwrite:
    return _reuse(out_dir, tokenizer, settings)
  records = rec.read_records(jsonl_path, kind, chat_template=tokenizer.chat_template, scale=scale,
                             attribute_names=attribute_names, max_candidates=max_candidates)
  dropped = 0
  if drop_uninformative and spec.informative is not None:
    kept = [r for r in records if spec.informative(r)]
    dropped = len(records) - len(kept)
    if not kept:
      raise ValueError(f"{jsonl_path}: every one of its {dropped} {kind} records has "
                       f"{spec.uninformative}; nothing to learn from")
    records = kept
  extra = {
      "source": fileio.absolute(jsonl_path), "settings": settings, "dropped_uninformative": dropped}
  try:
    return write_dataset(records, kind, tokenizer, out_dir, max_prompt_len=max_prompt_len,
                         max_response_len=max_response_len, truncation=truncation,
                         extra_metadata=extra, overwrite=overwrite)
  except (FileExistsError, OSError):
    if fileio.isfile(fileio.join(out_dir, "dataset_info.json")):  # another process won the race
      return _reuse(out_dir, tokenizer, settings)
    raise


def _reuse(out_dir: str, tokenizer: Tokenizer, settings: dict) -> TokenizedDataset:
  dataset = open_dataset(out_dir, tokenizer)
  stored = dataset.metadata.get("settings", {})
  keys = list(settings) + [k for k in stored if k not in settings]
  diffs = [
      f"{k}: stored {stored.get(k)!r} != requested {settings.get(k)!r}" for k in keys
      if stored.get(k) != settings.get(k)]
  if diffs:
    raise DatasetMismatchError(
        f"{out_dir} was built with other settings ({'; '.join(diffs)}); use another folder or overwrite=True"
    )
  return dataset
