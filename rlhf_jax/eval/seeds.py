"""Statistics over repeated runs (seeds): mean ± standard error, paired differences, table rows.

For values x_1..x_n of one metric over n seeds (missing or non-finite values dropped),

  mean = (1/n) Σ_k x_k,   s.e. = s / √n,   s² = (1/(n-1)) Σ_k (x_k - mean)²

(the sample standard deviation, ddof = 1); with n < 2 the standard error is undefined (None).
Two methods run on the same seeds share that seed's SFT model, reward model and evaluation
samples, so their gap is measured on the per-seed differences d_k = a_k - b_k, whose standard error
s_d / √n is usually smaller than the two errors combined (:func:`paired_difference`). An ordering
"a above b" is *supported* here when |mean(d)| > 2 s.e.(d) (:func:`supported`): with 3 seeds that
is a loose screen (a two-sided t-test at 5 % would ask for 4.3 s.e.), not a significance test.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Stat:
  """Mean and standard error of ``n`` finite values (``se`` is None when n < 2)."""

  mean: float | None
  se: float | None
  n: int


def finite_values(values: Iterable[Any]) -> list[float]:
  return [
      float(v)
      for v in values
      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def mean_se(values: Iterable[Any]) -> Stat:
  """:class:`Stat` of the finite numbers among ``values`` (None, NaN, strings are skipped)."""
  x_N = np.asarray(finite_values(values), np.float64)
  n = int(x_N.size)
  if n == 0:
    return Stat(None, None, 0)
  se = float(np.std(x_N, ddof=1) / math.sqrt(n)) if n > 1 else None
  return Stat(float(np.mean(x_N)), se, n)


def paired_difference(a: Sequence[Any], b: Sequence[Any]) -> Stat:
  """:class:`Stat` of a_k - b_k over the seeds k where both are finite numbers."""
  if len(a) != len(b):
    raise ValueError(f"paired_difference: {len(a)} values vs {len(b)}; allowed: one per seed each")
  pairs = [(x, y) for x, y in zip(a, b) if finite_values([x]) and finite_values([y])]
  return mean_se([float(x) - float(y) for x, y in pairs])


def supported(diff: Stat, num_se: float = 2.0) -> bool:
  """Whether the sign of a paired difference is supported: |mean| > ``num_se`` standard errors."""
  return diff.se is not None and diff.mean is not None and abs(diff.mean) > num_se * diff.se


def format_mean_se(stat: Stat) -> str:
  """``"0.507 ± 0.031"``: the error to 2 significant digits, the mean to the same decimal place;
  without an error, the mean to 4 significant digits (the single-run tables' format)."""
  if stat.mean is None:
    return ""
  # An error at rounding level (equal values: 0.7 three times gives s.e. ~1e-17) is no error.
  if stat.se is None or not math.isfinite(stat.se) or stat.se <= 1e-9 * max(abs(stat.mean), 1e-9):
    return f"{stat.mean:.4g}"
  decimals = max(0, 1 - math.floor(math.log10(stat.se)))
  return f"{stat.mean:.{decimals}f} ± {stat.se:.{decimals}f}"


def combine_status(statuses: Sequence[Any]) -> str:
  """One status for a metric's seeds: the common one, else each seed's (``seed k: ...``)."""
  texts = ["missing" if s is None else str(s) for s in statuses]
  if len(set(texts)) == 1:
    return texts[0]
  return "; ".join(f"seed {k}: {s}" for k, s in enumerate(texts))[:300]


def aggregate_rows(rows_by_seed: Sequence[Sequence[Mapping[str, Any]]], stat_columns: Sequence[str],
                   mean_columns: Sequence[str] = (), key: str = "method",
                   status_column: str = "status") -> list[dict]:
  """One row per ``key`` value (in order of first appearance) over the seeds' tables.

  Each ``stat_columns`` entry ``c`` becomes ``c`` (mean), ``c_se`` (standard error) and ``c_n``
  (seeds with a finite value); ``mean_columns`` get their mean only (seconds, steps);
  ``num_seeds`` = seeds that have the row; ``status`` = :func:`combine_status` over the seeds (a
  seed without the row counts as ``missing``). ``c_stat`` holds the :class:`Stat` for formatting.
  """
  order: list[Any] = []
  by_key: dict[Any, list[Mapping[str, Any] | None]] = {}
  for k, rows in enumerate(rows_by_seed):
    for row in rows:
      name = row.get(key)
      if name not in by_key:
        order.append(name)
        by_key[name] = [None] * len(rows_by_seed)
      by_key[name][k] = row
  out = []
  for name in order:
    seeds = by_key[name]
    present = [r for r in seeds if r is not None]
    agg: dict[str, Any] = {key: name, "num_seeds": len(present)}
    for col in stat_columns:
      stat = mean_se(r.get(col) for r in present)
      agg.update({col: stat.mean, f"{col}_se": stat.se, f"{col}_n": stat.n, f"{col}_stat": stat})
    for col in mean_columns:
      agg[col] = mean_se(r.get(col) for r in present).mean
    agg[status_column] = combine_status([
        None if r is None else r.get(status_column) for r in seeds])
    out.append(agg)
  return out
