"""Export a finished run as a Hugging Face checkpoint, and import exported reward models back.

  python -m rlhf_jax.models.hf export --workdir=RUN --out=DIR [--dtype=float32] [--step=N]

* A policy run (SFT, the DPO family, PRO / RRHF, KTO, RAFT, PPO / GRPO / RLOO: anything
  ``train.load_sft_params`` reads; a PPO run's ``policy`` params) becomes a ``...ForCausalLM``
  folder (``hf.save_pretrained``: config.json, safetensors, the run's tokenizer files).
* A reward-model run (``<run>/reward_model/``) becomes a ``...ForSequenceClassification`` folder:
  the backbone under ``model.`` (``transformer.`` for GPT-2) and the head's kernel as
  ``score.weight [K, D]``, ``num_labels = K``, ``id2label`` = the output names, ``pad_token_id`` =
  the tokenizer's pad. transformers' ``score`` has no bias and reads the rightmost token that is not
  ``pad_token_id``; so its logits are ``r_k(x) - b_k`` at the last real token (when pad differs
  from every real token, e.g. not GPT-2's pad = EOS). The head bias b, the normalisation
  statistics (μ, σ), the output names and the training limits go to ``reward_model.json`` beside
  it; :func:`import_reward_model` (and ``scoring.load_reward_model`` on such a folder) restores the
  exact ``RewardModel``. A ``...ForSequenceClassification`` folder from elsewhere (e.g. TRL's
  ``RewardTrainer``) imports too, with b = 0, μ = 0, σ = 1.
* A byte-tokenizer run (the synthetic task) gets a ``tokenizer.json`` equal to the byte tokenizer
  (:func:`write_byte_tokenizer`: byte b -> id b + 3, ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2), so
  the exported folder loads in ``transformers.AutoTokenizer`` too.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

from rlhf_jax.models.hf import checkpoint, families

SCORE = "score.weight"
SCORE_FILE = "model-score.safetensors"
REWARD_INFO = "reward_model.json"  # scoring.reward_model.INFO_FILE, plus the head bias
_SEQ_CLS_KEYS = ("num_labels", "id2label", "label2id", "problem_type")


class ExportError(ValueError):
  """A run that cannot be exported (names the run and what is missing)."""


def _classification_arch(causal: str) -> str:
  return causal.replace("ForCausalLM", "").replace("LMHeadModel", "") + \
      "ForSequenceClassification"


def _causal_arch(classification: str) -> str:
  base = classification.replace("ForSequenceClassification", "")
  for arch in families.SUPPORTED_ARCHITECTURES:
    if arch.startswith(base) and arch in (base + "ForCausalLM", base + "LMHeadModel"):
      return arch
  raise checkpoint.HFCheckpointError(
      f"architecture {classification!r}: no supported causal-LM family {base}*; supported: "
      f"{[_classification_arch(a) for a in families.SUPPORTED_ARCHITECTURES]}")


# ----------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------


def write_byte_tokenizer(out: str) -> None:
  """``tokenizer.json`` + ``tokenizer_config.json`` that encode exactly as ``ByteTokenizer``.

  A byte-level BPE without merges: the ByteLevel pre-tokenizer maps each UTF-8 byte to one of
  GPT-2's 256 byte characters, whose vocabulary id is the byte + 3; the specials are added tokens.
  """
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  # GPT-2's byte -> character table (bytes_to_unicode; tokenizers exposes only the alphabet).
  bs = list(range(ord("!"),
                  ord("~") + 1)) + list(range(ord("¡"),
                                              ord("¬") + 1)) + list(range(ord("®"),
                                                                          ord("ÿ") + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  byte_char = {b: chr(c) for b, c in zip(bs, cs)}
  assert set(byte_char.values()) == set(alphabet)
  vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
  vocab.update({byte_char[b]: b + 3 for b in range(256)})
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([
      tokenizers.AddedToken(t, special=True, normalized=False) for t in ("<pad>", "<bos>", "<eos>")
  ])
  tok.save(os.path.join(out, "tokenizer.json"))
  checkpoint._write_json(  # pylint: disable=protected-access
      os.path.join(out, "tokenizer_config.json"), {
          "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
          "pad_token": "<pad>", "clean_up_tokenization_spaces": False})


def _tokenizer_source(spec: str) -> str | None:
  """What ``save_pretrained(tokenizer=...)`` copies for a ``load_tokenizer`` spec (None: byte)."""
  spec = (spec or "byte").strip()
  if spec in ("byte", "bytes"):
    return None
  kind, sep, rest = spec.partition(":")
  path = rest if sep and kind in ("hf", "huggingface") else spec
  if sep and kind in ("sentencepiece", "spm", "sp") or path.endswith(".model"):
    raise ExportError(f"tokenizer {spec!r}: a SentencePiece model has no tokenizer.json; export "
                      "the weights with --no_tokenizer and convert the tokenizer with transformers")
  return path


def _write_tokenizer(out: str, spec: str) -> None:
  src = _tokenizer_source(spec)
  if src is None:
    write_byte_tokenizer(out)
  else:
    checkpoint._copy_tokenizer(src, out)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------


def is_reward_run(workdir: str) -> bool:
  from rlhf_jax.scoring import reward_model  # pylint: disable=import-outside-toplevel
  return any(
      os.path.isfile(os.path.join(c, reward_model.INFO_FILE))
      for c in (os.path.join(workdir, reward_model.ARTIFACT_DIR), workdir))


def export_run(workdir: str, out: str, *, dtype: str | None = "float32", step: int | None = None,
               max_shard_size: int | str = "5GB", tokenizer: bool = True) -> dict[str, Any]:
  """Writes the run ``workdir`` as a Hugging Face folder ``out``; returns a summary dict."""
  if "://" in str(out):  # a remote-looking path would become a local folder named "gs:"
    raise ExportError(f"--out={out!r}: a Hugging Face folder is written as local files; export "
                      "to a local folder and copy it (e.g. gsutil -m cp -r)")
  if not os.path.isdir(workdir):
    raise ExportError(f"--workdir={workdir!r}: no such run directory")
  if is_reward_run(workdir):
    if step is not None:
      raise ExportError("--step applies to policy runs; a reward model exports its saved params")
    return export_reward_model(workdir, out, dtype=dtype, max_shard_size=max_shard_size,
                               tokenizer=tokenizer)
  from rlhf_jax import train  # pylint: disable=import-outside-toplevel
  from rlhf_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  # A LoRA run reads back merged (adapters folded into the base it trained over).
  ckpt = train.load_sft_params(workdir, step)
  arch = families.infer_architecture(ckpt.model_config)
  checkpoint.save_pretrained(out, ckpt.model_config, ckpt.params, dtype=dtype,
                             max_shard_size=max_shard_size, architecture=arch)
  spec = train.tokenizer_spec(ckpt_lib.read_json(os.path.join(workdir, "config.json")))
  if tokenizer:
    _write_tokenizer(out, spec)
  _write_generation_config(out, ckpt.tokenizer)
  return {
      "kind": "policy", "architecture": arch, "step": ckpt.step, "out": out,
      "tokenizer": spec if tokenizer else ""}


def _write_generation_config(out: str, tok: Any) -> None:
  path = os.path.join(out, "generation_config.json")
  if os.path.isfile(path):
    return  # the checkpoint's own (copied with its tokenizer files)
  checkpoint._write_json(
      path,
      {  # pylint: disable=protected-access
          "bos_token_id": int(tok.bos_id), "eos_token_id": int(tok.eos_id), "pad_token_id": int(
              tok.pad_id)})


def export_reward_model(workdir: str, out: str, *, dtype: str | None = "float32",
                        max_shard_size: int | str = "5GB", tokenizer: bool = True) -> dict:
  """A reward-model run as ``...ForSequenceClassification`` (module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  from rlhf_jax import scoring  # pylint: disable=import-outside-toplevel
  handle = scoring.load_reward_model(workdir)
  info, params = handle.info, jax.device_get(handle.params)
  config = info.model_config()
  arch = families.infer_architecture(config)
  # The head model's backbone has no lm_head: save it as a tied LM, then swap the LM head for the
  # classification head in config.json.
  checkpoint.save_pretrained(out, config.replace(tie_embeddings=True), params["backbone"],
                             dtype=dtype, max_shard_size=max_shard_size, architecture=arch)
  kernel_DxK = np.asarray(params["head"]["kernel"], np.float32)
  score_KxD = np.ascontiguousarray(kernel_DxK.T)
  if dtype is not None:
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    score_KxD = score_KxD.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  index_file = os.path.join(out, checkpoint.INDEX_FILE)
  if os.path.isfile(index_file):  # sharded: the head is one more shard in the index
    save_file({SCORE: score_KxD}, os.path.join(out, SCORE_FILE), metadata={"format": "pt"})
    with open(index_file) as f:
      index = json.load(f)
    index["weight_map"][SCORE] = SCORE_FILE
    index.setdefault(
        "metadata",
        {})["total_size"] = int(index.get("metadata", {}).get("total_size", 0) + score_KxD.nbytes)
    checkpoint._write_json(index_file, index)  # pylint: disable=protected-access
  else:  # one file (transformers reads model.safetensors before any index): add the head to it
    single = os.path.join(out, checkpoint.SINGLE_FILE)
    tensors = load_file(single)
    tensors[SCORE] = score_KxD
    save_file(tensors, single + ".tmp", metadata={"format": "pt"})
    os.replace(single + ".tmp", single)
    del tensors
  hf_config = checkpoint.read_config(out)
  tok = handle.tokenizer
  hf_config.update({
      "architectures": [_classification_arch(arch)], "tie_word_embeddings": config.tie_embeddings,
      "num_labels": info.num_outputs,
      "id2label": {str(i): n for i, n in enumerate(info.output_names)},
      "label2id": {n: i for i, n in enumerate(info.output_names)}, "pad_token_id": int(tok.pad_id)})
  checkpoint._write_json(os.path.join(out, "config.json"), hf_config)  # pylint: disable=protected-access
  extra = info.to_json()
  extra["head_bias"] = [float(b) for b in np.asarray(params["head"]["bias"], np.float32)]
  checkpoint._write_json(os.path.join(out, REWARD_INFO), extra)  # pylint: disable=protected-access
  if tokenizer:
    _write_tokenizer(out, info.tokenizer_spec)
  _write_generation_config(out, tok)
  return {
      "kind": "reward_model", "architecture": _classification_arch(arch), "step": info.step,
      "out": out, "tokenizer": info.tokenizer_spec if tokenizer else ""}


# ----------------------------------------------------------------------------------------------------
# Import of ...ForSequenceClassification folders
# ----------------------------------------------------------------------------------------------------


def is_classification_checkpoint(path: str) -> bool:
  """``path`` is a Hugging Face ``...ForSequenceClassification`` folder."""
  path = checkpoint._strip(path)  # pylint: disable=protected-access
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    return False
  try:
    with open(file) as f:
      archs = json.load(f).get("architectures") or []
  except (OSError, json.JSONDecodeError):
    return False
  return bool(archs) and str(archs[0]).endswith("ForSequenceClassification")


def _causal_view_config(d: dict) -> dict:
  causal = {k: v for k, v in d.items() if k not in _SEQ_CLS_KEYS}
  causal["architectures"] = [_causal_arch(d["architectures"][0])]
  causal["tie_word_embeddings"] = True  # the backbone has no lm_head of its own
  return causal


def _read_extra(path: str) -> dict:
  extra_file = os.path.join(path, REWARD_INFO)
  if not os.path.isfile(extra_file):
    return {}
  with open(extra_file) as f:
    return json.load(f)


def reward_info(path: str, *, tokenizer_spec: str = ""):
  """The ``scoring.RewardModelInfo`` of a ``...ForSequenceClassification`` folder (no weights
  read): ``reward_model.json`` when the folder was exported from here, else b = 0, μ = 0, σ = 1,
  one output per label, limits of half the context each, the folder's tokenizer."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from rlhf_jax.data import tokenizers as tok_lib  # pylint: disable=import-outside-toplevel
  from rlhf_jax.scoring import reward_model as rm_lib  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(checkpoint._strip(path))  # pylint: disable=protected-access
  d = checkpoint.read_config(path)
  if not is_classification_checkpoint(path):
    raise checkpoint.HFCheckpointError(
        f"{path}/config.json: architectures={d.get('architectures')}; expected a "
        "...ForSequenceClassification reward model")
  extra = _read_extra(path)
  config = families.config_from_hf(_causal_view_config(d), source=os.path.join(path, "config.json"),
                                   dtype="float32", param_dtype="float32")
  if "model" in extra:
    config = config.replace(tie_embeddings=bool(extra["model"].get("tie_embeddings", True)))
  k = int(d.get("num_labels") or len(d.get("id2label") or {}) or 1)
  has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer.json"))
  spec = tokenizer_spec or ("hf:" + path if has_tokenizer else extra.get("tokenizer_spec", ""))
  if not spec:
    raise FileNotFoundError(f"{path}: no tokenizer.json; pass the reward model's tokenizer")
  tok = tok_lib.load_tokenizer(spec)
  names = extra.get("output_names") or (["reward"] if k == 1 else [
      (d.get("id2label") or {}).get(str(i), f"LABEL_{i}") for i in range(k)])
  return rm_lib.RewardModelInfo(
      model=dataclasses.asdict(config), output_names=tuple(names), tokenizer_spec=spec,
      tokenizer_fingerprint=tok.fingerprint(),
      max_prompt_len=int(extra.get("max_prompt_len", config.max_seq_len // 2)),
      max_response_len=int(extra.get("max_response_len", config.max_seq_len // 2)),
      mean=tuple(extra.get("mean", [0.0] * k)), std=tuple(extra.get("std", [1.0] * k)),
      normalization=extra.get("normalization",
                              {}), objective=extra.get("objective",
                                                       ""), step=int(extra.get("step", 0)))


def import_reward_model(path: str, *, mesh: Any = None, tokenizer_spec: str = ""):
  """``(scoring.RewardModelInfo, params)`` of a ``...ForSequenceClassification`` folder.

  The backbone is read by ``load_pretrained`` (lazy, born sharded on ``mesh``) through a view of the
  folder (its config.json as the causal LM, an index without ``score.weight``; links, no copies);
  the head is ``score.weight`` transposed plus the bias of ``reward_model.json`` (0 without it).
  """
  path = os.path.abspath(checkpoint._strip(path))  # pylint: disable=protected-access
  info = reward_info(path, tokenizer_spec=tokenizer_spec)
  index = checkpoint.tensor_index(path)
  if SCORE not in index:
    raise checkpoint.HFCheckpointError(f"{path}: no {SCORE!r} tensor (the classification head)")
  with tempfile.TemporaryDirectory(prefix="rm-view-") as view:
    checkpoint._write_json(  # pylint: disable=protected-access
        os.path.join(view, "config.json"), _causal_view_config(checkpoint.read_config(path)))
    for file in sorted({f for f, _, _ in index.values()}):
      os.symlink(file, os.path.join(view, os.path.basename(file)))
    checkpoint._write_json(  # pylint: disable=protected-access
        os.path.join(view, checkpoint.INDEX_FILE), {
            "metadata": {}, "weight_map": {
                name: os.path.basename(f) for name, (f, _, _) in index.items() if name != SCORE}})
    _, backbone = checkpoint.load_pretrained(view, mesh=mesh, param_dtype="float32")
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(index[SCORE][0], framework="numpy") as f:
    score_KxD = np.asarray(f.get_tensor(SCORE), np.float32)
  if score_KxD.shape[0] != info.num_outputs:
    raise checkpoint.HFCheckpointError(
        f"{index[SCORE][0]}: {SCORE} has {score_KxD.shape[0]} rows but config.json says "
        f"num_labels={info.num_outputs}")
  bias_K = np.asarray(_read_extra(path).get("head_bias", [0.0] * info.num_outputs), np.float32)
  params = {"backbone": backbone, "head": {"kernel": score_KxD.T.copy(), "bias": bias_K}}
  return info, params


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
  p.add_argument("--workdir", required=True, help="a finished run (policy or reward model)")
  p.add_argument("--out", required=True, help="the Hugging Face folder to write")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                 help="stored dtype of the weights")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--max_shard_size", default="5GB")
  p.add_argument("--no_tokenizer", action="store_true", help="weights and config only")


def run_export(args: Any) -> int:
  import sys  # pylint: disable=import-outside-toplevel
  try:
    summary = export_run(args.workdir, args.out, dtype=args.dtype, step=args.step,
                         max_shard_size=args.max_shard_size, tokenizer=not args.no_tokenizer)
  except (ExportError, checkpoint.HFCheckpointError, families.HFConfigError, FileNotFoundError,
          ValueError) as err:
    print(f"export: {err}", file=sys.stderr)
    return 2
  print(f"exported {summary['kind']} ({summary['architecture']}, step {summary['step']}) to "
        f"{summary['out']}")
  return 0
