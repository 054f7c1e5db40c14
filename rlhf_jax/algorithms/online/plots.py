"""Over-optimisation report: gold and proxy (reward-model) reward against KL to the SFT model.

  python -m rlhf_jax.algorithms.online.plots --out=DIR WORKDIR [WORKDIR ...]

Reads each PPO run's held-out evaluations (``metrics.jsonl``, split ``eval``: ``kl_to_sft``,
``gold_reward``, ``rm_reward``), plots both rewards against KL, one colour per run (labelled with
its β = ``config.ppo.kl_coef``), and writes ``overoptimization.png`` and ``overoptimization.json``
(per run: the evaluation where the gold reward peaks — its KL, gold and proxy reward — and the last
evaluation) to ``DIR``.
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from rlhf_jax import fileio, train


def gold_peak(rows: list[dict]) -> dict:
  """The evaluation row with the highest gold reward, and the last one."""
  best = max(rows, key=lambda r: r["gold_reward"])
  keys = ("step", "kl_to_sft", "gold_reward", "rm_reward")
  return {"peak": {k: best.get(k) for k in keys}, "last": {k: rows[-1].get(k) for k in keys}}


def report(workdirs: Sequence[str], out_dir: str) -> dict:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fileio.makedirs(out_dir)
  fig, (ax_gold, ax_rm) = plt.subplots(1, 2, figsize=(10, 3.8))
  summary = {}
  for workdir in workdirs:
    rows = sorted(train.read_metrics(workdir, split="eval"), key=lambda r: r["step"])
    rows = [r for r in rows if "gold_reward" in r and "kl_to_sft" in r]
    if not rows:
      continue
    beta = train.read_json(fileio.join(workdir, "config.json"))["ppo"]["kl_coef"]
    label = f"β = {beta:g}"
    kl = [r["kl_to_sft"] for r in rows]
    ax_gold.plot(kl, [r["gold_reward"] for r in rows], "o-", ms=3, label=label)
    ax_rm.plot(kl, [r["rm_reward"] for r in rows], "o-", ms=3, label=label)
    summary[label] = {"workdir": workdir, "kl_coef": beta, **gold_peak(rows)}
  ax_gold.set(xlabel="KL(π ‖ SFT) per response (nats)", ylabel="gold reward (held-out)",
              title="gold reward")
  ax_rm.set(xlabel="KL(π ‖ SFT) per response (nats)", ylabel="proxy RM reward (normalised)",
            title="proxy reward")
  for ax in (ax_gold, ax_rm):
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fileio.save_figure(fig, fileio.join(out_dir, "overoptimization.png"), dpi=120)
  plt.close(fig)
  train.atomic_write_json(fileio.join(out_dir, "overoptimization.json"), summary)
  return summary


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m rlhf_jax.algorithms.online.plots",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="folder for overoptimization.png / .json")
  parser.add_argument("workdirs", nargs="+", help="PPO run directories")
  args = parser.parse_args(argv)
  summary = report(args.workdirs, args.out)
  print(json.dumps(summary, indent=2))
  return summary


if __name__ == "__main__":
  main()
