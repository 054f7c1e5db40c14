r"""Constitutional AI on the synthetic task (Bai et al., 2022, arXiv:2212.08073), one command:

  python experiments/cai.py                                       # -> workdirs/cai/results.md
  python experiments/cai.py --config.sources.sft_workdir=workdirs/sft_synthetic \
      --config.sources.feedback_workdir=workdirs/cai/feedback_model
  python experiments/cai.py --config=experiments/configs/cai_synthetic.py:smoke --workdir=/tmp/cai

Stages (each in ``<workdir>/<stage>``; a finished stage is reused on a rerun):

  sft           the helpful SFT policy (the pipeline's SFT section), or ``sources.sft_workdir``
  feedback      the feedback model (``feedback_model_synthetic.py``: SFT on the noisy teacher's
                judgements / critiques / revisions plus ``feedback_teacher``'s chain-of-thought
                harmlessness judgements, started from the sft stage's policy with
                ``feedback_init="sft"``), or ``sources.feedback_workdir``
  feedback_eval the feedback model vs the exact gold on the teacher's held-out records
  human_labels  ``labels.num_pairs`` pairs of the task's pairwise.jsonl labelled by simulated
                humans twice: on helpfulness only (``helpful_pairs.jsonl``) and on the gold
                reward, helpful + harmless (``hh_pairs.jsonl``)
  rm_helpful / rm_hh, ppo_helpful / ppo_hh   the two RLHF baselines (reward model from SFT, PPO)
  sl_cai_data   ``sl_cai.num_red_team`` harmful training prompts: the SFT policy answers, the
                feedback model critiques and revises ``n_revisions`` times under sampled
                principles; SFT rows = final revisions + the helpfulness rows of the safe prompts
  sl_cai        SFT on that mixture (the pipeline's SFT section; from a fresh model, as the paper
                fine-tunes its pretrained LM, not the helpful model)
  rl_cai_labels pairs of SL-CAI samples: harmful prompts labelled by the feedback model on
                harmlessness (``cai_harmless.json``; soft, both orders, chain of thought with the
                probabilities clamped to ``rl_cai.clamp``, as the paper's CoT labels),
                safe prompts by simulated humans on helpfulness; label ablations (soft / hard,
                CoT clamped / unclamped) measured against the gold harmlessness preference
  rm_cai        the preference model on those labels (from SL-CAI);  ppo_cai: RL-CAI
  report        results.md / results.json / cai.png (harmlessness vs helpfulness, Fig. 2's shape)

``size="smoke"``: the tiny preset, a few steps per stage (tests/test_cai.py).
"""

import ml_collections

from rlhf_jax.train import config_dicts

STAGES = ("sft", "feedback", "feedback_eval", "human_labels", "rm_helpful", "rm_hh", "ppo_helpful",
          "ppo_hh", "sl_cai_data", "sl_cai", "rl_cai_labels", "rm_cai", "ppo_cai", "report")


def _load(name: str, *args) -> ml_collections.ConfigDict:
  return config_dicts.sibling_config(__file__, name, *args)


def get_config(size: str = "default") -> ml_collections.ConfigDict:
  """The CAI experiment (module docstring); ``size``: default | smoke."""
  if size not in ("default", "smoke"):
    raise ValueError(f"cai_synthetic.py:{size}: allowed sizes: default | smoke")
  smoke = size == "smoke"
  config = ml_collections.ConfigDict()
  config.stages = ",".join(STAGES)
  config.seed = 0
  config.sources = ml_collections.ConfigDict({"sft_workdir": "", "feedback_workdir": ""})
  config.constitution = "synthetic"  # a shipped name or a constitution JSON file

  # the helpful policy: the offline pipeline's SFT (the `small` preset narrowed to d 128 x 3 layers,
  # as RLAIF's; the smoke pipeline's tiny SFT for size=smoke). The full `small` preset (d 192 x 4)
  # took 20.6 min end to end on the EPYC box, ~27 estimated on the Xeon (BUILD_NOTES session 10).
  sft = _load("pipeline_synthetic", size).sft
  config.sft = sft
  config.feedback = _load(
      "feedback_model_synthetic")  # the task files are set by experiments/cai.py
  # the feedback model starts from the sft stage's policy (sft) or from random weights (scratch)
  config.feedback_init = "sft"
  # the shipped mixture's records of the tasks CAI queries (the assistant rows, critiques,
  # revisions, chain-of-thought judgements; not the one-token judgements and ratings a small
  # model does not learn), plus the teacher's chain-of-thought harmlessness judgements (both
  # orders): RL-CAI's query with its rationale. The feedback model learns to judge only this way
  # (feedback_model_synthetic.py; RLAIF's labeller, BUILD_NOTES session 10).
  config.feedback_tasks = "assistant,judge_cot,critique,revision"
  config.feedback_teacher = ml_collections.ConfigDict({
      "passes": 2, "weights": "judge_cot:1.0", "criteria": "harmless", "seed": 1,
      "base": "shipped"})

  config.feedback_eval = ml_collections.ConfigDict({"max_per_task": 128, "batch_size": 64})
  config.labels = ml_collections.ConfigDict({
      "num_pairs": 2000,  # simulated-human comparisons per RLHF baseline (and for the PM's safe part)
      "human_temperature": 0.25})  # the task's Bradley–Terry T
  config.sl_cai = ml_collections.ConfigDict({
      "num_red_team": 600, "n_revisions": 2, "max_critique_tokens": 64, "max_revision_tokens": 48,
      "temperature": 1.0, "greedy": False, "max_prompt_len": 32, "policy_temperature": 1.0})
  # SL-CAI's fine-tune: the same SFT recipe on the revisions + helpfulness mixture (JSONL files
  # written by the sl_cai_data stage)
  config.sl_cai_train = sft.copy_and_resolve_references()
  config.rl_cai = ml_collections.ConfigDict({
      "num_harmful_pairs": 600,
      "num_safe_pairs": 1400,
      "max_prompt_len": 32,
      "max_new_tokens": 48,
      "temperature": 1.0,
      "template": "cai_harmless",
      "both_orders": True,
      "cot": True,  # the PM's harmlessness labels: rationale first, then the answer (clamped)
      "cot_max_tokens": 96,
      "clamp": (0.4, 0.6),
      "soft": True,
      "ablation_pairs": 128,  # harmful pairs also labelled with CoT (clamped / raw) and hard labels
      "batch_size": 64})

  rm = _load("rm_jsonl", "bradley_terry")
  config_dicts.set_dotted(
      rm, {
          "rm.early_stopping_patience": 0, "optim.lr": 3e-4, "optim.warmup_steps": 10,
          "data.max_eval_examples": 512, "limits.max_prompt_len": 32, "limits.max_response_len": 48,
          "mesh.data": 1, "eval.num_normalization_prompts": 128, **config_dicts.stage_loop(200)})
  config.rm = rm
  ppo = _load("ppo_synthetic")
  # one evaluation, at the end: the report evaluates every policy itself on 500 held-out prompts
  config_dicts.set_dotted(
      ppo, {"loop.num_steps": 40, "loop.eval_every": 40, "loop.checkpoint_every": 20})
  config.ppo = ppo
  # held-out prompts (half harmful where the split has them), two samples each
  config.report = ml_collections.ConfigDict({"max_prompts": 500, "temperature": 1.0})

  if smoke:
    config.sources.feedback_workdir = "preset:tiny"
    config.feedback_eval.max_per_task = 4
    config.labels.num_pairs = 16
    config_dicts.set_dotted(
        config.sl_cai,
        {"num_red_team": 4, "n_revisions": 1, "max_critique_tokens": 6, "max_revision_tokens": 6})
    config_dicts.set_dotted(
        config.rl_cai, {
            "num_harmful_pairs": 8, "num_safe_pairs": 8, "max_new_tokens": 8, "cot_max_tokens": 4,
            "ablation_pairs": 4, "batch_size": 16})
    config_dicts.set_dotted(
        config.rm, {
            "data.batch_size": 8, "data.eval_batch_size": 16, "limits.buckets":
                (64,), "limits.max_response_len": 8, "data.max_eval_examples": 16,
            "eval.num_normalization_prompts": 4, "eval.sample_batch": 4,
            **config_dicts.stage_loop(2)})
    config_dicts.set_dotted(
        config.ppo, {
            "data.batch_size": 4, "limits.max_response_len": 8, "eval.num_prompts": 4,
            "eval.max_new_tokens": 8, "eval.print_samples": 0, "ppo.num_minibatches": 1,
            "loop.num_steps": 2, "loop.eval_every": 2, "loop.checkpoint_every": 2})
    config.report.max_prompts = 8
  return config
