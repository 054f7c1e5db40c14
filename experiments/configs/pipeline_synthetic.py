"""The offline pipeline on the synthetic task: SFT -> RM -> DPO, IPO, KTO, PRO, RRHF, RAFT, BoN.

Each stage's section is that method's own experiment config (``sft_synthetic.py``,
``rm_synthetic.py``, ``dpo_synthetic.py``, ...) with shorter schedules, so any key can be overridden
from the command line, e.g. ``--config.dpo.loss.beta=0.2`` or ``--config.stages=sft,rm,dpo``.
Each section names its method (``config.<stage>.method``); the runner (``experiments/pipeline.py``)
runs it through the method registry and fills in the links between stages, the same two keys for
every stage: ``sources.sft_workdir`` and ``sources.reward_model_workdir``.

``num_seeds`` (default 3; smoke 1) runs the whole pipeline that many times, seed k with every RNG
seed of every stage offset by k (seed 0 = the sections as written, in ``<workdir>/<stage>``; seed
k > 0 in ``<workdir>/seed_<k>/<stage>``), and the table reports mean ± standard error over them.
"""

import ml_collections

from rlhf_jax.train import config_dicts

STAGES = ("sft", "rm", "dpo", "ipo", "kto", "pro", "rrhf", "raft", "best_of_n")
# The pipeline's policy: the `small` preset narrowed to 0.62M parameters so that every stage fits
# the 15-minute budget on 2 CPU cores.
MODEL = {
    "preset": "small", "d_model": 128, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "d_ff": 384}
# Held-out evaluation shared by every method (same prompts, same seed -> the same SFT baseline).
EVAL = {"num_prompts": 128, "max_new_tokens": 48, "print_samples": 1}


def _load(name: str, *args) -> ml_collections.ConfigDict:
  return config_dicts.sibling_config(__file__, name, *args)


def get_config(size: str = "default") -> ml_collections.ConfigDict:
  """Every stage of the offline pipeline; ``size="smoke"`` is a seconds-long run of the same code.

  Run:
    python experiments/pipeline.py                         # workdirs/pipeline, 3 seeds
    python experiments/pipeline.py --config.num_seeds=1    # one seed, < 15 min on 2 cores
    python experiments/pipeline.py --config=experiments/configs/pipeline_synthetic.py:smoke \
        --workdir=/tmp/pipeline_smoke

  Writes <workdir>/results.md, results.csv and frontier.png; a rerun reuses finished stages (per
  seed: a finished one-seed pipeline is seed 0 of a three-seed one). One seed takes ~8 min on the
  2-core Xeon, the stages run one seed after the other (~25 min for 3 seeds).
  Measured table, machine and date: README.md.
  """
  if size not in ("default", "smoke"):
    raise ValueError(f"pipeline_synthetic.py:{size}: allowed sizes: default | smoke")
  smoke = size == "smoke"
  config = ml_collections.ConfigDict()
  config.stages = ",".join(STAGES)
  # Seeds of the whole pipeline (mean ± s.e. in the table); the smoke run keeps one (test cost).
  config.num_seeds = 1 if smoke else 3

  config.sft = _load("sft_synthetic")
  config_dicts.set_dotted(config.sft, {f"model.{k}": v for k, v in MODEL.items()})
  config_dicts.set_dotted(
      config.sft, {
          "data.batch_size": 32, "optim.lr": 3e-3, "optim.warmup_steps": 20,
          "eval.num_sample_prompts": 128, "eval.print_samples": 1, **config_dicts.stage_loop(400)})

  config.rm = _load("rm_synthetic", "bradley_terry")
  # The pipeline's RM keeps the 4000-pair task and the 512-pair held-out cap it was measured with
  # (README table); rm_synthetic.py's standalone default now uses 16000 pairs / 2000 held-out and
  # bfloat16 compute; the pipeline's RM stays float32 like the rest of its stages.
  config_dicts.set_dotted(
      config.rm, {
          "rm.early_stopping_patience": 0, "rm.compute_dtype": "", "optim.lr": 3e-4,
          "optim.warmup_steps": 10, "data.synthetic_num_prompts": 4000,
          "data.synthetic_num_test_prompts": 500, "data.max_eval_examples": 512,
          "eval.num_normalization_prompts": 128, "eval.num_gold_prompts": 128,
          **config_dicts.stage_loop(200)})

  method_common = {**{f"eval.{k}": v for k, v in EVAL.items()}}
  config.dpo = _load("dpo_synthetic")
  config_dicts.set_dotted(config.dpo, {
      **method_common, "loss.beta": 0.1, "optim.lr": 3e-4, **config_dicts.stage_loop(120, evals=2)})
  config.ipo = _load("ipo_synthetic")
  # IPO's beta is tau: the loss pulls the length-normalised log-ratio margin to 1/(2 tau) nats per
  # token. tau = 0.1 (5 nats/token) drove KL(pi || SFT) to ~38 and lost most of the gold gain in a
  # first run; tau = 0.5 asks for 1 nat/token.
  config_dicts.set_dotted(config.ipo, {
      **method_common, "loss.beta": 0.5, "optim.lr": 3e-4, **config_dicts.stage_loop(120, evals=2)})
  config.kto = _load("kto_synthetic")
  # KTO on the unpaired split of the comparisons DPO trains on (unpaired.jsonl), TRL's defaults.
  config_dicts.set_dotted(config.kto, {
      **method_common, "loss.beta": 0.1, "optim.lr": 3e-4, **config_dicts.stage_loop(120, evals=2)})
  config.pro = _load("pro_synthetic", "pro")
  config_dicts.set_dotted(
      config.pro, {**method_common, "optim.lr": 3e-4, **config_dicts.stage_loop(120, evals=2)})
  config.rrhf = _load("rrhf_synthetic")
  config_dicts.set_dotted(
      config.rrhf, {**method_common, "optim.lr": 3e-4, **config_dicts.stage_loop(120, evals=2)})
  config.raft = _load("raft_synthetic")
  config_dicts.set_dotted(
      config.raft, {
          **method_common, "raft.num_rounds": 3, "raft.prompts_per_round": 256,
          "raft.samples_per_prompt": 8, "optim.lr": 3e-4, **config_dicts.stage_loop(60)})
  config.best_of_n = _load("best_of_n_synthetic")
  config_dicts.set_dotted(config.best_of_n, {**method_common, "bon.ns": (1, 2, 4, 8, 16)})

  if smoke:  # tiny model, a couple of steps per stage, a handful of prompts
    config_dicts.set_dotted(
        config.sft, {
            "model.preset": "tiny", "model.d_model": None, "model.n_layers": None,
            "model.n_heads": None, "model.n_kv_heads": None, "model.d_ff": None,
            "data.synthetic_num_prompts": 96, "data.synthetic_num_test_prompts": 16,
            "data.batch_size": 8, "data.eval_batch_size": 16, "limits.buckets":
                (80,), "eval.num_sample_prompts": 4, **config_dicts.stage_loop(2)})
    config_dicts.set_dotted(
        config.rm, {
            "data.batch_size": 8, "data.eval_batch_size": 16, "limits.buckets":
                (80,), "data.max_eval_examples": 16, "eval.num_normalization_prompts": 4,
            "eval.num_gold_prompts": 4, "eval.sample_batch": 4, **config_dicts.stage_loop(2)})
    small_eval = {"eval.num_prompts": 4, "eval.max_new_tokens": 8, "eval.print_samples": 0}
    for name in ("dpo", "ipo"):
      config_dicts.set_dotted(
          config[name], {
              **small_eval, "data.batch_size": 8, "limits.buckets":
                  (80,), "data.num_eval_pairs": 8, **config_dicts.stage_loop(2)})
    config_dicts.set_dotted(
        config.kto, {
            **small_eval, "data.batch_size": 8, "limits.buckets":
                (80,), "data.num_eval_examples": 8, **config_dicts.stage_loop(2)})
    for name in ("pro", "rrhf"):
      config_dicts.set_dotted(
          config[name], {
              **small_eval, "data.batch_size": 4, "limits.buckets":
                  (80,), "data.num_eval_lists": 4, **config_dicts.stage_loop(2)})
    config_dicts.set_dotted(
        config.raft, {
            **small_eval, "raft.num_rounds": 1, "raft.prompts_per_round": 4,
            "raft.samples_per_prompt": 2, "data.batch_size": 4, "raft.require_eos": False,
            **config_dicts.stage_loop(1)})
    config_dicts.set_dotted(config.best_of_n, {**small_eval, "bon.ns": (1, 2)})
  return config
