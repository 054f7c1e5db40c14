"""Jitted autoregressive sampler with KV cache.

Public names: `SamplingConfig`, `sample`, `SampleOutput`, and the logit processors
`process_logits`, `apply_top_k`, `apply_top_p`.
"""

from rlhf_jax.sampling.config import SamplingConfig
from rlhf_jax.sampling.processors import apply_top_k, apply_top_p, process_logits
from rlhf_jax.sampling.sampler import SampleOutput, sample

__all__ = [
    "SamplingConfig", "SampleOutput", "sample", "process_logits", "apply_top_k", "apply_top_p"]
