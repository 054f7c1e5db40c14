"""Every method by name: ``get(name)`` is its ``train_and_evaluate(config, workdir) -> final metrics``.

The one launcher (``experiments/run.py``), the pipeline and iterated RLHF look methods up here, so
no method module imports another: a method that needs an earlier stage (iterated RLHF trains an RM
and a policy each round) runs it through this table. Modules are imported on first use, so naming
one method does not import the others.

Adding a method is one line here plus its module (see README, "Adding a method").
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import ml_collections

# name -> module with ``train_and_evaluate(config, workdir)``
METHODS = {
    "sft": "rlhf_jax.algorithms.sft",
    "reward_model": "rlhf_jax.algorithms.reward.trainer",
    "rm_learning_curve": "rlhf_jax.algorithms.reward.sweep",
    "dpo": "rlhf_jax.algorithms.offline.dpo",
    "kto": "rlhf_jax.algorithms.offline.kto",
    "listwise": "rlhf_jax.algorithms.offline.listwise",
    "raft": "rlhf_jax.algorithms.offline.raft",
    "best_of_n": "rlhf_jax.algorithms.offline.best_of_n",
    "ppo": "rlhf_jax.algorithms.online.ppo",
    "online_dpo": "rlhf_jax.algorithms.online.online_dpo",
    "iterated_rlhf": "rlhf_jax.algorithms.online.iterated",}

TrainFn = Callable[[ml_collections.ConfigDict, str], Any]


def get(name: str) -> TrainFn:
  """The ``train_and_evaluate`` of method ``name`` (an error lists the known names)."""
  if name not in METHODS:
    raise ValueError(f"config.method={name!r} is invalid; allowed: {' | '.join(METHODS)}")
  return importlib.import_module(METHODS[name]).train_and_evaluate


def default_config(name: str) -> ml_collections.ConfigDict:
  """The ``default_config()`` of method ``name`` (e.g. the RM trains the default SFT run first)."""
  get(name)
  module = importlib.import_module(METHODS[name])
  if not hasattr(module, "default_config"):
    raise ValueError(f"method {name!r} has no default_config()")
  return module.default_config()


def run(name: str, config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Runs method ``name``; the path every launcher takes (``experiments/run.py``, the pipeline,
  iterated RLHF). With ``config.mesh.device_memory_gb > 0`` the run's memory is planned first
  (``algorithms.plan.check_config``: compiled, nothing allocated) and a plan over that budget is
  refused with ``PlanExceedsMemoryError`` before the method starts."""
  fn = get(name)
  from rlhf_jax.algorithms import plan  # pylint: disable=import-outside-toplevel
  plan.check_config(config)
  return fn(config, workdir)
