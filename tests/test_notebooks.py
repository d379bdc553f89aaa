"""The walk-through notebooks run top to bottom on the shared data, as a user would run them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
#: What each notebook's run must print, and why: a notebook that runs but no longer shows its
#: point (the detect step flags positive1, the report unflags its scene) is a broken notebook.
MUST_PRINT = {
    "walkthrough": {
        "positive1.png True": "the walk-through's detect step should flag positive1.png",
        "{'TP': ": "the walk-through's explore cell printed no confusion counts",
    },
    "feedback": {
        "reported scene flagged after retrain: False": "the retrained model still flags the scene reported as not mining",
        "changes layer: True": "the map refreshed after the retrain has no 'changes since the last model' layer",
        "reported scene flagged after rollback: True": "rolling back to v1 did not flag the reported scene again",
        "same flags as the scan: True": "after the rollback the run flags other scenes than the scan did",
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, data_root, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    monkeypatch.setenv("AMBER_HUNTER_DATA", str(data_root))  # the kernel inherits it
    # The kernel runs in tmp_path, where "import amber_hunter" finds whatever checkout is installed;
    # the notebooks under test must run against this one (and find its training/ scripts).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(path, as_version=4)
    # Run inside tmp_path so nothing the notebook writes lands in the repo.
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
    assert path.stem in MUST_PRINT, f"say in MUST_PRINT what {path.name}'s run must print"
    for line, why in MUST_PRINT[path.stem].items():
        assert line in text, why
    if path.stem == "walkthrough":  # the explore section ends with the Bokeh figure
        assert any("application/vnd.bokehjs_exec.v0+json" in out.get("data", {})
                   for cell in notebook.cells for out in cell.get("outputs", [])), "no Bokeh figure shown"


def test_there_is_a_notebook():
    assert NOTEBOOKS, "notebooks/ should hold the walk-through"
