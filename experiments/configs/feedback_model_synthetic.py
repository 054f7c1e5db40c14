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

The recipe: each record's mean NLL averaged over records (``seq_mean_token_mean``), 600 steps of 16
at lr 3e-3. Batches come from length-sorted windows of 32 batches (``limits.group_by_length``) over
buckets in steps of 32: the records run 32-310 bytes (137 on average), so a random batch of 16
padded to 320 was 43 % real tokens, a grouped one is 87 % (600 grouped steps cost what 300 random
ones did). Grouping leaves a per-record loss unbiased (its normaliser is the batch size); under
``token_mean`` a batch of short records would weigh each of its tokens more. It is not free: on
RLAIF's labeller mixture, whose records are mostly long CoT judgements and short ratings,
homogeneous batches cost alignment (0.51 under ``token_mean``, 0.66 with a constant normaliser, 0.74
with random batches; BUILD_NOTES session 11), so RLAIF turns it off; CAI's mixture, 43 % real tokens
in a random batch, keeps it (random batches would double its feedback stage). A small model never
learned to answer a one-token judgement directly (it stayed at chance: BUILD_NOTES sessions 9-10);
it learns chain-of-thought judgements, whose answer follows from the critiques it writes first, and
the launchers add those (``config.feedback_teacher``). The launchers start it from their SFT policy
(``config.feedback_init="sft"``, ``rlhf_jax.feedback.feedback_model``: the SFT run exported as a
Hugging Face folder, read through ``sources.pretrained``); run alone, as above, it trains
``config.model`` (the ``small`` preset) from scratch unless ``--config.sources.pretrained=hf:DIR``
is given. Its skill against the exact gold (judgement accuracy per criterion, critique correctness,
revision gold gain) is measured by ``rlhf_jax.feedback.cai.evaluate_feedback_model``
(``experiments/cai.py`` writes it to ``feedback_eval.json``).
"""

import ml_collections

from rlhf_jax.algorithms import sft


def get_config(task_dir: str = "workdirs/cai/synthetic") -> ml_collections.ConfigDict:
  """SFT on ``<task_dir>/feedback_sft.jsonl`` (held out: ``feedback_sft_test.jsonl``)."""
  config = sft.default_config()
  config.data.source = "jsonl"
  config.data.train_jsonl = f"{task_dir}/feedback_sft.jsonl"
  config.data.eval_jsonl = f"{task_dir}/feedback_sft_test.jsonl"
  config.aggregation = "seq_mean_token_mean"  # per record: unbiased under group_by_length
  config.data.batch_size = 16
  config.data.eval_batch_size = 64
  config.data.max_eval_examples = 256
  # judgement / rating prompts carry the template preamble (<= 290 bytes); CoT answers <= 120
  config.limits.max_prompt_len = 320
  config.limits.max_response_len = 128
  config.limits.buckets = tuple(range(32, 449, 32))
  config.limits.group_by_length = 32
  config.loop.num_steps = 600
  config.loop.eval_every = 0
  config.loop.log_every = 25
  config.loop.checkpoint_every = 200
  config.eval.num_sample_prompts = 0  # measured by feedback.cai.evaluate_feedback_model instead
  return config
