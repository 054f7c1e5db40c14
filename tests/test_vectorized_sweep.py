"""Vectorised sweeps (``rlhf_jax.train.vectorized`` + ``algorithms.offline.vectorized``): every run
of a 4-run sweep equals its sequential run (loss curve, final params, sampled tokens); a diverging
run is frozen while the others still equal theirs; resume mid-sweep is bit-identical; the run axis
is sharded over a simulated 8-device mesh."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from offline_fixtures import REPO, TINY_RUN, load_config, override, tiny_sft_workdir
from rlhf_jax import train
from rlhf_jax.algorithms.offline import dpo
from rlhf_jax.algorithms.offline import vectorized as offline_vec
from rlhf_jax.train import checkpoint as ckpt_lib
from rlhf_jax.train import vectorized as vec

DATA = {"data.batch_size": 8, "limits.buckets": (80,), "data.num_eval_pairs": 8}
# 4 points: two loss types (two groups) x two betas; different learning rates and seeds too.
POINTS = [
    {"loss.loss_type": "sigmoid", "loss.beta": 0.1, "optim.lr": 1e-3, "seed": 0},
    {"loss.loss_type": "sigmoid", "loss.beta": 0.5, "optim.lr": 3e-3, "seed": 1},
    {"loss.loss_type": "ipo", "loss.beta": 0.1, "optim.lr": 1e-3, "seed": 2},
    {"loss.loss_type": "ipo", "loss.beta": 0.5, "optim.lr": 2e-3, "seed": 3},]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
  return tiny_sft_workdir(tmp_path_factory)


def _config(sft_dir, point, **extra):
  return override(load_config("dpo_synthetic"),
                  {**TINY_RUN, **DATA, "sources.sft_workdir": sft_dir, **point, **extra})


def _final_params(workdir):
  return train.restore_params(workdir)


def _curve(workdir):
  return [r["loss"] for r in train.read_metrics(workdir, "train")]


def _samples(workdir):
  return [json.loads(l)["response"] for l in open(os.path.join(workdir, "samples.jsonl"))]


def _assert_same_run(vec_dir, seq_dir, atol=1e-5):
  np.testing.assert_allclose(_curve(vec_dir), _curve(seq_dir), atol=atol, rtol=0)
  a, b = _final_params(vec_dir), _final_params(seq_dir)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)
  assert _samples(vec_dir) == _samples(seq_dir)
  fa = json.load(open(os.path.join(vec_dir, train.FINAL_METRICS_FILE)))
  fb = json.load(open(os.path.join(seq_dir, train.FINAL_METRICS_FILE)))
  assert fa.keys() == fb.keys()
  for k in fa:
    if isinstance(fa[k], float):
      assert abs(fa[k] - fb[k]) <= 1e-4 * max(1.0, abs(fb[k])), (k, fa[k], fb[k])
    else:
      assert fa[k] == fb[k], k


@pytest.fixture(scope="module")
def sequential(sft_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("seq")
  dirs = []
  for i, point in enumerate(POINTS):
    workdir = str(root / f"p{i}")
    dpo.train_and_evaluate(_config(sft_dir, point), workdir)
    dirs.append(workdir)
  return dirs


@pytest.mark.slow
def test_each_point_of_a_vectorized_sweep_equals_its_sequential_run(sft_dir, sequential, tmp_path):
  dirs = [str(tmp_path / f"p{i}") for i in range(len(POINTS))]
  outcomes = offline_vec.train_sweep([_config(sft_dir, p) for p in POINTS], dirs)
  assert [o.final is not None for o in outcomes] == [True] * 4
  for vec_dir, seq_dir in zip(dirs, sequential):
    _assert_same_run(vec_dir, seq_dir)


@pytest.mark.slow
def test_a_diverging_run_is_frozen_and_the_others_equal_their_sequential_runs(
    sft_dir, sequential, tmp_path):
  # lr = 1e30 makes run 1's first update overflow: its loss is non-finite from step 2 on.
  points = [dict(p) for p in POINTS]
  points[1]["optim.lr"] = 1e30
  dirs = [str(tmp_path / f"p{i}") for i in range(len(points))]
  outcomes = offline_vec.train_sweep([_config(sft_dir, p) for p in points], dirs)
  bad = outcomes[1]
  assert bad.final is None and bad.frozen is not None
  record = json.load(open(os.path.join(dirs[1], vec.FROZEN_FILE)))
  assert record["step"] == bad.frozen["step"] and "loss or gradient" in record["cause"]
  assert not os.path.exists(os.path.join(dirs[1], train.FINAL_METRICS_FILE))
  # its checkpoints hold finite params only (none after the bad step)
  assert ckpt_lib.latest_step(dirs[1]) < record["step"]
  for i in (0, 2, 3):
    _assert_same_run(dirs[i], sequential[i])


@pytest.mark.slow
def test_resume_mid_sweep_is_bit_identical(sft_dir, tmp_path):
  configs = lambda **kw: [_config(sft_dir, p, **kw) for p in POINTS]  # noqa: E731
  whole = [str(tmp_path / "whole" / f"p{i}") for i in range(4)]
  offline_vec.train_sweep(configs(), whole)
  parts = [str(tmp_path / "parts" / f"p{i}") for i in range(4)]
  first = offline_vec.train_sweep(configs(**{"loop.stop_after_steps": 2}), parts)
  assert all(o.preempted and o.step == 2 for o in first)
  offline_vec.train_sweep(configs(), parts)
  for a, b in zip(whole, parts):
    assert _curve(a) == _curve(b)
    for x, y in zip(jax.tree.leaves(_final_params(a)), jax.tree.leaves(_final_params(b))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert _samples(a) == _samples(b)


def test_non_vectorisable_keys_are_refused_by_name():
  with pytest.raises(ValueError, match=r"model.d_model.*cannot be vectorised"):
    offline_vec.check_vectorisable("dpo", ["loss.beta", "model.d_model"])
  with pytest.raises(ValueError, match="cannot be vectorised; allowed: dpo"):
    offline_vec.check_vectorisable("ppo", ["seed"])
  offline_vec.check_vectorisable("dpo", ["loss.beta", "loss.loss_type", "optim.lr", "seed"])
