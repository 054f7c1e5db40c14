"""Result tables (CSV + markdown) and the gold-reward-vs-KL frontier plot, for sweeps and the pipeline.

A *row* is a flat dict (one run or method). ``write_table`` keeps the given column order, formats
floats to 4 significant digits in markdown and full precision in CSV, and leaves a missing value
empty (a failed run still gets its row, with its status). ``plot_frontier`` draws each labelled
point at (KL(π ‖ π_SFT), gold reward), optional curves (best-of-n over n, a method's evaluations
over training) and the SFT model at (0, its gold reward); it uses matplotlib's Agg backend so it
runs headless. Over several seeds a point carries its standard errors (``kl_to_sft_se``,
``gold_reward_se``: drawn as error bars) and ``seed_points`` draws each seed's run small and hollow
in its mean's colour.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Sequence

from rlhf_jax import fileio


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
                md_path: str | None, title: str = "", preamble: str = "",
                postscript: str = "") -> str:
  """Writes ``rows`` as CSV and/or markdown (atomically); returns the markdown table.

  The markdown file is ``# title``, ``preamble``, the table, then ``postscript`` (more sections).
  """
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
    text += postscript
    _atomic_write(md_path, text)
  return table


def _atomic_write(path: str, text: str) -> None:
  fileio.atomic_write_text(path, text)  # a local path or a URL (a sweep dir on gs://)


def _finite(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_frontier(
    points: Sequence[Mapping[str, Any]], path: str, *,
    curves: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    sft_gold: float | None = None, title: str = "gold reward vs KL to SFT",
    sft_gold_se: float | None = None, seed_points: Sequence[Mapping[str, Any]] = ()) -> None:
  """PNG of gold reward (y) against KL(π ‖ π_SFT) (x).

  Args:
    points: dicts with ``label``, ``kl_to_sft``, ``gold_reward`` (rows without both are skipped),
      optionally ``kl_to_sft_se`` / ``gold_reward_se`` (drawn as ± error bars).
    curves: ``{label: [(kl, gold), ...]}`` drawn as lines with markers.
    sft_gold: the SFT model's gold reward, drawn at KL 0 and as a dotted horizontal line
      (``sft_gold_se``: its error bar).
    seed_points: each seed's point (``label``, ``kl_to_sft``, ``gold_reward``), small and hollow in
      the colour of the point with the same label (``SFT``: black).
  """
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
  for label, curve in (curves or {}).items():
    if curve:
      xs, ys = zip(*curve)
      ax.plot(xs, ys, "-", marker=".", alpha=0.55, label=label)
  spread = bool(seed_points) or any(
      _finite(p.get("kl_to_sft_se")) or _finite(p.get("gold_reward_se")) for p in points)
  colours = {"SFT": "black"}
  for i, point in enumerate(points):
    kl, gold = point.get("kl_to_sft"), point.get("gold_reward")
    if not (_finite(kl) and _finite(gold)):
      continue
    if spread:  # one colour per label, shared by its error bars and its seeds' points
      colour = colours.setdefault(str(point["label"]), plt.get_cmap("tab10")(i % 10))
      kl_se, gold_se = point.get("kl_to_sft_se"), point.get("gold_reward_se")
      ax.errorbar([kl], [gold], xerr=[kl_se] if _finite(kl_se) else None,
                  yerr=[gold_se] if _finite(gold_se) else None, fmt="o", markersize=6, color=colour,
                  capsize=3, zorder=3)
    else:
      ax.scatter([kl], [gold], s=40, zorder=3)
    ax.annotate(str(point["label"]), (kl, gold), textcoords="offset points", xytext=(5, 4),
                fontsize=8)
  for point in seed_points:
    kl, gold = point.get("kl_to_sft"), point.get("gold_reward")
    if _finite(kl) and _finite(gold):
      ax.scatter([kl], [gold], s=14, facecolors="none", alpha=0.7, zorder=2,
                 edgecolors=[colours.get(str(point.get("label")), "gray")])
  if sft_gold is not None and math.isfinite(sft_gold):
    ax.axhline(sft_gold, color="gray", linestyle=":", linewidth=1)
    if _finite(sft_gold_se):
      ax.errorbar([0.0], [sft_gold], yerr=[sft_gold_se], fmt="none", color="black", capsize=3,
                  zorder=3)
    ax.scatter([0.0], [sft_gold], marker="s", color="black", zorder=3)
    ax.annotate("SFT", (0.0, sft_gold), textcoords="offset points", xytext=(5, -10), fontsize=8)
  ax.set_xlabel("KL(π ‖ π_SFT), nats per response (sampled; best-of-n: analytic)")
  ax.set_ylabel("mean gold reward (held-out prompts)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if curves:
    ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  fileio.save_figure(fig, path)
  plt.close(fig)
