"""Run paths and files, local or remote, in one place: ``etils.epath`` under atomic writers.

Every workdir and data path of a run goes through these helpers, so a ``gs://bucket/run`` workdir
(or any scheme ``etils.epath`` has a backend for: ``gs://``, ``s3://``, ... with gcsfs / s3fs or
TensorFlow installed) is written where it names, never turned into a local folder:
``os.path.abspath('gs://b/run')`` is ``<cwd>/gs:/b/run`` and ``os.path.normpath`` drops a slash,
so neither is used on a path that may carry a scheme (:func:`absolute` keeps URLs as they are).
Local-only things (package data, ``/proc``, temporary staging folders, the tokenizer files a run
reads from its own disk) keep ``os.path``.

Atomicity. A reader (a resumed run, another host, a later stage) must see either the previous
complete file or the new one, never a half-written one:

* local files are written to a temporary sibling, fsync'ed and ``os.replace``-d (atomic on POSIX
  within one filesystem); local folders are built in a temporary sibling and swapped in
  (:func:`replace_dir`);
* on object stores (``gs://``, ``s3://``) an object becomes visible only once its upload has
  completed, so a file is written in place (a rename there is a copy + delete, which would not be
  atomic anyway), and :func:`replace_dir` copies the finished folder up object by object with the
  marker file last (see there).

Appending: object stores cannot append, so :func:`append_text` on a remote file rewrites the
object with the new text at its end (quadratic in the number of appends; fine for metrics
JSONL files of a few MB, which is what appends are used for).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from typing import Any, Iterator

from etils import epath

PathLike = str | os.PathLike
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_remote(p: PathLike) -> bool:
  """True for a URL with a scheme (``gs://b/x``, ``s3://b/x``, ``memory://x``), not a local path."""
  return bool(_SCHEME.match(os.fspath(p)))


def path(p: PathLike) -> epath.Path:
  """``p`` as an ``epath.Path`` (a ``gs://`` URL stays a URL)."""
  return epath.Path(p)


def absolute(p: PathLike) -> str:
  """A local path made absolute; a URL unchanged (``os.path.abspath`` would make it local)."""
  p = os.fspath(p)
  return p.rstrip("/") if is_remote(p) else os.path.abspath(p)


def join(base: PathLike, *parts: str) -> str:
  """``base/part/...`` for local paths and URLs alike (``gs://b/run``, ``x``: ``gs://b/run/x``)."""
  if not os.fspath(base):  # as os.path.join: '' + x is x (epath would make it ./x)
    return os.path.join("", *parts)
  return os.fspath(epath.Path(base).joinpath(*parts))


def parent(p: PathLike) -> str:
  """The folder holding ``p`` (``os.path.dirname`` of a local path; for a URL, the URL up to its
  last ``/``, never above the bucket: ``gs://b/x`` -> ``gs://b``, ``gs://b`` -> ``gs://b``)."""
  p = os.fspath(p)
  if not is_remote(p):
    return os.path.dirname(p)
  scheme, rest = p.split("://", 1)
  rest = rest.rstrip("/")
  return f"{scheme}://{rest.rsplit('/', 1)[0] if '/' in rest else rest}"


def exists(p: PathLike) -> bool:
  return epath.Path(p).exists()


def isdir(p: PathLike) -> bool:
  return epath.Path(p).is_dir()


def isfile(p: PathLike) -> bool:
  p = epath.Path(p)
  return p.exists() and not p.is_dir()


def listdir(p: PathLike) -> list[str]:
  """The names in folder ``p`` (not their paths), sorted."""
  return sorted(child.name for child in epath.Path(p).iterdir())


def makedirs(p: PathLike) -> None:
  """Creates folder ``p`` and its parents (no error when it exists). A no-op on object stores'
  implicit folders is fine: a folder there exists once an object under it does."""
  epath.Path(p).mkdir(parents=True, exist_ok=True)


def remove(p: PathLike, *, missing_ok: bool = True) -> None:
  epath.Path(p).unlink(missing_ok=missing_ok)


def rmtree(p: PathLike) -> None:
  """Removes folder ``p`` and everything under it; nothing if it does not exist."""
  p = epath.Path(p)
  if p.exists():
    p.rmtree()


def rename(src: PathLike, dst: PathLike) -> None:
  """Moves file or folder ``src`` to ``dst`` (local: ``os.replace``; remote: copy + delete)."""
  if is_remote(src) or is_remote(dst):
    epath.Path(src).rename(epath.Path(dst))
  else:
    os.replace(os.fspath(src), os.fspath(dst))


def relpath(p: PathLike, start: PathLike) -> str:
  """``p`` relative to its ancestor ``start`` (string arithmetic, so URLs work too)."""
  p, start = os.fspath(p), os.fspath(start).rstrip("/")
  if not is_remote(p):
    return os.path.relpath(p, start)
  if p != start and not p.startswith(start + "/"):
    raise ValueError(f"{p!r} is not under {start!r}")
  return p[len(start) + 1:] or "."


def getsize(p: PathLike) -> int:
  return int(epath.Path(p).stat().length)


def getmtime(p: PathLike) -> float:
  return float(epath.Path(p).stat().mtime)


def walk(top: PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
  """``os.walk`` for local paths and URLs: ``(folder, subfolder names, file names)``, top down.

  Remote folders are listed with ``iterdir`` (``epath.Path.walk`` on fsspec yields the folders
  without their scheme); callers may prune the subfolder list in place, as with ``os.walk``.
  """
  if not is_remote(top):
    yield from os.walk(os.fspath(top))
    return
  if not isdir(top):
    return
  dirs, files = [], []
  for child in sorted(epath.Path(top).iterdir(), key=lambda c: c.name):
    (dirs if child.is_dir() else files).append(child.name)
  yield os.fspath(top), dirs, files
  for name in dirs:
    yield from walk(join(top, name))


def open_file(p: PathLike, mode: str = "r", encoding: str | None = None):
  """``open`` for local paths and URLs (text modes are UTF-8 unless ``encoding`` says otherwise)."""
  if "b" in mode:
    return epath.Path(p).open(mode)
  return epath.Path(p).open(mode, encoding=encoding or "utf-8")


def read_text(p: PathLike) -> str:
  return epath.Path(p).read_text(encoding="utf-8")


def read_bytes(p: PathLike) -> bytes:
  return epath.Path(p).read_bytes()


def read_json(p: PathLike) -> Any:
  return json.loads(read_text(p))


def read_jsonl(p: PathLike) -> list[Any]:
  """The JSON values of a JSON Lines file, one per non-blank line."""
  return [json.loads(line) for line in read_text(p).splitlines() if line.strip()]


def atomic_write_bytes(p: PathLike, data: bytes) -> None:
  """Writes ``data`` to ``p`` so that a reader sees the old content or the new one (module doc)."""
  if is_remote(p):
    makedirs(epath.Path(p).parent)
    epath.Path(p).write_bytes(data)  # an object appears once its upload is complete
    return
  p = os.fspath(p)
  os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
  tmp = f"{p}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, p)


def atomic_write_text(p: PathLike, text: str) -> None:
  atomic_write_bytes(p, text.encode("utf-8"))


def atomic_write_json(p: PathLike, obj: Any) -> None:
  """``obj`` as indented, key-sorted JSON (one trailing newline), written atomically."""
  atomic_write_text(p, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_text(p: PathLike, text: str) -> None:
  """Appends ``text`` to file ``p`` (created if missing); a remote object is rewritten (above)."""
  if is_remote(p):
    old = read_bytes(p) if exists(p) else b""
    atomic_write_bytes(p, old + text.encode("utf-8"))
    return
  with open(p, "a", encoding="utf-8") as f:
    f.write(text)
    f.flush()


def save_figure(fig: Any, p: PathLike, **savefig_kwargs: Any) -> None:
  """A matplotlib figure as PNG at ``p`` (local or URL), written atomically: rendered into memory
  first, because ``fig.savefig`` opens local paths only and writes in place."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", **savefig_kwargs)
  atomic_write_bytes(p, buf.getvalue())


def upload_file(local: str, p: PathLike) -> None:
  """Copies the local file ``local`` to ``p`` (a URL or a local path), replacing it atomically."""
  with open(local, "rb") as f:
    atomic_write_bytes(p, f.read())


def replace_dir(src: PathLike, dst: PathLike, *, marker: str | None = None) -> None:
  """Moves the finished folder ``src`` to ``dst`` (each local or remote).

  Local ``dst``: an existing ``dst`` is first renamed aside (``os.replace`` cannot overwrite a
  non-empty folder), then ``src`` takes its name, then the old copy is deleted; at every instant
  ``dst`` is either absent, the old complete folder or the new complete folder.

  Remote ``src`` or ``dst`` (no folder rename on object stores): the old ``dst`` is deleted, then
  every file is copied with ``marker`` (the file a reader checks first, e.g.
  ``dataset_info.json``) last, and ``src`` is removed. A reader that finds ``marker`` finds the
  complete folder; one cut between the delete and the marker's copy finds no marker and treats
  the folder as absent.
  """
  if is_remote(dst) or is_remote(src):
    rmtree(dst)
    files = [relpath(join(root, name), src) for root, _, names in walk(src) for name in names]
    files.sort(key=lambda rel: (rel == marker, rel))
    for rel in files:
      atomic_write_bytes(join(dst, *rel.split("/")), read_bytes(join(src, *rel.split("/"))))
    rmtree(src)
    return
  src, dst = os.fspath(src), os.fspath(dst)
  if os.path.exists(dst):
    old = f"{dst}.old-{os.getpid()}"
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(src, dst)
