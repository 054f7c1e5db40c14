"""Reward-model inference shared by every method: loading a trained RM, scoring token sequences
and texts with one rule for a missing EOS, normalising with the RM's stored statistics.

    from rlhf_jax import scoring
    handle = scoring.load_reward_model("workdirs/rm_synthetic", policy_tokenizer=tok, mesh=mesh)
    rewards_B = scoring.score_texts(handle, tok, prompts, responses)

See :mod:`rlhf_jax.scoring.reward_model` for the math and the on-disk layout.
"""

from rlhf_jax.scoring.reward_model import (ARTIFACT_DIR, INFO_FILE, PARAMS_DIR, FORMAT_VERSION,
                                           RewardModelHandle, RewardModelInfo,
                                           TokenizerMismatchError, check_tokenizer, default_mesh,
                                           encode_pairs, load_reward_model, make_handle,
                                           normalize_rewards, param_shardings, place_params,
                                           read_reward_model_info, reward_fn, save_reward_model,
                                           score, score_sequences, score_texts)

__all__ = [
    "ARTIFACT_DIR", "INFO_FILE", "PARAMS_DIR", "FORMAT_VERSION", "RewardModelHandle",
    "RewardModelInfo", "TokenizerMismatchError", "check_tokenizer", "default_mesh", "encode_pairs",
    "load_reward_model", "make_handle", "normalize_rewards", "param_shardings", "place_params",
    "read_reward_model_info", "reward_fn", "save_reward_model", "score", "score_sequences",
    "score_texts",
]
