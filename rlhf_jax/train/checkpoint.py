"""Orbax checkpoints of the train state and data position, guarded by a run fingerprint.

Layout of a workdir::

    <workdir>/config.json               the run's full config (atomic write)
    <workdir>/run_fingerprint.json      model config + tokenizer fingerprint (+ method): what a
                                        checkpoint here must match before it is restored
    <workdir>/checkpoints/<step>/state  TrainState (params, opt_state, step, rng) - orbax StandardSave
    <workdir>/checkpoints/<step>/data   data-iterator position - orbax JsonSave

Orbax writes every step into a temporary directory and renames it once all items are committed, and
``latest_step`` only sees committed steps, so a checkpoint cut by ``kill -9`` is never read (its
temporary directory is deleted on the next start). The JSON files here are written to a temporary
file and ``os.replace``-d, which is atomic on POSIX.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

FINGERPRINT_FILE = "run_fingerprint.json"
CHECKPOINT_DIR = "checkpoints"


class WorkdirMismatchError(ValueError):
  """The workdir holds checkpoints of a different model / tokenizer than this run's."""


def atomic_write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` via a temp file + ``os.replace`` (never half-written)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(obj, Mapping):
    out = {}
    for k, v in obj.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: obj}


def fingerprint_diff(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """Human-readable ``key: stored vs current`` lines for every differing (flattened) key."""
  a, b = _flatten(stored), _flatten(current)
  lines = []
  for key in sorted(set(a) | set(b)):
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      lines.append(f"  {key}: workdir has {a.get(key, '<absent>')!r}, this run has "
                   f"{b.get(key, '<absent>')!r}")
  return lines


def check_fingerprint(workdir: str, fingerprint: Mapping[str, Any]) -> None:
  """Refuses a workdir whose stored fingerprint differs; records it if the workdir has none.

  Raises:
    WorkdirMismatchError: naming each differing key, before orbax is ever asked to restore.
  """
  current = json.loads(json.dumps(fingerprint))  # normalise tuples -> lists etc.
  path = os.path.join(workdir, FINGERPRINT_FILE)
  ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
  if os.path.exists(path):
    stored = read_json(path)
    diff = fingerprint_diff(stored, current)
    if diff:
      raise WorkdirMismatchError(
          f"workdir {workdir!r} holds a run with a different model/tokenizer config, so its "
          "checkpoints cannot be resumed by this run:\n" + "\n".join(diff) +
          "\nUse a fresh --workdir, or the same config as the stored run.")
    return
  if os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir)):
    raise WorkdirMismatchError(
        f"workdir {workdir!r} has checkpoints but no {FINGERPRINT_FILE}; refusing to guess whether "
        "they match this run's model. Use a fresh --workdir.")
  if jax.process_index() == 0:
    atomic_write_json(path, current)


class Checkpointer:
  """Saves / restores ``(TrainState, data position)`` under ``<workdir>/checkpoints``.

  Saving is asynchronous: ``save`` returns once the arrays are copied off the device (so the state
  may be donated to the next step immediately) and the files are written in a background thread.
  Call ``wait()`` before reading them and ``close()`` at the end of the run.
  """

  def __init__(self, workdir: str, *, fingerprint: Mapping[str, Any], keep: int = 3):
    if keep < 1:
      raise ValueError(f"keep={keep} is invalid; allowed: an int >= 1 (checkpoints kept).")
    check_fingerprint(workdir, fingerprint)
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: Mapping[str, Any]) -> None:
    if step in self._manager.all_steps():
      return  # already saved (e.g. periodic save coinciding with the final one)
    self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(dict(data_state))), force=True)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores ``(state, data_state)`` at ``step`` (default latest) onto ``abstract_state``'s shardings."""
    step = self._manager.latest_step() if step is None else step
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return restored.state, dict(restored.data)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _reader(workdir: str) -> ocp.CheckpointManager:
  """A manager that only reads ``<workdir>/checkpoints`` (handlers given, so metadata needs no args)."""
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints under {directory!r}")
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})


def latest_step(workdir: str) -> int | None:
  """The latest committed checkpoint step in ``workdir`` (None if there is none)."""
  if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    return None
  manager = _reader(workdir)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_params(workdir: str, step: int | None = None, abstract_params: Any = None) -> Any:
  """Loads only the params of the checkpoint at ``step`` (default latest) in ``workdir``.

  With ``abstract_params`` (a ``jax.ShapeDtypeStruct`` tree with shardings) the arrays are placed
  accordingly; without it they land as single-device arrays with the saved shapes and dtypes.
  """
  manager = _reader(workdir)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no finished checkpoint under {manager.directory}")
    metadata = manager.item_metadata(step)["state"]
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(
            jax.devices()[0])), tree)
    if abstract_params is not None:
      abstract["params"] = abstract_params
    restored = manager.restore(step,
                               args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored.state["params"]
  finally:
    manager.close()
