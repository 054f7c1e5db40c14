"""Reward modelling (step 2 of RLHF). Training lands next; the scoring API is re-exported here.

See :mod:`rlhf_jax.algorithms.reward_scoring` for ``load_reward_model``, ``score``, ``score_texts``.
"""

from rlhf_jax.algorithms.reward_scoring import (RewardModelHandle, RewardModelInfo,
                                                TokenizerMismatchError, check_tokenizer,
                                                encode_pairs, load_reward_model, make_handle,
                                                normalize_rewards, read_reward_model_info,
                                                reward_fn, save_reward_model, score,
                                                score_sequences, score_texts)
