"""The README's main command, ``training/run_demo.py``: build, serve over real HTTP, scan, export,
check the flags, and resume on a rerun.

It runs exactly as the README says, with the bundled default model, and guards the main job: the
three mining scenes must be flagged and none of the three clean ones (exit code 0). The check
itself is also tested against a ``scenes.json`` whose labels are turned around.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

TRAINING = Path(__file__).resolve().parents[1] / "training"


@pytest.fixture(scope="module")
def script():
    """The run_demo module; it imports build_demo_region from beside itself, as when run as a script."""
    sys.path.insert(0, str(TRAINING))
    try:
        import run_demo
    finally:
        sys.path.remove(str(TRAINING))
    return run_demo


@pytest.fixture(scope="module")
def demo(script, data_root, tmp_path_factory):
    """``(out, argv, exit code, stdout)`` of one demo run into a fresh folder."""
    out = tmp_path_factory.mktemp("demo")
    argv = ["--out", str(out), "--basemap", "none", "--data", str(data_root)]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        code = script.main(argv)
    return out, argv, code, stdout.getvalue()


def test_demo_writes_the_export_and_prints_where_the_map_is(demo):
    out, _, code, stdout = demo
    assert code == 0, stdout
    assert "3 flagged (positive1.png, positive2.png, positive3.png)" in stdout
    export_dir = out / "demo-export"
    assert {p.name for p in export_dir.iterdir()} >= {"map.html", "detections.geojson", "summary.json"}
    summary = json.loads((export_dir / "summary.json").read_text())
    assert summary["scenes_scanned"] == 6 and summary["scenes_failed"] == 0
    assert "demo: 6 scenes scanned now, 6 in all" in stdout
    assert f"map: {export_dir / 'map.html'}" in stdout
    assert (out / "demo-region" / "scenes.json").is_file() and (out / "demo-run" / "run.sqlite").is_file()


def test_a_rerun_resumes_on_a_new_port_and_scans_nothing_again(script, demo, capsys):
    out, argv, code, _ = demo
    before = (out / "demo-export" / "detections.geojson").read_text()
    assert script.main(argv) == code
    assert "demo: 0 scenes scanned now, 6 in all" in capsys.readouterr().out
    assert (out / "demo-export" / "detections.geojson").read_text() == before


def test_check_flags_names_every_scene_against_its_label(script, demo, tmp_path):
    out = demo[0]
    scenes = json.loads((out / "demo-region" / "scenes.json").read_text())
    _, problems = script.check_flags(out / "demo-run", out / "demo-region" / "scenes.json")
    for info in scenes["scenes"].values():
        info["label"] = "negative" if info["label"] == "positive" else "positive"
    (tmp_path / "scenes.json").write_text(json.dumps(scenes))
    _, flipped = script.check_flags(out / "demo-run", tmp_path / "scenes.json")
    assert len(problems) + len(flipped) == 6  # each scene is right under exactly one of the two labellings
    assert all(" but was " in p for p in problems + flipped)


def test_a_bad_basemap_stops_before_anything_is_built(script, tmp_path, capsys):
    assert script.main(["--out", str(tmp_path / "out"), "--basemap", "satellite"]) == 2
    assert capsys.readouterr().err.startswith("run_demo: error: --basemap 'satellite'")
    assert not (tmp_path / "out").exists()


def test_a_finished_demo_run_with_another_model_is_refused(script, demo, capsys):
    argv = demo[1]
    assert script.main([*argv, "--model", "fast"]) == 2
    error = capsys.readouterr().err
    assert "demo-run holds a demo scan made with another model; delete it or choose another --out" in error
