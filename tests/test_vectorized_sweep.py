"""Vectorised sweeps (``rlhf_jax.train.vectorized`` + ``algorithms.offline.vectorized``): every run
of a 4-run DPO sweep equals its sequential run (loss curve, final params, sampled tokens); a
diverging run is frozen while the others still equal theirs, with the run axis sharded over all 8
simulated devices (run=2 x data=2 x fsdp=2); resume mid-sweep is bit-identical; 2-run SFT, reward
model and KTO sweeps equal their sequential runs.

Cost: the 4 sequential DPO runs and the 4-run sweep are module fixtures shared by the DPO tests
(the resume test compares with the fixture's sweep instead of training a third one).
"""

import json
import os

import jax
import numpy as np
import pytest

from offline_fixtures import SFT_OVERRIDES, TINY_RUN, load_config, override, tiny_sft_workdir
from rlhf_jax import models, train
from rlhf_jax.algorithms import sft
from rlhf_jax.algorithms.offline import dpo, kto
from rlhf_jax.algorithms.offline import vectorized as offline_vec
from rlhf_jax.algorithms.reward import trainer as reward_trainer
from rlhf_jax.data import synthetic
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.train import checkpoint as ckpt_lib
from rlhf_jax.train import vectorized as vec

DATA = {"data.batch_size": 8, "limits.buckets": (80,), "data.num_eval_pairs": 8}
# 4 points: two loss types (two groups) x two betas; different learning rates and seeds too.
POINTS = [
    {"loss.loss_type": "sigmoid", "loss.beta": 0.1, "optim.lr": 1e-3, "seed": 0},
    {"loss.loss_type": "sigmoid", "loss.beta": 0.5, "optim.lr": 3e-3, "seed": 1},
    {"loss.loss_type": "ipo", "loss.beta": 0.1, "optim.lr": 1e-3, "seed": 2},
    {"loss.loss_type": "ipo", "loss.beta": 0.5, "optim.lr": 2e-3, "seed": 3},]
# Each run on its own 4 devices (data=2 x fsdp=2), two runs of each group side by side: 8 devices.
SHARDED_MESH = {"mesh.data": 2, "mesh.fsdp": 2}
SHARDED_RUN_DEVICES = 2


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


def _final(workdir):
  return json.load(open(os.path.join(workdir, train.FINAL_METRICS_FILE)))


def _assert_same_run(vec_dir, seq_dir, atol=1e-5, samples=True):
  np.testing.assert_allclose(_curve(vec_dir), _curve(seq_dir), atol=atol, rtol=0)
  a, b = _final_params(vec_dir), _final_params(seq_dir)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)
  if samples:
    assert _samples(vec_dir) == _samples(seq_dir)
  fa, fb = _final(vec_dir), _final(seq_dir)
  topology = {"mesh_shape", "device_count"}  # the sharded sweep's runs use 4 devices each
  assert fa.keys() == fb.keys()
  for k in fa.keys() - topology:
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


@pytest.fixture(scope="module")
def vectorized(sft_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("vec")
  dirs = [str(root / f"p{i}") for i in range(len(POINTS))]
  outcomes = offline_vec.train_sweep([_config(sft_dir, p) for p in POINTS], dirs)
  assert [o.final is not None for o in outcomes] == [True] * 4
  return dirs


@pytest.mark.slow
def test_each_point_of_a_vectorized_sweep_equals_its_sequential_run(sequential, vectorized):
  for vec_dir, seq_dir in zip(vectorized, sequential):
    _assert_same_run(vec_dir, seq_dir)
    layout = json.load(open(os.path.join(vec_dir, vec.LAYOUT_FILE)))
    assert layout["run_devices"] == 1 and layout["devices"] == [0]


@pytest.mark.slow
def test_a_diverging_run_is_frozen_the_others_equal_their_sequential_runs_on_8_sharded_devices(
    sft_dir, sequential, tmp_path):
  # lr = 1e30 makes run 1's first update overflow: its loss is non-finite from step 2 on.
  points = [dict(p) for p in POINTS]
  points[1]["optim.lr"] = 1e30
  dirs = [str(tmp_path / f"p{i}") for i in range(len(points))]
  outcomes = offline_vec.train_sweep([_config(sft_dir, p, **SHARDED_MESH) for p in points], dirs,
                                     run_devices=SHARDED_RUN_DEVICES)
  bad = outcomes[1]
  assert bad.final is None and bad.frozen is not None
  record = json.load(open(os.path.join(dirs[1], vec.FROZEN_FILE)))
  assert record["step"] == bad.frozen["step"] and "loss or gradient" in record["cause"]
  assert not os.path.exists(os.path.join(dirs[1], train.FINAL_METRICS_FILE))
  # its checkpoints hold finite params only (none after the bad step)
  assert ckpt_lib.latest_step(dirs[1]) < record["step"]
  for i in (0, 2, 3):
    _assert_same_run(dirs[i], sequential[i])
  # The run axis as configured: (run=2, data=2, fsdp=2, tensor=1) over the 8 devices; in each
  # group (sigmoid: runs 0, 1; ipo: runs 2, 3) the first run lives on devices 0-3, the second on
  # 4-7, and a run's params are split within its 4 devices (fsdp).
  for i, workdir in enumerate(dirs):
    layout = json.load(open(os.path.join(workdir, vec.LAYOUT_FILE)))
    assert layout["mesh_shape"] == {"run": 2, "data": 2, "fsdp": 2, "tensor": 1}
    assert (layout["group"], layout["group_index"], layout["run_shard"]) == (i // 2, i % 2, i % 2)
    assert layout["devices"] == list(range(4 * (i % 2), 4 * (i % 2) + 4))
    assert layout["max_param_pieces"] == 2
  assert _final(dirs[0])["device_count"] == 4


@pytest.mark.slow
def test_resume_mid_sweep_is_bit_identical(sft_dir, vectorized, tmp_path):
  configs = lambda **kw: [_config(sft_dir, p, **kw) for p in POINTS]  # noqa: E731
  parts = [str(tmp_path / f"p{i}") for i in range(4)]
  first = offline_vec.train_sweep(configs(**{"loop.stop_after_steps": 2}), parts)
  assert all(o.preempted and o.step == 2 for o in first)
  offline_vec.train_sweep(configs(), parts)
  for a, b in zip(vectorized, parts):
    assert _curve(a) == _curve(b)
    for x, y in zip(jax.tree.leaves(_final_params(a)), jax.tree.leaves(_final_params(b))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert _samples(a) == _samples(b)


# -- What a sweep's evaluations share (build_runs(share_eval=True), the default) ----------------


@pytest.mark.slow
def test_shared_evaluation_gives_each_run_the_metrics_of_its_own_evaluation(
    sft_dir, vectorized, tmp_path, monkeypatch):
  # The fixture's sweep shares the SFT samples and computes the held-out metrics per group (one
  # vmap); here the same two runs of one group are evaluated each on its own (the sequential
  # run's eval_fn): every eval row, final metric and sample must agree.
  draws = []
  sample = policy_eval.PolicyEvaluator.sample
  monkeypatch.setattr(policy_eval.PolicyEvaluator, "sample",
                      lambda self, params: draws.append(1) or sample(self, params))
  dirs = [str(tmp_path / f"p{i}") for i in range(2)]
  offline_vec.train_sweep([_config(sft_dir, p) for p in POINTS[:2]], dirs, share_eval=False)
  assert len(draws) == 2 * 2  # per run: its policy's samples and its own draw of the SFT ones
  for own, shared in zip(dirs, vectorized):
    rows_a, rows_b = train.read_metrics(own, "eval"), train.read_metrics(shared, "eval")
    assert len(rows_a) == len(rows_b)
    assert any(k.startswith("pairs/") for k in rows_a[-1])
    for ra, rb in [*zip(rows_a, rows_b), (_final(own), _final(shared))]:
      assert ra.keys() == rb.keys()
      for k in ra.keys() - {"time"}:  # the eval row's wall-clock time stamp
        assert ra[k] == (pytest.approx(rb[k], rel=1e-5, abs=1e-6)
                         if isinstance(rb[k], float) else rb[k]), k
    assert _samples(own) == _samples(shared)


def test_an_evaluator_sharing_the_sft_samples_draws_them_once(sft_dir):
  sft_run = train.load_sft_params(sft_dir)
  model = models.Transformer(sft_run.model_config)
  texts = synthetic.sample_prompts(np.random.default_rng(0), 4)
  prompts = policy_eval.make_eval_prompts(sft_run.tokenizer, texts, max_prompt_len=32)

  def evaluator(**cfg):
    return policy_eval.PolicyEvaluator(
        model, sft_run.params, sft_run.tokenizer, prompts,
        policy_eval.PolicyEvalConfig(num_prompts=4, max_new_tokens=8, print_samples=0, **cfg))

  first, second = evaluator(), evaluator()
  second.share_reference(first)
  draws = []
  first.sample = lambda params: draws.append(1) or policy_eval.PolicyEvaluator.sample(first, params)
  assert second.reference() is first.reference()
  assert len(draws) == 1
  own = evaluator()  # its own draw: the same tokens (common random numbers, same key)
  assert own.reference().responses == first.reference().responses
  with pytest.raises(ValueError, match="share_reference: the evaluators differ"):
    evaluator(seed=7).share_reference(first)


# -- SFT, the reward model and KTO: 2-run sweeps (seed, data order / beta, learning rate) -------


def _sweep_equals_sequential(configs, train_fn, root, compare):
  seq = [str(root / f"seq{i}") for i in range(len(configs))]
  for config, workdir in zip(configs, seq):
    train_fn(config.copy_and_resolve_references(), workdir)
  vdirs = [str(root / f"vec{i}") for i in range(len(configs))]
  outcomes = offline_vec.train_sweep(configs, vdirs)
  assert all(o.final is not None and o.frozen is None for o in outcomes)
  for a, b in zip(vdirs, seq):
    compare(a, b)


@pytest.mark.slow
def test_a_vectorized_sft_sweep_equals_its_sequential_runs(tmp_path):
  points = [{"seed": 0}, {"seed": 1, "data.shuffle_seed": 1, "optim.lr": 1e-3}]
  configs = [override(load_config("sft_synthetic"), {**SFT_OVERRIDES, **p}) for p in points]
  _sweep_equals_sequential(configs, sft.train_and_evaluate, tmp_path, _assert_same_run)


RM_TINY = {
    "rm.compute_dtype": "", "rm.early_stopping_patience": 0, "data.batch_size": 8,
    "data.eval_batch_size": 16, "data.synthetic_num_prompts": 64,
    "data.synthetic_num_test_prompts": 16, "limits.buckets": (80,), "loop.num_steps": 4,
    "loop.eval_every": 0, "loop.checkpoint_every": 2, "loop.log_every": 2,
    "loop.progress_every_secs": 0.0, "optim.warmup_steps": 1, "eval.num_normalization_prompts": 8,
    "eval.samples_per_prompt": 2, "eval.num_gold_prompts": 8, "eval.sample_batch": 8}


@pytest.mark.slow
def test_a_vectorized_reward_model_sweep_equals_its_sequential_runs(sft_dir, tmp_path):

  def compare(a, b):
    _assert_same_run(a, b, samples=False)  # the RM writes no samples.jsonl
    assert os.path.isdir(os.path.join(a, "reward_model"))  # its artifact, as the sequential run's

  points = [{"seed": 0}, {"seed": 1, "data.shuffle_seed": 1, "optim.lr": 3e-3}]
  configs = [
      override(load_config("rm_synthetic", "bradley_terry"),
               {**RM_TINY, "sources.sft_workdir": sft_dir, **p}) for p in points]
  _sweep_equals_sequential(configs, reward_trainer.train_and_evaluate, tmp_path, compare)


@pytest.mark.slow
def test_a_vectorized_kto_sweep_equals_its_sequential_runs(sft_dir, tmp_path):
  points = [{"loss.beta": 0.1}, {"loss.beta": 0.5, "optim.lr": 3e-3, "loss.desirable_weight": 1.2}]
  configs = [
      override(
          load_config("kto_synthetic"), {
              **TINY_RUN, "data.batch_size": 8, "limits.buckets":
                  (80,), "data.num_eval_examples": 8, "sources.sft_workdir": sft_dir, **p})
      for p in points]
  _sweep_equals_sequential(configs, kto.train_and_evaluate, tmp_path, _assert_same_run)


def test_non_vectorisable_keys_are_refused_by_name():
  with pytest.raises(ValueError, match=r"model.d_model.*cannot be vectorised"):
    offline_vec.check_vectorisable("dpo", ["loss.beta", "model.d_model"])
  with pytest.raises(ValueError, match="cannot be vectorised: its step is a host loop"):
    offline_vec.check_vectorisable("ppo", ["seed"])
  with pytest.raises(ValueError, match=r"cannot be vectorised; allowed: dpo \| listwise \| kto"):
    offline_vec.check_vectorisable("rm_learning_curve", ["seed"])
  with pytest.raises(ValueError, match=r"\['rm.center_coef'\] cannot be vectorised"):
    offline_vec.check_vectorisable("reward_model", ["seed", "rm.center_coef"])
  offline_vec.check_vectorisable("dpo", ["loss.beta", "loss.loss_type", "optim.lr", "seed"])
  offline_vec.check_vectorisable("sft", ["optim.lr", "seed", "data.shuffle_seed"])
  offline_vec.check_vectorisable("kto", ["loss.beta", "loss.desirable_weight"])
