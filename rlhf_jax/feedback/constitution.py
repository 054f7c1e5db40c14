"""A constitution: principles, each a critique request and a revision request (Bai et al., 2022).

A constitution FILE is one JSON object::

    {"name": "synthetic", "description": "...",
     "principles": [{"name": "harm",
                     "critique": "Point out anything harmful in the answer.",
                     "revision": "Rewrite the answer without anything harmful."}, ...]}

``principles`` must be a non-empty list; each principle needs non-empty string ``critique`` and
``revision`` fields (``name`` is optional; it defaults to ``principle_<i>``). One principle is
sampled per critique/revision step (:meth:`Constitution.sample`). Errors name the file and the
field (``FILE: field 'principles[3].revision': ...``).

The critique / revision **texts** the feedback model reads and writes are rendered here, so the
teacher's training data (:mod:`.teacher`) and the SL-CAI loop (:mod:`.cai`) use the same strings::

    critique_prompt(x, y, p) = "Request: {x}\\nAnswer: {y}\\nCritique request: {p.critique}\\nCritique: "
    revision_prompt(x, y, p, c) = critique_prompt(x, y, p) + c
                                  + "\\nRevision request: {p.revision}\\nRevision: "

The model's continuation of the first is the critique ``c``, of the second the revised answer.
Shipped: ``rlhf_jax/feedback/constitutions/synthetic.json`` (16 principles, our wording).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

from rlhf_jax.feedback import templates as tmpl

__all__ = [
    "CONSTITUTION_DIR", "Principle", "Constitution", "ConstitutionError",
    "default_constitution_path", "load_constitution", "constitution_from_dict", "critique_prompt",
    "revision_prompt"]

CONSTITUTION_DIR = os.path.join(os.path.dirname(__file__), "constitutions")
_PRINCIPLE_KEYS = ("name", "critique", "revision")


class ConstitutionError(tmpl.TemplateError):
  """A malformed constitution file; ``str(e)`` reads ``FILE: field 'F': expected X, got Y`` (the
  template files' error, so both kinds of feedback file report alike)."""


@dataclasses.dataclass(frozen=True)
class Principle:
  name: str
  critique: str  # the critique request
  revision: str  # the revision request


@dataclasses.dataclass(frozen=True)
class Constitution:
  name: str
  principles: tuple[Principle, ...]
  source: str = "<constitution>"

  def sample(self, rng: np.random.Generator) -> Principle:
    """One principle, uniformly (the paper samples one per critique/revision step)."""
    return self.principles[int(rng.integers(len(self.principles)))]


def default_constitution_path(name: str = "synthetic") -> str:
  path = os.path.join(CONSTITUTION_DIR, name if name.endswith(".json") else name + ".json")
  if not os.path.isfile(path):
    shipped = sorted(f[:-5] for f in os.listdir(CONSTITUTION_DIR) if f.endswith(".json"))
    raise FileNotFoundError(f"no shipped constitution {name!r}; allowed: {' | '.join(shipped)} "
                            "or the path of a constitution JSON file")
  return path


def load_constitution(path: str = "synthetic") -> Constitution:
  """Reads and validates a constitution file (a shipped name such as ``"synthetic"`` also works)."""
  if not os.path.isfile(path) and os.sep not in path and not path.endswith(".json"):
    path = default_constitution_path(path)
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise FileNotFoundError(f"constitution file {path!r} does not exist") from None
  if not text.strip():
    raise ConstitutionError(path, "<file>", "a JSON object with a 'principles' list (the file is "
                            "empty)")
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise ConstitutionError(path, "<file>",
                            f"one JSON object ({e.msg} at line {e.lineno})") from None
  return constitution_from_dict(obj, source=path)


def constitution_from_dict(obj: Mapping[str, Any], source: str = "<constitution>") -> Constitution:
  """Validates a constitution given as a dict (``source`` names it in errors)."""
  if not isinstance(obj, Mapping):
    raise ConstitutionError(source, "<file>", "a JSON object", type(obj).__name__)
  unknown = sorted(set(obj) - {"name", "description", "principles"})
  if unknown:
    raise ConstitutionError(source, unknown[0], "one of the fields name | description | principles")
  raw = obj.get("principles")
  if raw is None:
    raise ConstitutionError(source, "principles", "a non-empty list (the field is missing)")
  if not isinstance(raw, list) or not raw:
    raise ConstitutionError(source, "principles", "a non-empty list of principles", raw)
  principles = []
  for i, p in enumerate(raw):
    where = f"principles[{i}]"
    if not isinstance(p, Mapping):
      raise ConstitutionError(source, where, "an object with 'critique' and 'revision'", p)
    extra = sorted(set(p) - set(_PRINCIPLE_KEYS))
    if extra:
      raise ConstitutionError(source, f"{where}.{extra[0]}", "one of name | critique | revision")
    for key in ("critique", "revision"):
      if key not in p:
        raise ConstitutionError(source, f"{where}.{key}",
                                "a non-empty string (the field is missing)")
      if not isinstance(p[key], str) or not p[key].strip():
        raise ConstitutionError(source, f"{where}.{key}", "a non-empty string", p[key])
    name = p.get("name", f"principle_{i}")
    if not isinstance(name, str) or not name:
      raise ConstitutionError(source, f"{where}.name", "a non-empty string", name)
    principles.append(Principle(name, p["critique"].strip(), p["revision"].strip()))
  names = [p.name for p in principles]
  if len(set(names)) != len(names):
    dup = next(n for n in names if names.count(n) > 1)
    raise ConstitutionError(source, "principles", f"distinct names ({dup!r} repeats)")
  return Constitution(str(obj.get("name", "")), tuple(principles), source)


def critique_prompt(prompt: str, response: str, principle: Principle) -> str:
  """The text whose continuation is the critique of ``response`` under ``principle``."""
  return (f"Request: {prompt}\nAnswer: {response}\nCritique request: {principle.critique}\n"
          "Critique: ")


def revision_prompt(prompt: str, response: str, principle: Principle, critique: str) -> str:
  """The text whose continuation is the revised answer (the critique context, then the request)."""
  return (critique_prompt(prompt, response, principle) + critique +
          f"\nRevision request: {principle.revision}\nRevision: ")
