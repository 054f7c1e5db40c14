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


# --- run paths through etils.epath: local paths and URLs alike ---------------------------------

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fake_gcs  # noqa: E402  (tests/ is on sys.path: conftest.py lives there)


def _local_names_like_url(top):
  """Every file or folder under ``top`` named like a URL's scheme turned into a folder (``gs:``)."""
  return [
      os.path.join(root, name)
      for root, dirs, files in os.walk(top)
      for name in dirs + files
      if name.endswith(":") or name in ("gs:", "s3:")]


def test_is_remote_absolute_and_join_keep_urls_as_urls(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert fileio.is_remote("gs://b/run") and fileio.is_remote("memory://x")
  assert not fileio.is_remote("workdirs/run") and not fileio.is_remote("/abs/c:d")
  assert fileio.absolute("gs://b/run/") == "gs://b/run"  # os.path.abspath gives <cwd>/gs:/b/run
  assert fileio.absolute("rel") == os.path.join(str(tmp_path), "rel")
  assert fileio.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
  assert fileio.join("workdirs/run", "x.json") == os.path.join("workdirs/run", "x.json")
  assert fileio.relpath("gs://b/run/checkpoints/3/a", "gs://b/run/") == "checkpoints/3/a"
  with pytest.raises(ValueError, match="not under"):
    fileio.relpath("gs://b/other/a", "gs://b/run")


@pytest.mark.parametrize("remote", [False, True], ids=["local", "gs"])
def test_helpers_on_local_paths_and_on_a_fake_gcs(tmp_path, monkeypatch, remote):
  monkeypatch.chdir(tmp_path)
  with fake_gcs.fake_gcs(str(tmp_path / "bucket_root")) as root:
    base = "gs://bucket/run" if remote else str(tmp_path / "run")
    fileio.makedirs(fileio.join(base, "sub"))
    fileio.atomic_write_json(fileio.join(base, "a.json"), {"b": 1, "a": [1, 2]})
    assert fileio.read_text(fileio.join(
        base, "a.json")) == json.dumps({"a": [1, 2], "b": 1}, indent=2, sort_keys=True) + "\n"
    fileio.append_text(fileio.join(base, "sub", "log.jsonl"), "1\n")
    fileio.append_text(fileio.join(base, "sub", "log.jsonl"), "2\n")
    assert fileio.read_text(fileio.join(base, "sub", "log.jsonl")) == "1\n2\n"
    assert fileio.listdir(base) == ["a.json", "sub"]
    assert fileio.isdir(fileio.join(base, "sub")) and fileio.isfile(fileio.join(base, "a.json"))
    assert fileio.getsize(fileio.join(base, "sub", "log.jsonl")) == 4
    walked = [(fileio.relpath(d, base), sorted(ds), sorted(fs)) for d, ds, fs in fileio.walk(base)]
    assert walked == [(".", ["sub"], ["a.json"]), ("sub", [], ["log.jsonl"])]
    staged = str(tmp_path / "staged")
    _write(staged, "data.bin", "x")
    _write(staged, "info.json", "{}")
    fileio.replace_dir(staged, fileio.join(base, "artifact"), marker="info.json")
    assert fileio.listdir(fileio.join(base, "artifact")) == ["data.bin", "info.json"]
    assert not os.path.exists(staged)
    fileio.rename(fileio.join(base, "artifact"), fileio.join(base, "moved"))
    assert not fileio.exists(fileio.join(base, "artifact"))
    fileio.rmtree(fileio.join(base, "moved"))
    fileio.remove(fileio.join(base, "a.json"))
    assert fileio.listdir(base) == ["sub"]
    # A URL went to the fake bucket, never to a local folder named after it.
    assert os.path.isdir(os.path.join(root, "bucket", "run")) == remote
  assert _local_names_like_url(tmp_path) == []


def test_checkpoint_metrics_and_final_metrics_writers_keep_a_gs_workdir_remote(
    tmp_path, monkeypatch):
  """The train package's writers on ``gs://``: orbax steps, manifests, rotation, restore,
  metrics JSONL + TensorBoard events with a resume truncation, final_metrics; nothing local."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from rlhf_jax import train  # pylint: disable=import-outside-toplevel
  from rlhf_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from rlhf_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel

  monkeypatch.chdir(tmp_path)
  with fake_gcs.fake_gcs(str(tmp_path / "bucket_root")) as root:
    workdir = "gs://bucket/runs/sft"
    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(0)}
    ckpt = ckpt_lib.Checkpointer(workdir, fingerprint={"model": "tiny"}, keep=1)
    assert ckpt.workdir == workdir
    for step in (1, 2):
      ckpt.save(step, jax.tree.map(lambda x, s=step: x + s, state), {"position": step})
    ckpt.close()
    assert ckpt_lib.latest_step(workdir) == 2
    assert ckpt_lib.verify_step(ckpt.step_path(2)) == ("ok", "")
    assert fileio.listdir(fileio.join(workdir, "checkpoints")) == ["2"]  # step 1 rotated away
    again = ckpt_lib.Checkpointer(workdir, fingerprint={"model": "tiny"}, keep=1)
    step, restored, data_state = again.restore_latest(jax.eval_shape(lambda: state))
    again.close()
    assert step == 2 and data_state == {"position": 2}
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(6.0).reshape(2, 3) + 2)
    np.testing.assert_array_equal(train.restore_params(workdir)["w"], restored["params"]["w"])
    with pytest.raises(train.WorkdirMismatchError):
      ckpt_lib.Checkpointer(workdir, fingerprint={"model": "other"})

    writer = metrics_lib.MetricsWriter(workdir, hparams={"optim": {"lr": 0.1}})
    for step in (1, 2, 3):
      writer.write(step, {"loss": 1.0 / step})
    writer.close()
    writer = metrics_lib.MetricsWriter(workdir, resume_step=2, hparams={})  # drops step 3
    writer.write(3, {"loss": 0.5})
    writer.close()
    assert [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(workdir)] == [
        (1, 1.0), (2, 0.5), (3, 0.5)]
    events = metrics_lib.read_tensorboard(fileio.join(workdir, "tensorboard"))
    assert [(s, v) for s, tag, v in events.scalars if tag == "train/loss"] == [(1, 1.0), (2, 0.5),
                                                                               (3, 0.5)]
    assert events.hparams == {"optim.lr": pytest.approx(0.1)}
    train.write_final_metrics(workdir, {"loss": 0.5})
    assert train.is_finished(workdir)
    fileio.atomic_write_text(fileio.join(workdir, "stale.json.tmp.999999999"), "{}")
    monkeypatch.setattr(ckpt_lib, "_PROCESS_START", time.time() + 60)  # "left by an earlier run"
    assert ckpt_lib.clean_temp_files(workdir) == ["stale.json.tmp.999999999"]
    assert sorted(os.listdir(os.path.join(root, "bucket", "runs", "sft"))) == [
        "checkpoints", "final_metrics.json", "metrics.jsonl", "run_fingerprint.json", "tensorboard"]
  assert _local_names_like_url(tmp_path) == []
