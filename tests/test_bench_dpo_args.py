"""bench_dpo refuses a missing TRL interpreter before timing anything (it used to fail only after
the JAX half had run for minutes)."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_dpo():
  spec = importlib.util.spec_from_file_location("bench_dpo",
                                                os.path.join(REPO, "experiments", "bench_dpo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_missing_trl_python_fails_before_the_jax_side(monkeypatch, tmp_path):
  bench = _bench_dpo()
  monkeypatch.setattr(bench, "_trl_importable", lambda: False)
  monkeypatch.setattr(bench, "bench_jax", lambda shape: pytest.fail("the JAX side ran first"))
  missing = str(tmp_path / "no_venv" / "bin" / "python")
  with pytest.raises(SystemExit, match=r"--trl_python=.*no_venv.*--skip_trl"):
    bench.main(["--quick", f"--trl_python={missing}"])
