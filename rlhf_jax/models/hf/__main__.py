"""`python -m rlhf_jax.models.hf check --path=DIR` (see cli.py for the commands)."""

import sys

from rlhf_jax.models.hf.cli import main

if __name__ == "__main__":
  sys.exit(main())
