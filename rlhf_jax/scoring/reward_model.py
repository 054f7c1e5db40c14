"""Scoring API of trained reward models: what PPO, RAFT, best-of-n, PRO lists and evaluation call.

    handle = load_reward_model("workdirs/rm_synthetic", policy_tokenizer=tok, mesh=mesh)
    rewards_B = score(handle, out.prompt_tokens, out.prompt_mask,
                      out.response_tokens_BxR, out.response_mask_BxR)       # jax.Array [B]
    rewards_B = score_texts(handle, tok, prompts, responses)                 # np.ndarray [B]

A reward model maps a sequence ``x = [BOS] prompt response`` to K float32 outputs read at the
last real token (``models.RewardModel``). Every score is

    r̃_k(x, y) = (r_k(x, y) - μ_k) / σ_k                 (normalise; ``normalize=False`` skips it)
    r(x, y)    = Σ_k w_k r̃_k(x, y)                       (reduce the K outputs to one reward)

where μ_k, σ_k are the mean and standard deviation of r_k over responses sampled from the SFT model
(computed once after training, stored with the checkpoint), so a reward of +1 means "one standard
deviation better than a typical SFT sample" whatever the RM's arbitrary offset and scale.

The reduction (the attribute weights w) is explicit and the same everywhere: it is resolved once
when the handle is made (``attribute_weights=``, from ``config.sources.attribute_weights``) and every
function below applies it. A K = 1 model needs none (w = (1,)); for K > 1 weights must be given
(``"helpful:1,harmless:0.5"``, a ``{name: w}`` mapping, K numbers, or ``"mean"`` = 1/K each), and
asking a K > 1 handle without weights for a reward is an error naming the outputs: picking head 0,
or averaging, silently would be a choice the user never made. ``per_attribute=True`` returns the
normalised ``[B, K]`` outputs instead of the reduced ``[B]``.

The sequence rule — one rule for every caller, training, selection and evaluation alike: a
response is scored **as given**, i.e. exactly the tokens the policy produced: with its EOS when it
stopped, without one when it was cut at the token budget. No EOS the policy never emitted is
appended. Why: the RM reads the last real token, so appending an EOS to a cut response scores a
different sequence (a finished one) than the policy wrote and than PPO / RAFT / best-of-n rank
(measured 0.17 vs 0.90 for the same response); a cut response is a different (usually worse)
thing, and ranking it as if it had finished would reward not stopping. Penalising unfinished
responses is a separate, explicit choice (PPO's ``missing_eos_penalty``, RAFT's ``require_eos``).

* Token path (:func:`score`): the sampler's left-padded prompt (with BOS) and right-padded response
  (with EOS iff it stopped), concatenated exactly like ``SampleOutput.full_sequences``; real tokens
  are contiguous and positions come from the mask, so this is the training layout.
* Text path (:func:`score_texts`): ``finished[i]`` says whether response i ended (default: yes, a
  text handed in as a response is complete, like the RM's training data). A finished response is
  ``[BOS] prompt response [EOS]`` (prompt cut from the left to ``max_prompt_len - 1`` ids, response
  from the right to ``max_response_len - 1``); an unfinished one gets no EOS and keeps up to
  ``max_response_len`` ids. For the same response the two paths build the same ids, so they give
  the same score; evaluation of sampled responses uses the token path itself (no decode / re-encode
  round trip, which is lossy for invalid UTF-8).

Sharding and batching: params are restored directly onto ``mesh`` with the same logical-axis rules
as the policy (``parallel.logical_shardings``), the batch is split over the mesh's batch axes, and
rows are processed in chunks of ``batch_size`` (the last chunk padded with zero-mask rows, so one
compile per sequence length). ``reward_fn(handle)`` is the pure, jit-able function underneath for
callers that want to fuse scoring into their own jitted step; :func:`rewards_from_raw` is the
normalise-and-reduce step alone (PPO's jitted scoring phase uses it).

On-disk layout (``<rm workdir>/reward_model/``, written atomically by :func:`save_reward_model`):
``reward_model.json`` (model config, K and output names, tokenizer spec + fingerprint, length
limits, normalisation statistics, objective, step) and ``params/`` (orbax). A LoRA reward model
(``config.lora``) stores only ``{"lora": adapters, "trained": {"head"}}`` in ``params/`` and, in
``reward_model.json``'s ``lora``, its LoRA config, the frozen backbone's source (the SFT run or
``hf:`` checkpoint) and that backbone's ``models.lora.base_fingerprint``: :func:`load_reward_model`
reads the backbone again, refuses one with another fingerprint, and merges W + A·B·alpha/r, so the
handle holds a plain param tree like any other reward model's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax import fileio, models, parallel
from rlhf_jax.data import tokenizers as tok_lib

ARTIFACT_DIR = "reward_model"
INFO_FILE = "reward_model.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


class TokenizerMismatchError(ValueError):
  """The policy's tokenizer is not the one the reward model was trained with."""


@dataclasses.dataclass(frozen=True)
class RewardModelInfo:
  """Everything besides the params that scoring needs (``reward_model.json``).

  Attributes:
    model: ``ModelConfig`` fields of the backbone.
    output_names: names of the K outputs (``("reward",)`` or the attribute names).
    tokenizer_spec, tokenizer_fingerprint: ``load_tokenizer`` spec and the fingerprint it had.
    max_prompt_len, max_response_len: training limits (BOS / EOS included); ``score_texts`` uses them.
    mean, std: per-output normalisation statistics (μ_k, σ_k); identity (0, 1) before normalisation.
    normalization: how they were measured (number of samples, source, temperature).
    objective: the training objective name; step: optimiser steps of the saved params.
    lora: ``{}`` for a fully trained RM; for a LoRA RM its ``LoraConfig`` fields, ``base`` (the
      frozen backbone's fingerprint), ``base_source`` (``train.load_sft_params`` spec of the run
      or ``hf:`` checkpoint it is read from) and ``base_kwargs`` (its load keywords).
  """

  model: Mapping[str, Any]
  output_names: tuple[str, ...]
  tokenizer_spec: str
  tokenizer_fingerprint: str
  max_prompt_len: int
  max_response_len: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  normalization: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  objective: str = ""
  step: int = 0
  lora: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  format_version: int = FORMAT_VERSION

  def __post_init__(self):
    object.__setattr__(self, "output_names", tuple(self.output_names))
    object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
    object.__setattr__(self, "std", tuple(float(s) for s in self.std))
    k = len(self.output_names)
    if k < 1:
      raise ValueError(
          "RewardModelInfo.output_names is empty; allowed: one name per output (K >= 1)")
    if len(self.mean) != k or len(self.std) != k:
      raise ValueError(f"RewardModelInfo.mean/std have {len(self.mean)}/{len(self.std)} entries; "
                       f"allowed: K = {k} (one per output)")
    if not all(np.isfinite(self.mean)) or not all(s > 0 and np.isfinite(s) for s in self.std):
      raise ValueError(f"RewardModelInfo: mean={self.mean}, std={self.std}; allowed: finite means "
                       "and finite stds > 0")

  @property
  def num_outputs(self) -> int:
    return len(self.output_names)

  def model_config(self) -> models.ModelConfig:
    return models.ModelConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in self.model.items()})

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_json(cls, obj: Mapping[str, Any]) -> "RewardModelInfo":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in obj.items() if k in fields})


@dataclasses.dataclass(frozen=True, eq=False)
class RewardModelHandle:
  """A loaded reward model: params (placed on ``mesh``), model, tokenizer and statistics."""

  info: RewardModelInfo
  model: models.RewardModel
  params: Any  # {"backbone": ..., "head": ...}, unboxed, sharded on `mesh`
  tokenizer: tok_lib.Tokenizer
  mesh: Mesh
  rules: tuple
  batch_size: int  # rows per jitted call, a multiple of batch_ways
  batch_ways: int  # devices the batch dimension is split over
  # w of the K -> 1 reduction (module docstring); None: K > 1 and no weights were given.
  attribute_weights: tuple[float, ...] | None = None
  _score_jit: Callable = dataclasses.field(repr=False, default=None)

  @property
  def num_outputs(self) -> int:
    return self.info.num_outputs

  @property
  def output_names(self) -> tuple[str, ...]:
    return self.info.output_names


# ----------------------------------------------------------------------------------------------------
# Saving / loading
# ----------------------------------------------------------------------------------------------------


def save_reward_model(workdir: str, params: Any, info: RewardModelInfo) -> str:
  """Writes ``<workdir>/reward_model/`` (params + ``reward_model.json``) atomically; returns its path.

  The artifact is assembled in a temporary sibling and swapped in (``fileio.replace_dir``:
  ``os.replace`` locally; on an object store ``reward_model.json`` is copied last), so a reader
  sees either the previous complete artifact or the new one.
  """
  from rlhf_jax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
  if lora_lib.is_lora(params) != bool(info.lora):
    raise ValueError("save_reward_model: LoRA params need info.lora (and info.lora LoRA params)")
  if lora_lib.is_lora(params):  # the adapters and the head; the backbone is info.lora's source
    params = {"lora": params.lora, "trained": params.trained}
  final = fileio.join(fileio.absolute(workdir), ARTIFACT_DIR)
  # Multi-process: one temporary folder (process 0's pid) that orbax saves into collectively;
  # process 0 writes the info file and swaps the folder in, the others wait for it.
  tmp = f"{final}.tmp-{parallel.agree(os.getpid())}"
  if parallel.is_coordinator():
    fileio.rmtree(tmp)
    fileio.makedirs(tmp)
  parallel.sync("reward_model_tmp_made")
  params = parallel.to_host(nn.meta.unbox(params))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(fileio.path(fileio.join(tmp, PARAMS_DIR)), params)
    ckptr.wait_until_finished()

  def publish():
    fileio.atomic_write_json(fileio.join(tmp, INFO_FILE), info.to_json())
    fileio.replace_dir(tmp, final, marker=INFO_FILE)

  parallel.write_on_coordinator(publish, barrier="reward_model_saved")
  return final


def read_reward_model_info(workdir: str) -> RewardModelInfo:
  """The ``reward_model.json`` of an RM workdir (or of its ``reward_model/`` folder), or the info
  of a Hugging Face ``...ForSequenceClassification`` folder (``models.hf.export.reward_info``)."""
  from rlhf_jax.models.hf import export as hf_export  # pylint: disable=import-outside-toplevel
  if hf_export.is_classification_checkpoint(workdir):
    return hf_export.reward_info(workdir)
  folder = _artifact_dir(workdir)
  obj = fileio.read_json(fileio.join(folder, INFO_FILE))
  if obj.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{folder}: format_version={obj.get('format_version')!r}; this code reads "
                     f"{FORMAT_VERSION}")
  return RewardModelInfo.from_json(obj)


def _artifact_dir(workdir: str) -> str:
  for candidate in (fileio.join(workdir, ARTIFACT_DIR), workdir):
    if fileio.isfile(fileio.join(candidate, INFO_FILE)):
      return fileio.absolute(candidate)
  raise FileNotFoundError(
      f"no trained reward model under {workdir!r} ({ARTIFACT_DIR}/{INFO_FILE} is missing); train "
      "one with `python experiments/run.py --config=experiments/configs/rm_synthetic.py "
      "--workdir=...` (it is written when training and normalisation finish)")


def check_tokenizer(info: RewardModelInfo, tokenizer: tok_lib.Tokenizer,
                    what: str = "policy") -> None:
  """Raises :class:`TokenizerMismatchError` unless ``tokenizer`` has the RM's fingerprint."""
  if tokenizer.fingerprint() != info.tokenizer_fingerprint:
    raise TokenizerMismatchError(
        f"the {what} tokenizer {tokenizer!r} has fingerprint {tokenizer.fingerprint()}, but the reward "
        f"model was trained with {info.tokenizer_spec!r} (fingerprint {info.tokenizer_fingerprint}); "
        "the same ids would mean different text. Train the reward model from an SFT run that uses "
        "the policy's tokenizer.")


def default_mesh() -> Mesh:
  """A 1-device mesh (the default when no mesh is given): this process's first device, so every
  process of a multi-process job holds its own copy (``jax.devices()[0]`` is process 0's)."""
  return parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=1, tensor=1),
                            devices=jax.local_devices()[:1])


def param_shardings(model: models.RewardModel, mesh: Mesh,
                    rules: Sequence = parallel.DEFAULT_RULES) -> Any:
  """``NamedSharding`` tree of the RM's params on ``mesh`` (the policy's logical rules)."""
  return parallel.logical_shardings(models.abstract_variables(model), mesh, rules)["params"]


def place_params(params: Any, model: models.RewardModel, mesh: Mesh,
                 rules: Sequence = parallel.DEFAULT_RULES) -> Any:
  """Puts an (unboxed) RM param tree onto ``mesh`` with the policy's sharding rules."""
  return parallel.device_put_global(nn.meta.unbox(params), param_shardings(model, mesh, rules))


def load_reward_model(workdir: str, *, policy_tokenizer: tok_lib.Tokenizer | None = None,
                      mesh: Mesh | None = None, rules: Sequence = parallel.DEFAULT_RULES,
                      batch_size: int = 64,
                      attribute_weights: AttributeWeights = None) -> RewardModelHandle:
  """Loads ``<workdir>/reward_model`` onto ``mesh`` (default: one device).

  Args:
    workdir: an RM run directory (or its ``reward_model/`` folder), or a Hugging Face
      ``...ForSequenceClassification`` folder (``python -m rlhf_jax.models.hf export`` of an RM
      run, or e.g. TRL's RewardTrainer output: ``models.hf.export.import_reward_model``).
    policy_tokenizer: if given, must have the fingerprint the RM was trained with
      (:class:`TokenizerMismatchError` otherwise).
    mesh, rules: where the params live; use the policy's mesh and rules to shard them alike.
    batch_size: rows per jitted call in :func:`score` / :func:`score_texts` (rounded up to a
      multiple of the mesh's batch-axis size).
    attribute_weights: the K -> 1 reduction (:func:`resolve_attribute_weights`); '' / None is
      fine for K = 1 and leaves a K > 1 handle without a scalar reward.
  """
  if not (isinstance(batch_size, int) and batch_size >= 1):
    raise ValueError(f"load_reward_model: batch_size={batch_size!r}; allowed: an int >= 1")
  from rlhf_jax.models.hf import export as hf_export  # pylint: disable=import-outside-toplevel
  if hf_export.is_classification_checkpoint(workdir):  # an exported / transformers reward model
    mesh = mesh or default_mesh()
    info, params = hf_export.import_reward_model(workdir, mesh=mesh)
    if policy_tokenizer is not None:
      check_tokenizer(info, policy_tokenizer)
    return make_handle(info, params, mesh=mesh, rules=rules, batch_size=batch_size,
                       attribute_weights=attribute_weights)
  info = read_reward_model_info(workdir)
  tokenizer = tok_lib.load_tokenizer(info.tokenizer_spec)
  check_tokenizer(info, tokenizer, what=f"stored spec {info.tokenizer_spec!r} now gives a")
  if policy_tokenizer is not None:
    check_tokenizer(info, policy_tokenizer)
  mesh = mesh or default_mesh()
  model = models.RewardModel(info.model_config(), num_outputs=info.num_outputs)
  if info.lora:
    params = _merged_lora_params(workdir, info, model, mesh, rules)
  else:
    shardings = param_shardings(model, mesh, rules)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            models.abstract_params(model), shardings)
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(fileio.path(fileio.join(_artifact_dir(workdir), PARAMS_DIR)), abstract)
  return make_handle(info, params, mesh=mesh, rules=rules, batch_size=batch_size,
                     tokenizer=tokenizer, attribute_weights=attribute_weights)


def lora_base(backbone_params: Any) -> dict:
  """A LoRA reward model's frozen base: ``{"backbone": the LM's params without lm_head}`` (the
  same arrays, not copied)."""
  return {"backbone": models.with_backbone({"head": None}, backbone_params)["backbone"]}


def _merged_lora_params(workdir: str, info: RewardModelInfo, model: models.RewardModel, mesh: Mesh,
                        rules: Sequence) -> Any:
  """A LoRA RM's params merged over its backbone (module docstring), as a plain param tree."""
  # pylint: disable=import-outside-toplevel  (train reads runs; it never imports scoring)
  from rlhf_jax import train
  from rlhf_jax.models import lora as lora_lib
  meta = dict(info.lora)
  source = meta.get("base_source") or ""
  if not source:
    raise ValueError(f"{_artifact_dir(workdir)}: a LoRA reward model without lora.base_source")
  kwargs = dict(meta.get("base_kwargs") or {})
  if train.runs.is_pretrained(source):
    kwargs["mesh"] = mesh
  base = lora_base(train.load_sft_params(source, **kwargs).params)
  got = lora_lib.base_fingerprint(base)
  if got != meta.get("base"):
    raise ValueError(
        f"{_artifact_dir(workdir)}: its LoRA adapters were trained over the backbone {source!r} "
        f"with fingerprint {meta.get('base')}, which now has fingerprint {got}; the adapters need "
        "that very backbone (retrain the reward model, or restore that run)")
  names = [f.name for f in dataclasses.fields(lora_lib.LoraConfig)]
  config = lora_lib.LoraConfig(**{k: meta[k] for k in names if k in meta})
  lm = lora_lib.LoraModel(model, config, trained=("head",))
  shardings = lora_lib.param_shardings(lm, mesh, rules, param_shardings(model, mesh, rules))
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          lora_lib.abstract_params(lm), shardings)
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.restore(fileio.path(fileio.join(_artifact_dir(workdir), PARAMS_DIR)),
                          {"lora": abstract.lora, "trained": abstract.trained})
  return lora_lib.merge(
      lora_lib.LoraParams(base=base, lora=saved["lora"], trained=saved["trained"]), config)


def make_handle(info: RewardModelInfo, params: Any, *, mesh: Mesh | None = None,
                rules: Sequence = parallel.DEFAULT_RULES, batch_size: int = 64,
                tokenizer: tok_lib.Tokenizer | None = None,
                attribute_weights: AttributeWeights = None) -> RewardModelHandle:
  """A handle around in-memory params (e.g. right after training, before saving)."""
  weights = _optional_weights(info, attribute_weights)
  mesh = mesh or default_mesh()
  model = models.RewardModel(info.model_config(), num_outputs=info.num_outputs)
  params = place_params(params, model, mesh, rules)
  if tokenizer is None:
    tokenizer = tok_lib.load_tokenizer(info.tokenizer_spec)
  check_tokenizer(info, tokenizer, what="given")
  ways = int(np.prod([mesh.shape[a] for a in _as_tuple(parallel.batch_axes(rules))]))
  batch_size = -(-batch_size // ways) * ways
  data = parallel.data_sharding(mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  pure = _raw_fn(model)

  def run(params_, tokens_BxT, mask_BxT):
    with parallel.use_mesh(mesh, rules):
      return jitted(params_, tokens_BxT, mask_BxT)

  jitted = jax.jit(pure, in_shardings=(param_shardings(model, mesh, rules), data, data),
                   out_shardings=replicated)
  return RewardModelHandle(info=info, model=model, params=params, tokenizer=tokenizer, mesh=mesh,
                           rules=tuple(rules), batch_size=batch_size, batch_ways=ways,
                           attribute_weights=weights, _score_jit=run)


def _as_tuple(axes) -> tuple:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


# ----------------------------------------------------------------------------------------------------
# The K -> 1 reduction
# ----------------------------------------------------------------------------------------------------

# '' / None, "mean", "name:w,name:w", {name: w}, or K numbers in output order.
AttributeWeights = str | Mapping[str, float] | Sequence[float] | None


def parse_attribute_weights(spec: str) -> dict[str, float] | str:
  """``"helpful:1,harmless:0.5"`` -> ``{"helpful": 1.0, "harmless": 0.5}``; ``"mean"`` / '' as is.

  The config form (a string, so it can be set from the command line); raises ``ValueError`` on a
  malformed spec without needing the reward model.
  """
  spec = spec.strip()
  if spec in ("", "mean"):
    return spec
  out: dict[str, float] = {}
  for part in spec.split(","):
    name, sep, value = part.partition(":")
    name = name.strip()
    try:
      weight = float(value)
    except ValueError:
      weight = None
    if not sep or not name or weight is None or not np.isfinite(weight) or name in out:
      raise ValueError(
          f"attribute_weights={spec!r} is invalid at {part!r}; allowed: '' (a single-"
          "output RM), 'mean', or 'name:weight,name:weight' with each output name once")
    out[name] = weight
  return out


def resolve_attribute_weights(info: RewardModelInfo,
                              weights: AttributeWeights) -> tuple[float, ...]:
  """The weight vector w (one entry per output, in ``info.output_names`` order).

  ``weights``: '' / None (allowed only for K = 1: w = (1,)), ``"mean"`` (1/K each), a
  ``"name:w,..."`` string or ``{name: w}`` mapping naming every output exactly once, or K numbers.
  """
  names, k = info.output_names, info.num_outputs
  if isinstance(weights, str):
    weights = parse_attribute_weights(weights)
  if weights is None or (isinstance(weights, (str, Mapping, tuple, list)) and len(weights) == 0):
    if k == 1:
      return (1.0,)
    raise ValueError(
        f"the reward model has K={k} outputs {names}; a scalar reward needs explicit weights: set "
        f"config.sources.attribute_weights, e.g. {','.join(f'{n}:1' for n in names)!r} (or 'mean')")
  if weights == "mean":
    return tuple(1.0 / k for _ in names)
  if isinstance(weights, Mapping):
    if set(weights) != set(names):
      raise ValueError(f"attribute_weights names {sorted(weights)}; allowed: exactly the reward "
                       f"model's outputs {list(names)}")
    return tuple(float(weights[n]) for n in names)
  w = tuple(float(x) for x in weights)
  if len(w) != k:
    raise ValueError(f"attribute_weights has {len(w)} entries; allowed: {k}, one weight per output "
                     f"{names}")
  return w


def _optional_weights(info: RewardModelInfo, weights: AttributeWeights) -> tuple[float, ...] | None:
  """Resolved weights, or None for a K > 1 model given none (an error only once a reward is asked)."""
  empty = weights is None or (isinstance(weights, str) and not weights.strip())
  if empty and info.num_outputs > 1:
    return None
  return resolve_attribute_weights(info, weights)


def rewards_from_raw(raw_BxK: jax.Array, mean_K: jax.Array, std_K: jax.Array,
                     weights_K: jax.Array | None) -> jax.Array:
  """Σ_k w_k (r_k - μ_k) / σ_k ([B]), or the normalised ``[B, K]`` when ``weights_K`` is None.

  Pure and jit-able (μ, σ, w may be traced); float32 whatever the head's dtype.
  """
  r_BxK = (raw_BxK.astype(jnp.float32) - mean_K) / std_K
  if weights_K is None:
    return r_BxK
  return jnp.einsum("bk,k->b", r_BxK, jnp.asarray(weights_K, jnp.float32))


# ----------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------


def _raw_fn(model: models.RewardModel) -> Callable:

  def raw(params, tokens_BxT, mask_BxT):
    return model.apply({"params": params}, tokens_BxT, mask_BxT)  # [B, K] float32

  return raw


def normalize_rewards(raw_BxK: jax.Array, info: RewardModelInfo) -> jax.Array:
  """(r - μ) / σ per output, float32."""
  return rewards_from_raw(raw_BxK, jnp.asarray(info.mean, jnp.float32),
                          jnp.asarray(info.std, jnp.float32), None)


def _weights(handle: RewardModelHandle, attribute_weights: AttributeWeights,
             per_attribute: bool) -> tuple[float, ...] | None:
  if per_attribute:
    if attribute_weights is not None:
      raise ValueError("per_attribute=True returns the K outputs; attribute_weights does not apply")
    return None
  if attribute_weights is not None:
    return resolve_attribute_weights(handle.info, attribute_weights)
  if handle.attribute_weights is None:
    resolve_attribute_weights(handle.info, None)  # raises: K > 1 without weights
  return handle.attribute_weights


def _finish(raw_BxK: jax.Array, info: RewardModelInfo, normalize: bool,
            weights: tuple[float, ...] | None) -> jax.Array:
  k = info.num_outputs
  mean_K = jnp.asarray(info.mean if normalize else (0.0,) * k, jnp.float32)
  std_K = jnp.asarray(info.std if normalize else (1.0,) * k, jnp.float32)
  return rewards_from_raw(raw_BxK, mean_K, std_K, None if weights is None else jnp.asarray(weights))


def reward_fn(handle: RewardModelHandle, *, normalize: bool = True,
              attribute_weights: AttributeWeights = None, per_attribute: bool = False) -> Callable:
  """Pure ``f(params, tokens_BxT, mask_BxT) -> rewards`` ([B], or [B, K] with ``per_attribute``)
  for use inside jit.

  ``params`` is ``handle.params`` (passed explicitly so it is not baked in as a constant).
  """
  raw = _raw_fn(handle.model)
  info = handle.info
  weights = _weights(handle, attribute_weights, per_attribute)

  def f(params, tokens_BxT, mask_BxT):
    return _finish(raw(params, tokens_BxT, mask_BxT), info, normalize, weights)

  return f


def score_sequences(handle: RewardModelHandle, tokens_BxT: Any, mask_BxT: Any, *,
                    normalize: bool = True, attribute_weights: AttributeWeights = None,
                    per_attribute: bool = False) -> jax.Array:
  """Rewards of full sequences ``[BOS] prompt response`` (any padding; mask 1 = real token).

  Returns ``[B]`` float32 (the handle's reduction, or ``attribute_weights`` for this call), or the
  normalised ``[B, K]`` with ``per_attribute=True``.
  """
  weights = _weights(handle, attribute_weights, per_attribute)
  if not isinstance(tokens_BxT, jax.Array):
    tokens_BxT, mask_BxT = np.asarray(tokens_BxT), np.asarray(mask_BxT)
    tok_lib.check_token_ids(tokens_BxT[np.asarray(mask_BxT) > 0], handle.info.model["vocab_size"],
                            where="score tokens")
  if tokens_BxT.ndim != 2 or tuple(tokens_BxT.shape) != tuple(np.shape(mask_BxT)):
    raise ValueError(
        f"tokens {tuple(tokens_BxT.shape)} and mask {tuple(np.shape(mask_BxT))} must both "
        "be [B, T]")
  b = tokens_BxT.shape[0]
  if b == 0:
    raise ValueError("score: empty batch (B = 0)")
  # Full chunks of batch_size rows; a smaller batch is padded only to the mesh's batch ways.
  chunk = handle.batch_size if b >= handle.batch_size else _round_up(b, handle.batch_ways)
  xp = jnp if isinstance(tokens_BxT, jax.Array) else np
  data = parallel.data_sharding(handle.mesh, handle.rules)
  outs = []
  for start in range(0, b, chunk):
    tok = tokens_BxT[start:start + chunk].astype(xp.int32)
    msk = mask_BxT[start:start + chunk].astype(xp.int32)
    n = tok.shape[0]
    if n < chunk:  # pad with empty rows (mask 0): one compiled shape per sequence length
      tok = xp.pad(tok, ((0, chunk - n), (0, 0)))
      msk = xp.pad(msk, ((0, chunk - n), (0, 0)))
    raw = handle._score_jit(handle.params, jax.device_put(tok, data), jax.device_put(msk, data))
    outs.append(raw[:n])
  raw_BxK = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
  return _finish(raw_BxK, handle.info, normalize, weights)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def score(handle: RewardModelHandle, prompt_tokens_BxP: Any, prompt_mask_BxP: Any,
          response_tokens_BxR: Any, response_mask_BxR: Any, *, normalize: bool = True,
          attribute_weights: AttributeWeights = None, per_attribute: bool = False) -> jax.Array:
  """Rewards of (prompt, response) token batches, e.g. a sampler's ``SampleOutput`` fields.

  Prompts carry their BOS (``batching.encode_prompts`` / prompt datasets do); responses are scored
  as given: with EOS when generation stopped, without when it was cut (module docstring).
  Returns ``[B]``, or ``[B, K]`` with ``per_attribute=True``.
  """
  if np.shape(prompt_tokens_BxP)[0] != np.shape(response_tokens_BxR)[0]:
    raise ValueError(f"score: {np.shape(prompt_tokens_BxP)[0]} prompts but "
                     f"{np.shape(response_tokens_BxR)[0]} responses")
  cat = jnp.concatenate if isinstance(prompt_tokens_BxP, jax.Array) else np.concatenate
  tokens = cat([prompt_tokens_BxP, response_tokens_BxR], axis=1)
  mask = cat([prompt_mask_BxP, response_mask_BxR], axis=1)
  return score_sequences(handle, tokens, mask, normalize=normalize,
                         attribute_weights=attribute_weights, per_attribute=per_attribute)


def encode_pairs(tokenizer: tok_lib.Tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
                 max_prompt_len: int, max_response_len: int,
                 finished: Sequence[bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``[BOS] prompt response [EOS]`` right-padded to the longest row: ``(tokens, mask)`` int32.

  Prompts keep their last ``max_prompt_len - 1`` ids. A finished response (``finished[i]``, default
  all) keeps its first ``max_response_len - 1`` ids and gets the EOS; an unfinished one keeps up
  to ``max_response_len`` ids and gets none (the module docstring's rule), so text scores match
  what the RM was trained on and what the token path scores.
  """
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
  finished = [True] * len(responses) if finished is None else [bool(f) for f in finished]
  if len(finished) != len(responses):
    raise ValueError(f"{len(finished)} finished flags but {len(responses)} responses")
  rows = []
  for i, (p_ids, r_ids) in enumerate(
      zip(tokenizer.encode_batch(list(prompts)), tokenizer.encode_batch(list(responses)))):
    p_ids = list(p_ids)[max(0, len(p_ids) - (max_prompt_len - 1)):]
    end = [tokenizer.eos_id] if finished[i] else []
    r_ids = list(r_ids)[:max_response_len - len(end)]
    tok_lib.check_token_ids(p_ids + r_ids, tokenizer.vocab_size, where=f"pair {i}")
    rows.append([tokenizer.bos_id] + p_ids + r_ids + end)
  length = max(len(r) for r in rows)
  tokens = np.full((len(rows), length), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return tokens, mask


def score_texts(handle: RewardModelHandle, tokenizer: tok_lib.Tokenizer | None,
                prompts: Sequence[str], responses: Sequence[str], *,
                finished: Sequence[bool] | None = None, normalize: bool = True,
                attribute_weights: AttributeWeights = None, per_attribute: bool = False,
                pad_to: int | None = None) -> np.ndarray:
  """Rewards of text pairs as a host ``np.ndarray`` ([B], or [B, K] with ``per_attribute``).

  ``finished[i]``: whether response i ended (gets the EOS); default all (complete responses, as
  in datasets and comparisons). ``tokenizer`` (the caller's, e.g. the policy's) must match the
  RM's fingerprint; ``None`` uses the RM's own. Rows are padded to ``pad_to`` (default:
  ``max_prompt_len + max_response_len``) so every call compiles one shape.
  """
  if len(prompts) == 0:
    raise ValueError("score_texts: no prompts given")
  if tokenizer is not None:
    check_tokenizer(handle.info, tokenizer, what="given")
  info = handle.info
  tokens, mask = encode_pairs(handle.tokenizer, prompts, responses,
                              max_prompt_len=info.max_prompt_len,
                              max_response_len=info.max_response_len, finished=finished)
  width = pad_to or (info.max_prompt_len + info.max_response_len)
  if tokens.shape[1] < width:
    pad = ((0, 0), (0, width - tokens.shape[1]))
    tokens = np.pad(tokens, pad, constant_values=handle.tokenizer.pad_id)
    mask = np.pad(mask, pad)
  out = score_sequences(handle, tokens, mask, normalize=normalize,
                        attribute_weights=attribute_weights, per_attribute=per_attribute)
  return np.asarray(jax.device_get(out))


def sample_reward_fn(handle: RewardModelHandle) -> Callable[..., np.ndarray]:
  """``(prompt_tokens_BxP, prompt_mask_BxP, response_tokens_BxR, response_mask_BxR) -> [B]`` host
  rewards through :func:`score`: the evaluator's reward of sampled responses (the same rule and
  reduction as training and selection, no text round trip)."""

  def fn(prompt_tokens_BxP, prompt_mask_BxP, response_tokens_BxR, response_mask_BxR):
    return np.asarray(
        jax.device_get(
            score(handle, prompt_tokens_BxP, prompt_mask_BxP, response_tokens_BxR,
                  response_mask_BxR)), np.float32)

  return fn
