"""Reward-model inference shared by every method: loading a trained RM, scoring token sequences
and texts with one rule (a response is scored as given: EOS iff the policy emitted it), one
explicit reduction of K outputs to a reward (attribute weights), normalising with the RM's stored
statistics, and the one sample-and-score loop (K responses per prompt, scored).

    from rlhf_jax import scoring
    handle = scoring.load_reward_model("workdirs/rm_synthetic", policy_tokenizer=tok, mesh=mesh,
                                       attribute_weights="")      # "helpful:1,harmless:1" for K > 1
    rewards_B = scoring.score(handle, prompt_tokens, prompt_mask, response_tokens, response_mask)
    rewards_B = scoring.score_texts(handle, tok, prompts, responses, finished=None)
    cands = scoring.sample_candidates(model, params, tok, prompts, reward=handle, num_samples=8,
                                      max_prompt_len=32, max_new_tokens=48, temperature=1.0, rng=key)

See :mod:`rlhf_jax.scoring.reward_model` for the math, the rule and the on-disk layout, and
:mod:`rlhf_jax.scoring.candidates` for the loop.
"""

from rlhf_jax.scoring.candidates import CHUNK_PROMPTS, Candidates, sample_candidates
from rlhf_jax.scoring.reward_model import (
    ARTIFACT_DIR, INFO_FILE, PARAMS_DIR, FORMAT_VERSION, AttributeWeights, RewardModelHandle,
    RewardModelInfo, TokenizerMismatchError, check_tokenizer, default_mesh, encode_pairs,
    load_reward_model, make_handle, normalize_rewards, param_shardings, parse_attribute_weights,
    place_params, read_reward_model_info, resolve_attribute_weights, reward_fn, rewards_from_raw,
    sample_reward_fn, save_reward_model, score, score_sequences, score_texts)

__all__ = [
    "ARTIFACT_DIR",
    "INFO_FILE",
    "PARAMS_DIR",
    "FORMAT_VERSION",
    "AttributeWeights",
    "Candidates",
    "RewardModelHandle",
    "RewardModelInfo",
    "TokenizerMismatchError",
    "check_tokenizer",
    "default_mesh",
    "encode_pairs",
    "load_reward_model",
    "make_handle",
    "normalize_rewards",
    "param_shardings",
    "parse_attribute_weights",
    "place_params",
    "read_reward_model_info",
    "resolve_attribute_weights",
    "reward_fn",
    "rewards_from_raw",
    "sample_candidates",
    "CHUNK_PROMPTS",
    "sample_reward_fn",
    "save_reward_model",
    "score",
    "score_sequences",
    "score_texts",]
