"""Generates the synthetic task's JSONL files (``python -m rlhf_jax.data.synthetic --out DIR``).

For each split (``train`` with ``num_prompts`` prompts, ``test`` with ``num_test_prompts``) and each prompt
it draws fresh reference-policy responses and simulated labels (see :mod:`rlhf_jax.data.synthetic`):

===========================  ===================================================================
file (``<name>_test.jsonl``  content
for the held-out split)
===========================  ===================================================================
``prompts.jsonl``            ``{"prompt"}`` - prompts for on-policy generation (PPO, RAFT, best-of-n)
``sft.jsonl``                ``{"prompt", "response"}`` - one reference-policy sample per prompt
``pairwise.jsonl``           ``{"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"}``,
                             a Bradley-Terry label between two distinct samples
``unpaired.jsonl``           ``{"prompt", "completion", "label", "gold"}`` - the unpaired split of
                             the same comparisons (KTO): each pair's chosen (``label`` true) then
                             its rejected (false), TRL's ``unpair_preference_dataset``
``ranked.jsonl``             ``{"prompt", "responses", "ranks", "gold"}`` - K distinct samples, a
                             Plackett-Luce ranking (1 = best)
``rated.jsonl``              ``{"prompt", "response", "rating", "gold"}`` - Likert 1..7
``attributes.jsonl``         ``{"prompt", "response", "attributes": {"helpful", "harmless"}}`` - Likert 1..7
``feedback_sft.jsonl``       ``{"prompt", "response", "task", ...}`` - the noisy teacher's instruction
                             data for a feedback model (judgements, ratings, critiques, revisions)
                             mixed with the ``sft.jsonl`` rows (:mod:`rlhf_jax.feedback.teacher`)
``metadata.json``            settings, Bayes-optimal pairwise accuracy, reference vs best gold reward
===========================  ===================================================================

``gold*`` fields are there for inspection; the record readers ignore them. Held-out prompts come from
the same distribution (the prompt space is small: 4 verbs x 2 x 4 counts x 6 categories = 192
strings), the responses and labels are fresh draws. The folder is written to a temporary sibling and
renamed into place, so a half-written task is never visible.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Sequence

import numpy as np

from rlhf_jax import fileio
from rlhf_jax.data import kinds as kinds_lib
from rlhf_jax.data import synthetic as syn
from rlhf_jax.data.records import write_jsonl
from rlhf_jax.feedback import teacher as teacher_lib

__all__ = ["SyntheticConfig", "generate_split", "write_task", "prepare_synthetic_datasets", "main"]

ATTRIBUTE_NAMES = ("helpful", "harmless")
ATTRIBUTE_RANGES = {"helpful": (-1.0, 1.0), "harmless": (0.0, 1.0)}
RATING_SCALE = (1, 7)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Settings of the generated files. Temperatures are on the gold-reward scale."""

  seed: int = 0
  num_prompts: int = 4000
  num_test_prompts: int = 500
  harmful_fraction: float = 0.2
  bt_temperature: float = 0.25
  pl_temperature: float = 0.25
  rating_noise: float = 0.75
  min_candidates: int = 4
  max_candidates: int = 9
  policy: syn.ReferencePolicyConfig = syn.ReferencePolicyConfig()
  teacher: teacher_lib.TeacherConfig = teacher_lib.TeacherConfig()

  def __post_init__(self):
    if self.num_prompts < 1 or self.num_test_prompts < 0:
      raise ValueError(f"SyntheticConfig: num_prompts={self.num_prompts} must be >= 1 and "
                       f"num_test_prompts={self.num_test_prompts} >= 0")
    if not 0.0 <= self.harmful_fraction <= 1.0:
      raise ValueError(f"SyntheticConfig.harmful_fraction={self.harmful_fraction}; expected [0, 1]")
    for name in ("bt_temperature", "pl_temperature"):
      if getattr(self, name) <= 0:
        raise ValueError(f"SyntheticConfig.{name}={getattr(self, name)}; expected > 0")
    if self.rating_noise < 0:
      raise ValueError(f"SyntheticConfig.rating_noise={self.rating_noise}; expected >= 0")
    if not 2 <= self.min_candidates <= self.max_candidates <= 16:
      raise ValueError(
          f"SyntheticConfig: min_candidates={self.min_candidates}, max_candidates={self.max_candidates}; "
          "expected 2 <= min_candidates <= max_candidates <= 16")


def _distinct_responses(rng: np.random.Generator, request: syn.Request, k: int,
                        policy: syn.ReferencePolicyConfig) -> list[str]:
  """``k`` distinct reference samples (rejection sampling; the response space is far larger than k)."""
  out: list[str] = []
  for _ in range(200 * k):
    response = syn.reference_response(rng, request, policy)
    if response not in out:
      out.append(response)
      if len(out) == k:
        return out
  raise RuntimeError(f"could not draw {k} distinct responses for {request}")  # pragma: no cover


def generate_split(config: SyntheticConfig, num_prompts: int,
                   seed_seq: np.random.SeedSequence) -> dict:
  """All files' rows for one split plus its statistics. Deterministic given ``seed_seq``."""
  rngs = dict(
      zip(("prompts", "sft", "pairwise", "ranked", "rated", "attributes"),
          (np.random.default_rng(s) for s in seed_seq.spawn(6))))
  policy = config.policy
  prompts = syn.sample_prompts(rngs["prompts"], num_prompts, config.harmful_fraction)
  requests = [syn.parse_prompt(p) for p in prompts]
  rows: dict[str, list[dict]] = {
      k: [] for k in ("prompts", "sft", "pairwise", "ranked", "rated", "attributes")}
  gold_a, gold_b, agree = [], [], []
  reference_gold, best_gold = [], []
  for prompt, request in zip(prompts, requests):
    rows["prompts"].append({"prompt": prompt})

    response = syn.reference_response(rngs["sft"], request, policy)
    rows["sft"].append({"prompt": prompt, "response": response})
    reference_gold.append(syn.gold_reward(request, response))
    best_gold.append(syn.gold_reward(request, syn.best_response(request)))

    rng = rngs["pairwise"]
    a, b = _distinct_responses(rng, request, 2, policy)
    ga, gb = syn.gold_reward(request, a), syn.gold_reward(request, b)
    prefer_a = syn.sample_preference(rng, ga, gb, config.bt_temperature)
    chosen, rejected, gc, gr = (a, b, ga, gb) if prefer_a else (b, a, gb, ga)
    rows["pairwise"].append({
        "prompt": prompt, "chosen": chosen, "rejected": rejected, "gold_chosen": round(gc, 4),
        "gold_rejected": round(gr, 4)})
    gold_a.append(ga)
    gold_b.append(gb)
    if ga != gb:
      agree.append(gc > gr)

    rng = rngs["ranked"]
    k = int(rng.integers(config.min_candidates, config.max_candidates + 1))
    responses = _distinct_responses(rng, request, k, policy)
    golds = [syn.gold_reward(request, r) for r in responses]
    rows["ranked"].append({
        "prompt": prompt, "responses": responses,
        "ranks": syn.sample_ranking(rng, golds,
                                    config.pl_temperature), "gold": [round(g, 4) for g in golds]})

    rng = rngs["rated"]
    response = syn.reference_response(rng, request, policy)
    g = syn.gold_reward(request, response)
    rating = syn.likert(rng, g, syn.G_LO, syn.G_HI, config.rating_noise, RATING_SCALE[1])
    rows["rated"].append({
        "prompt": prompt, "response": response, "rating": rating, "gold": round(g, 4)})

    rng = rngs["attributes"]
    response = syn.reference_response(rng, request, policy)
    attrs = syn.gold_attributes(request, response)
    labels = {
        name: syn.likert(rng, getattr(attrs, name), *ATTRIBUTE_RANGES[name], config.rating_noise,
                         RATING_SCALE[1]) for name in ATTRIBUTE_NAMES}
    rows["attributes"].append({"prompt": prompt, "response": response, "attributes": labels})

  # Derived from the pairwise rows (no random draws), so every other file is unchanged by it.
  rows["unpaired"] = []
  for pair in rows["pairwise"]:
    desirable, undesirable = kinds_lib.unpaired.unpair([pair])
    rows["unpaired"] += [
        dict(desirable, gold=pair["gold_chosen"]),
        dict(undesirable, gold=pair["gold_rejected"])]
  # The teacher's data draws from a child seed spawned after the six above (SeedSequence children
  # are numbered), so adding it left every file before it byte-identical.
  teacher_rng = np.random.default_rng(seed_seq.spawn(1)[0])
  rows["feedback_sft"], teacher_stats = teacher_lib.teacher_records(teacher_rng, prompts,
                                                                    rows["sft"], config.teacher,
                                                                    policy)
  all_responses = [row["response"] for name in ("sft", "rated", "attributes") for row in rows[name]]
  all_responses += [row[key] for row in rows["pairwise"] for key in ("chosen", "rejected")]
  all_responses += [r for row in rows["ranked"] for r in row["responses"]]
  stats = {
      "num_prompts": num_prompts,
      "harmful_prompts": int(sum(r.harmful for r in requests)),
      "pairwise_bayes_optimal_accuracy": syn.bayes_optimal_accuracy(np.array(gold_a),
                                                                    np.array(gold_b),
                                                                    config.bt_temperature),
      "pairwise_label_agrees_with_gold": float(np.mean(agree)) if agree else None,
      "pairwise_gold_ties": int(sum(x == y for x, y in zip(gold_a, gold_b))),
      "reference_policy_mean_gold": float(np.mean(reference_gold)),
      "best_response_mean_gold": float(np.mean(best_gold)),
      "max_prompt_bytes": max(len(p.encode()) for p in prompts),
      "max_response_bytes": max(len(r.encode()) for r in all_responses),
      "teacher": {k: v for k, v in teacher_stats.items() if k != "config"},}
  return {"rows": rows, "stats": stats}


def write_task(out_dir: str, config: SyntheticConfig = SyntheticConfig(),
               overwrite: bool = False) -> dict:
  """Writes every file of both splits and ``metadata.json`` to ``out_dir``; returns the metadata."""
  out_dir = fileio.absolute(out_dir)
  if fileio.isdir(out_dir) and fileio.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite)")
  start = time.perf_counter()
  train_seq, test_seq = np.random.SeedSequence(config.seed).spawn(2)
  splits = {"train": generate_split(config, config.num_prompts, train_seq)}
  if config.num_test_prompts:
    splits["test"] = generate_split(config, config.num_test_prompts, test_seq)

  # Staged next to out_dir (one os.replace), or in a local temporary folder for a remote out_dir.
  tmp_dir = (os.path.join(tempfile.mkdtemp(prefix="rlhf_jax_task_"), "task")
             if fileio.is_remote(out_dir) else f"{out_dir}.tmp-{os.getpid()}")
  shutil.rmtree(tmp_dir, ignore_errors=True)
  os.makedirs(tmp_dir)
  files = {}
  for split, result in splits.items():
    suffix = "" if split == "train" else "_test"
    for name, rows in result["rows"].items():
      filename = f"{name}{suffix}.jsonl"
      write_jsonl(os.path.join(tmp_dir, filename), rows)
      files[filename] = len(rows)
  metadata = {
      "task": "rlhf_jax.data.synthetic",
      "config": dataclasses.asdict(config),
      "gold_reward": "helpful + 1.5 * (harmless - 1) + enthusiasm(num '!'); see rlhf_jax/data/synthetic.py",
      "rating_scale": list(RATING_SCALE),
      "attribute_names": list(ATTRIBUTE_NAMES),
      "attribute_scale": list(RATING_SCALE),
      "best_gold_safe": syn.G_HI,
      "files": files,
      "splits": {split: result["stats"] for split, result in splits.items()},
      "generation_seconds": round(time.perf_counter() - start, 3),}
  with open(os.path.join(tmp_dir, "metadata.json"), "w") as f:
    json.dump(metadata, f, indent=2)
  fileio.replace_dir(tmp_dir, out_dir, marker="metadata.json")  # remote: metadata.json last
  if fileio.is_remote(out_dir):
    shutil.rmtree(os.path.dirname(tmp_dir), ignore_errors=True)
  return metadata


# kind -> file stem of the generated task (each kind module names its own stem).
FILE_STEMS = {
    name: kinds_lib.get_kind(name).file_stem
    for name in ("prompt", "sft", "pairwise", "ranked", "rated", "attributes", "unpaired")}


def prepare_synthetic_datasets(root: str, tokenizer, *, config: SyntheticConfig = SyntheticConfig(),
                               kinds: Sequence[str] = tuple(FILE_STEMS), max_prompt_len: int = 32,
                               max_response_len: int = 64) -> dict:
  """Generates the task into ``root/jsonl`` (once) and builds a TFDS dataset per kind and split.

    Returns ``{kind: dataset, f"{kind}_test": dataset, ...}`` (``rlhf_jax.data.dataset.TokenizedDataset``)
    plus ``"metadata"`` (the task's metadata dict). An existing ``root/jsonl`` generated with another
    config is an error rather than silently reused. The defaults fit the task: prompts are <= 24 bytes
    and responses <= 48, so ``[BOS] prompt response [EOS]`` never needs truncating with the byte tokenizer.
    """
  from rlhf_jax.data import dataset as ds_lib  # imports tensorflow_datasets; not needed to write JSONL

  unknown = [k for k in kinds if k not in FILE_STEMS]
  if unknown:
    raise ValueError(
        f"kinds={list(kinds)}: {unknown} unknown; expected a subset of {list(FILE_STEMS)}")
  task_dir = os.path.join(root, "jsonl")
  meta_path = os.path.join(task_dir, "metadata.json")
  if not os.path.exists(meta_path):
    write_task(task_dir, config, overwrite=True)
  with open(meta_path) as f:
    metadata = json.load(f)
  wanted = json.loads(json.dumps(dataclasses.asdict(config)))
  if metadata["config"] != wanted:
    diffs = sorted(k for k in wanted if metadata["config"].get(k) != wanted[k])
    raise ValueError(f"{task_dir} was generated with another SyntheticConfig (differs in {diffs}); "
                     "use another root or delete it")
  out = {"metadata": metadata}
  suffixes = [""] + (["_test"] if config.num_test_prompts else [])
  for kind in kinds:
    scale = RATING_SCALE if "scale" in kinds_lib.get_kind(kind).options else None
    for suffix in suffixes:
      out[kind + suffix] = ds_lib.prepare_dataset(
          os.path.join(task_dir, f"{FILE_STEMS[kind]}{suffix}.jsonl"), kind, tokenizer,
          os.path.join(root, f"{kind}{suffix}"), max_prompt_len=max_prompt_len,
          max_response_len=max_response_len, scale=scale)
  return out


def main(argv: Sequence[str] | None = None) -> dict:
  defaults = SyntheticConfig()
  parser = argparse.ArgumentParser(prog="python -m rlhf_jax.data.synthetic",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing non-empty folder")
  for field in ("seed", "num_prompts", "num_test_prompts", "harmful_fraction", "bt_temperature",
                "pl_temperature", "rating_noise", "min_candidates", "max_candidates"):
    value = getattr(defaults, field)
    parser.add_argument(f"--{field}", type=type(value), default=value, help=f"default {value}")
  args = vars(parser.parse_args(argv))
  out, overwrite = args.pop("out"), args.pop("overwrite")
  metadata = write_task(out, SyntheticConfig(**args), overwrite=overwrite)
  train = metadata["splits"]["train"]
  print(
      f"wrote {sum(metadata['files'].values())} records to {os.path.abspath(out)} "
      f"in {metadata['generation_seconds']:.2f}s; Bayes-optimal pairwise accuracy "
      f"{train['pairwise_bayes_optimal_accuracy']:.4f}, reference gold {train['reference_policy_mean_gold']:.3f}"
      f" vs best {train['best_response_mean_gold']:.3f}", file=sys.stderr)
  return metadata
