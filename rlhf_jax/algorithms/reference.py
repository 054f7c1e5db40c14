"""The one reference-log-prob transform: ``batch -> batch + {"ref_logps": [rows]}``.

Every method that compares the policy to a frozen reference (DPO family, KTO, listwise variants
with a reference) needs, per sequence row of its batch,

    ref_logps_r = Σ_t log π_ref(tokens_r,t | tokens_r,<t) · loss_mask_r,t

over the *same rows* the policy sees. Batches of every record kind lay their sequence rows out
example major (``rlhf_jax.data.kinds.base``): pairs ``[2B, T]`` (chosen, rejected of pair b in rows
2b, 2b+1), lists ``[B·K, T]``, unpaired (KTO-style) ``[B, T]``. So one transform serves them all,
train and eval batches alike; the loss then reshapes ``ref_logps`` exactly as it reshapes its
own summed log-probs (``kinds.pairwise.split``, ``reshape(B, K)``).

Two ways to get the numbers (:class:`ReferenceLogps`):

* **on the fly** — ``models.response_logps`` (the one summed-log-prob function: jitted once per
  shape, the frozen params an *argument*, never baked in as constants) over the batch's rows,
  dispatched by the data iterator right before the train step (TRL's default). Multi-host: the
  forward runs on the global batch and each host keeps its own rows (``parallel.local_rows``).
* **precomputed** — one pass over the dataset before training (:func:`precompute_table`), a table
  ``[N, R]`` (R rows per example) stored as ``.npz`` with the JSON *key* of everything that made it
  (:func:`cache_key`: the reference run, its checkpoint step, model config, tokenizer, the
  dataset's build settings, the rows layout); looked up per batch as ``table[batch["index"]]``
  (``index = -1`` filler rows get 0). A stored table whose key differs is recomputed, never
  reused. Works multi-host: the pass runs on the global mesh, every host keeps the whole table and
  looks up its own rows; process 0 writes the file.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from rlhf_jax import fileio, models, parallel
from rlhf_jax.data import batching

logger = logging.getLogger(__name__)

MODES = ("on_the_fly", "precomputed")
REF_KEY = "ref_logps"


def logps_fn(model: models.Transformer, mesh: jax.sharding.Mesh | None = None) -> Callable:
  """``fn(params, tokens_NxT, mask_NxT, loss_mask_NxT) -> [N]`` Σ_t log π (``models.response_logps``)."""

  def fn(params, tokens, mask, loss_mask):
    return models.response_logps(model, params, tokens, mask, loss_mask, mesh=mesh)

  return fn


def rows_per_example(batch: Mapping[str, Any]) -> int:
  """R: sequence rows per example (2 for pairs, K for lists, 1 for single responses)."""
  b = len(batch["valid"])
  return int(batch["tokens"].shape[0]) // b


class ReferenceLogps:
  """Adds ``ref_logps`` ``[B·R]`` float32 to a batch (module docstring).

  Args:
    fn: ``fn(params, tokens, mask, loss_mask) -> [rows]`` (:func:`logps_fn`), used on the fly.
    params: the frozen reference params (placed on the mesh).
    table: ``[N, R]`` precomputed log-probs by dataset index, or None (on the fly).
  """

  def __init__(self, fn: Callable | None, params: Any, table: np.ndarray | None = None):
    if table is None and fn is None:
      raise ValueError("ReferenceLogps: give the log-prob function (on the fly) or a table")
    self.fn, self.params, self.table = fn, params, table

  def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
    batch = dict(batch)
    if self.table is not None:
      batch[REF_KEY] = lookup(self.table, batch)
    else:
      rows = self.fn(self.params, batch["tokens"], batch["mask"], batch["loss_mask"])
      # Multi-host: the forward ran on the global batch; keep this host's rows (its batch slice).
      batch[REF_KEY] = rows if parallel.process_count() == 1 else parallel.local_rows(rows)
    return batch


def lookup(table: np.ndarray, batch: Mapping[str, Any]) -> np.ndarray:
  """``table[batch["index"]]`` flattened to the batch's ``[B·R]`` rows; filler rows (-1) get 0."""
  if "index" not in batch:
    raise ValueError("a precomputed reference table needs batch['index'] (BatchIterator adds it)")
  index = np.asarray(batch["index"])
  r = rows_per_example(batch)
  if table.shape[1] != r:
    raise ValueError(f"the reference table has {table.shape[1]} rows per example but the batch has "
                     f"{r}; it was computed for another layout (e.g. another num_candidates)")
  rows_BxR = np.where((index >= 0)[:, None], table[np.maximum(index, 0)], 0.0)
  return rows_BxR.reshape(-1).astype(np.float32)


class WithReference:
  """Wraps a resumable batch iterator, applying ``transform`` to every batch it yields."""

  def __init__(self, inner: Any, transform: Callable[[Mapping[str, Any]], dict]):
    self.inner, self.transform = inner, transform

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    return self.transform(next(self.inner))

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state) -> None:
    self.inner.set_state(state)


def cache_key(*, reference_run: str, reference_step: int, model_config: Any, tokenizer: Any,
              dataset: Any, **extra: Any) -> dict:
  """Everything a reference table depends on, as a JSON-able dict.

  ``reference_run`` / ``reference_step``: the run directory the reference params came from and
  its checkpoint step ('' / -1 for a fresh init: then pass what seeds it in ``extra``);
  ``dataset``: a ``TokenizedDataset`` (its build settings hash the source file, tokenizer, limits
  and filters); ``extra``: anything else (e.g. ``num_candidates``).
  """
  key = {
      "reference_run": fileio.absolute(reference_run) if reference_run else "",
      "reference_step": int(reference_step),
      "model": dataclasses.asdict(model_config)
               if dataclasses.is_dataclass(model_config) else model_config,
      "tokenizer": tokenizer.fingerprint() if hasattr(tokenizer, "fingerprint") else str(tokenizer),
      "dataset": dataset.metadata.get("settings", {}),
      "num_examples": len(dataset),
      **extra,}
  return json.loads(json.dumps(key, sort_keys=True, default=str))


def precompute_table(dataset: Any, fn: Callable, params: Any, path: str, key: Mapping[str, Any], *,
                     batch_size: int, buckets=None, num_candidates: int = 0) -> np.ndarray:
  """``[N, R]`` Σ_t log π_ref of every sequence row of every example, computed once, stored at ``path``.

  The stored ``key`` must equal ``key`` (:func:`cache_key`) for the table to be reused; otherwise
  it is recomputed (and the reason logged). Written atomically (``fileio``: temp file + rename
  locally, one object upload remotely).
  """
  key = json.loads(json.dumps(dict(key), sort_keys=True))
  if fileio.exists(path):
    with np.load(io.BytesIO(fileio.read_bytes(path))) as stored:
      stored_key = json.loads(str(stored["key"]))
      if stored_key == key and len(stored["table"]) == len(dataset):
        return np.asarray(stored["table"])
    diff = sorted(k for k in set(key) | set(stored_key) if key.get(k) != stored_key.get(k))
    logger.warning("%s was computed for another reference / dataset (differs in %s); recomputing",
                   path, diff)
  # Multi-host: each process feeds its slice of every batch (the forward runs on the global
  # batch), and the rows with their dataset indices are all-gathered so every process holds the
  # whole table (its training batches may draw any example).
  it = batching.BatchIterator(dataset, batch_size, shuffle=False, drop_remainder=False,
                              num_epochs=1, buckets=buckets or None, num_candidates=num_candidates)
  table = None
  for batch in it:
    r = rows_per_example(batch)
    rows = fn(params, batch["tokens"], batch["mask"], batch["loss_mask"])
    rows_BxR, index = parallel.allgather_rows(
        (parallel.local_rows(rows).reshape(-1, r), np.asarray(batch["index"])))
    if table is None:
      table = np.zeros((len(dataset), r), np.float32)
    keep = index >= 0  # filler rows of the last batch have index -1
    table[index[keep]] = rows_BxR[keep]
  if parallel.is_coordinator():
    buf = io.BytesIO()
    np.savez(buf, key=json.dumps(key, sort_keys=True), table=table)
    fileio.atomic_write_bytes(path, buf.getvalue())
  logger.info("precomputed reference log-probs of %d examples x %d rows -> %s", *table.shape, path)
  return table


def make_transform(mode: str, *, model: models.Transformer, params: Any,
                   mesh: jax.sharding.Mesh | None, dataset: Any = None, path: str = "",
                   key: Mapping[str, Any] | None = None, batch_size: int = 0, buckets=None,
                   num_candidates: int = 0) -> ReferenceLogps:
  """The transform for ``mode`` (``on_the_fly`` | ``precomputed``; the latter needs ``dataset``,
  ``path``, ``key`` and the batching of the pass)."""
  if mode not in MODES:
    raise ValueError(f"reference mode={mode!r} is invalid; allowed: {' | '.join(MODES)}")
  fn = logps_fn(model, mesh)
  if mode == "on_the_fly":
    return ReferenceLogps(fn, params)
  if dataset is None or not path or key is None or batch_size < 1:
    raise ValueError("precomputed reference log-probs need dataset, path, key and batch_size")
  table = precompute_table(dataset, fn, params, path, key, batch_size=batch_size, buckets=buckets,
                           num_candidates=num_candidates)
  return ReferenceLogps(fn, params, table)
