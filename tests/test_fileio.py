"""rlhf_jax.fileio.replace_dir: the destination is always absent, the old folder or the new one."""

import os

from rlhf_jax import fileio


def _write(folder, name, text):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, name), "w") as f:
    f.write(text)


def test_replace_dir_into_empty_place_and_over_an_existing_folder(tmp_path):
  dst = str(tmp_path / "artifact")
  first = str(tmp_path / "tmp1")
  _write(first, "a.txt", "one")
  fileio.replace_dir(first, dst)
  assert not os.path.exists(first)
  assert open(os.path.join(dst, "a.txt")).read() == "one"

  second = str(tmp_path / "tmp2")
  _write(second, "b.txt", "two")
  fileio.replace_dir(second, dst)
  assert sorted(os.listdir(dst)) == ["b.txt"]  # the old contents are gone, not merged
  assert sorted(os.listdir(tmp_path)) == ["artifact"]  # no tmp or .old-* folder left behind
