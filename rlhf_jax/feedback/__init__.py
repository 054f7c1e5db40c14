"""Feedback: who labels comparisons (simulated humans, reward models, later AI evaluators).

``label_fn(prompts, responses_a, responses_b) -> P(a ≻ b)`` is the one annotator interface
(:mod:`.annotators`); iterated RLHF draws its labels from whichever ``config.annotator`` picks.
"""

from rlhf_jax.feedback.annotators import (KINDS, AnnotatorConfig, LabelFn, make_label_fn,
                                          reward_model_annotator, sample_labels,
                                          synthetic_annotator)

__all__ = [
    "KINDS", "AnnotatorConfig", "LabelFn", "make_label_fn", "reward_model_annotator",
    "sample_labels", "synthetic_annotator"]
