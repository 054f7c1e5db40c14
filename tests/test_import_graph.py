"""The architecture's rule, checked on the source: no method imports another method's module.

Methods are grouped in families (``sft.py``, ``reward/``, ``offline/``, ``online/``); a module may
import its own family and the shared modules of ``rlhf_jax/algorithms`` (common, sections,
reference, registry), never another family. Stages that need an earlier stage run
it through ``registry`` (by name, imported lazily)."""

import ast
import os

import pytest

from rlhf_jax.algorithms import registry

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rlhf_jax",
                    "algorithms")
SHARED = {"common", "sections", "reference", "registry", "plan"}


def _family(module: str) -> str:
  """``rlhf_jax.algorithms.offline.dpo`` -> ``offline``; ``rlhf_jax.algorithms.sft`` -> ``sft``."""
  return module.split(".")[2]


def _algorithm_modules():
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py") and name != "__init__.py":
        rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(os.path.dirname(ROOT)))
        yield rel[:-3].replace(os.sep, ".")


def _imported(module: str) -> set[str]:
  path = os.path.join(os.path.dirname(os.path.dirname(ROOT)), *module.split(".")) + ".py"
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node,
                  ast.ImportFrom) and node.module and node.module.startswith("rlhf_jax.algorithms"):
      if node.module == "rlhf_jax.algorithms":
        found.update(f"rlhf_jax.algorithms.{a.name}" for a in node.names)
      else:
        found.add(node.module if node.module.count(".") >= 3 else node.module + "." +
                  node.names[0].name)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("rlhf_jax.algorithms."))
  return found


MODULES = sorted(m for m in _algorithm_modules() if _family(m) not in SHARED)


@pytest.mark.parametrize("module", MODULES)
def test_no_method_imports_another_family(module):
  for target in _imported(module):
    family = _family(target)
    assert family in SHARED or family == _family(module), f"{module} imports {target}"


def test_the_offline_shells_serve_only_offline_methods():
  users = {
      m for m in MODULES if any(
          t.startswith("rlhf_jax.algorithms.offline.") and t.rsplit(".", 1)[1] in ("shell",
                                                                                   "pairwise_shell")
          for t in _imported(m))}
  assert users and all(_family(m) == "offline" for m in users), users


def test_every_registered_method_lives_in_a_family():
  assert {_family(m) for m in registry.METHODS.values()} <= {"sft", "reward", "offline", "online"}
  assert set(registry.METHODS.values()) <= set(MODULES)
