"""Seeds as a run axis: replicate k of a run config, where it lives, and its summary over seeds.

A replicate has to redraw all the randomness a run has, not just its top-level ``seed``: the init
of the model and adapters (``seed``, ``lora.seed``), the data order (``data.shuffle_seed``), the
evaluator's samples (``eval.seed``), best-of-n's candidates (``bon.seed``), RAFT's rounds. Seed k
adds k to every ``seed`` / ``*_seed`` int of the config (:func:`seed_config`) except the ones that
define the task (:data:`FIXED_SEED_KEYS`): the error bars then measure training and evaluation
randomness on one benchmark, not a new benchmark per seed. Seed 0 is the config unchanged, so a
one-seed run is today's run and a finished one is reused as seed 0.

Layout: seed 0 in ``root`` itself, seed k in ``root/seed_<k>`` (:func:`seed_root`); the pipeline
uses it per stage, ``experiments/run.py --config.num_seeds=N`` per run, and :func:`summary` gives
the mean ± standard error (``rlhf_jax.eval.seeds``) of every numeric final metric over the seeds.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Sequence

from rlhf_jax.eval import seeds as seed_stats
from rlhf_jax.train import config_dicts

# Seeds that define the task, not a run's randomness: the same for every seed.
FIXED_SEED_KEYS = ("data.synthetic_seed",)
# Final metrics that describe the run rather than measure it: never averaged.
_NOT_MEASURED = ("step", "seed", "process_count", "device_count", "preempted")


def num_seeds(config: Any) -> int:
  """``config.num_seeds`` (1 when absent), checked."""
  n = config.get("num_seeds", 1)
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"config.num_seeds={n!r} is invalid; allowed: an int >= 1")
  return n


def seed_keys(cfg: Any, prefix: str = "") -> list[str]:
  """Dotted keys of a config section that seed randomness: ``seed`` or ``*_seed`` ints, except the
  task's (:data:`FIXED_SEED_KEYS`)."""
  keys = []
  for key, value in cfg.items():
    dotted = f"{prefix}{key}"
    if hasattr(value, "items"):
      keys += seed_keys(value, f"{dotted}.")
    elif (key == "seed" or key.endswith("_seed")) and isinstance(value, int) and \
        not isinstance(value, bool) and dotted not in FIXED_SEED_KEYS:
      keys.append(dotted)
  return keys


def seed_config(cfg: Any, seed: int) -> Any:
  """A copy of the config (section) ``cfg`` for seed ``seed``: every :func:`seed_keys` value plus
  ``seed`` (seed 0 is ``cfg`` unchanged)."""
  out = copy.deepcopy(cfg)
  if seed:
    values = {}
    for key in seed_keys(cfg):
      value = cfg
      for part in key.split("."):
        value = value[part]
      values[key] = value + seed
    config_dicts.set_dotted(out, values)
  return out


def seed_root(root: str, seed: int) -> str:
  """Seed 0 in ``root`` itself, seed k in ``root/seed_<k>``."""
  return root if seed == 0 else f"{str(root).rstrip('/')}/seed_{seed}"


def summary(finals: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Mean, standard error and per-seed values of every numeric final metric over the seeds
  (``finals[k]``: seed k's ``final_metrics.json``); a metric some seeds lack uses those that have
  it (its ``n`` says how many)."""
  names = []
  for final in finals:
    for key, value in final.items():
      if key in names or key in _NOT_MEASURED or isinstance(value, bool):
        continue
      if isinstance(value, (int, float)) and math.isfinite(value):
        names.append(key)
  out = {}
  for name in names:
    values = [final.get(name) for final in finals]
    stat = seed_stats.mean_se(values)
    out[name] = {
        "mean": stat.mean, "se": stat.se, "n": stat.n, "values": values,
        "text": seed_stats.format_mean_se(stat)}
  return out


def summary_markdown(title: str, stats: Mapping[str, Mapping[str, Any]], num: int) -> str:
  """:func:`summary` as a Markdown table (metric | mean ± s.e. | seed 0 .. seed n-1)."""
  head = ["metric", "mean ± s.e.", *(f"seed {k}" for k in range(num))]
  lines = [
      f"# {title}", "", f"{num} seeds; mean ± standard error (s / √n) over the seeds.", "",
      "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
  for name, stat in stats.items():
    cells = [name, stat["text"], *(_cell(v) for v in stat["values"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
  if value is None:
    return ""
  return f"{value:.4g}" if isinstance(value, float) else str(value)
