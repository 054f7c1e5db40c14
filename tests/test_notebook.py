"""Executes experiments/notebooks/compare_losses.ipynb headless (nbclient + ipykernel), as a user
would run it, and checks it produced its figures. The notebook carries its own assertions (gradient
of DPO at margin 0, IPO's minimum at 1/(2β), every loss decreasing while training)."""

from __future__ import annotations

import os
import pathlib

import nbclient
import nbformat
import pytest

NOTEBOOK = pathlib.Path(
    __file__).resolve().parents[1] / "experiments" / "notebooks" / "compare_losses.ipynb"


@pytest.mark.slow
def test_compare_losses_notebook_runs(tmp_path, monkeypatch):
  out = tmp_path / "figures"
  # The kernel inherits this process's environment: figures go to tmp_path, JAX stays on CPU.
  monkeypatch.setenv("COMPARE_LOSSES_OUT", str(out))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # 8 simulated devices are pointless here and slow the kernel's JAX start-up.
  monkeypatch.setenv(
      "XLA_FLAGS",
      os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", ""))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert not any(cell.get("outputs")
                 for cell in nb.cells
                 if cell.cell_type == "code"), "commit the notebook without outputs"
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError on any failing cell or assertion
  assert (out / "loss_shapes.png").stat().st_size > 10_000
  assert (out / "training_comparison.png").stat().st_size > 10_000
  printed = "".join(
      o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
      for o in cell.get("outputs", []))
  for name in ("dpo (sigmoid)", "ipo", "simpo"):
    assert name in printed
