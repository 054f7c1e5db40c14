"""A test-only Google Cloud Storage: ``gs://bucket/key`` objects stored under a local root folder.

The fake sits where a real GCS client would, so the code under test sees real ``gs://`` URLs:

* ``etils.epath`` (which rlhf_jax.fileio and orbax use for every file operation) reaches ``gs://``
  through fsspec (TensorFlow is not installed); the fake registers an fsspec filesystem for the
  ``gs`` / ``gcs`` protocols that maps ``gs://bucket/key`` to ``<root>/bucket/key``;
* orbax's arrays are written by TensorStore's ``gcs`` kvstore driver; the fake swaps orbax's
  ``gcs_utils.get_kvstore_for_gcs`` for a ``file`` driver on the same local folder, and answers
  "no hierarchical namespace" for every bucket (the real call asks the GCS API).

Anything that turns the URL into a local path instead (``os.path.abspath('gs://b/x')`` is
``<cwd>/gs:/b/x``) writes outside ``<root>`` into a folder named ``gs:``, which the tests look for.
"""

from __future__ import annotations

import contextlib
import glob
import os
from typing import Iterator

import fsspec
import importlib

fsspec_registry = importlib.import_module("fsspec.registry")  # (fsspec.registry is its mapping)
from fsspec.implementations.local import LocalFileSystem

PROTOCOLS = ("gs", "gcs")


class FakeGcsFileSystem(LocalFileSystem):
  """fsspec filesystem for ``gs://``: objects under ``root`` (a class attribute set by the fixture).

  Like gcsfs, names it returns carry no protocol (``bucket/key``); names it receives may be
  ``gs://bucket/key``, ``bucket/key`` or (from LocalFileSystem's own helpers) the local path.
  """
  protocol = PROTOCOLS
  root = ""

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path) if not isinstance(path, str) else path
    for proto in PROTOCOLS:
      if path.startswith(f"{proto}://"):
        path = path[len(proto) + 3:]
        break
    if cls.root and not path.startswith(cls.root):
      path = os.path.join(cls.root, path.lstrip("/"))
    return path.rstrip("/") or cls.root

  @classmethod
  def _remote(cls, local: str) -> str:
    return local[len(cls.root):].lstrip("/") if local.startswith(cls.root) else local

  def ls(self, path, detail=False, **kwargs):
    out = super().ls(path, detail=detail, **kwargs)
    if detail:
      return [{**info, "name": self._remote(info["name"])} for info in out]
    return [self._remote(name) for name in out]

  def info(self, path, **kwargs):
    out = super().info(path, **kwargs)
    return {**out, "name": self._remote(out["name"])}

  def glob(self, path, **kwargs):
    del kwargs
    return sorted(self._remote(p) for p in glob.glob(self._strip_protocol(path), recursive=True))

  def unstrip_protocol(self, name):
    return f"gs://{self._remote(self._strip_protocol(name))}"


@contextlib.contextmanager
def fake_gcs(root: str) -> Iterator[str]:
  """Serves ``gs://`` from ``root`` (created) while the context is open; yields ``root``."""
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=import-outside-toplevel

  root = os.path.abspath(root)
  os.makedirs(root, exist_ok=True)
  saved = {
      name: getattr(gcs_utils, name)
      for name in ("get_kvstore_for_gcs", "is_hierarchical_namespace_enabled")}

  def kvstore(ckpt_path: str) -> dict:
    bucket, key = gcs_utils.parse_gcs_path(ckpt_path, add_trailing_slash=False)
    return {"driver": "file", "path": os.path.join(root, bucket, key)}

  FakeGcsFileSystem.root = root
  for proto in PROTOCOLS:
    fsspec.register_implementation(proto, FakeGcsFileSystem, clobber=True)
  fsspec.AbstractFileSystem.clear_instance_cache()
  FakeGcsFileSystem.clear_instance_cache()
  from etils.epath import backend  # pylint: disable=import-outside-toplevel
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  gcs_utils.get_kvstore_for_gcs = kvstore
  gcs_utils.is_hierarchical_namespace_enabled = lambda path: False
  try:
    yield root
  finally:
    for name, fn in saved.items():
      setattr(gcs_utils, name, fn)
    for proto in PROTOCOLS:
      fsspec_registry._registry.pop(proto, None)  # pylint: disable=protected-access
    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    FakeGcsFileSystem.clear_instance_cache()
    FakeGcsFileSystem.root = ""
