"""Reward over-optimisation: PPO against a proxy RM fit on few comparisons, with a weak KL penalty."""

import ml_collections

from rlhf_jax.train import config_dicts


def get_config() -> ml_collections.ConfigDict:
  """Proxy reward up, gold reward peaks then falls (Gao et al., 2022, arXiv:2210.10760).

  Run (a proxy RM over-fit on 128 comparisons — no early stopping — then one PPO run per β):
    python experiments/run.py --config=experiments/configs/rm_synthetic.py \\
        --workdir=workdirs/rm_proxy \\
        --config.sources.sft_workdir=workdirs/sft_synthetic --config.data.num_train_examples=128 \\
        --config.loop.num_steps=120 --config.loop.eval_every=40 \\
        --config.rm.early_stopping_patience=0
    for beta in 0.0 0.05; do
      python experiments/run.py --config=experiments/configs/overoptimization_synthetic.py \\
          --config.ppo.kl_coef=$beta --config.sources.sft_workdir=workdirs/sft_synthetic \\
          --config.sources.reward_model_workdir=workdirs/rm_proxy --workdir=workdirs/overopt_beta$beta
    done
    python -m rlhf_jax.algorithms.online.plots --out=workdirs/overoptimization workdirs/overopt_beta*

  Evaluates every 5 iterations so the gold-vs-KL curve has points; the plot
  (``overoptimization.png``) and the gold peak per β (``overoptimization.json``) go to ``--out``.
  The synthetic task's gold reward peaks at two '!' while the SFT data ties more '!' to better
  answers, so a proxy fit on few comparisons can extrapolate such features. Measured (CPU, see
  README.md): gold peaks at 0.42 (KL 1.4) for β = 0 and 0.46 (KL 2.4) for β = 0.05,
  then falls to 0.27 / 0.35 by iteration 40 while the proxy keeps rising to ~1.9-2.0 (the proxy
  over-values brevity). ~12 min of wall time per β on a loaded 2-core machine.
  """
  config = config_dicts.sibling_config(__file__, "ppo_synthetic")
  config.ppo.kl_coef = 0.0
  config.ppo.missing_eos_penalty = 0.0
  config.loop.num_steps = 40
  config.loop.eval_every = 5
  config.eval.num_prompts = 96
  config.optim.lr = 5e-5
  return config
