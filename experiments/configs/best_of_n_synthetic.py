"""Best-of-n (n = 1..16) of the SFT model under the reward model, on the synthetic held-out prompts."""

import ml_collections

from rlhf_jax import parallel
from rlhf_jax.algorithms import sections
from rlhf_jax.algorithms.offline import best_of_n
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.train import config_dicts


def get_config() -> ml_collections.ConfigDict:
  """Best-of-n curve: measured gold reward vs the analytic KL log n - (n-1)/n.

  Run:
    python experiments/run.py --config=experiments/configs/best_of_n_synthetic.py \
        --workdir=workdirs/best_of_n_synthetic \
        --config.sources.sft_workdir=workdirs/sft_synthetic \
        --config.sources.reward_model_workdir=workdirs/rm_synthetic

  Draws 16 samples per held-out prompt (the SFT run's synthetic ``prompts_test.jsonl``; the
  evaluation's sampler settings) and picks the RM's favourite among the first n. ``rm_reward`` and
  ``sft_rm_reward`` are the same RM reward of the sampled tokens (one scoring rule). Writes
  best_of_n.csv (one row per n) and final_metrics.json (the n = 16 row + the curve).
  """
  config = ml_collections.ConfigDict()
  config.method = "best_of_n"
  config.seed = 0
  config.sources = config_dicts.dataclass_section(sections.Sources)
  config.data = config_dicts.dataclass_section(best_of_n.BestOfNDataConfig)
  config.limits = config_dicts.dataclass_section(sections.Limits, max_prompt_len=32,
                                                 max_response_len=48)
  config.bon = config_dicts.dataclass_section(best_of_n.BestOfNConfig, ns=(1, 2, 4, 8, 16))
  config.eval = config_dicts.dataclass_section(policy_eval.PolicyEvalConfig, num_prompts=128,
                                               max_new_tokens=48)
  config.mesh = config_dicts.dataclass_section(parallel.MeshConfig, data=1, fsdp=1, tensor=1)
  return config
