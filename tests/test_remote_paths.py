"""Runs whose workdir is a URL write there and nowhere else (issue 19: paths through etils.epath).

``tests/fake_gcs.py`` serves ``gs://`` from a local folder at the place a real GCS client sits
(fsspec for ``etils.epath``, TensorStore's kvstore for orbax's arrays), so a path turned into a
local folder (``os.path.abspath('gs://b/x')`` = ``<cwd>/gs:/b/x``) shows up as a folder named
``gs:``, and one that only exists under the fake bucket went through the URL.

One pipeline on a ``gs://`` root covers SFT, the reward model, RAFT and PPO (the smoke stages of
``tests/multihost_pipeline_config.py``, one device): every stage reads the runs before it through
their URLs (the SFT checkpoint, the RM artifact, the synthetic task, the tokenised datasets) and
writes its checkpoints, metrics, samples and reports to the bucket. The SFT stage equals the same
stage run on local disk, and a rerun reuses every stage through the URLs.
"""

import importlib.util
import os

import pytest

from rlhf_jax import fileio, train

import fake_gcs
import multihost_pipeline_config
from offline_fixtures import REPO, load_config


def _launcher(name):
  """``experiments/<name>.py`` as a module (absl flags are defined only when run as a script)."""
  spec = importlib.util.spec_from_file_location(name,
                                                os.path.join(REPO, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


pipeline = _launcher("pipeline")

STAGES = ("sft", "rm", "raft", "ppo")


def _config(stages=STAGES):
  config = multihost_pipeline_config.get_config()
  for name in multihost_pipeline_config.STAGES:
    config[name].mesh.data = 1  # one device: the URL paths are under test, not the mesh
  config.stages = ",".join(stages)
  return config


def _url_like_local_names(top):
  return sorted(
      os.path.join(root, name)
      for root, dirs, files in os.walk(top)
      for name in dirs + files
      if name.endswith(":"))


@pytest.mark.slow
def test_pipeline_on_a_gs_root_writes_only_under_the_bucket_and_matches_local(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("RLHF_JAX_CACHE_DIR", str(tmp_path / "cache"))
  [local] = pipeline.run_pipeline(_config(("sft",)), str(tmp_path / "local"), "pytest")
  with fake_gcs.fake_gcs(str(tmp_path / "bucket_root")) as root:
    url = "gs://bucket/runs/pipe"
    [remote] = pipeline.run_pipeline(_config(), url, "pytest")
    sft_steps = train.load_sft_params(fileio.join(url, "sft")).step
    sft_rows = train.read_metrics(fileio.join(url, "sft"), "train")
    ppo_rows = train.read_metrics(fileio.join(url, "ppo"), "train")
    results_md = fileio.read_text(fileio.join(url, "results.md"))
    # A rerun finds every finished stage through the URLs and trains nothing.
    [again] = pipeline.run_pipeline(_config(), url, "pytest")
  assert {name: remote[name]["_status"] for name in STAGES} == dict.fromkeys(STAGES, "ok")
  assert {name: again[name]["_status"] for name in STAGES} == dict.fromkeys(STAGES, "reused")
  assert sft_steps == remote["sft"]["step"] and sft_rows and len(ppo_rows) == 2
  for key in ("eval_nll_per_token", "sample_gold_reward", "step"):
    assert remote["sft"][key] == local["sft"][key] == again["sft"][key], key
  for label in ("| sft |", "| reward model |", f"| {remote['raft'].get('method', 'raft')} |",
                f"| {remote['ppo'].get('method', 'ppo')} |"):  # one table row per stage
    assert label in results_md, (label, results_md)
  bucket = os.path.join(root, "bucket", "runs", "pipe")
  assert {"results.md", "results.csv", "frontier.png", *STAGES} <= set(os.listdir(bucket))
  for name in STAGES:
    assert {"final_metrics.json", "config.json",
            pipeline.STAGE_TIMES_FILE} <= set(os.listdir(os.path.join(bucket, name))), name
  for name in ("sft", "raft", "ppo"):
    assert os.path.isdir(os.path.join(bucket, name, "checkpoints")), name
  assert os.path.isfile(os.path.join(bucket, "ppo", "samples.jsonl"))
  assert os.path.isfile(os.path.join(bucket, "ppo", "data", "synthetic", "metadata.json"))
  assert sorted(os.listdir(os.path.join(bucket, "sft",
                                        "data"))) == ["sft_eval", "sft_train", "synthetic"]
  assert _url_like_local_names(tmp_path) == []
  assert not os.path.exists(os.path.join(str(tmp_path), "gs:"))


RLAIF_STAGES = ("sft", "feedback", "label", "rm_ai", "ppo_ai", "ppo_direct", "report")


@pytest.mark.slow
def test_rlaif_on_a_gs_root_writes_only_under_the_bucket(tmp_path, monkeypatch):
  # experiments/rlaif.py's own paths on a gs:// root: the feedback model's task-subset files, the
  # label stage's prompts and JSONL, the RM on those labels, PPO on that RM and on the feedback
  # model's ratings (d-RLAIF), the report's head-to-head over their samples. The feedback model
  # starts from scratch: init="sft" exports the SFT run as a Hugging Face folder, and
  # rlhf_jax/models/hf writes local folders only.
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("RLHF_JAX_CACHE_DIR", str(tmp_path / "cache"))
  config = load_config("rlaif_synthetic", "smoke")
  config.stages = ",".join(RLAIF_STAGES)
  config.feedback_init = "scratch"
  config.label.cot_pairs = 0  # the CoT labels run the same file paths; their decode is time
  url = "gs://bucket/runs/rlaif"
  with fake_gcs.fake_gcs(str(tmp_path / "bucket_root")) as root:
    res = _launcher("rlaif").run(config, url)
    results = fileio.read_json(fileio.join(url, "results.json"))
    ai_pairs = fileio.read_jsonl(fileio.join(url, "label", "ai_pairs.jsonl"))
    rm_config = fileio.read_json(fileio.join(url, "rm_ai", "config.json"))
  assert all("_seconds" in res[name] for name in RLAIF_STAGES[:-1]), res  # each stage ran
  assert results["stages"]["label"]["num_pairs"] == 16 == len(ai_pairs)
  assert all(0.5 <= r["preference_prob"] <= 1 for r in ai_pairs)
  assert rm_config["data"]["train_jsonl"] == url + "/label/ai_pairs.jsonl"
  assert 0 <= results["head_to_head"]["ppo_ai vs ppo_direct"] <= 1
  assert isinstance(res["ppo_direct"]["gold_reward"], float) and "rm_reward" in res["ppo_direct"]
  bucket = os.path.join(root, "bucket", "runs", "rlaif")
  assert {"results.md", "results.json", "rlaif.png", "feedback_data", *RLAIF_STAGES[:-1]
         } <= set(os.listdir(bucket))
  assert sorted(os.listdir(os.path.join(bucket, "feedback_data"))) == [
      "feedback_sft.jsonl", "feedback_sft_test.jsonl"]
  assert {"ai_pairs.jsonl", "human_pairs.jsonl", "pairs_scored.jsonl",
          "final_metrics.json"} <= set(os.listdir(os.path.join(bucket, "label")))
  for name in ("sft", "feedback", "rm_ai", "ppo_ai", "ppo_direct"):
    assert os.path.isfile(os.path.join(bucket, name, "final_metrics.json")), name
  assert "AI, both orders averaged" in open(os.path.join(bucket, "results.md")).read()
  assert _url_like_local_names(tmp_path) == []
  assert not os.path.exists(os.path.join(str(tmp_path), "gs:"))


@pytest.mark.slow
def test_cai_on_a_gs_root_writes_only_under_the_bucket(tmp_path, monkeypatch):
  # every stage of experiments/cai.py on a gs:// root (the feedback model from scratch, as above)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("RLHF_JAX_CACHE_DIR", str(tmp_path / "cache"))
  config = load_config("cai_synthetic", "smoke")
  config.feedback_init = "scratch"
  url = "gs://bucket/runs/cai"
  with fake_gcs.fake_gcs(str(tmp_path / "bucket_root")) as root:
    _launcher("cai").run(config, url)
    results = fileio.read_json(fileio.join(url, "results.json"))
  assert results["policies"] and results["trajectories"]
  bucket = os.path.join(root, "bucket", "runs", "cai")
  assert {"results.md", "results.json", "cai.png", "sl_cai_data", "human_labels",
          "rl_cai_labels"} <= set(os.listdir(bucket))
  assert os.path.isfile(os.path.join(bucket, "rl_cai_labels", "pm_pairs.jsonl"))
  assert _url_like_local_names(tmp_path) == []
  assert not os.path.exists(os.path.join(str(tmp_path), "gs:"))
