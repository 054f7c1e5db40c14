"""Packaging: every direct dependency is pinned in constraints.txt (what CI installs with) at the
version installed here, the console scripts exist, and the formatter config is in setup.cfg."""

import configparser
import importlib.metadata
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_cfg() -> configparser.ConfigParser:
  parser = configparser.ConfigParser(interpolation=None)
  parser.read(os.path.join(REPO, "setup.cfg"))
  return parser


def _names(block: str) -> list[str]:
  out = []
  for line in block.splitlines():
    line = line.split("#", 1)[0].strip()
    if line and not line.startswith("%("):
      out.append(re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].lower().replace("_", "-"))
  return out


def _constraints() -> dict[str, str]:
  pins = {}
  for line in open(os.path.join(REPO, "constraints.txt")):
    line = line.split("#", 1)[0].strip()
    if line:
      name, _, version = line.partition("==")
      assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
      pins[name.strip().lower().replace("_", "-")] = version.strip()
  return pins


def test_every_direct_dependency_is_pinned_at_the_installed_version():
  cfg = _setup_cfg()
  direct = _names(cfg["options"]["install_requires"])
  for extra in ("tokenizers", "test"):
    direct += _names(cfg["options.extras_require"][extra])
  pins = _constraints()
  missing = sorted(set(direct) - set(pins))
  assert not missing, f"direct dependencies without a pin in constraints.txt: {missing}"
  for name in direct:
    installed = importlib.metadata.version(name).split("+")[0]  # torch's +cpu local label
    assert installed == pins[name], f"{name}: installed {installed}, constraints.txt {pins[name]}"


def test_python_bound_runtime_deps_scripts_ci_and_formatter():
  cfg = _setup_cfg()
  assert cfg["options"]["python_requires"].strip() == ">=3.11"
  runtime = cfg["options"]["install_requires"]
  for bound in ("jax>=0.7.1", "flax>=0.12", "orbax-checkpoint>=0.12", "tensorboardX", "scipy"):
    assert bound in runtime, bound
  scripts = cfg["options.entry_points"]["console_scripts"]
  assert "rlhf-run = rlhf_jax.cli:run" in scripts and "rlhf-pipeline = rlhf_jax.cli:pipeline" in scripts
  ci = open(os.path.join(REPO, ".ci", "run")).read()
  assert '-c constraints.txt -e ".[test]"' in ci and '"$rc" -eq 5' in ci
  assert cfg["yapf"]["indent_width"] == "2" and cfg["yapf"]["column_limit"] == "100"
