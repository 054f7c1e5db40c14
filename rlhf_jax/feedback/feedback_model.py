"""How the RLAIF and CAI launchers train their feedback model (the evaluator / critic).

The feedback model is the SFT code run on the noisy teacher's instruction mixture
(``experiments/configs/feedback_model_synthetic.py``). A real assistant's evaluator starts from a
pretrained language model, so by default (``init="sft"``) it starts from the experiment's own SFT
policy: the SFT run is written as a Hugging Face folder (``models.hf.export.export_run``, exact
weights and the byte tokenizer) and the feedback SFT reads it through ``sources.pretrained``; the
feedback model then has the policy's architecture. ``init="scratch"`` trains ``config.model`` from
random weights (the session-6 recipe).

Task subset (``tasks``): a launcher that needs only some of the feedback skills trains on those
records alone, as a practitioner fine-tunes an AI labeller on the labelling task rather than on
the whole assistant mixture (CAI: ``assistant,judge_cot,critique,revision``, the tasks it queries).
The subset is written next to the run (``<data_dir>/feedback_sft[_test].jsonl``), rows in file
order, and rewritten only when it differs.

Labeller data (``teacher``): a launcher can instead have the teacher write the labeller's own
instruction data: ``passes`` passes over the task's training prompts (one over the test prompts)
with the task's own teacher (its flaws as in ``metadata.json``) and the given task weights and
criteria, as the whole file (``base="none"``) or added to the shipped mixture or its ``tasks``
subset (``base="shipped"``). RLAIF's default is chain-of-thought judgements on the overall
criterion plus ratings, alone; CAI's adds chain-of-thought harmlessness judgements to its subset
(``experiments/configs/{rlaif,cai}_synthetic.py``): a small model does not learn to answer a
pairwise judgement directly (held-out accuracy stays at ½ after 19k judgements), but it learns to
write the two critiques first, and the answer from them (BUILD_NOTES sessions 10-11).

Tokenizer: a run started from a checkpoint folder reads with the folder's tokenizer, here the
byte tokenizer written as a ``tokenizer.json`` (``export.write_byte_tokenizer``, which encodes
exactly as ``ByteTokenizer``). :func:`exported_tokenizer` tells the evaluator loader to use the SFT
run's own spec instead, so the feedback model shares the policy's tokenizer (d-RLAIF's token path
needs that; the text path would re-tokenise to the same ids).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from rlhf_jax import fileio

INITS = ("sft", "scratch")
EXPORT_INFO = "export_info.json"

__all__ = [
    "INITS", "BASES", "EXPORT_INFO", "check_teacher", "feedback_config", "exported_tokenizer",
    "task_subset", "teacher_mixture"]


def _exported(sft_dir: str, out: str) -> str:
  """``hf:<out>``: the SFT run's latest checkpoint as a Hugging Face folder (reused when ``out``
  already holds that very run and step)."""
  from rlhf_jax import train  # pylint: disable=import-outside-toplevel  (train imports the world)
  from rlhf_jax.models.hf import export  # pylint: disable=import-outside-toplevel
  from rlhf_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  want = {
      "sft_workdir": fileio.absolute(sft_dir), "step": ckpt_lib.latest_step(sft_dir),
      "fingerprint": ckpt_lib.read_json(fileio.join(sft_dir, ckpt_lib.FINGERPRINT_FILE)),
      "tokenizer": train.tokenizer_spec(ckpt_lib.read_json(fileio.join(sft_dir, "config.json")))}
  info = fileio.join(out, EXPORT_INFO)
  from rlhf_jax import parallel  # pylint: disable=import-outside-toplevel
  # Multi-process: process 0's answer, process 0 writes; the others join the export's checkpoint
  # restore (orbax restores are collective: every process must restore, in the same order).
  if not parallel.agree(fileio.isfile(info) and train.read_json(info) == want):
    if parallel.is_coordinator():
      export.export_run(sft_dir, out)
      train.atomic_write_json(info, want)
    else:
      train.load_sft_params(sft_dir)
  return "hf:" + fileio.absolute(out)


def _task_names(tasks: str | Sequence[str]) -> tuple[str, ...]:
  from rlhf_jax.feedback import teacher  # pylint: disable=import-outside-toplevel
  names = tuple(t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks))
  names = tuple(t for t in names if t)
  bad = [t for t in names if t not in teacher.TASKS]
  if bad:
    raise ValueError(f"config.feedback_tasks={tasks!r}: {bad} are not teacher tasks; allowed: a "
                     f"comma-separated subset of {','.join(teacher.TASKS)} ('' = all)")
  return names


def _shipped_lines(src: str, tasks: Sequence[str]) -> list[str]:
  """The lines of JSONL ``src`` whose ``task`` (before ``:``) is in ``tasks`` (all when empty)."""
  keep = []
  for line in fileio.read_text(src).splitlines(keepends=True):
    if line.strip() and (not tasks or json.loads(line).get("task", "").split(":", 1)[0] in tasks):
      keep.append(line if line.endswith("\n") else line + "\n")
  return keep


def task_subset(src: str, dst: str, tasks: Sequence[str]) -> int:
  """Writes the rows of JSONL ``src`` whose ``task`` (before ``:``) is in ``tasks`` to ``dst``, in
  order; returns how many. ``dst`` is left alone when it already holds exactly those bytes."""
  keep = _shipped_lines(src, tasks)
  if not keep:
    raise ValueError(f"{src}: no records of the tasks {','.join(tasks)}")
  _write_if_changed(dst, "".join(keep))
  return len(keep)


def _write_if_changed(dst: str, text: str) -> None:
  """Writes ``text`` to ``dst`` atomically (creating its folder) unless it already holds it, so a
  rerun leaves an unchanged data file (and its mtime) alone."""
  if not (fileio.isfile(dst) and fileio.read_text(dst) == text):
    fileio.atomic_write_text(dst, text)


def _weights(text: str) -> tuple[tuple[str, float], ...]:
  """``"judge_cot:1,rating:0.3"`` -> ``(("judge_cot", 1.0), ("rating", 0.3))``."""
  out = []
  for item in (t.strip() for t in text.split(",")):
    name, _, value = item.partition(":")
    try:
      out.append((name.strip(), float(value)))
    except ValueError:
      raise ValueError(f"config.feedback_teacher.weights={text!r}: {item!r} is not task:weight "
                       "(e.g. judge_cot:1.0,rating:0.3)") from None
  return tuple(out)


BASES = ("none", "shipped")  # config.feedback_teacher.base


def _teacher_fields(teacher: Any) -> dict:
  """The ``TeacherConfig`` fields a ``feedback_teacher`` section sets."""
  criteria = tuple(c.strip() for c in teacher["criteria"].split(",") if c.strip())
  return dict(weights=_weights(teacher["weights"]), criteria=criteria, harmful_oversample=0.0)


def check_teacher(teacher: Any) -> None:
  """Refuses a bad ``config.feedback_teacher`` (``passes`` < 1, an unknown ``base``, a weight that
  is not ``task:chance``, an unknown task or criterion) in one line, without reading any file: the
  launchers call it before their first stage; None or ``passes=0`` (no teacher) passes."""
  from rlhf_jax.feedback import teacher as teacher_lib  # pylint: disable=import-outside-toplevel
  from rlhf_jax.train import config_dicts  # pylint: disable=import-outside-toplevel
  if teacher is None or int(teacher.get("passes", 0)) == 0:
    return
  if int(teacher["passes"]) < 1:
    raise ValueError(f"config.feedback_teacher.passes={teacher['passes']}; allowed: an int >= 1")
  base = teacher.get("base", "none")
  if base not in BASES:
    raise ValueError(f"config.feedback_teacher.base={base!r}; allowed: {' | '.join(BASES)}")
  config_dicts.to_dataclass(teacher_lib.TeacherConfig, _teacher_fields(teacher), "feedback_teacher")


def teacher_mixture(task_dir: str, data_dir: str, teacher: Any,
                    tasks: Sequence[str] = ()) -> dict[str, int]:
  """Writes ``<data_dir>/feedback_sft[_test].jsonl``: the task's teacher (its flaws from the task's
  ``metadata.json``) with ``teacher["weights"]`` (``task:weight,...``, each weight in [0, 1]: the
  chance per prompt and pass), ``teacher["criteria"]`` (comma-separated) and no red-team
  oversampling, run ``teacher["passes"]`` times over the training prompts (seeds from
  ``teacher["seed"]`` and the pass) and once over the test prompts; ``teacher`` is a ConfigDict
  or a dict. With ``teacher["base"] == "shipped"`` the task's shipped mixture (its ``tasks``
  records when given) comes first and the teacher's records are added to it; with ``"none"`` (the
  default) the teacher's records are the whole file. Files are rewritten only when their bytes
  change; returns the record count per split."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from rlhf_jax.data import synthetic as syn  # pylint: disable=import-outside-toplevel
  from rlhf_jax.feedback import teacher as teacher_lib  # pylint: disable=import-outside-toplevel
  from rlhf_jax.train import config_dicts  # pylint: disable=import-outside-toplevel
  if int(teacher["passes"]) < 1:
    raise ValueError(f"config.feedback_teacher.passes={teacher['passes']}; allowed: an int >= 1")
  check_teacher(teacher)
  base = teacher.get("base", "none")
  meta = fileio.read_json(fileio.join(task_dir, "metadata.json"))["config"]
  policy = config_dicts.to_dataclass(syn.ReferencePolicyConfig, meta["policy"], "policy")
  config = config_dicts.to_dataclass(teacher_lib.TeacherConfig,
                                     dict(meta["teacher"], **_teacher_fields(teacher)),
                                     "feedback_teacher")
  counts = {}
  for split, passes in (("", int(teacher["passes"])), ("_test", 1)):
    prompts = [
        r["prompt"] for r in fileio.read_jsonl(fileio.join(task_dir, f"prompts{split}.jsonl"))]
    sft_rows = fileio.read_jsonl(fileio.join(task_dir, f"sft{split}.jsonl"))
    shipped = _shipped_lines(fileio.join(task_dir, f"feedback_sft{split}.jsonl"),
                             tasks) if base == "shipped" else []
    rows = []
    for k in range(passes):
      rng = np.random.default_rng([int(teacher["seed"]), k, 1 if split else 0])
      rows += teacher_lib.teacher_records(rng, prompts, sft_rows, config, policy)[0]
    _write_if_changed(fileio.join(data_dir, f"feedback_sft{split}.jsonl"),
                      "".join(shipped) + "".join(json.dumps(r) + "\n" for r in rows))
    counts[f"records{split or '_train'}"] = len(shipped) + len(rows)
  return counts


def feedback_config(fb: Any, task_dir: str, *, init: str, sft_dir: str, init_dir: str,
                    tasks: str | Sequence[str] = "", data_dir: str = "",
                    teacher: Any = None) -> Any:
  """The feedback model's SFT config: ``fb`` on ``<task_dir>/feedback_sft[_test].jsonl`` (only the
  records of ``tasks``, copied into ``data_dir``, when ``tasks`` is given), started from the SFT
  run ``sft_dir`` (exported into ``init_dir``) when ``init="sft"``; with ``teacher`` (a section
  with ``passes`` >= 1, :func:`teacher_mixture`) the teacher writes the records into
  ``data_dir``: instead of the task's shipped mixture (``base="none"``) or added to it (or to its
  ``tasks`` subset; ``base="shipped"``). Multi-process: call it on every process; process 0
  writes the files, then the processes meet at a barrier."""
  from rlhf_jax import parallel  # pylint: disable=import-outside-toplevel
  if init not in INITS:
    raise ValueError(f"config.feedback_init={init!r} is invalid; allowed: {' | '.join(INITS)}")
  names = _task_names(tasks)
  fb = fb.copy_and_resolve_references()
  fb.data.train_jsonl = fileio.join(task_dir, "feedback_sft.jsonl")
  fb.data.eval_jsonl = fileio.join(task_dir, "feedback_sft_test.jsonl")
  use_teacher = teacher is not None and int(teacher.get("passes", 0)) > 0
  if use_teacher and names and teacher.get("base", "none") == "none":
    raise ValueError("config.feedback_tasks and config.feedback_teacher both given; allowed: one "
                     "of them (the teacher writes only the tasks in its weights), or "
                     "config.feedback_teacher.base=shipped (the teacher adds to those tasks)")
  if use_teacher:
    if not data_dir:
      raise ValueError("feedback_config: a teacher mixture needs a data_dir for its files")
    if parallel.is_coordinator():  # multi-process: one writer (the barrier below)
      teacher_mixture(task_dir, data_dir, teacher, names)
    fb.data.train_jsonl = fileio.join(data_dir, "feedback_sft.jsonl")
    fb.data.eval_jsonl = fileio.join(data_dir, "feedback_sft_test.jsonl")
  elif names:
    if not data_dir:
      raise ValueError("feedback_config: tasks given without a data_dir for the subset files")
    for key in ("train_jsonl", "eval_jsonl"):
      dst = fileio.join(data_dir, fileio.path(fb.data[key]).name)
      if parallel.is_coordinator():  # multi-process: one writer (the barrier below)
        task_subset(fb.data[key], dst, names)
      fb.data[key] = dst
  if init == "sft":
    if not fileio.isfile(fileio.join(sft_dir, "config.json")):
      raise FileNotFoundError(f"config.feedback_init='sft': {sft_dir!r} is not a finished SFT run "
                              "(run the sft stage first, or set config.feedback_init=scratch)")
    if fileio.is_remote(init_dir) or fileio.is_remote(sft_dir):
      # the export is a Hugging Face folder, written and read back (mmap) as local files
      raise ValueError(
          f"config.feedback_init='sft' on a remote workdir ({init_dir}): the SFT policy is "
          "exported as a Hugging Face folder, which is written and loaded as local files; use a "
          "local --workdir, config.feedback_init=scratch, or train the feedback model locally "
          "and pass config.sources.feedback_workdir")
    fb.sources.pretrained = _exported(sft_dir, init_dir)
  parallel.sync("feedback_config_written")  # every process reads the files process 0 wrote
  return fb


def exported_tokenizer(run_dir: str) -> str:
  """The tokenizer spec of the SFT run a feedback run ``run_dir`` started from, when it started from
  an export written here (``EXPORT_INFO`` in its ``sources.pretrained`` folder) of a run with the
  byte tokenizer; else '' (use the run's own tokenizer)."""
  from rlhf_jax import train  # pylint: disable=import-outside-toplevel
  config_path = fileio.join(run_dir, "config.json")
  if not fileio.isfile(config_path):
    return ""
  pretrained = (train.read_json(config_path).get("sources") or {}).get("pretrained") or ""
  if not pretrained:
    return ""
  info = fileio.join(train.runs.pretrained_path(pretrained), EXPORT_INFO)
  if not fileio.isfile(info):
    return ""
  spec = train.read_json(info).get("tokenizer", "")
  return spec if spec in ("byte", "bytes") else ""
