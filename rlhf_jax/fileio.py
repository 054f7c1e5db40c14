"""Filesystem helpers shared by every package: swap finished artifacts into place atomically.

A reader (a resumed run, another host, a later stage) must see either the previous complete artifact
or the new one, never a half-written folder. Artifacts are therefore built in a temporary sibling
folder and moved into place with ``os.replace``, which is atomic on POSIX within one filesystem.
"""

from __future__ import annotations

import os
import shutil


def replace_dir(src: str, dst: str) -> None:
  """Moves the finished folder ``src`` to ``dst``.

  An existing ``dst`` is first renamed aside (``os.replace`` cannot overwrite a non-empty folder),
  then ``src`` takes its name, then the old copy is deleted; at every instant ``dst`` is either
  absent, the old complete folder or the new complete folder.
  """
  if os.path.exists(dst):
    old = f"{dst}.old-{os.getpid()}"
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(src, dst)
