"""Held-out evaluation of a reward model during and after training.

The held-out splits are materialised once as fixed-shape host arrays (one padded length, so one
compile per chunk size) and scored with the raw head outputs r (before normalisation: calibration
is a property of r, see ``eval.reward_metrics``). What is measured (keys of the returned dict):

* ``eval_loss``: the training objective on its own held-out split (valid rows only); early
  stopping watches it. When that split *is* the held-out pairs (``bradley_terry``), it is computed
  from the pairwise scores with ``pair_loss_fn`` instead of a second forward over the same pairs.
* ``pairwise/*``: :func:`eval.reward_metrics.pairwise_metrics` on held-out pairs (accuracy,
  precision, recall, F1, AUC, ECE of σ(r_c - r_r), ...), for every objective, so pairwise and
  listwise RMs are compared on the same pairs. On the synthetic task also ``gold/*``
  (:func:`eval.reward_metrics.gold_pairwise_metrics`: Bayes-optimal vs expected accuracy, gold
  agreement).
* ``ranked/*``: Kendall's τ_b, top-1 and pair accuracy on held-out ranked lists.
* ``rated/<output>/*``: for rating objectives, per output (attribute): regression metrics against the
  rescaled held-out ratings, and pairwise metrics over pairs of held-out records that share a prompt
  and differ in that rating (the better-rated one plays "chosen"). This gives per-attribute accuracy,
  precision, recall, F1, AUC and ECE from rating data alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models, parallel
from rlhf_jax.algorithms.reward import objectives
from rlhf_jax.data import batching
from rlhf_jax.data import dataset as ds_lib
from rlhf_jax.data.kinds import pairwise as pairwise_kind
from rlhf_jax.eval import ranking_metrics, reward_metrics


@dataclasses.dataclass
class HeldOut:
  """Materialised held-out data. Any field may be None when that split does not exist."""

  objective_batches: list  # fixed-shape batches of the objective's kind (with `valid`)
  pairwise: dict | None = None  # tokens/mask [2N, T] (rows 2n, 2n+1: pair n's chosen, rejected)
  pairwise_gold: tuple | None = None  # (gold_chosen [N], gold_rejected [N], bt_temperature)
  ranked: dict | None = None  # tokens/mask [N·K, T], candidate_mask, scores [N, K]
  rated: dict | None = None  # tokens/mask [N, T], targets [N, A] in [-1, 1], prompt_keys [N]
  output_names: tuple = ("reward",)
  objective_is_pairwise: bool = False  # objective_batches hold exactly the rows of `pairwise`


def materialize(dataset: ds_lib.TokenizedDataset, batch_size: int, max_examples: int,
                max_len: int) -> list[dict]:
  """The first ``max_examples`` examples as fixed-shape batches (filler rows have ``valid = 0``)."""
  it = batching.BatchIterator(dataset, batch_size, shuffle=False, drop_remainder=False,
                              num_epochs=1, buckets=(max_len,), process_index=0, process_count=1)
  num_batches = -(-min(len(dataset), max_examples) // batch_size)
  return [b for _, b in zip(range(num_batches), it)]


def concat_batches(batches: Sequence[dict], limit: int) -> dict:
  """Concatenates materialised batches, keeping the first ``limit`` valid examples (of any kind:
  a pair's or a list's sequence rows stay together, ``batching.take_examples``)."""
  out = {k: np.concatenate([b[k] for b in batches], axis=0) for k in batches[0]}
  keep = np.flatnonzero(out["valid"] > 0)[:limit]
  return batching.take_examples(out, keep)


def prompt_keys(dataset: ds_lib.TokenizedDataset, n: int) -> list[bytes]:
  """Hashable prompt identities of the first ``n`` examples (to pair records of one prompt)."""
  return [np.asarray(dataset[i]["prompt"], np.int32).tobytes() for i in range(n)]


class EvalInterrupted(Exception):
  """``should_stop()`` turned true during an evaluation (e.g. SIGTERM): the evaluation is abandoned."""


def _check(should_stop: Callable[[], bool] | None) -> None:
  if should_stop is not None and should_stop():
    raise EvalInterrupted("evaluation interrupted")


def make_raw_scorer(model: models.RewardModel, chunk: int,
                    mesh: jax.sharding.Mesh | None = None) -> Callable[..., np.ndarray]:
  """``score(params, tokens_NxT, mask_NxT, should_stop=None) -> raw rewards [N, K]`` (host), in
  padded chunks; raises :class:`EvalInterrupted` between chunks once ``should_stop()`` is true.

  Every process passes all N rows (the held-out sets are materialised whole on each host, the
  metrics need every score); with ``mesh`` each chunk is split over its batch axes
  (``parallel.shard_rows``) and the scores gathered back (``parallel.to_host``)."""

  @jax.jit
  def raw(params, tokens, mask):
    return model.apply({"params": params}, tokens, mask)

  def score(params, tokens, mask, should_stop=None):
    tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, np.int32)
    outs = []
    for start in range(0, len(tokens), chunk):
      _check(should_stop)
      tok, msk = tokens[start:start + chunk], mask[start:start + chunk]
      n = len(tok)
      if n < chunk:
        tok = np.pad(tok, ((0, chunk - n), (0, 0)))
        msk = np.pad(msk, ((0, chunk - n), (0, 0)))
      if mesh is not None:
        placed = parallel.shard_rows({"t": tok, "m": msk}, mesh)
        tok, msk = placed["t"], placed["m"]
      outs.append(np.asarray(parallel.to_host(raw(params, tok, msk)))[:n])
    return np.concatenate(outs, axis=0)

  return score


def make_eval_loss_fn(objective_fn: Callable, mesh: jax.sharding.Mesh | None = None) -> Callable:
  """``(params, batch) -> (sum of per-example losses over valid rows, number of valid rows)`` on
  the host; ``batch`` is whole on every process, split over ``mesh`` (``parallel.shard_rows``)."""

  @jax.jit
  def eval_loss(params, batch):
    per_example_B, _ = objective_fn(params, batch, None)
    valid_B = batch["valid"].astype(jnp.float32)
    return jnp.sum(per_example_B * valid_B), jnp.sum(valid_B)

  def fn(params, batch):
    if mesh is not None:
      batch = parallel.shard_rows(batch, mesh)
    return parallel.to_host(eval_loss(params, batch))

  return fn


def same_prompt_pairs(keys: Sequence[bytes], values: np.ndarray, max_pairs: int,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Index pairs (better, worse) of records with the same prompt and different ``values``.

  At most ``max_pairs`` pairs, drawn uniformly (fixed ``seed``) when there are more.
  """
  groups: dict[bytes, list[int]] = {}
  for i, key in enumerate(keys):
    groups.setdefault(key, []).append(i)
  better, worse = [], []
  for idx in groups.values():
    for a in range(len(idx)):
      for b in range(a + 1, len(idx)):
        i, j = idx[a], idx[b]
        if values[i] != values[j]:
          better.append(i if values[i] > values[j] else j)
          worse.append(j if values[i] > values[j] else i)
  better, worse = np.asarray(better, np.int64), np.asarray(worse, np.int64)
  if len(better) > max_pairs:
    pick = np.sort(np.random.default_rng(seed).choice(len(better), max_pairs, replace=False))
    better, worse = better[pick], worse[pick]
  return better, worse


def _num(v: Any) -> float | int:
  return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else float(v)


def evaluate(params: Any, held_out: HeldOut, scorer: Callable, eval_loss_fn: Callable, *,
             full: bool, ece_bins: int = 10, max_rating_pairs: int = 5000,
             pair_loss_fn: Callable | None = None,
             should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
  """Held-out metrics (module docstring). ``full=False`` (periodic evals) skips the ranked and
  rated sets and the secondary pairwise numbers to keep evaluation cheap. ``pair_loss_fn(r_c, r_r)
  -> per-pair losses`` (the objective on pairs) is used for ``eval_loss`` when the objective's
  held-out split is the held-out pairs. ``should_stop()`` is polled between forward chunks; once
  true, :class:`EvalInterrupted` is raised (a held-out evaluation can take minutes on a CPU)."""
  metrics: dict[str, float] = {}
  reuse_pairs = (pair_loss_fn is not None and held_out.objective_is_pairwise and
                 held_out.pairwise is not None)
  if not reuse_pairs:
    total, count = 0.0, 0.0
    for batch in held_out.objective_batches:
      _check(should_stop)
      loss_sum, n = eval_loss_fn(params, batch)
      total, count = total + float(loss_sum), count + float(n)
    metrics["eval_loss"] = total / max(count, 1.0)

  if held_out.pairwise is not None:
    pw = held_out.pairwise
    raw = scorer(params, pw["tokens"], pw["mask"], should_stop=should_stop)
    # Multi-output RMs are compared on the sum of their (rescaled-rating) heads.
    rc, rr = pairwise_kind.split(raw.sum(axis=1))
    if reuse_pairs:
      metrics["eval_loss"] = float(np.mean(np.asarray(pair_loss_fn(rc, rr), np.float64)))
    pm = reward_metrics.pairwise_metrics(rc, rr, num_bins=ece_bins)
    keys = pm if full else ("accuracy", "auc", "ece", "log_loss")
    metrics.update({f"pairwise/{k}": _num(pm[k]) for k in keys})
    if held_out.pairwise_gold is not None:
      gc, gr, tau = held_out.pairwise_gold
      gm = reward_metrics.gold_pairwise_metrics(rc, rr, gc, gr, tau)
      metrics.update({f"gold/{k}": _num(v) for k, v in gm.items()})

  if full and held_out.ranked is not None:
    rk = held_out.ranked
    n, k = rk["candidate_mask"].shape
    raw = scorer(params, rk["tokens"], rk["mask"])
    r_NxK = raw.sum(axis=1).reshape(n, k)
    rm = ranking_metrics.list_ranking_metrics(r_NxK, rk["scores"], rk["candidate_mask"])
    metrics.update({f"ranked/{name}": _num(v) for name, v in rm.items()})

  if full and held_out.rated is not None:
    rt = held_out.rated
    raw = scorer(params, rt["tokens"], rt["mask"])
    for a, name in enumerate(held_out.output_names):
      pred, target = raw[:, a], rt["targets"][:, a]
      reg = reward_metrics.regression_metrics(pred, target)
      metrics.update({f"rated/{name}/{k}": _num(v) for k, v in reg.items()})
      better, worse = same_prompt_pairs(rt["prompt_keys"], target, max_rating_pairs)
      if len(better):
        pm = reward_metrics.pairwise_metrics(pred[better], pred[worse], num_bins=ece_bins)
        metrics.update({f"rated/{name}/pair_{k}": _num(v) for k, v in pm.items()})
  return metrics


def target_matrix(batch: dict, objective: str, rating_scale: Sequence[float]) -> np.ndarray:
  """Held-out rating targets ``[N, A]`` rescaled to [-1, 1] like the training targets."""
  values = batch["rating"][:, None] if objective == "likert" else batch["attributes"]
  return np.asarray(objectives.scale_targets(values.astype(np.float64), rating_scale))
