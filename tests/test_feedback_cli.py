"""The feedback loop through the CLI: import (with bad lines and reports that touch nothing),
list, retrain, rollback, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_feedback import _geojson, _label_extremes, _pixel_point, _scene_polygon


@pytest.fixture
def run(folder_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(folder_run, copy)
    return copy


def test_the_loop_through_the_cli(run, region, small_data, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from amber_hunter.cli import main

    monkeypatch.setenv("AMBER_HUNTER_LABELS", str(tmp_path / "labels.sqlite"))
    victim = {v: k for k, v in region.ids.items()}["negative1"]
    report = tmp_path / "report.csv"
    lon, lat = _pixel_point(run, victim, 1)
    report.write_text(f"lat,lon,verdict,note\n{lat},{lon},not-mining,a clearing\n0,0,mining,\n1,2,perhaps,\n")
    runner = CliRunner()
    result = runner.invoke(main, ["feedback", "import", str(run), str(report)])
    assert result.exit_code == 0, result.output
    assert "3 reports" not in result.stdout and "2 reports: 1 touched 1 superpixels, 1 touched nothing, 1 bad lines" in result.stdout
    assert "line 3: outside the scanned area" in result.stdout and "unknown verdict 'perhaps'" in result.stderr
    result = runner.invoke(main, ["feedback", "import", str(run), str(report)])
    assert result.exit_code == 0 and "1 reports: 0 touched 0 superpixels, 1 touched nothing" in result.stdout
    assert "line 2: already imported (report.csv line 2); skipped" in result.stdout  # line 3 is tried again
    polygon = _geojson(tmp_path / "area.geojson", [("Polygon", _scene_polygon(run, victim, -0.001), "not-mining")])
    assert runner.invoke(main, ["feedback", "import", str(run), str(polygon)]).exit_code == 0
    out = tmp_path / "published"
    assert runner.invoke(main, ["export", str(run), "--out", str(out), "--basemap", "none"]).exit_code == 0
    assert '"changes":null' in (out / "map.html").read_text().replace(" ", "")
    result = runner.invoke(main, ["retrain", str(run), "--data", str(small_data)])
    assert result.exit_code == 0, result.output
    assert "v2 from v1" in result.stdout and f"no longer flagged: {victim}" in result.stdout
    # The run's labels are all readers' reports: they do not choose the threshold.
    assert "the threshold stays the training set's" in result.stdout and "(it has 0;" in result.stdout
    assert f"refreshed {out / 'map.html'}" in result.stdout
    page = (out / "map.html").read_text()
    assert f'"scene_id":"{victim}","change":"removed"' in page.replace(" ", "")
    assert victim not in {f["properties"]["scene_id"] for f in json.loads((out / "detections.geojson").read_text())["features"]}
    listing = runner.invoke(main, ["feedback", "list", str(run)]).stdout
    assert "a clearing: 1 superpixels" in listing and "v2 (current)" in listing and "from v1" in listing
    assert "(chosen on the training set)" in listing
    result = runner.invoke(main, ["rollback", str(run), "v1"])
    assert result.exit_code == 0 and f"newly flagged: {victim}" in result.stdout, result.output
    for args, message in ((["rollback", str(run), "two"], "is not like v2"),
                          (["rollback", str(run), "v9"], "has no model version v9"),
                          (["rescore", str(run), "--model", "default"], "pick a model trained on texture")):
        result = runner.invoke(main, args)
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output, result.output
        assert len(result.stderr.strip().splitlines()) == 1


def test_retrain_says_when_the_runs_own_labels_chose_the_threshold(run, small_data, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from amber_hunter.cli import main
    from amber_hunter.learn.labels import LabelStore

    store = tmp_path / "labels.sqlite"
    monkeypatch.setenv("AMBER_HUNTER_LABELS", str(store))
    with LabelStore(store) as labels:
        _label_extremes(run, labels, 6, 6)
    result = CliRunner().invoke(main, ["retrain", str(run), "--data", str(small_data)])
    assert result.exit_code == 0, result.output
    assert "threshold re-chosen on this run's 12 labelled superpixels" in result.stdout
    listing = CliRunner().invoke(main, ["feedback", "list", str(run)]).stdout
    assert "(chosen on the run's own labels)" in listing
