"""Evaluator prompt templates (RLAIF): a JSON file → the exact text an evaluator model is asked.

A template file is one JSON object (Lee et al., 2023, arXiv:2309.00267, §2.1: preamble, optional
few-shot exemplars, the sample to annotate, an ending; the label is read from the next token)::

    {
      "kind": "pair",                        # "pair" (which of two is better) | "single" (a rating)
      "preamble": "Rate ... on these criteria: ...\\n",       # rater instructions and the criteria
      "exemplars": [{"prompt": ..., "response_a": ..., "response_b": ..., "label": "A",
                     "rationale": "..."}],   # optional few-shot examples ("rationale": CoT only)
      "pair": "Request: {prompt}\\nA: {response_a}\\nB: {response_b}\\n",   # kind "pair"
      "single": "Request: {prompt}\\nResponse: {response}\\n",              # kind "single"
      "ending": "Preferred=",                # the label token comes right after it
      "labels": ["A", "B"],                  # pair: exactly 2 (position 1, position 2)
      "label_values": [1, 2, ...],           # single only: the number each label stands for
      "cot_ending": "Rationale:",            # optional: chain of thought (the rationale follows)
      "cot_answer": "\\nPreferred="          # optional: appended after the rationale (default: ending)
    }

Rendering (the same function renders the feedback model's training text and its queries, so the
model is asked exactly what it learnt)::

    render_pair(t, x, a, b)   = preamble + Σ_exemplars (pair(e) + ending + e.label + "\\n")
                                + pair(x, a, b) + ending
    render_pair(t, x, a, b, cot=True) = ... + pair(x, a, b) + cot_ending
    cot_answer_text(t, rendered_cot, rationale) = rendered_cot + rationale + cot_answer
    render_single(t, x, y)    = the same with the single-response block

Placeholders are Python ``str.format`` fields; literal braces are written ``{{`` / ``}}``. A pair
block must contain ``{prompt}``, ``{response_a}`` and ``{response_b}`` (a single block ``{prompt}``
and ``{response}``) and nothing else. Label strings must each be one token of the evaluator's
tokenizer (:func:`label_token_ids`), since the soft label is the softmax over those tokens'
next-token log-probs. Errors name the file and the field.

Shipped templates (``rlhf_jax/feedback/templates/``, :func:`default_template_path`):
``synthetic_pair.json`` and ``synthetic_rating.json`` state the synthetic task's criteria (the
requested count and category, no harmful items, at most two exclamation marks).
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
from typing import Any, Mapping, Sequence

__all__ = [
    "KINDS", "TEMPLATE_DIR", "Template", "TemplateError", "default_template_path", "load_template",
    "template_from_dict", "render_pair", "render_single", "cot_answer_text", "label_token_ids"]

KINDS = ("pair", "single")
TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "templates")
_FIELDS = {"pair": ("prompt", "response_a", "response_b"), "single": ("prompt", "response")}
_KNOWN_KEYS = {
    "name", "kind", "preamble", "exemplars", "pair", "single", "ending", "labels", "label_values",
    "cot_ending", "cot_answer", "description"}


class TemplateError(ValueError):
  """A malformed template file; ``str(e)`` reads ``FILE: field 'F': expected X, got Y``."""

  def __init__(self, source: str, field: str, expected: str, got: Any = None):
    got_str = "" if got is None else f", got {got!r}"[:200]
    super().__init__(f"{source}: field '{field}': expected {expected}{got_str}")


@dataclasses.dataclass(frozen=True)
class Template:
  """A parsed template (see the module docstring for each field)."""

  kind: str
  preamble: str
  block: str  # the "pair" or "single" text, by kind
  ending: str
  labels: tuple[str, ...]
  label_values: tuple[float, ...] = ()
  exemplars: tuple[Mapping[str, str], ...] = ()
  cot_ending: str = ""
  cot_answer: str = ""
  name: str = ""
  source: str = "<template>"

  @property
  def has_cot(self) -> bool:
    return bool(self.cot_ending)


def default_template_path(name: str) -> str:
  """Path of a shipped template: ``"synthetic_pair"`` → ``.../feedback/templates/synthetic_pair.json``."""
  path = os.path.join(TEMPLATE_DIR, name if name.endswith(".json") else name + ".json")
  if not os.path.isfile(path):
    shipped = sorted(f[:-5] for f in os.listdir(TEMPLATE_DIR) if f.endswith(".json"))
    raise FileNotFoundError(f"no shipped template {name!r}; allowed: {' | '.join(shipped)} "
                            "or the path of a template JSON file")
  return path


def load_template(path: str) -> Template:
  """Reads and validates a template file (a shipped name such as ``"synthetic_pair"`` also works)."""
  if not os.path.isfile(path) and os.sep not in path and not path.endswith(".json"):
    path = default_template_path(path)
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"template file {path!r} does not exist") from None
  except json.JSONDecodeError as e:
    raise TemplateError(path, "<file>", f"one JSON object ({e.msg} at line {e.lineno})") from None
  return template_from_dict(obj, source=path)


def _string(obj, key, source, *, required: bool, non_empty: bool = False) -> str:
  if key not in obj:
    if required:
      raise TemplateError(source, key, "a string (the field is missing)")
    return ""
  value = obj[key]
  if not isinstance(value, str):
    raise TemplateError(source, key, "a string", value)
  if non_empty and not value:
    raise TemplateError(source, key, "a non-empty string", value)
  return value


def _check_placeholders(text: str, kind: str, source: str, field: str) -> None:
  try:
    names = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
  except ValueError as e:
    raise TemplateError(source, field,
                        f"valid placeholders ({e}; write literal braces as {{{{ }}}})",
                        text) from None
  wanted = _FIELDS[kind]
  missing = [n for n in wanted if n not in names]
  unknown = sorted({n for n in names if n not in wanted})
  if missing or unknown:
    parts = ([f"missing {', '.join('{' + n + '}' for n in missing)}"] if missing else []) + ([
        f"unknown {', '.join('{' + n + '}' for n in unknown)}"] if unknown else [])
    raise TemplateError(
        source, field, f"the placeholders {', '.join('{' + n + '}' for n in wanted)} "
        f"({'; '.join(parts)})", text)


def template_from_dict(obj: Mapping[str, Any], source: str = "<template>") -> Template:
  """Validates a template given as a dict (``source`` names it in errors)."""
  if not isinstance(obj, Mapping):
    raise TemplateError(source, "<file>", "a JSON object", type(obj).__name__)
  unknown = sorted(set(obj) - _KNOWN_KEYS)
  if unknown:
    raise TemplateError(source, unknown[0], f"one of the known fields {sorted(_KNOWN_KEYS)}")
  kind = obj.get("kind", "pair")
  if kind not in KINDS:
    raise TemplateError(source, "kind", " | ".join(KINDS), kind)
  block = _string(obj, kind, source, required=True, non_empty=True)
  _check_placeholders(block, kind, source, kind)
  other = "single" if kind == "pair" else "pair"
  if other in obj:
    raise TemplateError(source, other, f"no '{other}' block in a template of kind '{kind}'")
  ending = _string(obj, "ending", source, required=True, non_empty=True)
  preamble = _string(obj, "preamble", source, required=False)
  for key, text in (("preamble", preamble), ("ending", ending)):
    try:
      text.format()
    except (IndexError, KeyError, ValueError):
      raise TemplateError(source, key, "no placeholders (write literal braces as {{ }})",
                          text) from None
  labels = obj.get("labels")
  if (not isinstance(labels, list) or not labels or
      not all(isinstance(l, str) and l for l in labels)):
    raise TemplateError(source, "labels", "a list of non-empty strings", labels)
  if len(set(labels)) != len(labels):
    raise TemplateError(source, "labels", "distinct strings", labels)
  if kind == "pair" and len(labels) != 2:
    raise TemplateError(source, "labels", "exactly 2 strings for a pair (first, second response)",
                        labels)
  values: tuple[float, ...] = ()
  if kind == "single":
    if len(labels) < 2:
      raise TemplateError(source, "labels", "at least 2 rating labels", labels)
    raw = obj.get("label_values", list(range(1, len(labels) + 1)))
    if (not isinstance(raw, list) or len(raw) != len(labels) or
        not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)):
      raise TemplateError(source, "label_values", f"{len(labels)} numbers (one per label)", raw)
    if len(set(raw)) < 2:
      raise TemplateError(source, "label_values", "at least two different numbers", raw)
    values = tuple(float(v) for v in raw)
  elif "label_values" in obj:
    raise TemplateError(source, "label_values", "no label_values in a pair template")
  cot_ending = _string(obj, "cot_ending", source, required=False)
  cot_answer = _string(obj, "cot_answer", source, required=False)
  if cot_answer and not cot_ending:
    raise TemplateError(source, "cot_ending", "a non-empty string when cot_answer is set")
  exemplars = obj.get("exemplars", [])
  if not isinstance(exemplars, list):
    raise TemplateError(source, "exemplars", "a list of objects", exemplars)
  checked = []
  for i, ex in enumerate(exemplars):
    where = f"exemplars[{i}]"
    if not isinstance(ex, Mapping):
      raise TemplateError(source, where, "an object", ex)
    for name in _FIELDS[kind]:
      if not isinstance(ex.get(name), str):
        raise TemplateError(source, f"{where}.{name}", "a string", ex.get(name))
    if ex.get("label") not in labels:
      raise TemplateError(source, f"{where}.label", f"one of the labels {labels}", ex.get("label"))
    if "rationale" in ex and not isinstance(ex["rationale"], str):
      raise TemplateError(source, f"{where}.rationale", "a string", ex["rationale"])
    checked.append(dict(ex))
  return Template(kind=kind, preamble=preamble, block=block, ending=ending, labels=tuple(labels),
                  label_values=values, exemplars=tuple(checked), cot_ending=cot_ending,
                  cot_answer=cot_answer or (ending if cot_ending else ""),
                  name=str(obj.get("name", "")), source=source)


def _exemplar_text(t: Template, cot: bool) -> str:
  parts = []
  for ex in t.exemplars:
    body = t.block.format(**{k: ex[k] for k in _FIELDS[t.kind]})
    if cot and ex.get("rationale"):
      parts.append(body + t.cot_ending + ex["rationale"] + t.cot_answer + ex["label"] + "\n")
    else:
      parts.append(body + t.ending + ex["label"] + "\n")
  return "".join(parts)


def _render(t: Template, kind: str, values: Mapping[str, str], cot: bool) -> str:
  if t.kind != kind:
    raise ValueError(f"{t.source}: a template of kind '{t.kind}' cannot render a {kind} query; "
                     f"allowed: a template file with \"kind\": \"{kind}\"")
  if cot and not t.has_cot:
    raise ValueError(
        f"{t.source}: field 'cot_ending' is missing; a chain-of-thought query needs it")
  end = t.cot_ending if cot else t.ending
  return t.preamble + _exemplar_text(t, cot) + t.block.format(**values) + end


def render_pair(t: Template, prompt: str, response_a: str, response_b: str, *,
                cot: bool = False) -> str:
  """The evaluator's query for ``(prompt, a, b)``, ending where the label (or rationale) follows."""
  return _render(t, "pair", dict(prompt=prompt, response_a=response_a, response_b=response_b), cot)


def render_single(t: Template, prompt: str, response: str, *, cot: bool = False) -> str:
  """The evaluator's rating query for ``(prompt, response)`` (d-RLAIF)."""
  return _render(t, "single", dict(prompt=prompt, response=response), cot)


def cot_answer_text(t: Template, rendered_cot: str, rationale: str) -> str:
  """A CoT query completed with its rationale, ending where the label token follows."""
  return rendered_cot + rationale + t.cot_answer


def label_token_ids(t: Template, tokenizer: Any) -> tuple[int, ...]:
  """The single token id of each label string under ``tokenizer`` (errors name file and field)."""
  ids = []
  for i, label in enumerate(t.labels):
    enc = list(tokenizer.encode(label))
    if len(enc) != 1:
      raise TemplateError(
          t.source, f"labels[{i}]", f"a single token of the evaluator's tokenizer {tokenizer!r} "
          f"(the soft label reads one next-token log-prob per label); {label!r} encodes to "
          f"{len(enc)} tokens {enc}")
    ids.append(int(enc[0]))
  if len(set(ids)) != len(ids):
    raise TemplateError(t.source, "labels", "labels that encode to distinct tokens", t.labels)
  return tuple(ids)
