r"""RLAIF vs RLHF on the synthetic task (Lee et al., 2023, arXiv:2309.00267), one command:

  python experiments/rlaif.py                                    # -> workdirs/rlaif/results.md
  python experiments/rlaif.py --config.sources.feedback_workdir=workdirs/cai/feedback_model
  python experiments/rlaif.py --config=experiments/configs/rlaif_synthetic.py:smoke \
      --workdir=/tmp/rlaif_smoke

Stages (each in ``<workdir>/<stage>``; a finished stage is reused on a rerun):

  sft         the SFT policy (the offline pipeline's SFT section), or ``sources.sft_workdir``
  feedback    the feedback model = the evaluator (``feedback_model_synthetic.py``: SFT on the noisy
              teacher's labelling data, ``feedback_teacher``: chain-of-thought judgements and
              ratings, started from the sft stage's policy with
              ``feedback_init="sft"``, from random weights with ``"scratch"``), or
              ``sources.feedback_workdir``
  label       ``label.num_pairs`` pairs of SFT samples on training prompts, labelled by the
              evaluator (soft, both orders; ``ai_pairs.jsonl``) and by the simulated humans
              (Bradley–Terry over the gold reward, T = ``label.human_temperature``, hard;
              ``human_pairs.jsonl``); the AI file holds the chain-of-thought labels
              (``label.ai_labels``); alignment with the gold preference with/without both-orders
              averaging (+ position-bias rate) and with/without CoT (``alignment.json``)
  rm_ai       distilled RLAIF's reward model: Bradley–Terry on the soft AI labels
  rm_human    the RLHF baseline's reward model on the same number of human labels
  ppo_ai      PPO against rm_ai;   ppo_human: the same PPO against rm_human
  ppo_direct  d-RLAIF: the same PPO with the evaluator's 0..9 rating as the reward (critic from SFT)
  dpo_ai_soft / dpo_ai_hard   offline DPO (the pipeline's DPO section) on the AI label file, with
              the soft label as the per-pair target (``loss.soft_labels``) / the hard label
  report      results.md / results.json / rlaif.png: gold reward, win rate vs SFT, head to head

``size="smoke"``: the tiny preset, a few steps per stage (the feedback model: 2 steps from the SFT).
"""

import ml_collections

from rlhf_jax.train import config_dicts

STAGES = ("sft", "feedback", "label", "rm_ai", "rm_human", "ppo_ai", "ppo_human", "ppo_direct",
          "dpo_ai_soft", "dpo_ai_hard", "report")


def _load(name: str, *args) -> ml_collections.ConfigDict:
  return config_dicts.sibling_config(__file__, name, *args)


def get_config(size: str = "default") -> ml_collections.ConfigDict:
  """The RLAIF experiment (module docstring); ``size``: default | smoke."""
  if size not in ("default", "smoke"):
    raise ValueError(f"rlaif_synthetic.py:{size}: allowed sizes: default | smoke")
  smoke = size == "smoke"
  config = ml_collections.ConfigDict()
  config.stages = ",".join(STAGES)
  config.seed = 0
  config.sources = ml_collections.ConfigDict({"sft_workdir": "", "feedback_workdir": ""})

  pipeline = _load("pipeline_synthetic", "smoke" if smoke else "default")
  config.sft = pipeline.sft
  # the task dir is filled in by experiments/rlaif.py (the SFT run's data/synthetic)
  config.feedback = _load("feedback_model_synthetic")
  config.feedback_init = "sft"  # sft | scratch (rlhf_jax.feedback.feedback_model)
  # the labeller's own data, written by the task's teacher (feedback_model.teacher_mixture): three
  # passes over the training prompts of chain-of-thought judgements on the overall criterion (the
  # query the label stage makes) and d-RLAIF's ratings. A small model does not learn to answer a
  # judgement directly; it learns to write both critiques, then the answer (BUILD_NOTES session 10).
  config.feedback_tasks = ""  # or: a subset of the shipped mixture (feedback_model.task_subset)
  config.feedback_teacher = ml_collections.ConfigDict({
      "passes": 3, "weights": "judge_cot:1.0,rating:0.3", "criteria": "overall", "seed": 1,
      "base": "none"})  # none: these records are the whole file (shipped: added to the task's)
  # Every token counts the same (token_mean): with every record weighted equally a two-token
  # rating record weighs as much as a 55-token CoT record (whose answer is one token); that run
  # (also 450 steps, not 600) gave CoT labels of 0.55 alignment, this recipe 0.74. Records run to
  # 331 bytes (prompt <= 195, answer <= 150) with the short preamble, 210 on average: three
  # buckets, 75 % real tokens in a random batch of 16; 540 steps for the 15-minute budget (CoT
  # alignment 0.743 at 600 steps, 0.726 at 540, 0.642 at 480: BUILD_NOTES session 11). No length
  # grouping (the base config's): homogeneous batches (all ratings, all CoT) lost the labeller,
  # 0.51 under token_mean (a batch of short records weighs its tokens ~25x more) and 0.66 with a
  # constant normaliser (seq_mean_token_sum_norm), against 0.74 for random batches (BUILD_NOTES
  # session 11).
  config_dicts.set_dotted(
      config.feedback, {
          "aggregation": "token_mean", "loop.num_steps": 540, "loop.checkpoint_every": 540,
          "limits.max_prompt_len": 200, "limits.max_response_len": 152, "limits.buckets":
              (256, 288, 352), "limits.group_by_length": 0})

  config.label = ml_collections.ConfigDict({
      "num_pairs": 1024,  # comparisons labelled by each annotator (the same pairs)
      "max_prompt_len": 32,
      "max_new_tokens": 48,
      "temperature": 1.0,  # SFT sampling of the pairs
      "human_temperature": 0.25,  # the simulated humans' Bradley–Terry T (the task's default)
      "pair_template": "synthetic_pair",
      "rating_template": "synthetic_rating",
      # the AI label file (RM, DPO) holds the chain-of-thought labels ("cot": every pair is labelled
      # with CoT, both orders) or the direct answers ("plain"; then CoT on the first cot_pairs)
      "ai_labels": "cot",
      "cot_pairs": 256,
      # the teacher's rationales run to 109 bytes (mean 52; 71 % over 40): room for all of them
      "cot_max_tokens": 112,
      "batch_size": 64})

  config.rm = _load("rm_jsonl", "bradley_terry")
  config_dicts.set_dotted(
      config.rm, {
          "rm.early_stopping_patience": 0, "optim.lr": 3e-4, "optim.warmup_steps": 10,
          "data.max_eval_examples": 512, "limits.max_prompt_len": 32, "limits.max_response_len": 48,
          "mesh.data": 1, "eval.num_normalization_prompts": 128, **config_dicts.stage_loop(120)})

  ppo = _load("ppo_synthetic")
  config_dicts.set_dotted(
      ppo, {"loop.num_steps": 40, "loop.eval_every": 40, "loop.checkpoint_every": 20})
  config.ppo = ppo
  direct = _load("ppo_synthetic")
  config_dicts.set_dotted(
      direct, {
          "loop.num_steps": 40, "loop.eval_every": 40, "loop.checkpoint_every": 20,
          "ppo.critic_init": "sft"})
  config.ppo_direct = direct
  # DPO on the AI labels (data files and soft_labels set by experiments/rlaif.py)
  config.dpo = pipeline.dpo
  if not smoke:  # 80 steps (2.6 epochs of the ~1000 AI pairs), one evaluation, at the end
    config_dicts.set_dotted(config.dpo, config_dicts.stage_loop(80))

  if smoke:
    # the feedback stage runs: 2 steps from the smoke SFT (queries cut to the tiny preset's 256)
    config_dicts.set_dotted(
        config.feedback, {
            "data.batch_size": 8, "data.eval_batch_size": 16, "data.max_eval_examples": 16,
            "limits.max_prompt_len": 192, "limits.max_response_len": 64, "limits.buckets":
                (256,), **config_dicts.stage_loop(2)})
    config.feedback_teacher.passes = 1
    config.label.num_pairs = 16
    config.label.cot_pairs = 4
    config.label.cot_max_tokens = 4
    config.label.max_new_tokens = 8
    config.label.batch_size = 16
    config_dicts.set_dotted(
        config.rm, {
            "data.batch_size": 8, "data.eval_batch_size": 16, "limits.buckets":
                (64,), "limits.max_response_len": 8, "data.max_eval_examples": 16,
            "eval.num_normalization_prompts": 4, "eval.sample_batch": 4,
            **config_dicts.stage_loop(2)})
    for section in (config.ppo, config.ppo_direct):
      config_dicts.set_dotted(
          section, {
              "data.batch_size": 4, "limits.max_response_len": 8, "eval.num_prompts": 4,
              "eval.max_new_tokens": 8, "eval.print_samples": 0, "ppo.num_minibatches": 1,
              "loop.num_steps": 2, "loop.eval_every": 2, "loop.checkpoint_every": 2})
  return config
