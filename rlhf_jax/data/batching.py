"""Batches of NumPy arrays from a :class:`~rlhf_jax.data.dataset.TokenizedDataset`.

Sequences are ``[BOS] prompt response [EOS]``, right-padded with ``pad_id`` to a **bucket length**: the
smallest entry of ``buckets`` that fits the longest row of the *global* batch. With the default buckets
(powers of two from 16, capped by the dataset's ``max_prompt_len + max_response_len``) jit compiles
at most ``log2(max_len / 16) + 2`` shapes per kind.

Batch keys (int32 unless noted; ``B`` is the per-host batch, ``T`` the bucket, ``K`` candidates).
Each kind's module in :mod:`rlhf_jax.data.kinds` builds its keys; sequence arrays hold the rows of
one example next to each other (example major), so host slices concatenate into the global batch:

==============  ===================================================================================
kind            keys
==============  ===================================================================================
sft             ``tokens [B,T]``, ``mask`` (1 = real token), ``loss_mask`` (1 = response token incl. EOS)
rated           the sft keys + ``rating [B]`` float32
attributes      the sft keys + ``attributes [B,A]`` float32 (names in ``dataset.metadata``)
pairwise        ``tokens/mask/loss_mask [2B,T]``: pair b's chosen in row 2b, its rejected in row
                2b+1 (``kinds.pairwise.split`` separates them)
ranked          ``tokens/mask/loss_mask [B·K,T]`` (candidate k of list b in row b·K+k),
                ``candidate_mask [B,K]``, ``scores [B,K]`` float32 (higher is better; 0 where
                ``candidate_mask`` is 0); ``K`` = the dataset's max unless the iterator sets it
prompt          ``prompt_tokens [B,P]``, ``prompt_mask [B,P]``, **left**-padded ``[BOS] prompt`` for
                generation (the sampler's convention)
every kind      ``valid [B]``: 1 for real rows, 0 for the filler rows of a padded final batch;
                ``index [B]`` (from :class:`BatchIterator`): each row's dataset index, -1 for
                filler rows, so a precomputed per-example table is ``table[batch["index"]]``
==============  ===================================================================================

:class:`BatchIterator` order: epoch ``e`` visits ``permutation(N)`` drawn from
``np.random.default_rng([seed, e])`` (or ``arange(N)`` without shuffling). Global batch ``b`` is
``perm[b * batch_size:(b + 1) * batch_size]`` and host ``h`` of ``H`` takes rows
``[h * batch_size / H, (h + 1) * batch_size / H)`` of it, so the global batch is the same whatever the
number of hosts. ``drop_remainder=True`` (training) drops the last ``N mod batch_size`` examples of
each epoch (a different set every epoch when shuffling); ``False`` (evaluation) fills the last global
batch with ``valid = 0`` rows so shapes stay static. ``group_by_length=G`` (``G >= 2``) narrows the
batches (Hugging Face Trainer's ``group_by_length``): the epoch's kept examples are cut into windows
of ``G`` batches in permutation order, each window is sorted longest first, and the resulting
batches are visited in an order drawn from ``default_rng([seed, e, 1])``: every example is still
seen once per epoch, and a batch pads to the bucket of similar lengths. ``get_state()`` /
``set_state()`` capture ``(epoch, batch_in_epoch)``: resuming yields exactly the batches an
uninterrupted run would have.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from rlhf_jax.data import kinds as kinds_lib
from rlhf_jax.data.kinds.base import left_pad_prompts, take_examples
from rlhf_jax.data.tokenizers import Tokenizer, check_token_ids

__all__ = [
    "default_buckets",
    "bucket_length",
    "collate",
    "left_pad_prompts",
    "take_examples",
    "encode_prompts",
    "BatchIterator",]


def default_buckets(max_len: int, min_bucket: int = 16) -> tuple[int, ...]:
  """Powers of two ``>= min_bucket`` below ``max_len``, then ``max_len`` itself."""
  if max_len < 1 or min_bucket < 1:
    raise ValueError(f"default_buckets: max_len={max_len} and min_bucket={min_bucket} must be >= 1")
  buckets, b = [], min_bucket
  while b < max_len:
    buckets.append(b)
    b *= 2
  return tuple(buckets) + (max_len,)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket ``>= length``."""
  for b in sorted(buckets):
    if b >= length:
      return int(b)
  raise ValueError(
      f"sequence length {length} exceeds the largest bucket {max(buckets)}; buckets={tuple(buckets)}"
  )


def encode_prompts(tokenizer: Tokenizer, texts: Sequence[str], *, max_prompt_len: int,
                   buckets: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """Tokenises raw prompt strings into a left-padded generation batch ``[BOS] prompt``.

    Prompts longer than ``max_prompt_len`` (BOS included) keep their last tokens (left truncation).
    The width is the bucket of the longest prompt (``default_buckets(max_prompt_len)`` by default).
    """
  if max_prompt_len < 1:
    raise ValueError(f"max_prompt_len={max_prompt_len}; expected >= 1")
  rows = []
  for i, ids in enumerate(tokenizer.encode_batch(list(texts))):
    check_token_ids(ids, tokenizer.vocab_size, where=f"prompt {i}")
    rows.append([tokenizer.bos_id] + list(ids)[max(0, len(ids) - (max_prompt_len - 1)):])
  width = bucket_length(max(len(r) for r in rows), buckets or default_buckets(max_prompt_len))
  tokens, mask = left_pad_prompts(rows, pad_id=tokenizer.pad_id, length=width)
  return {"prompt_tokens": tokens, "prompt_mask": mask}


def collate(examples: Sequence[Mapping[str, np.ndarray] | None], kind: str,
            specials: Mapping[str, int], length: int, *, num_candidates: int = 0,
            num_attributes: int = 0) -> dict[str, np.ndarray]:
  """Builds one batch (module docstring) from stored examples; ``None`` entries become filler rows.

    ``length`` is the bucket (``T``, or ``P`` for prompts). ``specials`` holds ``bos_id``, ``eos_id``,
    ``pad_id``. ``num_candidates`` (ranked) and ``num_attributes`` (attributes) fix those axes.
    """
  spec = kinds_lib.get_kind(kind)
  batch = spec.collate(examples, specials, length, num_candidates=num_candidates,
                       num_attributes=num_attributes)
  return {"valid": np.asarray([ex is not None for ex in examples], np.int32), **batch}


class BatchIterator:
  """Seeded, host-sliced, resumable iterator of bucketed batches (module docstring).

    Args:
      dataset: a :class:`~rlhf_jax.data.dataset.TokenizedDataset`.
      batch_size: the *global* batch size; each host yields ``batch_size // process_count`` rows.
      seed, shuffle: epoch ``e`` uses ``np.random.default_rng([seed, e]).permutation(N)``.
      drop_remainder: drop the last partial global batch of each epoch (True) or fill it with
        ``valid = 0`` rows (False).
      num_epochs: stop after this many epochs (``None``: forever).
      buckets: allowed sequence lengths (prompt lengths for ``kind == "prompt"``); the default is
        ``default_buckets(max_len)`` with ``max_len`` from the dataset's limits.
      process_index, process_count: this host's slice; default ``jax.process_index()`` / ``jax.process_count()``.
      vocab_size: if given, every batch's token ids are checked against the model vocabulary.
      num_candidates: the candidate axis ``K`` of ranked batches (0 = the dataset's longest list).
      group_by_length: batches per length-sorted window (module docstring); 0 or 1 = off.
    """

  def __init__(self, dataset: Any, batch_size: int, *, seed: int = 0, shuffle: bool = True,
               drop_remainder: bool = True, num_epochs: int | None = None,
               buckets: Sequence[int] | None = None, process_index: int | None = None,
               process_count: int | None = None, vocab_size: int | None = None,
               num_candidates: int = 0, group_by_length: int = 0):
    if process_index is None or process_count is None:
      import jax  # only needed for the multi-host defaults

      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if batch_size < 1 or batch_size % process_count:
      raise ValueError(
          f"batch_size={batch_size} must be >= 1 and divisible by process_count={process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(
          f"process_index={process_index}; expected 0 <= index < process_count={process_count}")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs={num_epochs}; expected >= 1 or None")
    if isinstance(group_by_length,
                  bool) or not isinstance(group_by_length, int) or group_by_length < 0:
      raise ValueError(f"group_by_length={group_by_length!r}; expected an int >= 0 (0 = off)")
    self.group_by_length = group_by_length
    self.dataset, self.kind = dataset, dataset.kind
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.drop_remainder, self.num_epochs, self.vocab_size = drop_remainder, num_epochs, vocab_size
    self.process_index, self.process_count = process_index, process_count
    self.host_batch_size = batch_size // process_count
    self.num_examples = len(dataset)
    max_len = dataset.max_prompt_len if kinds_lib.get_kind(
        self.kind).prompt_only else dataset.max_seq_len
    self.buckets = tuple(sorted(buckets)) if buckets else default_buckets(max_len)
    if self.buckets[-1] < max_len:
      raise ValueError(
          f"buckets={self.buckets}: the largest must be >= the dataset's max length {max_len}")
    if drop_remainder:
      self.batches_per_epoch = self.num_examples // batch_size
    else:
      self.batches_per_epoch = -(-self.num_examples // batch_size)
    if self.batches_per_epoch == 0:
      raise ValueError(
          f"dataset has {self.num_examples} examples < batch_size={batch_size} with drop_remainder")
    stored_k = int(dataset.metadata.get("max_candidates", 0))
    if num_candidates and num_candidates < stored_k:
      raise ValueError(f"num_candidates={num_candidates} < the dataset's longest list ({stored_k})")
    self.num_candidates = int(num_candidates or stored_k)
    self.num_attributes = len(dataset.metadata.get("attribute_names", ()))
    self._specials = dataset.special_ids
    self._epoch, self._batch = 0, 0
    self._perm_epoch, self._perm = -1, None

  # -- position ----------------------------------------------------------------------------------

  def get_state(self) -> dict[str, int]:
    """The position of the next batch, as plain ints (store it in the checkpoint)."""
    return {
        "epoch": self._epoch, "batch_in_epoch": self._batch, "seed": self.seed,
        "num_examples": self.num_examples, "batch_size": self.batch_size,
        "group_by_length": self.group_by_length}

  def set_state(self, state: Mapping[str, int]) -> None:
    for key in ("seed", "num_examples", "batch_size", "group_by_length"):
      if key in state and int(state[key]) != getattr(self, key):
        raise ValueError(f"set_state: checkpoint has {key}={state[key]} but this iterator has "
                         f"{key}={getattr(self, key)}; resuming would not reproduce the run")
    epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
    if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
      raise ValueError(f"set_state: epoch={epoch}, batch_in_epoch={batch} out of range "
                       f"(batches_per_epoch={self.batches_per_epoch})")
    self._epoch, self._batch = epoch, batch

  # -- iteration ---------------------------------------------------------------------------------

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm_epoch != epoch:
      if self.shuffle:
        self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
      else:
        self._perm = np.arange(self.num_examples)
      if self.group_by_length > 1:
        self._perm = self._grouped(self._perm, epoch)
      self._perm_epoch = epoch
    return self._perm

  def _grouped(self, perm: np.ndarray, epoch: int) -> np.ndarray:
    """``perm`` with each window of ``group_by_length`` batches sorted longest first and the
    batches shuffled (module docstring); the partial last batch's examples stay at the end."""
    kept = len(perm) // self.batch_size * self.batch_size
    window = self.group_by_length * self.batch_size
    lengths = self.dataset.lengths
    parts = [
        w[np.argsort(-lengths[w], kind="stable")]
        for w in np.split(perm[:kept], range(window, kept, window))]
    batches = np.concatenate(parts).reshape(-1, self.batch_size)
    order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
    return np.concatenate([batches[order].reshape(-1), perm[kept:]])

  def global_indices(self, epoch: int, batch: int) -> np.ndarray:
    """Dataset indices of global batch ``batch`` of ``epoch``; -1 marks filler rows."""
    rows = self._permutation(epoch)[batch * self.batch_size:(batch + 1) * self.batch_size]
    return np.concatenate([rows, np.full(self.batch_size - len(rows), -1, rows.dtype)])

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._batch >= self.batches_per_epoch:
      self._epoch, self._batch = self._epoch + 1, 0
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    global_rows = self.global_indices(self._epoch, self._batch)
    real = global_rows[global_rows >= 0]
    length = bucket_length(int(self.dataset.lengths[real].max()),
                           self.buckets)  # same on every host
    lo = self.process_index * self.host_batch_size
    host_rows = global_rows[lo:lo + self.host_batch_size]
    fetched = iter(self.dataset.get_batch(host_rows[host_rows >= 0]))
    examples = [next(fetched) if i >= 0 else None for i in host_rows]
    batch = collate(examples, self.kind, self._specials, length, num_candidates=self.num_candidates,
                    num_attributes=self.num_attributes)
    batch["index"] = host_rows.astype(np.int32)
    if self.vocab_size is not None:
      for key, value in batch.items():
        if key.endswith("tokens"):
          check_token_ids(value, self.vocab_size, where=f"batch {key} (epoch {self._epoch}, "
                          f"batch {self._batch})")
    self._batch += 1
    return batch
