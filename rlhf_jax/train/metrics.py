"""Metric sinks: JSON Lines + TensorBoard event files in the workdir, and a throttled console line.

``<workdir>/metrics.jsonl`` holds one object per write: ``{"step": s, "split": "train"|"eval"|...,
"time": unix_seconds, <name>: value, ...}``. On resume from step ``s`` lines with ``step > s``
(written after the last checkpoint by the interrupted run) are dropped, so the JSONL reads as one
uninterrupted run.

``<workdir>/tensorboard/`` holds ``tensorboardX`` event files: scalars tagged ``<split>/<name>``,
the run's config (``config.json``, flattened) as TensorBoard hparams at the start of every
session, and the samples an evaluation appended to ``<workdir>/samples.jsonl`` as a text table
(tag ``<split>/samples``). A run resumed from step ``s`` opens its writer with
``purge_step=s + 1`` and first rewrites the existing event files without the events of steps
after ``s`` (:func:`purge_events`), so what the interrupted run logged after its last checkpoint
is gone from the files too, like the JSONL truncation (``samples.jsonl`` likewise).
:func:`read_tensorboard` reads the files back (TensorBoard's own reader is not a dependency).

Paths go through ``rlhf_jax.fileio``: with a remote workdir (``gs://...``) the JSONL object is
rewritten with each new row (object stores cannot append) and the event files are written to a
local staging folder and uploaded after every flush (tensorboardX would need a GCS client).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import shutil
import struct
import tempfile
import time
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

from rlhf_jax import fileio

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"
MAX_TEXT_SAMPLES = 8  # rows of samples.jsonl shown per evaluation in TensorBoard's text tab
_WRITER_IDS = itertools.count()


def _clean(value):
  value = float(value)
  return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf


def flatten_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"optim.lr": 3e-3, ...}``: nested config values as TensorBoard hparams (bool/int/float/str)."""
  out: dict[str, Any] = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten_hparams(value, name + "."))
    elif value is None:
      continue
    elif isinstance(value, (bool, int, float, str)):
      out[name] = value
    else:  # tuples / lists: their JSON text
      out[name] = json.dumps(value)
  return out


def _samples_markdown(rows: list[dict]) -> str:
  cols = [c for c in ("prompt", "response", "gold", "rm", "kl") if any(c in r for r in rows)]
  cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
  lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
  lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


class MetricsWriter:
  """Writes scalar metrics to ``metrics.jsonl`` and TensorBoard events under ``workdir``.

  Args:
    resume_step: the checkpoint step a resumed run restarts from: JSONL rows and TensorBoard
      events after it are dropped (TensorBoard: ``purge_step=resume_step + 1``).
    hparams: the run's config for TensorBoard's hparams tab (default: ``<workdir>/config.json``,
      which the loop writes before opening the writer; ``{}`` writes none).
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None,
               tensorboard_events: bool = True, hparams: Mapping[str, Any] | None = None):
    fileio.makedirs(workdir)
    self.jsonl_path = fileio.join(workdir, METRICS_FILE)
    if resume_step is not None and fileio.exists(self.jsonl_path):
      _truncate_after(self.jsonl_path, resume_step)
    if resume_step is not None and fileio.exists(fileio.join(workdir, SAMPLES_FILE)):
      _truncate_after(fileio.join(workdir, SAMPLES_FILE), resume_step)
    tb_dir = fileio.join(workdir, TENSORBOARD_DIR)
    if resume_step is not None and fileio.isdir(tb_dir):
      purge_events(tb_dir, resume_step)
    # A local file is appended through one open handle; a remote object is rewritten per row.
    self._jsonl = None if fileio.is_remote(self.jsonl_path) else open(self.jsonl_path, "a")
    self._samples_path = fileio.join(workdir, SAMPLES_FILE)
    self._samples_offset = (fileio.getsize(self._samples_path)
                            if fileio.exists(self._samples_path) else 0)
    self._tb = None
    self._tb_remote = tb_dir if fileio.is_remote(tb_dir) else None
    self._tb_local = tempfile.mkdtemp(prefix="rlhf_jax_tb_") if self._tb_remote else tb_dir
    if tensorboard_events:
      import tensorboardX  # pylint: disable=import-outside-toplevel

      # pid + counter: two writers opened in the same second get distinct files (the name's
      # timestamp has one-second resolution).
      self._tb = tensorboardX.SummaryWriter(
          self._tb_local,
          flush_secs=30,
          # rows of step <= resume_step were logged before the checkpoint and are kept (as in
          # the JSONL); later ones were logged by the interrupted run after it.
          purge_step=None if resume_step is None else resume_step + 1,
          filename_suffix=f".{os.getpid()}.{next(_WRITER_IDS)}")
      if hparams is None:
        config_path = fileio.join(workdir, "config.json")
        hparams = fileio.read_json(config_path) if fileio.exists(config_path) else {}
      if hparams:
        self._write_hparams(flatten_hparams(hparams))
        self._flush_tb()

  def _flush_tb(self) -> None:
    """Flushes the event files; with a remote workdir, uploads the staged ones (whole files)."""
    self._tb.flush()
    self._upload_tb()

  def _upload_tb(self) -> None:
    if self._tb_remote:
      for name in os.listdir(self._tb_local):
        fileio.upload_file(os.path.join(self._tb_local, name), fileio.join(self._tb_remote, name))

  def _write_hparams(self, hparams: dict[str, Any]) -> None:
    from tensorboardX import summary  # pylint: disable=import-outside-toplevel

    for proto in summary.hparams(hparams, {}):  # experiment, session start, session end
      self._tb.file_writer.add_summary(proto)

  def write(self, step: int, metrics: Mapping[str, float], *, split: str = "train") -> None:
    row = {"step": int(step), "split": split, "time": round(time.time(), 3)}
    row.update({k: _clean(v) for k, v in metrics.items()})
    if self._jsonl is None:
      fileio.append_text(self.jsonl_path, json.dumps(row) + "\n")
    else:
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
      if split != "train":
        self._write_new_samples(int(step), split)
      self._flush_tb()

  def write_text(self, step: int, tag: str, text: str) -> None:
    """A markdown text summary (TensorBoard's text tab)."""
    if self._tb is not None:
      self._tb.add_text(tag, text, int(step))
      self._flush_tb()

  def _write_new_samples(self, step: int, split: str) -> None:
    """The rows of ``samples.jsonl`` this evaluation appended, as a text table."""
    if not fileio.exists(self._samples_path):
      return
    with fileio.open_file(self._samples_path, "rb") as f:
      f.seek(self._samples_offset)
      # Split on b"\n" only (JSON text may hold other line separators); the part after the last
      # newline is a row being written: read it next time.
      lines = f.read().split(b"\n")[:-1]
    self._samples_offset += sum(len(line) + 1 for line in lines)
    rows = []
    for line in lines:
      try:
        row = json.loads(line)
      except ValueError:  # not JSON, or not UTF-8
        continue
      if row.get("step") == step and len(rows) < MAX_TEXT_SAMPLES:
        rows.append(row)
    if rows:
      self._tb.add_text(f"{split}/samples", _samples_markdown(rows), step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
      self._upload_tb()
      if self._tb_remote:
        shutil.rmtree(self._tb_local, ignore_errors=True)


class TensorBoardEvents(NamedTuple):
  """What :func:`read_tensorboard` found: ``(step, tag, value)`` rows, in write order."""

  scalars: list
  texts: list
  hparams: dict


def _records(path: str) -> Iterator[bytes]:
  """The payloads of a TFRecord file (``uint64 len | crc | data | crc``); CRCs are checked."""
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=import-outside-toplevel

  data = fileio.read_bytes(path)
  pos = 0
  while pos + 12 <= len(data):
    header = data[pos:pos + 8]
    (n,) = struct.unpack("<Q", header)
    body = data[pos + 12:pos + 12 + n]
    crcs = struct.unpack("<II", data[pos + 8:pos + 12] + data[pos + 12 + n:pos + 16 + n])
    if len(body) < n or crcs != (masked_crc32c(header), masked_crc32c(body)):
      raise ValueError(f"{path}: corrupt record at byte {pos}")
    yield body
    pos += 16 + n


def read_tensorboard(logdir: str) -> TensorBoardEvents:
  """Scalars, texts and hparams of every event file in ``logdir``, with purges applied.

  Files are read in the order they were opened; an event ``session_log: START`` at step ``s``
  (a resumed writer's ``purge_step``) drops the earlier rows with step >= ``s``, as TensorBoard
  does.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import plugin_hparams_pb2  # pylint: disable=import-outside-toplevel

  files = []
  for name in fileio.listdir(logdir):
    if ".tfevents." in name:
      path = fileio.join(logdir, name)
      first = next(_records(path), None)
      wall = event_pb2.Event.FromString(first).wall_time if first else 0.0
      files.append((wall, name, path))
  scalars, texts, hparams = [], [], {}
  for _, _, path in sorted(files):
    for record in _records(path):
      event = event_pb2.Event.FromString(record)
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        scalars = [r for r in scalars if r[0] < event.step]
        texts = [r for r in texts if r[0] < event.step]
      for value in event.summary.value:
        plugin = value.metadata.plugin_data.plugin_name
        if value.HasField("simple_value"):
          scalars.append((event.step, value.tag, value.simple_value))
        elif plugin == "text":
          texts.append((event.step, value.tag.removesuffix("/text_summary"),
                        value.tensor.string_val[0].decode("utf-8")))
        elif plugin == "hparams" and value.tag.endswith("session_start_info"):
          data = plugin_hparams_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
          for key, hp in data.session_start_info.hparams.items():
            hparams[key] = getattr(hp, hp.WhichOneof("kind"))
  return TensorBoardEvents(scalars, texts, hparams)


class NullWriter:
  """The ``MetricsWriter`` interface for non-coordinator processes: writes nothing."""

  def write(self, step: int, metrics: Mapping[str, float], *, split: str = "train") -> None:
    del step, metrics, split

  def close(self) -> None:
    pass


def purge_events(logdir: str, step: int) -> int:
  """Rewrites every event file in ``logdir`` without the events of steps after ``step``.

  What an interrupted run logged after its last checkpoint is removed from the files themselves
  (the resumed writer's ``purge_step`` only asks TensorBoard to hide it), so every reader sees one
  uninterrupted run. A record cut by ``kill -9`` ends the file's readable part. Each file is
  replaced atomically; returns the number of events dropped.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=import-outside-toplevel

  dropped = 0
  for name in fileio.listdir(logdir):
    if ".tfevents." not in name or ".tmp" in name:
      continue
    path = fileio.join(logdir, name)
    kept, cut = [], 0
    try:
      for record in _records(path):
        event = event_pb2.Event.FromString(record)
        if event.step > step and (event.HasField("summary") or event.HasField("session_log")):
          cut += 1
        else:
          kept.append(record)
    except ValueError:  # a record cut by kill -9: keep what precedes it
      cut += 1
    if not cut:
      continue
    dropped += cut
    out = []
    for record in kept:
      header = struct.pack("<Q", len(record))
      out.append(header + struct.pack("<I", masked_crc32c(header)) + record +
                 struct.pack("<I", masked_crc32c(record)))
    fileio.atomic_write_bytes(path, b"".join(out))
  return dropped


def _truncate_after(path: str, step: int) -> None:
  """Atomically rewrites a metrics JSONL keeping the rows with ``step <= step``."""
  keep = []
  with fileio.open_file(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line cut by kill -9
        continue
      if row.get("step", 0) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
  fileio.atomic_write_text(path, "".join(keep))


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  """Rows of ``<workdir>/metrics.jsonl`` (optionally of one split), e.g. for plotting."""
  rows = []
  with fileio.open_file(fileio.join(workdir, METRICS_FILE)) as f:
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

  def __init__(self, total_steps: int, start_step: int, every_secs: float = 5.0,
               keys: Sequence[str] = ()):
    self.total_steps = total_steps
    self.every_secs = every_secs
    self.keys = tuple(keys)  # extra metrics shown in the line (e.g. PPO's gold reward, KL)
    self._last_time = time.perf_counter()
    self._last_step = start_step
    self._tokens = 0.0

  def restart(self, step: int) -> None:
    """Restarts the throughput clock at ``step`` (after an evaluation, so it does not count)."""
    self._last_time, self._last_step, self._tokens = time.perf_counter(), step, 0.0

  def add_tokens(self, n: float) -> None:
    self._tokens += n

  def maybe_report(self, step: int, metrics: Mapping[str, float],
                   force: bool = False) -> dict | None:
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
    extra = "".join(f" | {k} {metrics[k]:.4g}" for k in self.keys if k in metrics)
    logger.info("step %d/%d | loss %.4f%s | %.0f tok/s | %.2f step/s | ETA %s", step,
                self.total_steps, loss, extra, tokens_per_s, steps_per_s, _fmt_duration(eta))
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
    points = [(r["step"], r[name])
              for r in rows
              if r["split"] == split and isinstance(r.get(name), (int, float))]
    if not points:
      raise KeyError(f"no {split!r} rows with metric {name!r} in {workdir}/metrics.jsonl")
    ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
    ax.set_title(f"{split}/{name}")
    ax.set_xlabel("step")
  fig.tight_layout()
  out_path = out_path or fileio.join(workdir, "metrics.png")
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  fileio.atomic_write_bytes(out_path, buf.getvalue())
  plt.close(fig)
  return out_path
