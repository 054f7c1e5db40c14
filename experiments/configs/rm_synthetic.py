r"""Reward model on the embedded synthetic task, one objective per config string.

  python experiments/run.py --config=experiments/configs/rm_synthetic.py \
      --workdir=workdirs/rm_synthetic                                        # bradley_terry (pairs)
  python experiments/run.py --config=experiments/configs/rm_synthetic.py:all_pairs \
      --workdir=workdirs/rm_all_pairs          # also :plackett_luce, :likert, :multi_attribute
  # learning curve (accuracy vs annotated prompts, one line per objective) -> learning_curve.png
  python experiments/run.py --config=experiments/configs/rm_synthetic.py:learning_curve \
      --workdir=workdirs/rm_curve --config.curve.sizes="(250, 500, 1000, 2000)" \
      --config.curve.objectives=bradley_terry,all_pairs
"""

import ml_collections

from rlhf_jax import parallel, train
from rlhf_jax.algorithms import sections
from rlhf_jax.algorithms.reward import trainer as reward_model
from rlhf_jax.train import config_dicts

# Records per step: 32 pairs (64 sequences); ranked lists hold 4..9 responses (6.5 on average), so
# 8 lists (~52 sequences) keep a step's compute comparable.
_BATCH = {
    "bradley_terry": 32, "all_pairs": 8, "plackett_luce": 8, "likert": 32, "multi_attribute": 32}


def get_config(objective: str = "bradley_terry") -> ml_collections.ConfigDict:
  """Reward model from the synthetic SFT run (``small`` preset, byte tokenizer).

  Run (the SFT run in ``sources.sft_workdir``, default workdirs/sft_synthetic, is trained first
  with experiments/configs/sft_synthetic.py if it is missing):
    python experiments/run.py --config=experiments/configs/rm_synthetic.py:<objective> \
        --workdir=workdirs/rm_<objective>

  ``learning_curve``: the ``rm_learning_curve`` method over this Bradley-Terry config: one RM per
  objective in ``curve.objectives`` and number of annotated prompts in ``curve.sizes`` under
  <workdir>/curve/, then learning_curve.{md,json,png}.

  Objectives: bradley_terry (pairwise.jsonl, 16000 pairs), all_pairs / plackett_luce (ranked.jsonl,
  16000 lists of 4..9), likert (rated.jsonl, 1..7), multi_attribute (attributes.jsonl: harmless,
  helpful); the first 4000 records equal those of the 4000-prompt task the SFT run uses. 600 steps
  (AdamW, lr 5e-4 cosine) in bfloat16 compute (``rm.compute_dtype``; params, norms and the head stay
  float32; 1.85x faster than float32 here at the same accuracy), held-out evaluation every 100 steps
  on 2000 held-out pairs (500 gave +-1.8 points of sampling noise) with early stopping (patience 3),
  then normalisation over 512 SFT samples and the report (rm_report.md).

  Measured (pairwise, idle 2-core CPU, 2026-11-22, BUILD_NOTES.md "Reward models"): 4 min 02 s wall
  for the whole command (SFT run already there); on the 2000 held-out pairs accuracy 0.7925, expected
  accuracy 0.796 vs the Bayes-optimal 0.849, AUC 0.887; 0.789 expected on 4000 fresh pairs (Bayes
  0.847). The issue's "within 3 points of Bayes-optimal" is NOT met (~5.5 points short). Neither more
  data and steps (32000 pairs / 1200 steps: 0.792 fresh), noise-free labels (0.784), batch 64 at lr
  1e-3 (0.786), mean / summed per-token read-outs (0.775 / 0.782), DPO's implicit reward (0.790), an
  LM-loss regulariser (0.785), a longer-trained SFT backbone (0.783) nor a 5.9x larger one (0.781)
  moves it past ~0.79: the RM does not learn which listed words belong to the requested category.
  """
  if objective == "learning_curve":
    config = get_config("bradley_terry")
    config.method = "rm_learning_curve"
    config.curve = ml_collections.ConfigDict({
        "sizes": (250, 500, 1000, 2000), "objectives": ("bradley_terry", "all_pairs")})
    return config
  if objective not in reward_model.OBJECTIVES:
    raise ValueError(f"rm_synthetic.py:{objective}: allowed: {' | '.join(reward_model.OBJECTIVES)} "
                     "| learning_curve")
  config = ml_collections.ConfigDict()
  config.method = "reward_model"
  config.seed = 0
  config.model = config_dicts.model_section("small")  # used only with rm.init=scratch
  config.sources = config_dicts.dataclass_section(sections.Sources,
                                                  sft_workdir="workdirs/sft_synthetic")
  config.rm = config_dicts.dataclass_section(reward_model.RMConfig, objective=objective, init="sft",
                                             dropout_rate=0.0, compute_dtype="bfloat16",
                                             early_stopping_patience=3)
  config.optim = config_dicts.dataclass_section(train.OptimConfig, lr=5e-4, warmup_steps=20,
                                                schedule="cosine", end_lr_ratio=0.1,
                                                weight_decay=0.01, clip_norm=1.0)
  config.loop = config_dicts.dataclass_section(train.LoopConfig, num_steps=600, log_every=20,
                                               eval_every=100, checkpoint_every=100,
                                               keep_checkpoints=1, progress_every_secs=15.0)
  config.data = config_dicts.dataclass_section(reward_model.RMDataConfig, source="synthetic",
                                               synthetic_num_prompts=16000,
                                               synthetic_num_test_prompts=2000,
                                               batch_size=_BATCH[objective], eval_batch_size=128,
                                               max_eval_examples=2000)
  config.limits = config_dicts.dataclass_section(sections.Limits, max_prompt_len=32,
                                                 max_response_len=48, buckets=(64, 80))
  config.eval = config_dicts.dataclass_section(reward_model.RMEvalConfig,
                                               num_normalization_prompts=256, samples_per_prompt=2,
                                               num_gold_prompts=256)
  config.mesh = config_dicts.dataclass_section(parallel.MeshConfig, data=1, fsdp=1, tensor=1)
  # Off; --config.lora.enabled=True trains adapters on the frozen SFT backbone plus the head.
  config.lora = config_dicts.dataclass_section(sections.Lora)
  return config
