"""Result tables (CSV + markdown) and the gold-reward-vs-KL frontier plot, for sweeps and the pipeline.

A *row* is a flat dict (one run or method). ``write_table`` keeps the given column order, formats
floats to 4 significant digits in markdown and full precision in CSV, and leaves a missing value
empty (a failed run still gets its row, with its status). ``plot_frontier`` draws each labelled
point at (KL(π ‖ π_SFT), gold reward), optional curves (best-of-n over n, a method's evaluations
over training) and the SFT model at (0, its gold reward); it uses matplotlib's Agg backend so it
runs headless.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Mapping, Sequence


def _fmt(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    if math.isnan(value):
      return "nan"
    return f"{value:.4g}"
  return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(_fmt(row.get(c)).replace("|", "\\|") for c in columns) + " |")
  return "\n".join(lines) + "\n"


def write_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, csv_path: str | None,
                md_path: str | None, title: str = "", preamble: str = "") -> str:
  """Writes ``rows`` as CSV and/or markdown (atomically); returns the markdown table."""
  table = markdown_table(rows, columns)
  if csv_path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    _atomic_write(csv_path, buf.getvalue())
  if md_path:
    text = (f"# {title}\n\n" if title else "") + (preamble + "\n\n" if preamble else "") + table
    _atomic_write(md_path, text)
  return table


def _atomic_write(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def plot_frontier(points: Sequence[Mapping[str, Any]], path: str, *,
                  curves: Mapping[str, Sequence[tuple[float, float]]] | None = None,
                  sft_gold: float | None = None, title: str = "gold reward vs KL to SFT") -> None:
  """PNG of gold reward (y) against KL(π ‖ π_SFT) (x).

  Args:
    points: dicts with ``label``, ``kl_to_sft``, ``gold_reward`` (rows without both are skipped).
    curves: ``{label: [(kl, gold), ...]}`` drawn as lines with markers.
    sft_gold: the SFT model's gold reward, drawn at KL 0 and as a dotted horizontal line.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
  for label, curve in (curves or {}).items():
    if curve:
      xs, ys = zip(*curve)
      ax.plot(xs, ys, "-", marker=".", alpha=0.55, label=label)
  for point in points:
    kl, gold = point.get("kl_to_sft"), point.get("gold_reward")
    if not isinstance(kl, (int, float)) or not isinstance(gold, (int, float)):
      continue
    if not (math.isfinite(kl) and math.isfinite(gold)):
      continue
    ax.scatter([kl], [gold], s=40, zorder=3)
    ax.annotate(str(point["label"]), (kl, gold), textcoords="offset points", xytext=(5, 4),
                fontsize=8)
  if sft_gold is not None and math.isfinite(sft_gold):
    ax.axhline(sft_gold, color="gray", linestyle=":", linewidth=1)
    ax.scatter([0.0], [sft_gold], marker="s", color="black", zorder=3)
    ax.annotate("SFT", (0.0, sft_gold), textcoords="offset points", xytext=(5, -10), fontsize=8)
  ax.set_xlabel("KL(π ‖ π_SFT), nats per response (sampled; best-of-n: analytic)")
  ax.set_ylabel("mean gold reward (held-out prompts)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if curves:
    ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}.png"
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, path)
