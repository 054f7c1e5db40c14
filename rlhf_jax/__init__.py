"""rlhf_jax: aligning language models with feedback, in JAX/Flax.

Subpackages: ``models`` (Flax decoder and heads), ``losses`` (every objective as a pure function),
``sampling`` (jitted KV-cache sampler), ``data`` (tokenizers, records, datasets, the synthetic task),
``parallel`` (meshes and sharding), ``train`` (state, optimiser, loop, checkpoints), ``algorithms``
(one module per method) and ``eval`` (metrics).
"""

__version__ = "0.1.0"
