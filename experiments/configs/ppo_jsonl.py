"""PPO on your own prompts with your own SFT model and reward model."""

import ml_collections

from rlhf_jax.train import config_dicts


def get_config() -> ml_collections.ConfigDict:
  """PPO on ``{"prompt"}`` (or chat ``messages``) JSONL prompts.

  Run:
    python experiments/run.py --config=experiments/configs/ppo_jsonl.py \\
        --config.data.train_jsonl=prompts.jsonl --config.data.eval_prompts_jsonl=heldout.jsonl \\
        --config.sources.sft_workdir=workdirs/my_sft \\
        --config.sources.reward_model_workdir=workdirs/my_rm --workdir=workdirs/my_ppo

  The SFT run fixes the tokenizer and architecture; the reward model must use the same tokenizer
  (refused at start otherwise). There is no gold reward: ``eval`` reports the reward-model score,
  KL to the SFT model, length and EOS rate on the held-out prompts (if given). Time scales with the
  model: one iteration is 64 prompts × 128 new tokens here.
  """
  config = config_dicts.sibling_config(__file__, "ppo_synthetic")
  config.data.source = "jsonl"
  config.data.batch_size = 64
  config.limits.max_prompt_len = 256
  config.limits.max_response_len = 128
  config.ppo.num_ppo_epochs = 4
  config.ppo.num_minibatches = 4
  config.loop.num_steps = 200
  config.loop.eval_every = 25
  config.eval.max_new_tokens = 128
  return config
