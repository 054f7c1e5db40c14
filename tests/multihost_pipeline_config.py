"""Test-only pipeline config: the smoke offline pipeline plus RAFT, best-of-n, PPO and GRPO stages.

``tests/test_multihost.py`` runs it once as 2 processes x 2 devices and once as 1 process x 4
devices (``experiments/pipeline.py --config=tests/multihost_pipeline_config.py``), so process
start-up, the SFT / RM stages and the shared compilations (the evaluator's sampler, the RM) are
paid once for every method it compares. Every stage runs on all devices (``mesh.data = -1``).

The RM's synthetic task is 128 + 32 prompts; RAFT trains 2 steps without warmup (the smoke
round's single step is inside the warmup, lr 0). The online stages are tiny: PPO (critic from the
RM) with 4 prompts x 1 sample and GRPO with 4 prompts x 2 samples per iteration, 2 iterations
each, 8-token responses; each prepares its own synthetic prompt task in its workdir
(``data.synthetic_dir`` empty), written by process 0.
"""

import os

import ml_collections

from rlhf_jax.train import config_dicts

PIPELINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                        "configs", "pipeline_synthetic.py")
OFFLINE_STAGES = ("sft", "rm", "dpo", "kto", "pro", "raft", "best_of_n")
ONLINE_STAGES = ("ppo", "grpo")
STAGES = OFFLINE_STAGES + ONLINE_STAGES

ONLINE_TINY = {
    "limits.max_response_len": 8, "ppo.num_ppo_epochs": 1, "data.synthetic_num_prompts": 16,
    "data.synthetic_num_test_prompts": 4, "loop.num_steps": 2, "loop.log_every": 1,
    "loop.eval_every": 0, "loop.checkpoint_every": 1, "eval.num_prompts": 4,
    "eval.max_new_tokens": 8, "eval.print_samples": 0, "optim.lr": 1e-3}


def get_config() -> ml_collections.ConfigDict:
  config = config_dicts.sibling_config(PIPELINE, "pipeline_synthetic", "smoke")
  # The RM's own task: 128 + 32 prompts instead of the pipeline's 4000 + 500 (its held-out cap is
  # 16 pairs at smoke size anyway); generating and tokenising 4500 prompts per process is wasted.
  config_dicts.set_dotted(
      config.rm, {"data.synthetic_num_prompts": 128, "data.synthetic_num_test_prompts": 32})
  # RAFT's smoke round trains one step inside its 5-step warmup (lr 0): no warmup and two steps,
  # so the comparison covers the fine-tuning on the selected samples, not only their selection.
  config_dicts.set_dotted(
      config.raft, {"optim.warmup_steps": 0, "loop.num_steps": 2, "loop.checkpoint_every": 2})
  config.ppo = config_dicts.sibling_config(PIPELINE, "ppo_synthetic")
  config_dicts.set_dotted(
      config.ppo,
      {**ONLINE_TINY, "data.batch_size": 4, "ppo.num_samples": 1, "ppo.num_minibatches": 1})
  config.grpo = config_dicts.sibling_config(PIPELINE, "grpo_synthetic")
  config_dicts.set_dotted(
      config.grpo,
      {**ONLINE_TINY, "data.batch_size": 4, "ppo.num_samples": 2, "ppo.num_minibatches": 2})
  for name in STAGES:
    config[name].mesh.data = -1  # every device (what several processes do with 1x1x1 anyway)
  config.stages = ",".join(STAGES)
  return config
