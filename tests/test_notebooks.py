"""The walk-through notebooks run top to bottom on the shared data, as a user would run them."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, data_root, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    monkeypatch.setenv("AMBER_HUNTER_DATA", str(data_root))  # the kernel inherits it
    notebook = nbformat.read(path, as_version=4)
    # Run inside tmp_path so nothing the notebook writes lands in the repo.
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "positive1.png True" in text, "the walk-through's detect step should flag positive1.png"
    if path.stem == "walkthrough":  # the explore section: confusion counts, then the Bokeh figure
        assert "{'TP': " in text, "the walk-through's explore cell printed no confusion counts"
        assert any("application/vnd.bokehjs_exec.v0+json" in out.get("data", {})
                   for cell in notebook.cells for out in cell.get("outputs", [])), "no Bokeh figure shown"


def test_there_is_a_notebook():
    assert NOTEBOOKS, "notebooks/ should hold the walk-through"
