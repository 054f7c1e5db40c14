"""Orbax checkpoints of the train state and data position, guarded by a run fingerprint.

Layout of a workdir::

    <workdir>/config.json               the run's full config (atomic write)
    <workdir>/run_fingerprint.json      model config + tokenizer fingerprint (+ method): what a
                                        checkpoint here must match before it is restored
    <workdir>/checkpoints/<step>/state  TrainState (params, opt_state, step, rng) - orbax StandardSave
    <workdir>/checkpoints/<step>/data   data-iterator position - orbax JsonSave
    <workdir>/checkpoints/<step>/manifest.sha256.json   size + SHA-256 of every file of the step
    <workdir>/corrupt_checkpoints/<step>-<time>/        steps found unusable (kept for inspection)

Orbax writes every step into a temporary directory and renames it once all items are committed, and
``latest_step`` only sees committed steps, so a checkpoint cut by ``kill -9`` is never read (its
temporary directory is deleted on the next start). The JSON files here are written with
``fileio.atomic_write_json`` (a temporary file + ``os.replace`` locally; one object upload on an
object store). Every path goes through ``rlhf_jax.fileio`` (``etils.epath``), so a ``gs://``
workdir is checkpointed there (orbax takes the ``epath.Path`` as it is).

Verification: once orbax has committed a step the manifest is written (atomically); restoring
checks it (a truncated, deleted or flipped file, a missing metadata file, an empty manifest or an
empty step folder all fail it) and that every restored value is finite, and falls back to the
previous step with one warning line naming the path and what is wrong. Rotation (``keep``) is done
here, after verification, and never deletes the newest verified step for an unverified one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from rlhf_jax import fileio, parallel

logger = logging.getLogger(__name__)
_PROCESS_START = time.time()  # temp files older than this were left by an earlier process

FINGERPRINT_FILE = "run_fingerprint.json"
CHECKPOINT_DIR = "checkpoints"


class WorkdirMismatchError(ValueError):
  """The workdir holds checkpoints of a different model / tokenizer than this run's."""


class CheckpointCorruptError(ValueError):
  """A checkpoint step's files do not match its manifest, or it cannot be restored."""


MANIFEST_FILE = "manifest.sha256.json"  # inside <workdir>/checkpoints/<step>/
QUARANTINE_DIR = "corrupt_checkpoints"  # <workdir>/corrupt_checkpoints/<step>-<unix time>/
_TMP_MARKERS = (".tmp-", ".tmp.", ".orbax-checkpoint-tmp")


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with fileio.open_file(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _step_files(step_path: str) -> list[str]:
  out = []
  for root, _, names in fileio.walk(step_path):
    for name in names:
      rel = fileio.relpath(fileio.join(root, name), step_path)
      if rel != MANIFEST_FILE and not any(marker in name for marker in _TMP_MARKERS):
        out.append(rel)  # (a temp file of an interrupted write is not part of the step)
  return sorted(out)


def write_manifest(step_path: str) -> dict:
  """Writes ``<step>/manifest.sha256.json``: size + SHA-256 of every file orbax committed there.

  Called after orbax's commit (its files no longer change) and written atomically, so a manifest
  that exists always describes a complete step.
  """
  files = {
      rel: {
          "size": fileio.getsize(fileio.join(step_path, rel)),
          "sha256": _sha256(fileio.join(step_path, rel))} for rel in _step_files(step_path)}
  manifest = {"version": 1, "files": files}
  atomic_write_json(fileio.join(step_path, MANIFEST_FILE), manifest)
  return manifest


def verify_step(step_path: str) -> tuple[str, str]:
  """``(status, detail)`` of one checkpoint step folder against its manifest.

  ``status`` is ``"ok"`` (every file present with its size and SHA-256), ``"unverified"`` (no
  manifest: a run killed between orbax's commit and the manifest; the caller restores it only if
  it loads and is finite) or ``"bad"`` (``detail`` says what is wrong: an empty folder, an
  unreadable or empty manifest, a missing / truncated / changed file).
  """
  if not fileio.isdir(step_path):
    return "bad", "the folder is missing"
  if not fileio.listdir(step_path):
    return "bad", "the step folder is empty"
  path = fileio.join(step_path, MANIFEST_FILE)
  if not fileio.exists(path):
    if not fileio.exists(fileio.join(step_path, "_CHECKPOINT_METADATA")):
      return "bad", "no manifest and no orbax metadata (_CHECKPOINT_METADATA)"
    return "unverified", "no manifest"
  try:
    manifest = read_json(path)
    files = manifest["files"]
    if not isinstance(files, Mapping) or not files:
      raise ValueError("no files listed")
  except (OSError, ValueError, KeyError, TypeError) as err:
    return "bad", f"its manifest {MANIFEST_FILE} is unreadable or empty ({err})"
  for rel, entry in sorted(files.items()):
    full = fileio.join(step_path, rel)
    if not fileio.isfile(full):
      return "bad", f"file {rel} is missing"
    size = fileio.getsize(full)
    if size != entry["size"]:
      return "bad", f"file {rel} has {size} bytes, the manifest says {entry['size']} (truncated?)"
    if _sha256(full) != entry["sha256"]:
      return "bad", f"file {rel} does not match its SHA-256 in the manifest (corrupted bytes)"
  return "ok", ""


def nonfinite_leaves(tree: Any) -> list[str]:
  """Paths of the floating-point leaves of ``tree`` holding NaN or inf (host check)."""
  bad = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.inexact):
      continue
    if not bool(jax.numpy.all(jax.numpy.isfinite(leaf))):
      bad.append(jax.tree_util.keystr(path))
  return bad


def clean_temp_files(workdir: str) -> list[str]:
  """Removes what interrupted writes left under ``workdir`` (``*.tmp-<pid>`` / ``*.tmp.<pid>``
  files of the atomic writers, orbax's ``*.orbax-checkpoint-tmp-*`` folders); returns them.

  Only names whose writer is gone are removed (a ``<pid>`` suffix of a live process is kept), so a
  concurrent writer on the same machine is never disturbed.
  """
  removed = []
  if not fileio.isdir(workdir):
    return removed
  for root, dirs, names in fileio.walk(workdir):
    for name in list(dirs) + names:
      if not any(marker in name for marker in _TMP_MARKERS):
        continue
      tail = name.rsplit("tmp", 1)[-1].lstrip("-.")
      full = fileio.join(root, name)
      if tail.isdigit() and ".orbax" not in name and _alive(int(tail)):
        continue
      with contextlib.suppress(OSError):
        if fileio.getmtime(full) >= _PROCESS_START:  # written by this job (another process)
          continue
      if name in dirs:
        with contextlib.suppress(OSError):
          fileio.rmtree(full)
        dirs.remove(name)
      else:
        with contextlib.suppress(OSError):
          fileio.remove(full)
      removed.append(fileio.relpath(full, workdir))
  if removed:
    logger.info("removed %d temporary file(s) an interrupted run left in %s: %s", len(removed),
                workdir, ", ".join(removed[:5]) + (" ..." if len(removed) > 5 else ""))
  return removed


def _alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OSError):
    return True
  return True


def atomic_write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` (local or remote), never half-written (``fileio``)."""
  fileio.atomic_write_json(path, obj)


def read_json(path: str) -> Any:
  return fileio.read_json(path)


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
  path = fileio.join(workdir, FINGERPRINT_FILE)
  ckpt_dir = fileio.join(workdir, CHECKPOINT_DIR)
  if fileio.exists(path):
    stored = read_json(path)
    diff = fingerprint_diff(stored, current)
    if diff:
      raise WorkdirMismatchError(
          f"workdir {workdir!r} holds a run with a different model/tokenizer config, so its "
          "checkpoints cannot be resumed by this run:\n" + "\n".join(diff) +
          "\nUse a fresh --workdir, or the same config as the stored run.")
    return
  if fileio.isdir(ckpt_dir) and any(name.isdigit() for name in fileio.listdir(ckpt_dir)):
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

  Every step is verified: once orbax has committed it (checked at the next ``save``, ``wait`` or
  ``close``), ``<step>/manifest.sha256.json`` records each file's size and SHA-256. Rotation keeps
  the newest ``keep`` steps and never deletes the newest verified step while a newer one is still
  unverified. :meth:`restore_latest` checks the manifest and the restored values (finite) and falls
  back to the previous good step, moving an unusable one to ``<workdir>/corrupt_checkpoints/``.
  """

  def __init__(self, workdir: str, *, fingerprint: Mapping[str, Any], keep: int = 3):
    if keep < 1:
      raise ValueError(f"keep={keep} is invalid; allowed: an int >= 1 (checkpoints kept).")
    check_fingerprint(workdir, fingerprint)
    self.workdir = fileio.absolute(workdir)
    self.directory = fileio.join(self.workdir, CHECKPOINT_DIR)
    self.keep = keep
    # Rotation is done here (max_to_keep=None), after a step is verified, not by orbax at save time.
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(fileio.path(self.directory), options=options,
                                          item_names=("state", "data"))
    self._pending: list[int] = []  # saved steps whose manifest is not written yet
    self._is_main = jax.process_index() == 0

  def step_path(self, step: int) -> str:
    return fileio.join(self.directory, str(step))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: Mapping[str, Any]) -> None:
    if step in self._manager.all_steps():
      return  # already saved (e.g. periodic save coinciding with the final one)
    self._finalize()
    self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(dict(data_state))), force=True)
    self._pending.append(step)

  def _finalize(self) -> None:
    """Waits for the saves in flight, writes their manifests, then rotates."""
    if not self._pending:
      return
    self._manager.wait_until_finished()
    if self._is_main:
      for step in self._pending:
        if fileio.isdir(self.step_path(step)):
          write_manifest(self.step_path(step))
    # Every process decides alike: the steps just finalized count as verified everywhere, even
    # where process 0's manifest is not visible yet (orbax's delete synchronises the processes).
    verified, self._pending = set(self._pending), []
    self._rotate(verified)

  def _rotate(self, just_verified: set) -> None:
    steps = self.all_steps()
    kept = set(steps[-self.keep:])
    verified = [
        s for s in steps
        if s in just_verified or fileio.exists(fileio.join(self.step_path(s), MANIFEST_FILE))]
    if verified and not kept & set(verified):
      kept.add(verified[-1])  # the newest verified step stays until a newer one is verified
    for step in steps:
      if step not in kept:
        self._manager.delete(step)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores ``(state, data_state)`` at ``step`` (default latest) onto ``abstract_state``'s shardings."""
    step = self._manager.latest_step() if step is None else step
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return restored.state, dict(restored.data)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """``(step, state, data_state)`` of the newest usable step, or None when there is none.

    A step is usable when its files match its manifest (or it has none yet: a run killed between
    orbax's commit and the manifest), it restores, and every floating-point param is finite. An
    unusable step is reported in one line (path, what is wrong), moved to
    ``<workdir>/corrupt_checkpoints/`` (so the resumed run can write that step again) and the
    previous one is tried.
    """
    bad: list[tuple[int, str]] = []
    result = None
    for step in reversed(self.all_steps()):
      status, detail = verify_step(self.step_path(step))
      if status == "bad":
        bad.append((step, detail))
        continue
      try:
        state, data_state = self.restore(abstract_state, step)
      except Exception as err:  # pylint: disable=broad-except  # any orbax/tensorstore failure
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        bad.append((step, f"orbax could not restore it ({type(err).__name__}: {first})"))
        continue
      # Params only: an optimiser state may hold inf by design (e.g. a plateau tracker's best).
      nonfinite = nonfinite_leaves(getattr(state, "params", state))
      if nonfinite:
        bad.append((step, f"it holds NaN/inf in {', '.join(nonfinite[:3])}"
                    f"{' ...' if len(nonfinite) > 3 else ''}"))
        continue
      if status == "unverified" and self._is_main:
        write_manifest(self.step_path(step))  # it loaded and is finite: record it as it is now
      result = (step, state, data_state)
      break
    for step, detail in bad:
      moved = self._quarantine(step)
      fallback = f"resuming from step {result[0]}" if result else "no earlier usable step"
      logger.warning("checkpoint %s is unusable: %s; moved to %s; %s", self.step_path(step), detail,
                     moved, fallback)
    if bad:
      if jax.process_count() > 1:  # every process found the same bad steps; process 0 moved them
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices("rlhf_jax_checkpoint_quarantine")
      self._manager.reload()
      if result is None:
        logger.warning("no usable checkpoint left in %s: training starts from step 0",
                       self.directory)
    return result

  def _quarantine(self, step: int) -> str:
    target = fileio.join(self.workdir, QUARANTINE_DIR, f"{step}-{int(time.time())}")
    if self._is_main:
      fileio.makedirs(fileio.join(self.workdir, QUARANTINE_DIR))
      with contextlib.suppress(OSError):
        fileio.rename(self.step_path(step), target)
    return target

  def wait(self) -> None:
    self._manager.wait_until_finished()
    self._finalize()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._finalize()
    self._manager.close()


def _reader(workdir: str) -> ocp.CheckpointManager:
  """A manager that only reads ``<workdir>/checkpoints`` (handlers given, so metadata needs no args)."""
  directory = fileio.join(fileio.absolute(workdir), CHECKPOINT_DIR)
  if not fileio.isdir(directory):
    raise FileNotFoundError(f"no checkpoints under {directory!r}")
  return ocp.CheckpointManager(
      fileio.path(directory), options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})


def _committed_steps(workdir: str) -> list[int]:
  manager = _reader(workdir)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def latest_step(workdir: str) -> int | None:
  """The latest committed checkpoint step in ``workdir`` whose files match its manifest (a step
  without a manifest counts: written before manifests existed, or cut before its manifest); steps
  that fail the check are skipped with a warning naming them. None if there is none."""
  # Multi-process: process 0's answer. The reader below is collective (orbax syncs the processes
  # when it opens a checkpoint root), and process 0 may create the folder meanwhile (its trainer
  # ahead of a peer's): a peer that saw it would wait in a sync process 0 never enters.
  if not parallel.agree(fileio.isdir(fileio.join(workdir, CHECKPOINT_DIR))):
    return None
  for step in reversed(_committed_steps(workdir)):
    path = fileio.join(fileio.absolute(workdir), CHECKPOINT_DIR, str(step))
    status, detail = verify_step(path)
    if status != "bad":
      return step
    logger.warning("checkpoint %s is unusable: %s; trying the previous step", path, detail)
  return None


def restore_params(workdir: str, step: int | None = None, abstract_params: Any = None) -> Any:
  """Loads only the params of the checkpoint at ``step`` (default latest) in ``workdir``.

  With ``abstract_params`` (a ``jax.ShapeDtypeStruct`` tree with shardings) the arrays are placed
  accordingly; without it they land as single-device arrays (this process's first device) with the
  saved shapes and dtypes.

  Raises:
    CheckpointCorruptError: the step's files do not match its manifest or its params are not
      finite (the message names the path and what is wrong).
  """
  step = latest_step(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f"no finished checkpoint under {fileio.join(workdir, CHECKPOINT_DIR)}")
  path = fileio.join(fileio.absolute(workdir), CHECKPOINT_DIR, str(step))
  status, detail = verify_step(path)
  if status == "bad":
    raise CheckpointCorruptError(f"checkpoint {path} is unusable: {detail}")
  manager = _reader(workdir)
  try:
    metadata = manager.item_metadata(step)["state"]
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
    # This process's first device (jax.devices()[0] belongs to process 0 in a multi-process job).
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(
            jax.local_devices()[0])), tree)
    if abstract_params is not None:
      abstract["params"] = abstract_params
    restored = manager.restore(step,
                               args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    params = restored.state["params"]
  finally:
    manager.close()
  nonfinite = nonfinite_leaves(params)
  if nonfinite:
    raise CheckpointCorruptError(f"checkpoint {path} is unusable: its params hold NaN/inf in "
                                 f"{', '.join(nonfinite[:3])}")
  return params
