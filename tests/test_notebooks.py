"""Notebooks run top to bottom on a fresh kernel (small sizes via KVQ_SMALL=1)."""

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="notebook extra not installed")
    nbclient = pytest.importorskip("nbclient", reason="notebook extra not installed")
    pytest.importorskip("ipykernel", reason="notebook extra not installed")
    pytest.importorskip("matplotlib", reason="notebook extra not installed")
    monkeypatch.setenv("KVQ_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        f"{path.name} has outputs committed: strip them"
    )
    nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": path.parent}}
    ).execute()
    assert os.environ["KVQ_SMALL"] == "1"
