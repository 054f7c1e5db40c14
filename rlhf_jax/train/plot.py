"""``python -m rlhf_jax.train.plot WORKDIR KEY [KEY ...]``: plot a run's metrics to a PNG.

KEY is ``name`` (train split) or ``split/name``, e.g.
``python -m rlhf_jax.train.plot workdirs/sft_synthetic loss eval/eval_nll_per_token eval/sample_gold_reward``
writes ``workdirs/sft_synthetic/metrics.png``.
"""

import sys

from rlhf_jax.train.metrics import plot_metrics


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    sys.exit(__doc__.split("\n")[0])
  print(plot_metrics(argv[0], argv[1:]))


if __name__ == "__main__":
  main(sys.argv[1:])
