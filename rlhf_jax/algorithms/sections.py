"""The config vocabulary every method shares: ``sources``, ``data`` and ``limits`` sections.

Every experiment config composes the same three sections, so one concept has one key whatever the
method (``--config.sources.sft_workdir=...`` means the same thing for the RM, DPO and PPO):

* ``config.sources`` (:class:`Sources`) — the runs a stage starts from: the SFT run (policy
  init, and the frozen reference unless ``reference_workdir`` is set), a trained reward model, the
  run whose reward model initialises PPO's critic, and the tokenizer ('' = the SFT run's).
* ``config.data`` (:class:`DataSource`, or a method's subclass adding its own fields) — where
  the records come from (the synthetic task or JSONL files) and how they are batched.
* ``config.limits`` (:class:`Limits`) — token limits and padding buckets.
* ``config.lora`` (:class:`Lora`, optional) — LoRA adapters over a frozen base that the policy
  and its reference share (``models.lora``); off unless ``enabled``.

The validators at the bottom (:func:`check_int`, :func:`check_choice`, :func:`check_file`) make
every error name ``Class.field``, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar, Sequence

from rlhf_jax import fileio
from rlhf_jax.models import lora as lora_lib

DATA_SOURCES = ("synthetic", "jsonl")


def check_int(owner: str, name: str, value: Any, low: int, note: str = "") -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{owner}.{name}={value!r} is invalid; allowed: an int >= {low}{note}")


def check_choice(owner: str, name: str, value: Any, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ValueError(f"{owner}.{name}={value!r} is invalid; allowed: {' | '.join(allowed)}")


def check_file(owner: str, name: str, path: Any, required: bool, why: str = "") -> None:
  """``path`` must be an existing file (or '' when not ``required``)."""
  if not isinstance(path, str):
    raise ValueError(f"{owner}.{name}={path!r} is invalid; allowed: a path string")
  if (required or path) and not fileio.isfile(path):
    allowed = "an existing file" + (f" ({why})" if why else "")
    raise ValueError(f"{owner}.{name}={path!r} is invalid; allowed: {allowed}" +
                     ("" if required else " or ''"))


def check_dir(owner: str, name: str, path: Any) -> None:
  """``path`` must be '' or an existing directory."""
  if not isinstance(path, str):
    raise ValueError(f"{owner}.{name}={path!r} is invalid; allowed: a path string or ''")
  if path and not fileio.isdir(path):
    raise ValueError(f"{owner}.{name}={path!r} is invalid; allowed: an existing run directory or "
                     "'' (no such directory)")


@dataclasses.dataclass(frozen=True)
class Sources:
  """The runs a stage starts from (all optional; a method says which it needs).

  Attributes:
    sft_workdir: a finished SFT run: the policy (or the RM / critic backbone) starts from its
      latest checkpoint, and it is the frozen reference unless ``reference_workdir`` is set.
      Empty: a freshly initialised model of ``config.model`` (SFT itself, benchmarks, tests).
    reference_workdir: another run as the frozen reference ('' = ``sft_workdir``); it must have
      the policy's model config and tokenizer.
    reward_model_workdir: a trained reward model (``rlhf_jax.scoring.load_reward_model``).
    value_model_workdir: the reward model whose backbone and head initialise PPO's critic
      ('' = ``reward_model_workdir``).
    pretrained: a Hugging Face checkpoint folder (``hf:DIR`` or ``DIR``: config.json +
      safetensors, ``models.hf.load_pretrained``) the policy starts from instead of an SFT run:
      policy and frozen reference (SFT itself, the DPO family, PRO / RRHF, RAFT, best-of-n,
      PPO / GRPO / RLOO), the reward model's backbone under a new head (``rm.init=sft``) and
      the critic's with ``critic_init=sft``. Its tokenizer (and chat template) comes with it
      unless ``tokenizer`` is set; ``config.model`` may only set how it runs
      (``train.runs.PRETRAINED_RUNTIME_FIELDS``: dtype, param_dtype, scan_layers, remat_policy,
      dropout_rate). Exclusive with ``sft_workdir``; recorded in the run's fingerprint.
    tokenizer: ``data.tokenizers.load_tokenizer`` spec; '' = the tokenizer of ``sft_workdir``
      or ``pretrained`` (``byte`` when starting fresh). Given together with ``sft_workdir`` it
      must match it.
    attribute_weights: how a multi-output reward model's K outputs become one reward,
      r = Σ_k w_k r̃_k (``scoring.resolve_attribute_weights``): ``'name:w,name:w'`` naming every
      output once, or ``'mean'`` (1/K each); '' is allowed for a single-output RM only (a K > 1 RM
      without weights is an error, never a silent choice of head). The same reduction applies in
      training, selection and evaluation.
  """

  sft_workdir: str = ""
  reference_workdir: str = ""
  reward_model_workdir: str = ""
  value_model_workdir: str = ""
  tokenizer: str = ""
  attribute_weights: str = ""
  pretrained: str = ""

  def __post_init__(self):
    for name in ("sft_workdir", "reference_workdir", "reward_model_workdir", "value_model_workdir"):
      check_dir("Sources", name, getattr(self, name))
    if not isinstance(self.pretrained, str):
      raise ValueError(f"Sources.pretrained={self.pretrained!r} is invalid; allowed: '' or "
                       "hf:DIR (a Hugging Face checkpoint folder)")
    if self.pretrained:
      folder = self.pretrained[3:] if self.pretrained.startswith("hf:") else self.pretrained
      if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"Sources.pretrained={self.pretrained!r} is invalid; allowed: '' or "
                         "hf:DIR, a Hugging Face checkpoint folder with config.json and "
                         f"safetensors ({folder!r} has no config.json)")
      if self.sft_workdir:
        raise ValueError(f"Sources.pretrained={self.pretrained!r} and sft_workdir="
                         f"{self.sft_workdir!r} are both set; allowed: one of them (an SFT run "
                         "that started from the checkpoint already records it)")
    if not isinstance(self.tokenizer, str):
      raise ValueError(f"Sources.tokenizer={self.tokenizer!r} is invalid; allowed: a tokenizer "
                       "spec string (byte | hf:PATH | spm:PATH) or ''")
    if not isinstance(self.attribute_weights, str):
      raise ValueError(f"Sources.attribute_weights={self.attribute_weights!r} is invalid; allowed: "
                       "'' | 'mean' | 'name:weight,name:weight'")
    from rlhf_jax.scoring import reward_model  # pylint: disable=import-outside-toplevel
    try:
      reward_model.parse_attribute_weights(self.attribute_weights)
    except ValueError as err:
      raise ValueError(f"Sources.{err}") from None
    if self.reference_workdir and not (self.sft_workdir or self.pretrained):
      raise ValueError("Sources.reference_workdir is set but sft_workdir is empty; allowed: a "
                       "reference only together with the SFT run (or the pretrained "
                       "checkpoint) that initialises the policy")

  @property
  def policy(self) -> str:
    """Where the policy starts: the SFT run, ``hf:DIR`` of ``pretrained``, or '' (fresh)."""
    if self.sft_workdir:
      return self.sft_workdir
    if self.pretrained:
      return "hf:" + os.path.abspath(
          self.pretrained[3:] if self.pretrained.startswith("hf:") else self.pretrained)
    return ""

  @property
  def reference(self) -> str:
    """The frozen reference run ('' when the policy starts fresh)."""
    return self.reference_workdir or self.policy

  @property
  def value_model(self) -> str:
    """The reward-model run that initialises the critic."""
    return self.value_model_workdir or self.reward_model_workdir

  def require(self, name: str, method: str, why: str) -> str:
    """The value of ``name``, or a clear error saying what ``method`` needs it for."""
    value = getattr(self, name)
    if not value:
      raise ValueError(f"config.sources.{name} is empty; {method} needs it ({why})")
    return value


@dataclasses.dataclass(frozen=True)
class DataSource:
  """Where a method's records come from and how they are batched.

  Attributes:
    source: ``synthetic`` (the embedded task: the SFT run's ``<sft_workdir>/data/synthetic``, or
      ``synthetic_dir``, generated when missing) or ``jsonl`` (``train_jsonl`` / ``eval_jsonl``).
    synthetic_dir: a folder ``python -m rlhf_jax.data.synthetic --out DIR`` wrote ('' = default).
    train_jsonl, eval_jsonl: record files for ``source="jsonl"``.
    eval_prompts_jsonl: held-out prompts for the policy metrics ('' = the synthetic
      ``prompts_test.jsonl``, or the prompts of ``eval_jsonl``).
    synthetic_num_prompts, synthetic_num_test_prompts, synthetic_seed: size / seed of a generated task.
    batch_size: examples (sequences, pairs, lists or prompts) per optimiser step or iteration.
    shuffle_seed: seed of the per-epoch shuffling.
  """

  source: str = "synthetic"
  synthetic_dir: str = ""
  train_jsonl: str = ""
  eval_jsonl: str = ""
  eval_prompts_jsonl: str = ""
  synthetic_num_prompts: int = 4000
  synthetic_num_test_prompts: int = 500
  synthetic_seed: int = 0
  batch_size: int = 32
  shuffle_seed: int = 0

  # Files a subclass does not need with source='jsonl' (e.g. PPO reads prompts, eval is optional).
  OPTIONAL_JSONL: ClassVar[tuple] = ()

  def __post_init__(self):
    owner = type(self).__name__
    check_choice(owner, "source", self.source, DATA_SOURCES)
    if self.source == "jsonl":
      for name in ("train_jsonl", "eval_jsonl"):
        check_file(owner, name, getattr(self, name), required=name not in self.OPTIONAL_JSONL,
                   why="required with source='jsonl'")
    check_file(owner, "eval_prompts_jsonl", self.eval_prompts_jsonl, required=False)
    for name in ("synthetic_num_prompts", "synthetic_num_test_prompts", "batch_size"):
      check_int(owner, name, getattr(self, name), 1)
    check_int(owner, "shuffle_seed", self.shuffle_seed, 0)
    check_int(owner, "synthetic_seed", self.synthetic_seed, 0)

  def synthetic_task(self, **overrides: Any):
    """The ``data.synthetic_files.SyntheticConfig`` of the task these fields describe."""
    from rlhf_jax.data import synthetic_files  # pylint: disable=import-outside-toplevel
    return synthetic_files.SyntheticConfig(seed=self.synthetic_seed,
                                           num_prompts=self.synthetic_num_prompts,
                                           num_test_prompts=self.synthetic_num_test_prompts,
                                           **overrides)


@dataclasses.dataclass(frozen=True)
class Limits:
  """Token limits and padding buckets (one jit compile per bucket).

  Attributes:
    max_prompt_len: prompt tokens incl. BOS; longer prompts are cut from the left.
    max_response_len: response tokens incl. EOS; longer responses are cut from the right.
    buckets: allowed padded sequence lengths; () = powers of two up to the maximum.
    group_by_length: training batches drawn from length-sorted windows of this many batches
      (``data.batching.BatchIterator``; Hugging Face Trainer's ``group_by_length``): with fine
      buckets a batch pads to its own length range instead of to its longest random member.
      0 = off (every batch a uniform draw).
  """

  max_prompt_len: int = 32
  max_response_len: int = 48
  buckets: tuple = ()
  group_by_length: int = 0

  def __post_init__(self):
    check_int("Limits", "max_prompt_len", self.max_prompt_len, 2)
    check_int("Limits", "max_response_len", self.max_response_len, 2)
    check_int("Limits", "group_by_length", self.group_by_length, 0)
    object.__setattr__(self, "buckets", tuple(self.buckets))
    if self.buckets and (any(not isinstance(b, int) or b < 1 for b in self.buckets) or
                         max(self.buckets) < self.max_len):
      raise ValueError(
          f"Limits.buckets={self.buckets!r} is invalid; allowed: () or positive "
          f"lengths whose largest is >= max_prompt_len + max_response_len = {self.max_len}")

  @property
  def max_len(self) -> int:
    return self.max_prompt_len + self.max_response_len

  def check_model(self, max_seq_len: int) -> None:
    """The model must hold a whole sequence."""
    if self.max_len > max_seq_len:
      raise ValueError(f"config.limits.max_prompt_len + max_response_len = {self.max_len} exceeds "
                       f"the model's max_seq_len={max_seq_len}")


@dataclasses.dataclass(frozen=True)
class Lora(lora_lib.LoraConfig):
  """``config.lora``: LoRA adapters (``models.lora.LoraConfig``'s fields) plus ``enabled``.

  With ``enabled`` the method trains only adapters on the kernels ``targets`` selects
  (default: attention q/k/v/o and MLP up/gate/down), ``(x A) B · alpha / rank`` with B = 0 at
  step 0; the base stays frozen and is the reference (DPO family, PRO / RRHF, PPO's KL) from the
  same arrays; checkpoints hold the adapters and a fingerprint of the base.

  Attributes:
    enabled: train LoRA adapters instead of every weight.
  """

  enabled: bool = False

  def __post_init__(self):
    if not isinstance(self.enabled, bool):
      raise ValueError(f"Lora.enabled={self.enabled!r} is invalid; allowed: True | False")
    super().__post_init__()

  def config(self) -> lora_lib.LoraConfig | None:
    """The ``LoraConfig`` when enabled, else None."""
    if not self.enabled:
      return None
    return lora_lib.LoraConfig(
        **{f.name: getattr(self, f.name) for f in dataclasses.fields(lora_lib.LoraConfig)})


def lora_section(config: Any) -> Lora:
  """``config.lora`` as a :class:`Lora` (disabled when the config has no ``lora`` section)."""
  from rlhf_jax.train import config_dicts  # pylint: disable=import-outside-toplevel
  section = config.get("lora") if hasattr(config, "get") else None
  if section is None:
    return Lora()
  return config_dicts.to_dataclass(Lora, section, "lora")
