"""One module per method, each composing models, losses, data and the shared training stack
(``rlhf_jax.train``) into a loss function, an evaluation and a ``train_and_evaluate(config, workdir)``
that the thin launcher in ``experiments/`` calls.

Submodules are imported explicitly (``from rlhf_jax.algorithms import sft``) so that using one
method does not import every other one. ``train.load_sft_params(workdir)`` is how later stages start
from a supervised fine-tuning run.
"""
