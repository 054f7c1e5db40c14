"""Readers and writers of finished runs: what a later stage needs from an earlier one.

* :func:`load_sft_params` — params, model config and tokenizer of a policy run's checkpoint
  (an SFT run, or any run written by the one loop with a ``model`` fingerprint, e.g. a PPO run,
  whose ``policy`` params are returned).
  ``"hf:DIR"`` (a Hugging Face checkpoint folder, ``sources.pretrained``) is read the same way:
  :func:`load_pretrained_policy` (``models.hf.load_pretrained`` + the folder's tokenizer).
* :func:`tokenizer_spec` — the tokenizer a run was trained with, from its ``config.json`` (its
  ``sources.tokenizer``, else its ``sources.pretrained`` checkpoint's, else that of the run it
  started from, ``sources.sft_workdir``).
* :func:`pretrained_fingerprint` — what a run's fingerprint records of ``sources.pretrained``.
* :data:`FINAL_METRICS_FILE` / :func:`write_final_metrics` / :func:`is_finished` — a run is
  finished once its ``final_metrics.json`` exists (written atomically, last).
* :func:`run_or_reuse` — one stage of a multi-stage launcher (``experiments/rlaif.py``,
  ``cai.py``), reused when finished; multi-process safe (agreed reuse and outcome, process 0
  writes).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Mapping, NamedTuple

from rlhf_jax import cli, fileio
from rlhf_jax import models, parallel
from rlhf_jax.data import tokenizers as tok_lib
from rlhf_jax.train import checkpoint as ckpt_lib
from rlhf_jax.train import signals

logger = logging.getLogger(__name__)

FINAL_METRICS_FILE = "final_metrics.json"


def is_finished(workdir: str) -> bool:
  return fileio.isfile(fileio.join(workdir, FINAL_METRICS_FILE))


def write_final_metrics(workdir: str, final: Mapping[str, Any], method: str = "") -> dict:
  """Writes ``<workdir>/final_metrics.json`` atomically and logs a one-line summary."""
  final = dict(final)
  ckpt_lib.atomic_write_json(fileio.join(workdir, FINAL_METRICS_FILE), final)
  if method:
    logger.info(
        "%s finished: %s", method,
        ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
  return final


PRETRAINED_PREFIX = "hf:"
# ModelConfig fields a run may set for a pretrained checkpoint (how it runs, not what it computes).
PRETRAINED_RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "dropout_rate")


def pretrained_path(spec: str) -> str:
  """The folder of a ``sources.pretrained`` spec (``hf:DIR`` or ``DIR``), absolute (a URL as is)."""
  spec = os.fspath(spec)
  return fileio.absolute(
      spec[len(PRETRAINED_PREFIX):] if spec.startswith(PRETRAINED_PREFIX) else spec)


def is_pretrained(source: str) -> bool:
  """``source`` names a Hugging Face checkpoint (``hf:DIR``) rather than a run workdir."""
  return isinstance(source, str) and source.startswith(PRETRAINED_PREFIX)


def pretrained_tokenizer_spec(spec: str) -> str:
  """``hf:DIR`` when the checkpoint folder carries a ``tokenizer.json``, else ''."""
  path = pretrained_path(spec)
  return PRETRAINED_PREFIX + path if fileio.isfile(fileio.join(path, "tokenizer.json")) else ""


def tokenizer_spec(run_config: Mapping[str, Any], _seen: tuple = ()) -> str:
  """The tokenizer spec a run used: ``sources.tokenizer``; else the tokenizer of its
  ``sources.pretrained`` checkpoint; else (older runs) ``data.tokenizer``; else that of the run
  it started from (``sources.sft_workdir``, followed recursively); else ``byte``."""
  sources = run_config.get("sources") or {}
  spec = sources.get("tokenizer") or (run_config.get("data") or {}).get("tokenizer")
  if sources.get("pretrained") and spec in ("byte", "bytes"):
    spec = ""  # SFT's default: the checkpoint's own (load_pretrained_policy)
  if spec:
    return spec
  if sources.get("pretrained"):
    spec = pretrained_tokenizer_spec(sources["pretrained"])
    if spec:
      return spec
  parent = sources.get("sft_workdir") or ""
  parent_config = fileio.join(parent, "config.json") if parent else ""
  if parent_config and fileio.isfile(parent_config) and fileio.absolute(parent) not in _seen:
    return tokenizer_spec(ckpt_lib.read_json(parent_config), _seen + (fileio.absolute(parent),))
  return "byte"


def pretrained_fingerprint(spec: str) -> dict:
  """``{"pretrained": {"path", "config_sha256"}}`` for a run's fingerprint ({} when ``spec`` is
  ''): a run resumed against another checkpoint (or an edited config.json) is refused."""
  if not spec:
    return {}
  path = pretrained_path(spec)
  digest = hashlib.sha256(fileio.read_bytes(fileio.join(path, "config.json"))).hexdigest()[:16]
  return {"pretrained": {"path": path, "config_sha256": digest}}


def load_pretrained_policy(spec: str, *, mesh: Any = None, tokenizer: str = "",
                           model_overrides: Mapping[str, Any] | None = None) -> "SFTCheckpoint":
  """A Hugging Face checkpoint folder as an :class:`SFTCheckpoint` (``step`` 0).

  ``model_overrides`` may set :data:`PRETRAINED_RUNTIME_FIELDS` only (the architecture is the
  checkpoint's). Defaults: ``param_dtype="float32"`` (the trained master weights), ``dtype`` =
  the checkpoint's stored dtype (its ``config.json`` ``dtype`` / ``torch_dtype``), e.g. bfloat16
  compute for a bfloat16 checkpoint. The tokenizer is ``tokenizer`` (a ``load_tokenizer`` spec)
  or the folder's own ('' or ``byte``, SFT's default); one whose ids exceed the embedding rows is
  refused.
  """
  from rlhf_jax.models import hf  # pylint: disable=import-outside-toplevel
  path = pretrained_path(spec)
  overrides = dict(model_overrides or {})
  bad = sorted(set(overrides) - set(PRETRAINED_RUNTIME_FIELDS))
  if bad:
    raise ValueError(
        f"config.model.{bad[0]}={overrides[bad[0]]!r} cannot change the architecture of the "
        f"pretrained checkpoint {path}; allowed with sources.pretrained: "
        f"{' | '.join(PRETRAINED_RUNTIME_FIELDS)} (leave the others unset)")
  stored = next((v for v in (hf.read_config(path).get(k)
                             for k in ("dtype", "torch_dtype")) if v in models.DTYPES), "float32")
  param_dtype = overrides.pop("param_dtype", None) or "float32"
  dtype = overrides.pop("dtype", None) or stored
  scan_layers = bool(overrides.pop("scan_layers", False))
  config, params = hf.load_pretrained(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype,
                                      scan_layers=scan_layers)
  if overrides:
    config = config.replace(**overrides)
  # 'byte' is SFT's default spec, never a checkpoint's tokenizer (its ids would index embedding
  # rows of other tokens): with a pretrained checkpoint it means "the checkpoint's own".
  spec = tokenizer if tokenizer not in ("byte", "bytes") else ""
  spec = spec or pretrained_tokenizer_spec(path)
  if not spec:
    raise FileNotFoundError(
        f"{path} has no tokenizer.json; set config.sources.tokenizer to the checkpoint's "
        "tokenizer (hf:DIR of a folder with tokenizer.json, or a .model SentencePiece file)")
  tok = tok_lib.load_tokenizer(spec)
  tok_lib.check_vocab(tok, config.vocab_size, where=f"the checkpoint {path}")
  return SFTCheckpoint(params=params, model_config=config, tokenizer=tok, step=0)


class SFTCheckpoint(NamedTuple):
  params: Any
  model_config: models.ModelConfig
  tokenizer: tok_lib.Tokenizer
  step: int


def load_sft_params(workdir: str, step: int | None = None, **pretrained_kwargs) -> SFTCheckpoint:
  """Params, model config and tokenizer of an SFT run's checkpoint (default: the latest step).

  The model config comes from the run's ``run_fingerprint.json`` and the tokenizer from its
  ``config.json``, so ``Transformer(ckpt.model_config).apply({"params": ckpt.params}, ...)`` and
  ``ckpt.tokenizer`` reproduce the SFT policy exactly. ``workdir="hf:DIR"`` reads a Hugging Face
  checkpoint instead (:func:`load_pretrained_policy`, which takes ``pretrained_kwargs``).
  """
  if is_pretrained(workdir):
    return load_pretrained_policy(workdir, **pretrained_kwargs)
  needed = (ckpt_lib.FINGERPRINT_FILE, "config.json")
  missing = [name for name in needed if not fileio.isfile(fileio.join(workdir, name))]
  if missing:
    raise FileNotFoundError(
        f"{workdir!r} is not an SFT run's workdir (missing {', '.join(missing)}): train one with "
        "`python experiments/run.py --config=experiments/configs/sft_synthetic.py "
        f"--workdir={workdir}` or point the config's sources.sft_workdir at one")
  fingerprint = ckpt_lib.read_json(fileio.join(workdir, ckpt_lib.FINGERPRINT_FILE))
  run_config = ckpt_lib.read_json(fileio.join(workdir, "config.json"))
  model_config = models.ModelConfig(
      **{k: tuple(v) if isinstance(v, list) else v for k, v in fingerprint["model"].items()})
  spec = tokenizer_spec(run_config)
  tokenizer = tok_lib.load_tokenizer(spec)
  if tokenizer.fingerprint() != fingerprint["tokenizer"]:
    raise ckpt_lib.WorkdirMismatchError(
        f"{workdir}: tokenizer {spec!r} now has fingerprint "
        f"{tokenizer.fingerprint()}, the run used {fingerprint['tokenizer']}")
  step = ckpt_lib.latest_step(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir!r}: the SFT run saved no checkpoint yet; finish it first "
                            "(rerunning its `python experiments/run.py --config=... "
                            f"--workdir={workdir}` resumes it)")
  params = ckpt_lib.restore_params(workdir, step)
  # A run whose state holds several models keeps the policy under "policy" (PPO: policy + value),
  # so a later stage (iterated RLHF's next round) can start from it like from an SFT run.
  if isinstance(params, dict) and "policy" in params:
    params = params["policy"]
  if "lora" in fingerprint:  # a LoRA run: its adapters merged into the base it trained over
    params = _merged_lora_params(workdir, run_config, fingerprint["lora"], params)
  return SFTCheckpoint(params=params, model_config=model_config, tokenizer=tokenizer,
                       step=int(step))


def _merged_lora_params(workdir: str, run_config: Mapping[str, Any], lora_fp: Mapping[str, Any],
                        saved: Any) -> Any:
  """W + A·B·alpha/r of a LoRA run (``models.lora.merge``) over its base, the run's
  ``sources.pretrained`` or ``sources.sft_workdir``, which must still be the very same base."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from rlhf_jax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
  sources = run_config.get("sources") or {}
  base_src = sources.get("pretrained") or sources.get("sft_workdir") or ""
  if base_src and sources.get("pretrained") and not is_pretrained(base_src):
    base_src = f"hf:{base_src}"
  if not base_src:
    raise FileNotFoundError(f"{workdir!r} is a LoRA run but its config.json names no base "
                            "(sources.sft_workdir / sources.pretrained)")
  kwargs = {}
  if sources.get("pretrained"):  # loaded as the run loaded it: its tokenizer and runtime fields
    model = run_config.get("model") or {}
    kwargs = {
        "tokenizer": sources.get("tokenizer") or "",
        "model_overrides": {k: v for k, v in model.items() if k != "preset" and v is not None}}
  base = load_sft_params(base_src, **kwargs).params
  got = lora_lib.base_fingerprint(base)
  if got != lora_fp.get("base"):
    raise ckpt_lib.WorkdirMismatchError(
        f"{workdir}: its LoRA adapters were trained over the base {base_src!r} with fingerprint "
        f"{lora_fp.get('base')}, which now has fingerprint {got}; the adapters need that very base")
  names = [f.name for f in dataclasses.fields(lora_lib.LoraConfig)]
  config = lora_lib.LoraConfig(**{k: lora_fp[k] for k in names if k in lora_fp})
  return lora_lib.merge(lora_lib.LoraParams(base=base, lora=saved["lora"]), config)


STAGE_NAMESPACE = "rlhf_jax/stages"  # run_or_reuse's keys in the coordination service
FAILED_FINAL_FILE = "final_metrics.failed.json"
_STOPPED = "stopped"  # the outcome a stopped (SIGTERM) stage publishes: every process stops
_STAGE_CALLS = itertools.count()  # every process calls run_or_reuse in the same order


def set_aside_failed(final_path: str) -> None:
  """Renames a failed stage's ``final_metrics.json`` (when it left one) to
  ``final_metrics.failed.json`` beside it, so a rerun does not take the stage as finished; call
  it on process 0 only (the one writer)."""
  if fileio.exists(final_path):
    fileio.rename(final_path, fileio.join(fileio.parent(final_path), FAILED_FINAL_FILE))


class StageFailed(RuntimeError):
  """A stage failed on another process of the job (this one finished it): the peer's one line."""


def run_or_reuse(name: str, root: str, fn: Callable[[str], Mapping[str, Any] | None]) -> dict:
  """One stage of a multi-stage experiment (``experiments/rlaif.py``, ``cai.py``): ``fn(<root>/<name>)``
  returns the stage's final metrics, written atomically to its ``final_metrics.json`` with
  ``_seconds``; a stage whose folder already holds that file finished earlier and is reused.

  Multi-process (every process calls it with the same stages in the same order):

  * "finished earlier?" is process 0's answer (``parallel.agree``), so every process takes the
    same branch even while a file is being written;
  * ``fn`` runs on every process (a training stage over the global mesh; a stage whose work is
    process 0's alone, e.g. labelling, returns None on the others after joining the collective
    restores), then every process's outcome is agreed through ``parallel.agree_outcome``: failed
    on one = failed on all (this process re-raises its own error, a peer raises
    :class:`StageFailed` with the first failure); process 0 then renames a
    ``final_metrics.json`` the failed stage left to ``final_metrics.failed.json`` so a rerun
    does not take it as finished; a stop (SIGTERM) on any process stops every process;
  * process 0 alone writes ``final_metrics.json`` (from its own ``fn`` result), the processes meet
    at a barrier, and every process returns that file's content: the same dict everywhere.

  A peer that does not report its outcome in time (stuck in a collective, dead) ends this process
  at once with status 1 (``parallel.AgreementTimeout`` logged): its exit fails the collectives
  the peers wait in.
  """
  workdir = fileio.join(root, name)
  final_path = fileio.join(workdir, FINAL_METRICS_FILE)
  multi = parallel.process_count() > 1
  # numbered: a launcher that runs the same stage name twice in one job gets fresh keys / barriers
  call = next(_STAGE_CALLS)
  parallel.sync(f"stage_{call}_{name}")
  if parallel.agree(is_finished(workdir)):  # process 0's answer: one branch everywhere
    logger.info("[%s] finished earlier, reusing %s", name, workdir)
    return ckpt_lib.read_json(final_path)
  logger.info("[%s] running in %s", name, workdir)
  start = time.time()
  final, error, failed = None, None, None
  try:
    out = fn(workdir)
    if out is None and parallel.is_coordinator():
      raise ValueError(f"stage {name}: its function returned no final metrics on process 0")
    # NumPy scalars in a stage's metrics are written as plain floats.
    final = None if out is None else json.loads(json.dumps(dict(out), default=float))
    if (final or {}).get("preempted") or signals.stop_requested() is not None:
      failed = _STOPPED
  except Exception as err:  # pylint: disable=broad-except  (agreed with the peers, then re-raised)
    if not multi:
      raise
    error, failed = err, f"failed: {type(err).__name__}: {err}"[:200]
  if multi:
    try:
      failed = parallel.agree_outcome(f"{call}/{name}", failed, namespace=STAGE_NAMESPACE)
    except parallel.AgreementTimeout as err:
      logger.error("[%s] %s", name, err)
      cli.quiet_exit(1)  # now, not at jax's shutdown barrier: our exit unblocks the peers
  if failed is not None:
    if failed.startswith(_STOPPED):
      # A stopped stage is not finished: no final_metrics.json, so the rerun resumes it from its
      # last checkpoint instead of reusing a partial run, and no later stage starts on it.
      raise signals.Interrupted(signals.stop_requested() or signal.SIGTERM)
    if parallel.is_coordinator():
      set_aside_failed(final_path)
    raise error if error is not None else StageFailed(f"stage {name}: {failed}")
  if parallel.is_coordinator():
    final["_seconds"] = round(time.time() - start, 1)
    ckpt_lib.atomic_write_json(final_path, final)
  parallel.sync(f"stage_{call}_{name}_written")
  final = ckpt_lib.read_json(final_path)
  logger.info("[%s] done in %s", name, format_duration(final["_seconds"]))
  return final


def format_duration(seconds: float) -> str:
  """``"7m05s"``: the wall / CPU times launchers print."""
  minutes, secs = divmod(int(seconds), 60)
  return f"{minutes}m{secs:02d}s"
