r"""The synthetic task's FEEDBACK MODEL: SFT on the noisy teacher's instruction mixture.

  python -m rlhf_jax.data.synthetic --out workdirs/cai/synthetic        # writes feedback_sft*.jsonl
  python experiments/run.py --config=experiments/configs/feedback_model_synthetic.py:workdirs/cai/synthetic \
      --workdir=workdirs/cai/feedback_model

(``experiments/cai.py`` runs both as its first stages.) The records are
``<task_dir>/feedback_sft.jsonl`` (``rlhf_jax.feedback.teacher``: ordinary helpfulness SFT rows
mixed with pairwise judgements on six criteria, chain-of-thought judgements, 0..9 ratings,
critiques under a sampled constitution principle and revisions; ~13k records for the default
4000-prompt task, 143 bytes on average). The SFT code (prompt-masked NLL) learns the exact strings
RLAIF's evaluator (``feedback/templates/*.json`` through ``templates.render_pair``) and CAI's
critique / revision loop (``feedback/constitution.py``) query it with.

The recipe: the loss is each record's mean NLL averaged over records (``seq_mean_token_mean``):
a judgement's or rating's answer is one token, so under ``token_mean`` they were 2.7 % of the
loss and the model barely learned to judge. 300 steps of 16 at lr 3e-3; two length buckets (320,
448): with 16 random records per batch nearly every batch reaches one of them. The launchers
start it from their SFT policy (``config.feedback_init="sft"``, ``rlhf_jax.feedback.feedback_model``:
the SFT run exported as a Hugging Face folder, read through ``sources.pretrained``); run alone, as
above, it trains ``config.model`` (the ``small`` preset) from scratch unless
``--config.sources.pretrained=hf:DIR`` is given. Its skill against the exact gold (judgement
accuracy per criterion, critique correctness, revision gold gain) is measured by
``rlhf_jax.feedback.cai.evaluate_feedback_model`` (``experiments/cai.py`` writes it to
``feedback_eval.json``).
"""

import ml_collections

from rlhf_jax.algorithms import sft


def get_config(task_dir: str = "workdirs/cai/synthetic") -> ml_collections.ConfigDict:
  """SFT on ``<task_dir>/feedback_sft.jsonl`` (held out: ``feedback_sft_test.jsonl``)."""
  config = sft.default_config()
  config.data.source = "jsonl"
  config.data.train_jsonl = f"{task_dir}/feedback_sft.jsonl"
  config.data.eval_jsonl = f"{task_dir}/feedback_sft_test.jsonl"
  config.aggregation = "seq_mean_token_mean"  # every record counts the same (one-token judgements)
  config.data.batch_size = 16
  config.data.eval_batch_size = 64
  config.data.max_eval_examples = 256
  # judgement / rating prompts carry the template preamble (<= 290 bytes); CoT answers <= 120
  config.limits.max_prompt_len = 320
  config.limits.max_response_len = 128
  config.limits.buckets = (320, 448)
  config.loop.num_steps = 300
  config.loop.eval_every = 0
  config.loop.log_every = 25
  config.loop.checkpoint_every = 100
  config.eval.num_sample_prompts = 0  # measured by feedback.cai.evaluate_feedback_model instead
  return config
