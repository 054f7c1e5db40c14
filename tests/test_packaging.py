"""Packaging: every direct dependency is pinned in constraints.txt (what CI installs with) at the
version installed here, the console scripts exist, the formatter config is in setup.cfg, and a
built wheel ships the feedback data files (templates, constitutions)."""

import configparser
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile

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


def test_wheel_ships_the_feedback_data_files(tmp_path):
  # A non-editable install gets what the wheel holds: build one from a copy of the sources and
  # check every evaluator template and constitution file of rlhf_jax/feedback is inside.
  src = tmp_path / "src"
  shutil.copytree(os.path.join(REPO, "rlhf_jax"), src / "rlhf_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), src / name)
  run = subprocess.run([
      sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
      str(tmp_path / "dist"),
      str(src)], capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  (wheel,) = (tmp_path / "dist").glob("rlhf_jax-*.whl")
  shipped = set(zipfile.ZipFile(wheel).namelist())
  wanted = []
  for sub in ("templates", "constitutions"):
    folder = os.path.join(REPO, "rlhf_jax", "feedback", sub)
    wanted += [f"rlhf_jax/feedback/{sub}/{n}" for n in os.listdir(folder) if n.endswith(".json")]
  assert any(w.endswith("constitutions/synthetic.json") for w in wanted)
  assert any(w.endswith("templates/synthetic_pair.json") for w in wanted)
  missing = sorted(set(wanted) - shipped)
  assert not missing, f"setup.cfg [options.package_data] does not ship {missing}"
