"""examples/walkthrough.ipynb runs headless from top to bottom (nbclient) on a subset of the shared photos, and is
committed without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "walkthrough.ipynb"


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    assert all(not cell.outputs and cell.execution_count is None for cell in code_cells), \
        f"{NOTEBOOK}: strip the outputs before committing (see README, Python API)"


@pytest.mark.slow
@pytest.mark.shared_data
def test_walkthrough_runs_headless(shared_data, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # The kernel inherits this process's environment: this checkout's src, the session's feature cache
    # (conftest), the shared photos and a scratch folder for everything the notebook writes.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOK.parents[1] / "src"), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("CATDOG_DATA", str(shared_data))
    monkeypatch.setenv("CATDOG_WALKTHROUGH_DIR", str(tmp_path / "walkthrough"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # An error in any cell raises CellExecutionError naming the cell and the traceback.
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    # Every plotting cell showed its figure, also those after catdog.training.evaluate drew its own (headless) plots.
    plotting_cells = [cell for cell in notebook.cells if cell.cell_type == "code" and "plt.show()" in cell.source]
    for cell in plotting_cells:
        assert any("image/png" in output.get("data", {}) for output in cell.outputs), cell.source[:80]
    text = "".join(output.get("text", "") + str(output.get("data", {}).get("text/plain", "")) for output in outputs)
    assert "validation accuracy" in text and "Prediction(path=None, label=" in text and "200 {'label':" in text
    assert (tmp_path / "walkthrough" / "run" / "evaluation" / "metrics.json").is_file()
