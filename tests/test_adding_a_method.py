"""The README's "Adding a method" example, run for real: a new DPO-style loss (squared hinge) as one
module over the pairwise shell, a config and a registry line — trained end to end on the tiny
synthetic SFT run, with its loss checked by hand, against NumPy and by its gradient."""

import importlib.util
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import train
from rlhf_jax.algorithms import registry
from rlhf_jax.algorithms.offline import shell
from rlhf_jax.train import config_dicts

from offline_fixtures import REPO, TINY_RUN, load_config, override, tiny_sft_workdir

EXAMPLE = os.path.join(REPO, "docs", "examples", "sqhinge.py")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
  """The example module copied into an importable package (as a user's new file would be)."""
  root = tmp_path_factory.mktemp("user_pkg")
  pkg = root / "my_methods"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  shutil.copy(EXAMPLE, pkg / "sqhinge.py")
  sys.path.insert(0, str(root))
  try:
    spec = importlib.util.spec_from_file_location("my_methods.sqhinge", pkg / "sqhinge.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["my_methods.sqhinge"] = module
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.path.remove(str(root))


def test_loss_by_hand_numpy_and_gradient(example):
  pc, pr = jnp.array([-3.0, -2.0]), jnp.array([-4.0, -1.0])
  rc, rr = jnp.array([-3.5, -2.0]), jnp.array([-3.5, -2.0])
  # by hand, β = 0.5: Δ = (0.5 - (-0.5), 0 - 1) = (1, -1); L = (1 - 0.5)² = 0.25, (1 + 0.5)² = 2.25
  per, metrics = example.sqhinge_loss(pc, pr, rc, rr, beta=0.5)
  np.testing.assert_allclose(per, [0.25, 2.25], rtol=1e-6)
  margin = 0.5 * ((np.asarray(pc) - rc) - (np.asarray(pr) - rr))
  np.testing.assert_allclose(per, np.maximum(0.0, 1.0 - margin)**2, rtol=1e-6)
  assert float(metrics["rewards/accuracies"]) == 0.5
  grad = jax.grad(lambda x: example.sqhinge_loss(x, pr, rc, rr, beta=0.5)[0].sum())(pc)
  np.testing.assert_allclose(grad, -2 * 0.5 * np.maximum(0.0, 1.0 - margin), rtol=1e-6)
  with pytest.raises(ValueError, match=r"SqHingeConfig.beta=0"):
    example.SqHingeConfig(beta=0)


@pytest.mark.slow
def test_new_method_trains_through_the_registry(example, tmp_path_factory, monkeypatch):
  sft_dir = tiny_sft_workdir(tmp_path_factory)
  # the registry line a user adds
  monkeypatch.setitem(registry.METHODS, "sqhinge", "my_methods.sqhinge")
  # the config: any pairwise config with method and loss replaced
  config = load_config("dpo_synthetic")
  config.method = "sqhinge"
  config.loss = config_dicts.dataclass_section(example.SqHingeConfig, beta=0.1)
  config = override(
      config, {
          **TINY_RUN, "data.batch_size": 8, "limits.buckets":
              (80,), "data.num_eval_pairs": 8, "sources.sft_workdir": sft_dir, "optim.lr": 1e-3})
  workdir = str(tmp_path_factory.mktemp("sqhinge"))
  final = registry.run(config.method, config, workdir)
  stored = json.load(open(os.path.join(workdir, train.FINAL_METRICS_FILE)))
  assert stored["method"] == final["method"] == "sqhinge(beta=0.1)" and stored["step"] == 4
  for key in ("gold_reward", "kl_to_sft", "win_rate_vs_sft", "pairs/rewards/margins"):
    assert np.isfinite(stored[key]), key
  rows = train.read_metrics(workdir, "train")
  # the policy starts at the reference: margin 0, loss (1 - 0)² = 1; then it moves away from it
  assert abs(rows[0]["loss"] - 1.0) < 0.05, rows
  assert stored["kl_to_sft"] != 0.0 and rows[-1]["rewards/margins"] != rows[0]["rewards/margins"]
  # and in the preferred direction on held-out pairs (implicit-reward margin > 0)
  assert stored["pairs/rewards/margins"] > 0.0
  assert shell.KNOWN_KEYS >= set(config.keys())
