"""Best-of-n sampling: draw n responses from the SFT model, return the reward model's favourite.

For each held-out prompt x: y_1..y_n ~ π_SFT(·|x) (i.i.d.), ŷ = argmax_j r̃_φ(x, y_j). The
resulting policy π_BoN is never trained, so its KL to π_SFT is known in closed form,

    KL(π_BoN ‖ π_SFT) = log n - (n - 1)/n

(Stiennon et al., 2020, App. G.3; exact for continuous rewards, an upper bound with ties, Beirami
et al., 2024, arXiv:2401.01879), and it is reported next to the *measured* gold reward of ŷ. One
draw of n_max = max(ns) samples per prompt serves every n in ``ns`` (the first n of them), so the
curve over n is nested and cheap. Each row also reports the oracle best-of-n by gold reward (the
selection a perfect reward model would make): the gap between the two is what the reward model's
errors cost. Win rates are against the SFT model's own sample (``rlhf_jax.eval.policy``).

Multi-host: the held-out prompts are split over the run's mesh (``config.mesh``, all devices of all
processes in a multi-process job), each process sampling and scoring its slice, and every process
reads all n_max candidates back (``scoring.sample_candidates``), so the curve is computed from the
same numbers on every process; ``best_of_n.csv`` and ``final_metrics.json`` (with
``process_count``, ``device_count``, ``mesh_shape``) are written by process 0.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np

from rlhf_jax import fileio, parallel
from rlhf_jax.algorithms import common, sections
from rlhf_jax import scoring
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.train import config_dicts

logger = logging.getLogger(__name__)

CURVE_FILE = "best_of_n.csv"


@dataclasses.dataclass(frozen=True)
class BestOfNConfig:
  """The method's own settings (``config.bon``).

  Attributes:
    ns: the n values to report (each >= 1); n_max = max(ns) samples are drawn per prompt.
    chunk_prompts: prompts per sampler call (n_max rows each).
    seed: sampling seed (independent of the evaluator's SFT samples).
  """

  ns: tuple = (1, 2, 4, 8, 16)
  chunk_prompts: int = 32
  seed: int = 7

  def __post_init__(self):
    object.__setattr__(self, "ns", tuple(self.ns))
    if not self.ns or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.ns):
      raise ValueError(f"BestOfNConfig.ns={self.ns!r} is invalid; allowed: a non-empty tuple of "
                       "ints >= 1")
    sections.check_int("BestOfNConfig", "chunk_prompts", self.chunk_prompts, 1)
    sections.check_int("BestOfNConfig", "seed", self.seed, 0)


@dataclasses.dataclass(frozen=True)
class BestOfNDataConfig(sections.DataSource):
  """Held-out prompts (``config.data``, the shared :class:`sections.DataSource`); nothing is trained.

  ``synthetic``: the task's ``prompts_test.jsonl`` (the task in ``synthetic_dir``, default the SFT
  run's ``<sft_workdir>/data/synthetic``); ``jsonl``: ``eval_prompts_jsonl``, else ``eval_jsonl``
  (any records with a ``prompt``). ``eval_prompts_jsonl`` overrides both. ``batch_size`` is unused.
  """

  OPTIONAL_JSONL: ClassVar[tuple] = ("train_jsonl", "eval_jsonl")

  def __post_init__(self):
    super().__post_init__()
    if self.source == "jsonl" and not (self.eval_prompts_jsonl or self.eval_jsonl):
      raise ValueError("BestOfNDataConfig.eval_jsonl='' is invalid with source='jsonl'; allowed: "
                       "an existing file of prompts (or set eval_prompts_jsonl)")


def best_of_n_rows(rm_SxN: np.ndarray, gold_SxN: np.ndarray, lengths_SxN: np.ndarray,
                   sft_gold_S: np.ndarray, ns) -> list[dict[str, float]]:
  """One row per n: RM-selected and gold-oracle-selected gold reward, RM reward, analytic KL, win rate."""
  rows = []
  s = np.arange(rm_SxN.shape[0])
  for n in sorted(set(ns)):
    pick = np.argmax(rm_SxN[:, :n], axis=1)  # first index on ties
    gold = gold_SxN[s, pick]
    rows.append({
        "n": float(n),
        "gold_reward": float(np.mean(gold)),
        "rm_reward": float(np.mean(rm_SxN[s, pick])),
        "kl_to_sft": policy_eval.best_of_n_kl(n),
        "win_rate_vs_sft": policy_eval.win_rate(gold, sft_gold_S),
        "response_length": float(np.mean(lengths_SxN[s, pick])),
        "oracle_gold_reward": float(np.mean(np.max(gold_SxN[:, :n], axis=1))),})
  return rows


def sample_and_score(loaded: common.LoadedModels, prompts: list[str], cfg: BestOfNConfig,
                     max_prompt_len: int, max_new_tokens: int, temperature: float,
                     mesh: jax.sharding.Mesh | None = None):
  """n_max SFT samples per prompt: RM rewards, gold rewards and lengths, each ``[S, n_max]``.

  ``scoring.sample_candidates`` samples and scores (the RM reward of each response as sampled,
  the rule the evaluator's ``sft_rm_reward`` uses too), the prompts split over ``mesh`` (default:
  the reward model's); the gold reward reads the decoded texts.
  """
  cands = scoring.sample_candidates(loaded.model, loaded.ref_params, loaded.tokenizer, prompts,
                                    reward=loaded.reward, num_samples=max(cfg.ns),
                                    max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens,
                                    temperature=temperature, rng=jax.random.PRNGKey(cfg.seed),
                                    chunk_prompts=cfg.chunk_prompts, mesh=mesh)
  prompt_rows = [p for p in prompts for _ in range(cands.num_samples)]
  gold_N = policy_eval.synthetic.gold_rewards(prompt_rows, cands.texts)
  lengths_N = cands.response_mask.sum(-1).astype(np.float32)
  return cands.grid(cands.rewards_N), cands.grid(gold_N), cands.grid(lengths_N)


def _write_curve(rows: list[dict[str, float]], path: str) -> None:
  """``best_of_n.csv``: one line per n (written atomically: ``fileio.atomic_write_text``)."""
  header = list(rows[0])
  lines = [",".join(header)] + [",".join(f"{row[h]:.6g}" for h in header) for row in rows]
  fileio.atomic_write_text(path, "\n".join(lines) + "\n")


KNOWN_KEYS = {"method", "seed", "sources", "data", "limits", "bon", "eval", "mesh"}


def _prompts_file(data: BestOfNDataConfig, sources: sections.Sources) -> str:
  if data.eval_prompts_jsonl:
    return data.eval_prompts_jsonl
  if data.source == "jsonl":
    return data.eval_jsonl
  task = data.synthetic_dir or fileio.join(sources.sft_workdir, "data", "synthetic")
  if not fileio.isfile(fileio.join(task, "metadata.json")):
    raise ValueError(f"config.data.synthetic_dir={task!r}: no synthetic task there; allowed: the "
                     "folder `python -m rlhf_jax.data.synthetic --out DIR` wrote (default: the SFT "
                     "run's <sft_workdir>/data/synthetic)")
  return fileio.join(task, "prompts_test.jsonl")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates best-of-n for every n in ``config.bon.ns``; writes ``best_of_n.csv`` and
  ``final_metrics.json`` (the n_max row, flat, plus ``curve``). Nothing is trained.

  The n samples per prompt use the evaluation's sampler settings (``eval.max_new_tokens``,
  ``eval.temperature``) so they are draws of the same SFT distribution the evaluator's baseline
  comes from; prompts are ``limits.max_prompt_len`` wide.
  """
  common.check_config_keys(config, KNOWN_KEYS, "best_of_n")
  if config.get("method", "best_of_n") != "best_of_n":
    raise ValueError(
        f"config.method={config.method!r} is invalid for best_of_n.train_and_evaluate; "
        "allowed: 'best_of_n'")
  sources = config_dicts.to_dataclass(sections.Sources, config.sources, "sources")
  if not sources.policy:
    sources.require("sft_workdir", "best-of-n", "the SFT run it samples from (or "
                    "sources.pretrained)")
  sources.require("reward_model_workdir", "best-of-n", "the reward model that picks the best")
  cfg = config_dicts.to_dataclass(BestOfNConfig, config.bon, "bon")
  data_cfg = config_dicts.to_dataclass(BestOfNDataConfig, config.data, "data")
  limits = config_dicts.to_dataclass(sections.Limits, config.limits, "limits")
  eval_cfg = config_dicts.to_dataclass(policy_eval.PolicyEvalConfig, config.eval, "eval")
  mesh = parallel.mesh_from_config(config.mesh)
  fileio.makedirs(workdir)
  loaded = common.load_models(sources, mesh, need_reward=True)
  prompts = common.read_prompts(_prompts_file(data_cfg, sources), eval_cfg.num_prompts,
                                loaded.tokenizer.chat_template)
  evaluator = common.policy_evaluator(loaded, prompts, limits.max_prompt_len, eval_cfg, workdir,
                                      mesh=mesh)
  sft_ref = evaluator.reference()  # the SFT model's own samples (win-rate baseline)
  rm_SxN, gold_SxN, len_SxN = sample_and_score(loaded, evaluator.prompt_texts, cfg,
                                               limits.max_prompt_len, eval_cfg.max_new_tokens,
                                               eval_cfg.temperature, mesh)
  rows = best_of_n_rows(rm_SxN, gold_SxN, len_SxN, sft_ref.gold, cfg.ns)
  for row in rows:
    logger.info("best-of-%d: gold %.3f (oracle %.3f), RM %.3f, KL %.3f, win rate %.3f",
                int(row["n"]), row["gold_reward"], row["oracle_gold_reward"], row["rm_reward"],
                row["kl_to_sft"], row["win_rate_vs_sft"])
  parallel.write_on_coordinator(_write_curve, rows, fileio.join(workdir, CURVE_FILE))
  top = rows[-1]
  final = {
      "method": f"best_of_{int(top['n'])}", "step": 0, "preempted": False,
      **top, "sft_gold_reward": float(np.mean(sft_ref.gold)),
      "gold_reward_gain": top["gold_reward"] - float(np.mean(sft_ref.gold)), "curve": rows}
  if sft_ref.rm is not None:
    final["sft_rm_reward"] = float(np.mean(sft_ref.rm))
  return common.write_final(workdir, final, final["method"], mesh)
