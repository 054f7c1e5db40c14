"""Console scripts ``rlhf-run`` and ``rlhf-pipeline`` (``pip install -e .``).

They run the repository's launchers, ``experiments/run.py`` and ``experiments/pipeline.py``, with
the command line as given, so ``rlhf-run --config=experiments/configs/sft_synthetic.py
--workdir=workdirs/sft`` is ``python experiments/run.py ...``. The launchers and the experiment
configs live in the checkout (``experiments/`` is not an installed package), hence an editable
install; a plain install reports that instead of a traceback.
"""

from __future__ import annotations

import os
import runpy
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(script: str) -> None:
  path = os.path.join(_REPO, "experiments", script)
  if not os.path.isfile(path):
    sys.exit(f"{os.path.basename(sys.argv[0])}: {path} not found; the console scripts run the "
             "repository's experiments/ launchers: install the checkout with `pip install -e .`")
  runpy.run_path(path, run_name="__main__")


def run() -> None:
  """``rlhf-run``: ``experiments/run.py`` (any method from its config)."""
  _launch("run.py")


def pipeline() -> None:
  """``rlhf-pipeline``: ``experiments/pipeline.py`` (SFT -> RM -> every offline method)."""
  _launch("pipeline.py")
