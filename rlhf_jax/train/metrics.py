"""Metric sinks: JSON Lines + TensorBoard event files in the workdir, and a throttled console line.

``<workdir>/metrics.jsonl`` holds one object per write: ``{"step": s, "split": "train"|"eval"|...,
"time": unix_seconds, <name>: value, ...}``; ``<workdir>/tensorboard/`` holds event files with tags
``<split>/<name>``. On resume from step ``s`` lines with ``step > s`` (written after the last
checkpoint by the interrupted run) are dropped, so the JSONL reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Mapping

from rlhf_jax.train import tensorboard

logger = logging.getLogger(__name__)


def _clean(value):
  value = float(value)
  return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf


class MetricsWriter:
  """Writes scalar metrics to ``metrics.jsonl`` and TensorBoard events under ``workdir``."""

  def __init__(self, workdir: str, *, resume_step: int | None = None, tensorboard_events: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None and os.path.exists(self.jsonl_path):
      _truncate_after(self.jsonl_path, resume_step)
    self._jsonl = open(self.jsonl_path, "a")
    self._tb = (tensorboard.EventFileWriter(os.path.join(workdir, "tensorboard"))
                if tensorboard_events else None)

  def write(self, step: int, metrics: Mapping[str, float], *, split: str = "train") -> None:
    row = {"step": int(step), "split": split, "time": round(time.time(), 3)}
    row.update({k: _clean(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.scalars(step, {f"{split}/{k}": float(v) for k, v in metrics.items()})
      self._tb.flush()

  def close(self) -> None:
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class NullWriter:
  """The ``MetricsWriter`` interface for non-coordinator processes: writes nothing."""

  def write(self, step: int, metrics: Mapping[str, float], *, split: str = "train") -> None:
    del step, metrics, split

  def close(self) -> None:
    pass


def _truncate_after(path: str, step: int) -> None:
  """Atomically rewrites a metrics JSONL keeping the rows with ``step <= step``."""
  keep = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line cut by kill -9
        continue
      if row.get("step", 0) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  """Rows of ``<workdir>/metrics.jsonl`` (optionally of one split), e.g. for plotting."""
  rows = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if split is None or row["split"] == split:
        rows.append(row)
  return rows


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """A one-line console report (step, loss, tokens/s, ETA), at most every ``every_secs`` seconds.

  Throughput is measured between reports, on the host clock, over steps whose metrics have been
  read back (so it counts finished device work, not dispatches).
  """

  def __init__(self, total_steps: int, start_step: int, every_secs: float = 5.0):
    self.total_steps = total_steps
    self.every_secs = every_secs
    self._last_time = time.perf_counter()
    self._last_step = start_step
    self._tokens = 0.0

  def restart(self, step: int) -> None:
    """Restarts the throughput clock at ``step`` (after an evaluation, so it does not count)."""
    self._last_time, self._last_step, self._tokens = time.perf_counter(), step, 0.0

  def add_tokens(self, n: float) -> None:
    self._tokens += n

  def maybe_report(self, step: int, metrics: Mapping[str, float], force: bool = False) -> dict | None:
    """Logs a line if due; returns the throughput numbers it logged (or None)."""
    now = time.perf_counter()
    dt = now - self._last_time
    if not force and dt < self.every_secs:
      return None
    steps = step - self._last_step
    if steps <= 0 or dt <= 0:
      return None
    steps_per_s = steps / dt
    tokens_per_s = self._tokens / dt
    eta = (self.total_steps - step) / steps_per_s
    loss = metrics.get("loss", float("nan"))
    logger.info("step %d/%d | loss %.4f | %.0f tok/s | %.2f step/s | ETA %s", step,
                self.total_steps, loss, tokens_per_s, steps_per_s, _fmt_duration(eta))
    self._last_time, self._last_step, self._tokens = now, step, 0.0
    return {"tokens_per_s": tokens_per_s, "steps_per_s": steps_per_s}


def plot_metrics(workdir: str, keys: list[str], out_path: str | None = None) -> str:
  """Plots ``keys`` (each ``name`` or ``split/name``, default split ``train``) against step.

  One panel per key, written to ``out_path`` (default ``<workdir>/metrics.png``); returns the path.
  ``python -m rlhf_jax.train.plot WORKDIR loss eval/eval_nll_per_token eval/sample_gold_reward``.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = read_metrics(workdir)
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
  for ax, key in zip(axes[0], keys):
    split, _, name = key.rpartition("/")
    split = split or "train"
    points = [(r["step"], r[name]) for r in rows
              if r["split"] == split and isinstance(r.get(name), (int, float))]
    if not points:
      raise KeyError(f"no {split!r} rows with metric {name!r} in {workdir}/metrics.jsonl")
    ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
    ax.set_title(f"{split}/{name}")
    ax.set_xlabel("step")
  fig.tight_layout()
  out_path = out_path or os.path.join(workdir, "metrics.png")
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return out_path

