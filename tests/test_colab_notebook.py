"""experiments/colab_tpu.ipynb, executed end to end with a real Jupyter kernel (nbclient) in smoke
mode on the CPU, skipping only the cells tagged ``install`` and ``drive`` (Colab-only)."""

from __future__ import annotations

import json
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # End-to-end runs: the full suite only.

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "experiments" / "colab_tpu.ipynb"
COLAB_ONLY = {"install", "drive"}


def _tags(cell) -> set[str]:
    return set(cell.metadata.get("tags", []))


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert [c for c in code if "parameters" in _tags(c)], "no parameters cell"
    assert {t for c in code for t in _tags(c)} >= COLAB_ONLY | {"parameters"}


def test_notebook_runs_in_smoke_mode(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = [c for c in nb.cells if not _tags(c) & COLAB_ONLY]
    at = next(i for i, c in enumerate(cells) if "parameters" in _tags(c)) + 1
    workdir = tmp_path / "runs" / "smoke"
    cells.insert(at, nbformat.v4.new_code_cell(  # What papermill's injected parameters do.
        f'MODE = "smoke"\nWORKDIR = {str(workdir)!r}\nUSE_DRIVE = False'))
    nb.cells = cells
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    results = json.loads((workdir / "report" / "results.json").read_text())
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"test accuracy {results['test_accuracy']:.4f}" in text  # The report cell's line.
    assert "devices:" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 6  # 3 EDA figures + curves, confusion matrix, reliability, inline.
    assert (tmp_path / "runs" / "eda" / "stats.json").exists()
