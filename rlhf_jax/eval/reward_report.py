"""The reward-model report (``rm_report.json`` + ``rm_report.md``) and the learning-curve plot.

The markdown holds one short table of the headline numbers (held-out pairwise metrics, the
synthetic task's Bayes-optimal accuracy next to the RM's, ranking metrics, gold correlation,
normalisation statistics); the JSON holds every metric plus the reward model's stored info.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Mapping, Sequence

from rlhf_jax import fileio
from rlhf_jax.train import checkpoint

REPORT_JSON = "rm_report.json"
REPORT_MD = "rm_report.md"

# (metric key, label) rows of the markdown table, in order; missing keys are left out.
_ROWS = (
    ("objective", "objective"),
    ("data/train_examples", "training records"),
    ("data/train_comparisons", "training comparisons"),
    ("data/train_tied_pairs", "tied pairs skipped (ranked data)"),
    ("final_params_step", "step of the saved params"),
    ("stopped_early", "stopped early"),
    ("eval_loss", "held-out objective loss"),
    ("pairwise/accuracy", "held-out pairwise accuracy (vs sampled labels)"),
    ("gold/expected_accuracy", "expected accuracy under the annotators' noise"),
    ("gold/bayes_optimal_accuracy", "Bayes-optimal accuracy (same pairs)"),
    ("gold/gold_agreement", "agreement with the gold preference"),
    ("gold/label_gold_agreement", "labels' agreement with the gold preference"),
    ("pairwise/precision", "precision"),
    ("pairwise/recall", "recall"),
    ("pairwise/f1", "F1"),
    ("pairwise/auc", "AUC-ROC"),
    ("pairwise/ece", "ECE of sigmoid(r_c - r_r)"),
    ("pairwise/num_pairs", "held-out pairs"),
    ("ranked/kendall_tau", "Kendall tau_b (held-out lists)"),
    ("ranked/top1_accuracy", "top-1 accuracy (held-out lists)"),
    ("ranked/pair_accuracy", "pair accuracy within lists"),
    ("gold_corr/gold/pearson", "Pearson(reward, gold) on fresh SFT samples"),
    ("gold_corr/gold/spearman", "Spearman(reward, gold) on fresh SFT samples"),
    ("gold_corr/num_samples", "fresh SFT samples"),
)


def json_value(v: Any) -> Any:
  """JSON-safe scalar: NaN / inf become strings (JSON has none), numpy scalars become Python."""
  if isinstance(v, (bool, str)) or v is None:
    return v
  if isinstance(v, (int,)) and not isinstance(v, bool):
    return int(v)
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return f if math.isfinite(f) else str(f)


def _fmt(v: Any) -> str:
  if isinstance(v, bool) or isinstance(v, str):
    return str(v)
  if isinstance(v, int):
    return str(v)
  try:
    return f"{float(v):.4f}"
  except (TypeError, ValueError):
    return str(v)


def markdown_table(metrics: Mapping[str, Any], extra_rows: Sequence[tuple[str, str]] = ()) -> str:
  lines = ["| metric | value |", "| --- | --- |"]
  for key, label in _ROWS:
    if key in metrics:
      lines.append(f"| {label} | {_fmt(metrics[key])} |")
  for key in sorted(k for k in metrics if k.startswith(("rated/", "gold_corr/")) and k.endswith((
      "/accuracy", "pair_accuracy", "pair_auc", "/pearson", "/spearman"))):
    if not key.startswith("gold_corr/gold/"):
      lines.append(f"| {key} | {_fmt(metrics[key])} |")
  for label, value in extra_rows:
    lines.append(f"| {label} | {value} |")
  return "\n".join(lines)


def write_report(workdir: str, metrics: Mapping[str, Any], info: Mapping[str, Any]) -> str:
  """Writes ``rm_report.json`` / ``rm_report.md`` to ``workdir``; returns the markdown text."""
  norm = info.get("normalization", {})
  extra = [("normalisation", f"{norm.get('source', '?')}; mu={_fmt_list(info.get('mean'))}, "
            f"sigma={_fmt_list(info.get('std'))}")]
  text = (f"# Reward model report: `{fileio.absolute(workdir)}`\n\n" +
          markdown_table(metrics, extra) + "\n")
  checkpoint.atomic_write_json(
      fileio.join(workdir, REPORT_JSON),
      {"metrics": {k: json_value(v) for k, v in metrics.items()}, "reward_model": info})
  fileio.atomic_write_text(fileio.join(workdir, REPORT_MD), text)
  return text


def _fmt_list(values: Any) -> str:
  return "[" + ", ".join(f"{float(v):.3f}" for v in values or ()) + "]"


def plot_learning_curve(rows: Sequence[Mapping[str, Any]], path: str, *,
                        bayes_optimal: float | None = None, metric: str = "pairwise/accuracy",
                        x: str = "num_prompts") -> str:
  """Plots ``metric`` against ``x`` (log scale), one line per ``row["objective"]``; writes a PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
  for objective in sorted({r["objective"] for r in rows}):
    pts = sorted((r[x], r[metric]) for r in rows if r["objective"] == objective)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=objective)
  if bayes_optimal is not None:
    ax.axhline(bayes_optimal, color="k", linestyle="--", linewidth=1, label="Bayes-optimal")
  ax.set_xscale("log")
  sizes = sorted({r[x] for r in rows})
  ax.minorticks_off()  # log minor labels (3x10^2, 4x10^2, ...) collide; label the sizes instead
  ax.set_xticks(sizes)
  ax.set_xticklabels([str(v) for v in sizes])
  ax.set_xlabel("annotated prompts (pairs, or ranked lists)" if x == "num_prompts" else x)
  ax.set_ylabel(f"held-out {metric}")
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  fileio.atomic_write_bytes(path, buf.getvalue())
  return path


def dumps(obj: Any) -> str:
  return json.dumps(obj, indent=2, sort_keys=True)
