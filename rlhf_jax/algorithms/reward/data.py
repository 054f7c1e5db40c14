"""Reward-model data: the synthetic task or the user's JSONL, built into TFDS datasets once.

Each objective reads one record kind (``reward_objectives.DATA_KIND``). Held-out splits are
materialised for :mod:`.reward_eval`: the objective's own eval split, held-out *pairs* (for every
objective, so pairwise and listwise RMs are compared on the same pairs), held-out *rankings* and,
for rating objectives, held-out ratings.

Bad input is handled by the record layer (``data.records``: a list of length 1, NaN or missing
scores, ratings outside the declared scale, non-numbers all raise ``RecordError`` naming the file,
line and field; rating objectives require ``rating_scale`` so every rating is range-checked). Ties
are allowed and counted here: a ranked list with some equal scores yields no comparison between
the tied candidates in ``all_pairs`` and Breslow's rule in ``plackett_luce``. Training records that
carry no preference at all (a pair whose chosen and rejected texts are identical, a list whose
scores all tie) are dropped and counted (``data/dropped_uninformative``), as DPO and PRO / RRHF
do; a file of nothing else is an error naming it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, NamedTuple

import numpy as np

from rlhf_jax import fileio, parallel, train
from rlhf_jax.algorithms import sections
from rlhf_jax.algorithms.reward import evaluation as reward_eval
from rlhf_jax.algorithms.reward.objectives import DATA_KIND
from rlhf_jax.data import batching, records, synthetic, synthetic_files
from rlhf_jax.data import dataset as ds_lib
from rlhf_jax.data import kinds as kinds_lib
from rlhf_jax.data import tokenizers as tok_lib

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RMDataConfig(sections.DataSource):
  """Where the preference data comes from and how it is batched (``sections.DataSource`` plus
  the reward model's own fields; token limits are ``config.limits``, the tokenizer
  ``config.sources.tokenizer``).

  Attributes:
    source: ``synthetic`` (the embedded task, generated into ``<workdir>/data/synthetic``, or into
      ``synthetic_dir`` when set) or ``jsonl`` (``train_jsonl`` / ``eval_jsonl`` of the
      objective's record kind).
    eval_prompts_jsonl: held-out ``{"prompt"}`` records for the fresh-sample gold correlation
      (synthetic task only; '' = its ``prompts_test.jsonl``).
    eval_pairwise_jsonl, eval_ranked_jsonl: optional extra held-out pairwise / ranked files
      (jsonl source) for the pairwise and ranking metrics of any objective.
    prompts_jsonl: optional ``{"prompt"}`` file whose prompts the SFT model answers to normalise
      the rewards (default: the training records' prompts).
    synthetic_num_prompts, synthetic_num_test_prompts, synthetic_seed, synthetic_bt_temperature:
      the generated task (the defaults equal the SFT run's, so both see the same prompts).
    num_train_examples: train on the first N records only (0 = all): learning curves.
    rating_scale: ``(low, high)`` of Likert ratings / attribute values (rating objectives; the
      synthetic task uses (1, 7)); values outside it are errors.
    attribute_names: attributes a ``multi_attribute`` record must rate (empty = those of the data).
    batch_size: global batch in records (pairs, ranked lists or rated responses) per step.
    eval_batch_size: sequences per evaluation forward; max_eval_examples caps each held-out split.
  """

  eval_pairwise_jsonl: str = ""
  eval_ranked_jsonl: str = ""
  prompts_jsonl: str = ""
  synthetic_bt_temperature: float = 0.25
  num_train_examples: int = 0
  rating_scale: tuple[float, ...] = ()
  attribute_names: tuple[str, ...] = ()
  eval_batch_size: int = 128
  max_eval_examples: int = 512

  def __post_init__(self):
    super().__post_init__()
    for name in ("eval_pairwise_jsonl", "eval_ranked_jsonl", "prompts_jsonl"):
      sections.check_file("RMDataConfig", name, getattr(self, name), required=False)
    if self.eval_prompts_jsonl and self.source != "synthetic":
      raise ValueError(f"RMDataConfig.eval_prompts_jsonl={self.eval_prompts_jsonl!r} is invalid "
                       "with source='jsonl'; allowed: '' (the gold correlation needs the synthetic "
                       "task's gold reward; prompts_jsonl sets the normalisation prompts)")
    for name in ("eval_batch_size", "max_eval_examples"):
      sections.check_int("RMDataConfig", name, getattr(self, name), 1)
    sections.check_int("RMDataConfig", "num_train_examples", self.num_train_examples, 0,
                       " (0 = all)")
    if self.num_train_examples and self.num_train_examples < self.batch_size:
      raise ValueError(f"RMDataConfig.num_train_examples={self.num_train_examples} is invalid; "
                       f"allowed: 0 or >= batch_size={self.batch_size}")
    if not self.synthetic_bt_temperature > 0:
      raise ValueError(
          f"RMDataConfig.synthetic_bt_temperature={self.synthetic_bt_temperature!r} is "
          "invalid; allowed: a float > 0")
    if self.rating_scale and (len(self.rating_scale) != 2 or
                              not self.rating_scale[0] < self.rating_scale[1]):
      raise ValueError(
          f"RMDataConfig.rating_scale={self.rating_scale!r} is invalid; allowed: () or "
          "(low, high) with low < high")


class RMData(NamedTuple):
  train_batches: batching.BatchIterator
  held_out: reward_eval.HeldOut
  rating_scale: tuple
  attribute_names: tuple
  stats: dict  # data statistics for the report (counts, ties)
  normalization_prompts: dict  # left-padded prompt_tokens / prompt_mask for the SFT samples
  gold_prompts: dict | None  # synthetic: held-out prompts (+ "texts") for fresh-sample gold
  gold_fn: Callable | None  # synthetic: (prompts, responses) -> per-attribute gold arrays


def _subset(path: str, n: int, out_path: str) -> str:
  """Writes the first ``n`` non-blank lines of ``path`` to ``out_path`` (atomic); returns it."""
  lines = []
  for _, line in records.jsonl_lines(path):  # names the file and line of a non-UTF-8 byte
    lines.append(line if line.endswith("\n") else line + "\n")
    if len(lines) == n:
      break
  if len(lines) < n:
    raise ValueError(f"config.data.num_train_examples={n} but {path} has only {len(lines)} records")
  if not fileio.exists(out_path):
    fileio.atomic_write_text(out_path, "".join(lines))
  return out_path


def tie_statistics(dataset: ds_lib.TokenizedDataset) -> dict:
  """Ranked: comparisons and tied pairs; pairwise: identical chosen/rejected pairs."""
  n = len(dataset)
  examples = dataset.get_batch(range(n))
  if dataset.kind == "ranked":
    pairs = tied = 0
    for ex in examples:
      s = np.asarray(ex["scores"], np.float64)
      iu = np.triu_indices(len(s), k=1)
      diff = (s[:, None] - s[None, :])[iu]
      pairs += int(np.sum(diff != 0))
      tied += int(np.sum(diff == 0))
    return {"data/train_comparisons": pairs, "data/train_tied_pairs": tied}
  if dataset.kind == "pairwise":
    same = sum(np.array_equal(ex["chosen"], ex["rejected"]) for ex in examples)
    return {"data/train_comparisons": n, "data/identical_pairs": int(same)}
  return {}


def prepare(config: RMDataConfig, limits: sections.Limits, objective: str,
            tokenizer: tok_lib.Tokenizer, workdir: str, *, vocab_size: int) -> RMData:
  """Builds (once) the datasets under ``<workdir>/data`` and materialises the held-out splits."""
  kind = DATA_KIND[objective]
  data_dir = fileio.join(workdir, "data")
  fileio.makedirs(data_dir)
  files: dict[str, str] = {}
  gold_prompts, gold_fn, bt_temperature = None, None, None
  rating_scale, attribute_names = tuple(config.rating_scale), tuple(config.attribute_names)
  if config.source == "synthetic":
    task_dir = config.synthetic_dir or fileio.join(data_dir, "synthetic")
    wanted = config.synthetic_task(bt_temperature=config.synthetic_bt_temperature)
    meta_path = fileio.join(task_dir, "metadata.json")
    # One decision, one writer: two processes publishing the task concurrently race in
    # fileio.replace_dir (an OSError, or the folder briefly absent for the other's reads), and the
    # failed process's stage ends while the other waits in the next collective.
    if not parallel.agree(fileio.exists(meta_path)):
      logger.info("generating the synthetic task into %s", task_dir)
      parallel.write_on_coordinator(synthetic_files.write_task, task_dir, wanted, overwrite=True,
                                    barrier="rm_synthetic_task_written")
    meta = train.read_json(meta_path)
    for key in ("seed", "num_prompts", "num_test_prompts", "bt_temperature"):
      if meta["config"][key] != getattr(wanted, key):
        raise ValueError(f"{task_dir} holds a synthetic task with {key}={meta['config'][key]}, the "
                         f"config asks for {getattr(wanted, key)}; use a fresh --workdir")
    stem = synthetic_files.FILE_STEMS[kind]
    files = {
        "train": f"{stem}.jsonl", "eval": f"{stem}_test.jsonl", "pairwise": "pairwise_test.jsonl",
        "ranked": "ranked_test.jsonl", "prompts": "prompts.jsonl"}
    files = {k: fileio.join(task_dir, v) for k, v in files.items()}
    rating_scale = rating_scale or tuple(synthetic_files.RATING_SCALE)
    bt_temperature = config.synthetic_bt_temperature
    gold_path = config.eval_prompts_jsonl or fileio.join(task_dir, "prompts_test.jsonl")
    texts = [r.prompt for r in records.read_records(gold_path, "prompt")]
    gold_prompts = {"texts": texts}
    gold_fn = synthetic.gold_attribute_arrays
  else:
    files = {"train": config.train_jsonl, "eval": config.eval_jsonl}
    if kind == "pairwise":
      files["pairwise"] = config.eval_jsonl
    if kind == "ranked":
      files["ranked"] = config.eval_jsonl
    if config.eval_pairwise_jsonl:
      files["pairwise"] = config.eval_pairwise_jsonl
    if config.eval_ranked_jsonl:
      files["ranked"] = config.eval_ranked_jsonl
    if config.prompts_jsonl:
      files["prompts"] = config.prompts_jsonl
  if kind in ("rated", "attributes") and not rating_scale:
    raise ValueError(
        f"objective {objective!r} needs config.data.rating_scale=(low, high): ratings are "
        "range-checked against it and rescaled to [-1, 1]")
  if config.num_train_examples:
    files["train"] = _subset(
        files["train"], config.num_train_examples,
        fileio.join(data_dir, f"{kind}_train_first{config.num_train_examples}.jsonl"))

  lengths = dict(max_prompt_len=limits.max_prompt_len, max_response_len=limits.max_response_len)
  scale = rating_scale if kind in ("rated", "attributes") else None
  names = attribute_names or None

  def build(name: str, path: str, k: str) -> ds_lib.TokenizedDataset:
    suffix = f"_first{config.num_train_examples}" if name == "train" and config.num_train_examples else ""
    # Training pairs with chosen == rejected and ranked lists whose scores all tie carry no
    # preference: dropped and counted (an error if nothing is left), as DPO and PRO / RRHF do.
    return ds_lib.prepare_dataset(path, k, tokenizer, fileio.join(data_dir, f"{k}_{name}{suffix}"),
                                  scale=scale if k == kind else None,
                                  attribute_names=names if k == "attributes" else None,
                                  drop_uninformative=name == "train", **lengths)

  train_ds, eval_ds = build("train", files["train"], kind), build("eval", files["eval"], kind)
  if kind == "attributes":
    attribute_names = tuple(train_ds.metadata["attribute_names"])
    if tuple(eval_ds.metadata["attribute_names"]) != attribute_names:
      raise ValueError(
          f"{files['eval']} rates {eval_ds.metadata['attribute_names']} but the training "
          f"data rates {list(attribute_names)}")
  batches = batching.BatchIterator(train_ds, config.batch_size, seed=config.shuffle_seed,
                                   buckets=limits.buckets or None,
                                   group_by_length=limits.group_by_length, vocab_size=vocab_size)
  max_len = limits.max_len
  eb, cap = config.eval_batch_size, config.max_eval_examples
  # Ranked eval batches hold K sequences per row: keep the forward at ~eval_batch_size sequences.
  row_batch = max(1, eb // max(1, int(eval_ds.metadata.get("max_candidates", 1)))) \
      if kind == "ranked" else eb
  held_out = reward_eval.HeldOut(reward_eval.materialize(eval_ds, row_batch, cap, max_len))

  if "pairwise" in files:
    pw_ds = eval_ds if files["pairwise"] == files["eval"] and kind == "pairwise" else \
        build("eval_pairs", files["pairwise"], "pairwise")
    held_out.pairwise = reward_eval.concat_batches(reward_eval.materialize(pw_ds, eb, cap, max_len),
                                                   cap)
    held_out.objective_is_pairwise = pw_ds is eval_ds
    if bt_temperature is not None:
      rows = records.read_records(files["pairwise"], "pairwise")[:len(held_out.pairwise["valid"])]
      held_out.pairwise_gold = (synthetic.gold_rewards([r.prompt for r in rows],
                                                       [r.chosen for r in rows]),
                                synthetic.gold_rewards([r.prompt for r in rows],
                                                       [r.rejected for r in rows]), bt_temperature)
  if "ranked" in files:
    rk_ds = eval_ds if files["ranked"] == files["eval"] and kind == "ranked" else \
        build("eval_lists", files["ranked"], "ranked")
    k = max(1, int(rk_ds.metadata.get("max_candidates", 1)))
    held_out.ranked = reward_eval.concat_batches(
        reward_eval.materialize(rk_ds, max(1, eb // k), cap, max_len), cap)
  if kind in ("rated", "attributes"):
    rated = reward_eval.concat_batches(held_out.objective_batches, cap)
    held_out.rated = {
        "tokens": rated["tokens"], "mask": rated["mask"],
        "targets": reward_eval.target_matrix(rated, objective, rating_scale),
        "prompt_keys": reward_eval.prompt_keys(eval_ds, len(rated["tokens"]))}

  # Prompts the SFT model answers for the normalisation statistics.
  if "prompts" in files:
    prompt_ds = build("prompts", files["prompts"], "prompt")
  else:
    prompt_ds = train_ds
  examples = prompt_ds.get_batch(range(len(prompt_ds)))
  norm_prompts = batching.collate(examples, "prompt", prompt_ds.special_ids, limits.max_prompt_len)
  if gold_prompts is not None:
    gold_prompts.update(
        batching.encode_prompts(tokenizer, gold_prompts["texts"],
                                max_prompt_len=limits.max_prompt_len,
                                buckets=(limits.max_prompt_len,)))
  stats = {
      "data/train_examples": len(train_ds), "data/eval_examples": len(eval_ds),
      "data/train_truncated_responses": int(train_ds.metadata.get("truncated_responses", 0)),
      **tie_statistics(train_ds), "data/dropped_uninformative": int(
          train_ds.metadata.get("dropped_uninformative", 0))}
  if stats["data/dropped_uninformative"]:
    logger.warning("%s: skipped %d training record(s) that carry no preference (%s)",
                   files["train"], stats["data/dropped_uninformative"],
                   kinds_lib.get_kind(kind).uninformative)
  return RMData(
      batches, held_out, rating_scale, attribute_names, stats,
      {"prompt_tokens": norm_prompts["prompt_tokens"], "prompt_mask": norm_prompts["prompt_mask"]},
      gold_prompts, gold_fn)
