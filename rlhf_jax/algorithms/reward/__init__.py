"""Reward modelling: pairwise Bradley-Terry, listwise, Likert ratings and multi-attribute heads.

``trainer`` is the method (``train_and_evaluate``); ``data``, ``objectives``, ``evaluation``,
``stats`` and ``sweep`` are its parts. Inference on a trained RM lives in :mod:`rlhf_jax.scoring`.
"""
