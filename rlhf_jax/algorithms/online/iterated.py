"""Iterated RLHF (Bai et al., 2022, arXiv:2204.05862, §4.5 "iterated online RLHF"; InstructGPT's
repeated steps 2–3) on the synthetic task.

Round r = 0, 1, ... with policy π_r (π_0 = SFT):

1. comparisons — ``pairs_per_round`` prompts, two samples each from π_r, labelled by the annotator
   of ``config.annotator`` (``rlhf_jax.feedback``: ``label_fn(prompts, a, b) -> P(a ≻ b)``, the
   label drawn from it; default the simulated Bradley–Terry human at temperature 0.25); appended
   to ``all_pairs.jsonl``. ``eval_pairs`` more prompts give held-out pairs of π_r.
2. reward model RM_r — retrained from the SFT backbone on *all* comparisons so far (the
   ``config.rm`` experiment with ``data.source="jsonl"``, run as ``config.rm.method`` through
   ``algorithms.registry``).
3. policy π_{r+1} — PPO (``config.ppo``, through the registry) from π_r (the previous round's PPO
   run is its ``sources.sft_workdir``) against RM_r; the KL reference stays the SFT model
   (``sources.reference_workdir``).
4. report — gold reward of π_{r+1} and its KL to SFT (``eval.policy`` on held-out prompts), and
   RM_r's accuracy on comparisons between π_{r+1}'s own samples (gold order, ties dropped): the
   distribution shift each round's new data is meant to repair.

With ``config.lora.enabled`` both trained stages use it (it replaces ``config.rm.lora`` and
``config.ppo.lora``): RM_r trains adapters and its head over the frozen SFT backbone, π_{r+1}
trains adapters over π_r — the previous round's adapters merged into its base
(``train.load_sft_params``), frozen — with the SFT model as the KL reference.

Each stage writes its outputs under ``<workdir>/round_<r>/`` and is skipped when they exist, so a
rerun resumes; ``round_<r>/round.json`` holds the round's row. ``rounds.json`` / ``rounds.md`` /
``iterated_rlhf.png`` hold the table and plot.

Several processes (``launch/multiprocess_local.sh``, SLURM, a TPU pod) run it as one job: the RM
and PPO stages run on the global mesh as they do alone; the comparisons, the task and every
shared file come from process 0 (its first device draws and labels them), the other processes
read them after a barrier, so every process trains on the same pairs and prompts.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import jax
import ml_collections
import numpy as np

from rlhf_jax import feedback, fileio, models, parallel, sampling, scoring, train
from rlhf_jax.algorithms import registry, sections
from rlhf_jax.algorithms.online.config import PPODataConfig
from rlhf_jax.data import batching, records, synthetic, synthetic_files
from rlhf_jax.train import config_dicts

logger = logging.getLogger(__name__)

ROUND_FILE = "round.json"  # round r's row, written once it is measured (a rerun reuses it)
KNOWN_KEYS = ("method", "seed", "sources", "rounds", "pairs_per_round", "eval_pairs", "annotator",
              "rm", "ppo", "lora")


def sample_comparisons(policy, params, tokenizer, prompts: list[str], rng: np.random.Generator,
                       key: jax.Array, *, max_prompt_len: int, max_new_tokens: int,
                       label_fn: feedback.LabelFn) -> list[dict]:
  """Two samples per prompt from ``params``, labelled by ``label_fn``: the label is drawn from its
  ``P(a ≻ b)`` (``feedback.sample_labels``). Rows carry that probability and the gold rewards for
  inspection (the record reader ignores them); identical pairs and pairs with an empty answer
  are dropped before labelling."""
  batch = batching.encode_prompts(tokenizer, prompts, max_prompt_len=max_prompt_len,
                                  buckets=(max_prompt_len,))
  cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, num_samples=2,
                                eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  out = sampling.sample(policy, params, batch["prompt_tokens"], batch["prompt_mask"], key, cfg)
  tokens, mask = jax.device_get((out.response_tokens_BxR, out.response_mask_BxR))
  texts = [tokenizer.decode(t[m > 0]) for t, m in zip(tokens, mask)]
  # An empty answer (EOS first) is no record a reward model can read; such pairs are dropped like
  # identical ones (a weak SFT policy does answer some prompts with EOS straight away).
  pairs = [(prompt, texts[2 * i], texts[2 * i + 1])
           for i, prompt in enumerate(prompts)
           if texts[2 * i] != texts[2 * i + 1] and texts[2 * i] and texts[2 * i + 1]]
  if not pairs:
    return []
  ps, as_, bs = (list(x) for x in zip(*pairs))
  p_a_N = np.asarray(label_fn(ps, as_, bs), np.float64)
  prefer_a_N = feedback.sample_labels(rng, p_a_N)
  rows = []
  for prompt, a, b, p_a, prefer_a in zip(ps, as_, bs, p_a_N, prefer_a_N):
    chosen, rejected = (a, b) if prefer_a else (b, a)
    rows.append({
        "prompt": prompt, "chosen": chosen, "rejected": rejected,
        "p_chosen": round(float(p_a if prefer_a else 1.0 - p_a),
                          4), "gold_chosen": round(synthetic.gold_reward(prompt, chosen), 4),
        "gold_rejected": round(synthetic.gold_reward(prompt, rejected), 4)})
  return rows


def rm_gold_accuracy(handle, tokenizer, rows: list[dict]) -> float:
  """Share of pairs (gold ties dropped) where the reward model orders the two like the gold reward."""
  rows = [r for r in rows if r["gold_chosen"] != r["gold_rejected"]]
  if not rows:
    return float("nan")
  prompts = [r["prompt"] for r in rows]
  rc = scoring.score_texts(handle, tokenizer, prompts, [r["chosen"] for r in rows])
  rr = scoring.score_texts(handle, tokenizer, prompts, [r["rejected"] for r in rows])
  gold_first = np.array([r["gold_chosen"] > r["gold_rejected"] for r in rows])
  return float(np.mean((rc > rr) == gold_first))


def _write(path: str, rows: list[dict]) -> None:
  records.write_jsonl(path, rows)  # atomic (a temp file + rename; one object upload for a URL)


def _read(path: str) -> list[dict]:
  return fileio.read_jsonl(path)


def _round_stage(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs one stage's experiment config through the registry (``cfg.method``)."""
  return registry.run(cfg.method, cfg, workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or resumes) ``config.rounds`` rounds; returns one row per round (also ``rounds.json``).
  Keys: see ``experiments/configs/iterated_synthetic.py``."""
  parallel.initialize_distributed()  # one job over every process (no-op on one host; idempotent)
  unknown = sorted(set(config.keys()) - set(KNOWN_KEYS))
  if unknown:
    raise ValueError(f"unknown config key(s) {[f'config.{k}' for k in unknown]}; allowed top-level "
                     f"keys: {list(KNOWN_KEYS)}")
  sources = config_dicts.to_dataclass(sections.Sources, config.sources, "sources")
  sft_dir = sources.require("sft_workdir", "iterated_rlhf", "π_0, the RM backbone and the KL "
                            "reference")
  annotator = config_dicts.to_dataclass(feedback.AnnotatorConfig, config.annotator, "annotator")
  lora = sections.lora_section(config)  # validated here; each stage parses its own copy
  workdir = fileio.absolute(workdir)
  fileio.makedirs(workdir)
  # Several processes (one job): process 0 writes every shared file (config, task, pairs, the
  # round rows, the report) and draws the comparisons on its own first device; the others wait at
  # a barrier, then every process reads the same files. The RM and PPO stages run on all of them.
  # Decisions taken from files go through parallel.agree, so every process takes one branch.
  coordinator = parallel.is_coordinator()
  if coordinator:
    train.atomic_write_json(fileio.join(workdir, "config.json"), config.to_dict())
  sft_ckpt = train.load_sft_params(sft_dir)
  tok, policy_model = sft_ckpt.tokenizer, models.Transformer(sft_ckpt.model_config)
  tok_spec = train.tokenizer_spec(train.read_json(fileio.join(sft_dir, "config.json")))
  label_fn = feedback.make_label_fn(annotator, tok)
  ppo_data, ppo_limits = config.ppo.data, config.ppo.limits
  task_dir = fileio.join(workdir, "data", "synthetic")
  if not parallel.agree(fileio.exists(fileio.join(task_dir, "metadata.json"))):
    if coordinator:
      task = config_dicts.to_dataclass(PPODataConfig, ppo_data, "ppo.data").synthetic_task()
      synthetic_files.write_task(task_dir, task, overwrite=True)
    parallel.sync("iterated_task")
  prompt_pool = [r["prompt"] for r in _read(fileio.join(task_dir, "prompts.jsonl"))]
  sample_kw = dict(max_prompt_len=ppo_limits.max_prompt_len,
                   max_new_tokens=ppo_limits.max_response_len, label_fn=label_fn)
  all_pairs = fileio.join(workdir, "all_pairs.jsonl")
  params, policy_dir, table = sft_ckpt.params, sft_dir, []
  for r in range(config.rounds):
    rdir = fileio.join(workdir, f"round_{r}")
    if coordinator:
      fileio.makedirs(rdir)
    rng = np.random.default_rng([config.seed, r])
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), r)
    new_pairs, held_pairs = fileio.join(rdir, "pairs.jsonl"), fileio.join(rdir, "eval_pairs.jsonl")
    if not parallel.agree(fileio.exists(held_pairs)):  # 1. comparisons of π_r
      if coordinator:
        chosen = rng.choice(len(prompt_pool), config.pairs_per_round + config.eval_pairs,
                            replace=False)
        prompts = [prompt_pool[i] for i in chosen]
        rows = sample_comparisons(policy_model, params, tok, prompts, rng, key, **sample_kw)
        split = int(
            len(rows) * config.pairs_per_round / (config.pairs_per_round + config.eval_pairs))
        previous = _read(all_pairs) if r > 0 else []
        _write(new_pairs, rows[:split])
        _write(all_pairs + f".round{r}", previous + rows[:split])
        _write(held_pairs, rows[split:])  # last: its presence marks the round's data complete
      parallel.sync(f"iterated_round{r}_pairs")
    rm_dir = fileio.join(rdir, "rm")
    if not parallel.agree(fileio.exists(fileio.join(rm_dir, scoring.ARTIFACT_DIR))):  # 2. RM_r
      rm_cfg = copy.deepcopy(config.rm)
      rm_cfg.sources.sft_workdir = sft_dir
      rm_cfg.data.source = "jsonl"
      rm_cfg.data.train_jsonl = all_pairs + f".round{r}"
      rm_cfg.data.eval_jsonl = held_pairs
      rm_cfg.data.prompts_jsonl = fileio.join(task_dir, "prompts.jsonl")
      if lora.enabled:
        rm_cfg.lora = copy.deepcopy(config.lora)
      if _round_stage(rm_cfg, rm_dir).get("preempted"):
        logger.warning("round %d: reward model preempted; rerun to resume", r)
        return table
    if coordinator and fileio.exists(all_pairs + f".round{r}"):  # now backs a trained RM
      fileio.rename(all_pairs + f".round{r}", all_pairs)
    parallel.sync(f"iterated_round{r}_rm")
    ppo_dir = fileio.join(rdir, "ppo")  # 3. π_{r+1}: PPO from π_r, KL to the SFT model
    if parallel.agree(train.is_finished(ppo_dir)):
      final = train.read_json(fileio.join(ppo_dir, train.FINAL_METRICS_FILE))
    else:
      ppo_cfg = copy.deepcopy(config.ppo)
      ppo_cfg.sources.sft_workdir = policy_dir
      ppo_cfg.sources.reference_workdir = sft_dir if policy_dir != sft_dir else ""
      ppo_cfg.sources.reward_model_workdir = rm_dir
      ppo_cfg.sources.tokenizer = tok_spec
      ppo_cfg.data.synthetic_dir = task_dir
      if lora.enabled:
        ppo_cfg.lora = copy.deepcopy(config.lora)
      final = _round_stage(ppo_cfg, ppo_dir)
    if final.get("preempted"):
      logger.warning("round %d preempted; rerun to resume", r)
      return table
    # π_{r+1}'s params as a plain tree (a LoRA run's adapters merged into its base); every
    # process restores them (a checkpoint read is the same call on every process).
    params, policy_dir = train.load_sft_params(ppo_dir).params, ppo_dir
    row_path = fileio.join(rdir, ROUND_FILE)
    if not parallel.agree(fileio.exists(row_path)):
      # every process restores RM_r (orbax's restore meets at a barrier); process 0 measures
      handle = scoring.load_reward_model(rm_dir, policy_tokenizer=tok)
      if coordinator:  # 4. RM_r on π_{r+1}'s own comparisons (they also seed the next round's data)
        write_round_row(r, final, rng, key, policy_model, params, tok, prompt_pool, handle,
                        all_pairs, held_pairs, config.eval_pairs, sample_kw, row_path)
      parallel.sync(f"iterated_round{r}_row")
    row = train.read_json(row_path)
    table.append(row)
    logger.info("round %d: %s", r, row)
  if coordinator:
    train.atomic_write_json(fileio.join(workdir, "rounds.json"), table)
    write_report(table, workdir)
  parallel.sync("iterated_report")
  return table


def write_round_row(r: int, final: dict, rng: np.random.Generator, key: jax.Array, policy_model,
                    params, tok, prompt_pool: list[str], handle, all_pairs: str,
                    held_pairs: str, eval_pairs: int, sample_kw: dict, row_path: str) -> dict:
  """Round ``r``'s row (``round_<r>/round.json``): PPO's final numbers, the job they ran on, and
  RM_r's (``handle``) gold accuracy on π_r's held-out pairs and on fresh pairs of π_{r+1}."""
  probe_prompts = [prompt_pool[i] for i in rng.choice(len(prompt_pool), eval_pairs, replace=False)]
  probe = sample_comparisons(policy_model, params, tok, probe_prompts, rng,
                             jax.random.fold_in(key, 7), **sample_kw)
  row = {
      "round": r, "num_comparisons": len(_read(all_pairs)), "gold_reward": final.get("gold_reward"),
      "initial_gold_reward": final.get("initial_gold_reward"),
      "sft_gold_reward": final.get("sft_gold_reward"), "kl_to_sft": final.get("kl_to_sft"),
      "rm_reward": final.get("rm_reward"),
      "rm_accuracy_on_new_policy": rm_gold_accuracy(handle, tok, probe),
      "rm_accuracy_on_own_policy": rm_gold_accuracy(handle, tok, _read(held_pairs)),
      # the job the round's PPO stage ran on (its final_metrics.json's topology)
      "process_count": final.get("process_count"), "device_count": final.get("device_count")}
  train.atomic_write_json(row_path, row)
  return row


def write_report(table: list[dict], workdir: str) -> None:
  """``rounds.md`` (a Markdown table) and ``iterated_rlhf.png`` (gold reward, RM accuracy, KL)."""
  cols = ("round", "num_comparisons", "gold_reward", "kl_to_sft", "rm_accuracy_on_own_policy",
          "rm_accuracy_on_new_policy")
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for row in table:
    lines.append("| " + " | ".join(
        f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
  fileio.atomic_write_text(fileio.join(workdir, "rounds.md"), "\n".join(lines) + "\n")
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
  rounds = [row["round"] + 1 for row in table]
  axes[0].plot([0] + rounds, [table[0]["sft_gold_reward"]] + [row["gold_reward"] for row in table],
               "o-")
  axes[0].set(xlabel="round", ylabel="gold reward (held-out)")
  axes[1].plot(rounds, [row["rm_accuracy_on_own_policy"] for row in table], "o-", label="π_r pairs")
  axes[1].plot(rounds, [row["rm_accuracy_on_new_policy"] for row in table], "s--",
               label="π_{r+1} pairs")
  axes[1].set(xlabel="round", ylabel="RM_r gold accuracy")
  axes[1].legend()
  axes[2].plot([0] + rounds, [0.0] + [row["kl_to_sft"] for row in table], "o-")
  axes[2].set(xlabel="round", ylabel="KL(π ‖ SFT) per response")
  fig.tight_layout()
  fileio.save_figure(fig, fileio.join(workdir, "iterated_rlhf.png"), dpi=120)
  plt.close(fig)
