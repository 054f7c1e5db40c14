"""A run whose workdir is a URL writes there and nowhere else (issue 19: paths through etils.epath).

``tests/fake_gcs.py`` serves ``gs://`` from a local folder at the place a real GCS client sits
(fsspec for ``etils.epath``, TensorStore's kvstore for orbax's arrays), so a path turned into a
local folder (``os.path.abspath('gs://b/x')`` = ``<cwd>/gs:/b/x``) shows up as a folder named
``gs:``, and one that only exists under the fake bucket went through the URL.
"""

import json
import os

import pytest

from rlhf_jax import fileio, train
from rlhf_jax.algorithms import sft

import fake_gcs
from offline_fixtures import SFT_OVERRIDES, load_config, override

TINY = {
    **SFT_OVERRIDES, "loop.num_steps": 4, "loop.log_every": 2, "loop.checkpoint_every": 2,
    "optim.warmup_steps": 1}


def _url_like_local_names(top):
  return sorted(
      os.path.join(root, name)
      for root, dirs, files in os.walk(top)
      for name in dirs + files
      if name.endswith(":"))


@pytest.mark.slow
def test_tiny_sft_run_on_a_gs_workdir_writes_only_there_and_matches_a_local_run(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("RLHF_JAX_CACHE_DIR", str(tmp_path / "cache"))
  local = sft.train_and_evaluate(override(load_config("sft_synthetic"), TINY),
                                 str(tmp_path / "local_sft"))
  with fake_gcs.fake_gcs(str(tmp_path / "bucket_root")) as root:
    workdir = "gs://bucket/runs/sft"
    remote = sft.train_and_evaluate(override(load_config("sft_synthetic"), TINY), workdir)
    assert train.load_sft_params(workdir).step == 4
    rows = train.read_metrics(workdir, "train")
    stored = json.loads(fileio.read_text(fileio.join(workdir, train.FINAL_METRICS_FILE)))
    # A rerun finds the finished run through the URL and does not train again.
    again = sft.train_and_evaluate(override(load_config("sft_synthetic"), TINY), workdir)
  assert [r["step"] for r in rows] == [2, 4]
  for key in ("eval_nll_per_token", "sample_gold_reward", "step"):
    assert remote[key] == local[key] == stored[key] == again[key], key
  on_bucket = sorted(os.listdir(os.path.join(root, "bucket", "runs", "sft")))
  assert {
      "checkpoints", "config.json", "data", "final_metrics.json", "metrics.jsonl",
      "run_fingerprint.json", "samples.jsonl", "tensorboard"} <= set(on_bucket), on_bucket
  assert sorted(os.listdir(os.path.join(root, "bucket", "runs", "sft",
                                        "data"))) == ["sft_eval", "sft_train", "synthetic"]
  assert _url_like_local_names(tmp_path) == []
  assert not os.path.exists(os.path.join(str(tmp_path), "gs:"))
