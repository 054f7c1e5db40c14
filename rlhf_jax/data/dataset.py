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

Layout of one example (token ids without specials; int32 unless noted)
---------------------------------------------------------------------
``prompt``        always; truncated to ``max_prompt_len - 1`` ids (one slot is BOS).
``response``      sft / rated / attributes; truncated to ``max_response_len - 1`` ids (one slot is EOS).
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
from rlhf_jax.data import records as rec
from rlhf_jax.data.tokenizers import Tokenizer, check_token_ids

__all__ = [
    "FORMAT_VERSION",
    "Truncation",
    "DatasetMismatchError",
    "TokenizedDataset",
    "write_dataset",
    "open_dataset",
    "prepare_dataset",
    "sequence_length",
]

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
                raise ValueError(f"Truncation.{field}={getattr(self, field)!r}; expected one of {_TRUNCATION_MODES}")


class DatasetMismatchError(ValueError):
    """An existing dataset was built with another tokenizer, source or settings."""


class _Drop(Exception):
    """Internal: a record exceeded a limit under the ``"drop"`` policy."""


def _truncate(ids: list[int], limit: int, mode: str, what: str) -> tuple[list[int], bool]:
    if len(ids) <= limit:
        return ids, False
    if mode == "left":
        return ids[len(ids) - limit:], True
    if mode == "right":
        return ids[:limit], True
    if mode == "drop":
        raise _Drop()
    raise ValueError(f"{what} has {len(ids)} tokens > limit {limit} and truncation is 'error'")


# ----------------------------------------------------------------------------------------------------
# The builder
# ----------------------------------------------------------------------------------------------------

_INT_SEQ = dict(shape=(None,), dtype=np.int32)
_FLOAT_SEQ = dict(shape=(None,), dtype=np.float32)
_FEATURES = {
    "prompt": {"prompt": _INT_SEQ},
    "sft": {"prompt": _INT_SEQ, "response": _INT_SEQ},
    "pairwise": {"prompt": _INT_SEQ, "chosen": _INT_SEQ, "rejected": _INT_SEQ},
    "ranked": {"prompt": _INT_SEQ, "responses_flat": _INT_SEQ, "response_lengths": _INT_SEQ, "scores": _FLOAT_SEQ},
    "rated": {"prompt": _INT_SEQ, "response": _INT_SEQ, "rating": dict(shape=(), dtype=np.float32)},
    "attributes": {"prompt": _INT_SEQ, "response": _INT_SEQ, "attributes": _FLOAT_SEQ},
}


def _features(kind: str) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({k: tfds.features.Tensor(**v) for k, v in _FEATURES[kind].items()})


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

    def __init__(self, path: str, source: Any, metadata: dict):
        self.path, self.source, self.metadata = path, source, metadata
        self.kind: str = metadata["kind"]
        self._lengths: np.ndarray | None = None

    @property
    def lengths(self) -> np.ndarray:
        """``[N]`` int32 padded-sequence length of every example (memory-mapped ``lengths.npy``)."""
        if self._lengths is None:
            self._lengths = np.load(os.path.join(self.path, _LENGTHS_FILE), mmap_mode="r")
            if len(self._lengths) != len(self):
                raise DatasetMismatchError(f"{self.path}: lengths.npy has {len(self._lengths)} rows, data {len(self)}")
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
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
        raise FileNotFoundError(f"no rlhf_jax dataset at {path!r} (dataset_info.json is missing)")
    builder = tfds.builder_from_directory(path)
    metadata = dict(builder.info.metadata or {})
    if metadata.get("format_version") != FORMAT_VERSION:
        raise DatasetMismatchError(
            f"{path}: format_version={metadata.get('format_version')!r}, this code reads {FORMAT_VERSION}; rebuild it"
        )
    if tokenizer is not None and tokenizer.fingerprint() != metadata["tokenizer"]["fingerprint"]:
        raise DatasetMismatchError(
            f"{path} was tokenised with {metadata['tokenizer']['fingerprint']} ({metadata['tokenizer']['repr']}) but "
            f"the given tokenizer is {tokenizer.fingerprint()} ({tokenizer!r}); the same text would map to different "
            "ids. Use the tokenizer that built it or rebuild the dataset in another folder."
        )
    return TokenizedDataset(path, builder.as_data_source(split=_SPLIT), metadata)


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def _encode_examples(records: Sequence[Any], kind: str, tokenizer: Tokenizer, max_prompt_len: int,
                     max_response_len: int, truncation: Truncation, where: str) -> tuple[list[dict], dict]:
    """Tokenises and truncates; returns examples and counts (truncated prompts/responses, dropped)."""
    prompt_limit, response_limit = max_prompt_len - 1, max_response_len - 1
    counts = {"truncated_prompts": 0, "truncated_responses": 0, "dropped": 0}
    prompts = tokenizer.encode_batch([r.prompt for r in records])
    examples = []
    for i, (record, prompt_ids) in enumerate(zip(records, prompts)):
        loc = f"{where} record {i}"
        try:
            prompt, cut = _truncate(prompt_ids, prompt_limit, truncation.prompt, f"{loc} prompt")
            counts["truncated_prompts"] += cut
            example: dict[str, Any] = {"prompt": np.asarray(prompt, np.int32)}

            def response(text: str, name: str) -> np.ndarray:
                ids, cut = _truncate(tokenizer.encode(text), response_limit, truncation.response, f"{loc} {name}")
                counts["truncated_responses"] += cut
                check_token_ids(ids, tokenizer.vocab_size, where=f"{loc} {name}")
                return np.asarray(ids, np.int32)

            if kind in ("sft", "rated", "attributes"):
                example["response"] = response(record.response, "response")
            if kind == "pairwise":
                example["chosen"] = response(record.chosen, "chosen")
                example["rejected"] = response(record.rejected, "rejected")
            if kind == "ranked":
                parts = [response(text, f"responses[{j}]") for j, text in enumerate(record.responses)]
                example["responses_flat"] = np.concatenate(parts).astype(np.int32)
                example["response_lengths"] = np.asarray([len(p) for p in parts], np.int32)
                example["scores"] = np.asarray(record.scores, np.float32)
            if kind == "rated":
                example["rating"] = np.float32(record.rating)
            if kind == "attributes":
                example["attributes"] = np.asarray([value for _, value in record.attributes], np.float32)
        except _Drop:
            counts["dropped"] += 1
            continue
        check_token_ids(example["prompt"], tokenizer.vocab_size, where=f"{loc} prompt")
        examples.append(example)
    return examples, counts


def sequence_length(example: Mapping[str, np.ndarray], kind: str) -> int:
    """Length of the padded sequence(s) an example becomes: ``[BOS] prompt response [EOS]``."""
    prompt = len(example["prompt"]) + 1
    if kind == "prompt":
        return prompt
    if kind == "pairwise":
        return prompt + max(len(example["chosen"]), len(example["rejected"])) + 1
    if kind == "ranked":
        return prompt + int(np.max(example["response_lengths"])) + 1
    return prompt + len(example["response"]) + 1


def _tokenizer_info(tokenizer: Tokenizer) -> dict:
    return {
        "fingerprint": tokenizer.fingerprint(),
        "repr": repr(tokenizer),
        "vocab_size": int(tokenizer.vocab_size),
        "bos_id": int(tokenizer.bos_id),
        "eos_id": int(tokenizer.eos_id),
        "pad_id": int(tokenizer.pad_id),
        "chat_template": dataclasses.asdict(tokenizer.chat_template),
    }


def write_dataset(records: Sequence[Any], kind: str, tokenizer: Tokenizer, out_dir: str, *,
                  max_prompt_len: int, max_response_len: int, truncation: Truncation = Truncation(),
                  extra_metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> TokenizedDataset:
    """Tokenises validated ``records`` (from :mod:`rlhf_jax.data.records`) and writes them atomically."""
    if kind not in _FEATURES:
        raise ValueError(f"kind={kind!r}; expected one of {tuple(_FEATURES)}")
    if max_prompt_len < 2 or max_response_len < 2:
        raise ValueError(
            f"max_prompt_len={max_prompt_len}, max_response_len={max_response_len}; both must be >= 2 "
            "(they include the BOS / EOS slot)"
        )
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True or choose another folder")
    if kind == "attributes":
        names = {tuple(name for name, _ in r.attributes) for r in records}
        if len(names) != 1:
            raise ValueError(f"attributes records must all name the same attributes; found {sorted(names)}")
    examples, counts = _encode_examples(records, kind, tokenizer, max_prompt_len, max_response_len, truncation,
                                        where=str((extra_metadata or {}).get("source", "<records>")))
    if not examples:
        raise ValueError(f"no {kind} examples left to write ({counts['dropped']} dropped by truncation='drop')")
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "tokenizer": _tokenizer_info(tokenizer),
        "max_prompt_len": int(max_prompt_len),
        "max_response_len": int(max_response_len),
        "truncation": dataclasses.asdict(truncation),
        "num_records": len(records),
        "num_examples": len(examples),
        **counts,
    }
    if kind == "ranked":
        metadata["max_candidates"] = max(len(ex["response_lengths"]) for ex in examples)
    if kind == "attributes":
        metadata["attribute_names"] = [name for name, _ in records[0].attributes]
    metadata.update(extra_metadata or {})

    parent = os.path.dirname(out_dir)
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
        fileio.replace_dir(built, out_dir)  # overwrite: the old folder is moved aside first
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return open_dataset(out_dir, tokenizer)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_dataset(jsonl_path: str, kind: str, tokenizer: Tokenizer, out_dir: str, *, max_prompt_len: int,
                    max_response_len: int, truncation: Truncation = Truncation(), overwrite: bool = False,
                    scale: Sequence[float] | None = None,
                    attribute_names: Sequence[str] | None = None) -> TokenizedDataset:
    """Reads + validates ``jsonl_path``, builds the dataset at ``out_dir`` once, and opens it.

    A later call with the same arguments reuses the folder. If the folder was built from another file
    content, kind, tokenizer, chat template, length limits, truncation policy or scale, :class:`DatasetMismatchError` names
    the differing settings (pass ``overwrite=True`` to rebuild). Several processes building the same
    folder concurrently is safe: the rename is atomic and the loser reuses the winner's folder.
    """
    settings = {
        "kind": kind,
        "source_sha256": _sha256(jsonl_path),
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "chat_template": json.loads(json.dumps(dataclasses.asdict(tokenizer.chat_template))),
        "max_prompt_len": int(max_prompt_len),
        "max_response_len": int(max_response_len),
        "truncation": dataclasses.asdict(truncation),
        "scale": list(scale) if scale is not None else None,
        "attribute_names": list(attribute_names) if attribute_names is not None else None,
    }
    if os.path.exists(out_dir) and not overwrite:
        return _reuse(out_dir, tokenizer, settings)
    records = rec.read_records(jsonl_path, kind, chat_template=tokenizer.chat_template, scale=scale,
                               attribute_names=attribute_names)
    extra = {"source": os.path.abspath(jsonl_path), "settings": settings}
    try:
        return write_dataset(records, kind, tokenizer, out_dir, max_prompt_len=max_prompt_len,
                             max_response_len=max_response_len, truncation=truncation, extra_metadata=extra,
                             overwrite=overwrite)
    except (FileExistsError, OSError):
        if os.path.isfile(os.path.join(out_dir, "dataset_info.json")):  # another process won the race
            return _reuse(out_dir, tokenizer, settings)
        raise


def _reuse(out_dir: str, tokenizer: Tokenizer, settings: dict) -> TokenizedDataset:
    dataset = open_dataset(out_dir, tokenizer)
    stored = dataset.metadata.get("settings", {})
    diffs = [f"{k}: stored {stored.get(k)!r} != requested {v!r}" for k, v in settings.items() if stored.get(k) != v]
    if diffs:
        raise DatasetMismatchError(
            f"{out_dir} was built with other settings ({'; '.join(diffs)}); use another folder or overwrite=True"
        )
    return dataset
