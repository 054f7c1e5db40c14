"""``ml_collections`` sections shared by every experiment config, and their conversion to dataclasses.

Experiment configs (``experiments/configs/*.py``) are ``ConfigDict`` s so that any value can be
overridden from the command line (``--config.optim.lr=1e-3``); the code that reaches jit takes
frozen, validated dataclasses. This module builds the default sections from the dataclasses'
own defaults (one source of truth) and converts them back with errors that name the config key::

    config.model = model_section("small")   # preset + every ModelConfig field as a typed None
    config.optim = dataclass_section(OptimConfig, lr=1e-3)
    ...
    optim = to_dataclass(OptimConfig, config.optim, "optim")
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping, Sequence, TypeVar

import ml_collections
from ml_collections import config_dict

T = TypeVar("T")


def dataclass_section(cls: type, **overrides: Any) -> ml_collections.ConfigDict:
  """A ``ConfigDict`` with every field of ``cls`` at its default (or ``overrides``)."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(fields)}")
  values = {}
  for name, field in fields.items():
    if name in overrides:
      values[name] = overrides[name]
    elif field.default is not dataclasses.MISSING:
      values[name] = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
      values[name] = field.default_factory()  # type: ignore[misc]
    else:
      raise ValueError(f"{cls.__name__}.{name} has no default; pass it as an override")
  return ml_collections.ConfigDict(values)


def to_dataclass(cls: type[T], section: Mapping[str, Any] | ml_collections.ConfigDict,
                 key: str) -> T:
  """``cls(**section)``, with unknown keys reported as ``config.<key>.<name>`` and the allowed keys.

  Value errors raised by ``cls.__post_init__`` are re-raised prefixed with the config key, so a
  command-line override that is out of range names the flag to fix.
  """
  values = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)
  allowed = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(values) - set(allowed))
  if unknown:
    raise ValueError(
        f"unknown config key(s) {[f'config.{key}.{u}' for u in unknown]}; allowed keys "
        f"of config.{key}: {allowed}")
  for name, value in values.items():  # ConfigDict stores tuples as tuples, lists as lists
    if isinstance(value, list):
      values[name] = tuple(value)
  try:
    return cls(**values)
  except (ValueError, TypeError) as err:
    raise ValueError(f"config.{key}: {err}") from err


def model_section(preset: str) -> ml_collections.ConfigDict:
  """``preset`` plus every ``ModelConfig`` field as a typed ``None`` (= keep the preset's value).

  Typed placeholders make ``--config.model.d_model=128`` work from the command line, while
  ``--config.model.preset=tiny`` still switches every other field to the new preset.
  """
  from rlhf_jax.models import ModelConfig, get_model_config  # pylint: disable=import-outside-toplevel

  reference = get_model_config(preset)
  values: dict[str, Any] = {"preset": preset}
  for field in dataclasses.fields(ModelConfig):
    value = getattr(reference, field.name)
    kind = type(value) if value is not None else int
    values[field.name] = config_dict.placeholder(kind)
  return ml_collections.ConfigDict(values)


def build_model_config(section: Mapping[str, Any] | ml_collections.ConfigDict):
  """The ``ModelConfig`` of a :func:`model_section`: the preset with the non-``None`` overrides."""
  from rlhf_jax.models import get_model_config  # pylint: disable=import-outside-toplevel

  values = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)
  preset = values.pop("preset", None)
  if preset is None:
    raise ValueError("config.model.preset is missing; allowed: a name in rlhf_jax.models.PRESETS")
  overrides = {
      k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if v is not None}
  try:
    return get_model_config(preset, **overrides)
  except (ValueError, TypeError) as err:
    raise ValueError(f"config.model: {err}") from err


def sibling_config(config_file: str, name: str, *args: Any) -> ml_collections.ConfigDict:
  """``get_config(*args)`` of the config file ``name``.py that sits next to ``config_file``.

  absl's ``config_flags`` loads a config file by path, without putting its folder on ``sys.path``,
  so a config that derives from another one (IPO from DPO, the pipeline from every stage) cannot
  simply ``import`` it; this loads the sibling by path instead.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config {name!r}: no file {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def set_dotted(section: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
  """``section[a][b]... = value`` for every ``"a.b...": value`` in ``values`` (experiment configs
  that derive their stages from the method configs)."""
  for key, value in values.items():
    *path, name = key.split(".")
    target = section
    for part in path:
      target = target[part]
    target[name] = value


def stage_loop(num_steps: int, evals: int = 1) -> dict[str, Any]:
  """Loop keys of one stage of a multi-stage experiment: ``evals`` evaluations (1 = only the
  final one), one checkpoint kept, progress every 15 s."""
  return {
      "loop.num_steps": num_steps, "loop.log_every": max(1, min(10, num_steps // 4)),
      "loop.eval_every": num_steps // evals if evals > 1 else 0, "loop.checkpoint_every": num_steps,
      "loop.keep_checkpoints": 1, "loop.progress_every_secs": 15.0}


def without_keys(config: ml_collections.ConfigDict,
                 keys: Sequence[str]) -> ml_collections.ConfigDict:
  """A copy of ``config`` without the top-level ``keys`` (locked again if ``config`` was)."""
  out = copy.deepcopy(config)
  with out.unlocked():
    for key in keys:
      if key in out:
        del out[key]
  if config.is_locked:
    out.lock()
  return out
