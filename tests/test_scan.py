"""Region scans over real sockets, files and SQLite: sources agree, faults are survived, kills resume.

The region is a row of 2x2-tile scenes at zoom 18 near Rivne, cut from the study's real example
scenes (copied at test time, never committed), plus scenes that exercise every outcome: blank
tiles, no tiles, a non-image body and a tile of the wrong size. The detector is a real texture
model with a small booster, so a scene takes well under a second.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scan_fixtures import EXPECTED, LAYOUT, SIZE, ZOOM, region_cells, results
from tile_servers import Fault, tile_server

from amber_hunter.errors import RunStoreError
from amber_hunter.geo.tiles import SceneCell
from amber_hunter.images import read_rgb
from amber_hunter.model.segment import Region
from amber_hunter.run.scan import SIMPLIFY_PX, region_outline, scan
from amber_hunter.run.scenes import load_scene
from amber_hunter.run.store import RunStore

#: Launches the CLI as the installed ``amber-hunter`` script does.
CLI = "from amber_hunter.cli import main; main()"


# --- scenes ------------------------------------------------------------------------------------


def test_each_kind_of_scene_gets_its_outcome(folder_run, region):
    scenes, _ = results(folder_run)
    assert {sid: status for sid, status, *_ in scenes} == {sid: EXPECTED[name] for sid, name in region.ids.items()}
    with RunStore(folder_run) as store:
        errors = {region.ids[s.scene_id]: s.error for s in store.scenes() if s.error}
        flagged = [s.scene_id for s in store.scenes(flagged_only=True)]
    assert "not a readable image" in errors["garbage"]
    assert "128x128 px, expected 256x256" in errors["small"]
    assert "blank or uniform" in errors["blank"] and "no imagery" in errors["missing"]
    assert flagged, "the tiny model should flag at least one scene"
    assert all((folder_run / "scenes" / f"{s.replace('/', '_')}.png").is_file() for s in flagged)
    assert "finished after 7 scenes" in (folder_run / "log.txt").read_text()


@settings(max_examples=200, deadline=None)
@given(
    base=st.integers(0, 253), spread=st.integers(0, 6), row=st.integers(0, 63), col=st.integers(0, 63),
    channel=st.integers(0, 2), hole=st.integers(0, 64), fill=st.sampled_from(["all", "some", "none"]),
)
@example(base=100, spread=3, row=16, col=32, channel=1, hole=0, fill="all")  # seen by the sparse first look
@example(base=100, spread=3, row=17, col=33, channel=1, hole=0, fill="all")  # missed by it: the full check
@example(base=100, spread=3, row=16, col=32, channel=1, hole=20, fill="some")  # on the grid but transparent
def test_uniform_check_agrees_with_checking_every_valid_pixel(base, spread, row, col, channel, hole, fill):
    """The sparse first look of ``_is_uniform`` never changes its answer: a flat tile with one
    pixel brighter, on the sampled grid or off it, and tiles partly or wholly transparent, come
    out as the plain definition says."""
    from amber_hunter.run.scenes import UNIFORM_SPREAD, _is_uniform

    rgb = np.full((64, 64, 3), base, np.uint8)
    rgb[row, col, channel] = min(base + spread, 255)
    valid = np.ones((64, 64), bool)
    if fill == "some":
        valid[:hole] = False
    elif fill == "none":
        valid[:] = False
    pixels = rgb[valid].astype(int)
    expected = bool(len(pixels)) and bool((pixels.max(axis=0) - pixels.min(axis=0) <= UNIFORM_SPREAD).all())
    assert _is_uniform(rgb, valid) is expected


def test_scene_is_stitched_in_row_major_order_with_capture_date(region):
    import datetime as dt

    from amber_hunter.sources import FolderSource, TileResult

    class Dated(FolderSource):
        def get(self, tile):
            return TileResult("ok", super().get(tile).data, dt.date(2015, 3, tile.x % 7 + 1))

    cell = region_cells()[0]
    scene = load_scene(cell, Dated(region.folder))
    assert scene.status == "ok" and scene.image.shape == (512, 512, 3)
    tile = read_rgb(region.folder / "18" / str(cell.x0 + 1) / f"{cell.y0}.png")
    assert np.array_equal(scene.image[:256, 256:], tile)
    assert scene.capture_date == max(dt.date(2015, 3, t.x % 7 + 1) for t in cell.tiles)
    assert scene.m_per_px == pytest.approx(0.38, abs=0.02)


def test_outline_follows_the_superpixel_in_lonlat():
    cell = SceneCell(18, 150186, 88196, 2)
    mask = np.zeros((10, 20), bool)
    mask[2:8, 5:15] = True  # a 6 x 10 px rectangle at rows 12-18, cols 35-45 of the scene
    geometry = region_outline(Region(1, (10, 30, 20, 50), int(mask.sum()), mask), cell)
    ring = np.array(geometry["coordinates"][0])
    assert (ring[0] == ring[-1]).all()
    (west, east), (north, south) = cell.pixel_to_lonlat(np.array([12, 18]), np.array([35, 45]))
    px = (east - west) / 10 * SIMPLIFY_PX  # simplification may cut corners by up to SIMPLIFY_PX
    assert ring[:, 0].min() == pytest.approx(west, abs=px) and ring[:, 0].max() == pytest.approx(east, abs=px)
    assert ring[:, 1].min() == pytest.approx(south, abs=px) and ring[:, 1].max() == pytest.approx(north, abs=px)
    x, y = ring[:, 0], ring[:, 1]
    assert np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) > 0  # counter-clockwise, as RFC 7946 asks


def test_outline_keeps_its_holes_and_stays_inside_the_scene():
    """A superpixel around another (a pond in a pit field) keeps the hole, wound clockwise, and an
    outline along the scene's edge never leaves the scene."""
    cell = SceneCell(18, 150186, 88196, 2)
    mask = np.ones((40, 40), bool)
    mask[10:30, 12:28] = False  # the hole: 20 x 16 px
    geometry = region_outline(Region(1, (0, 0, 40, 40), int(mask.sum()), mask), cell)
    assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 2
    outer, hole = (np.array(ring) for ring in geometry["coordinates"])
    signed = [np.dot(r[:-1, 0], r[1:, 1]) - np.dot(r[1:, 0], r[:-1, 1]) for r in (outer, hole)]
    assert signed[0] > 0 > signed[1]  # outer counter-clockwise, hole clockwise (RFC 7946)
    (west, east), (north, south) = cell.pixel_to_lonlat(np.array([10, 30]), np.array([12, 28]))
    px = (east - west) / 16 * SIMPLIFY_PX  # simplification may cut corners by up to SIMPLIFY_PX
    assert hole[:, 0].min() == pytest.approx(west, abs=px) and hole[:, 0].max() == pytest.approx(east, abs=px)
    assert hole[:, 1].min() == pytest.approx(south, abs=px) and hole[:, 1].max() == pytest.approx(north, abs=px)
    b = cell.bounds  # the region starts at the scene's top-left corner: its outline stays inside
    assert (outer[:, 0] >= b.west).all() and (outer[:, 1] <= b.north).all()
    assert outer[:, 0].min() == pytest.approx(b.west, abs=1e-7) and outer[:, 1].max() == pytest.approx(b.north, abs=1e-7)


# --- sources and faults ------------------------------------------------------------------------


def test_mbtiles_source_gives_the_same_results(folder_run, region, tiny_model, tmp_path):
    scan(region.config(region.mbtiles, tiny_model), tmp_path / "run")
    assert results(tmp_path / "run") == results(folder_run)


@pytest.mark.parametrize("fault", [Fault("status", status=500), Fault("status", status=429, retry_after="0")],
                         ids=["500", "429"])
def test_a_server_failing_half_the_time_gives_the_same_results(fault, folder_run, region, tiny_model, tmp_path, monkeypatch):
    from amber_hunter.sources import HttpTileSource

    with tile_server(region.folder, fault=fault) as server:
        config = region.config(server.url + "/{z}/{x}/{y}.png", tiny_model, workers=2)
        monkeypatch.setattr(HttpTileSource, "_backoff", lambda self, attempt: 0.01)
        summary = scan(config, tmp_path / "run")
    assert summary.status.pending == 0 and not summary.interrupted
    assert results(tmp_path / "run") == results(folder_run)
    assert max(server.hits.values()) == 2  # every tile failed once, then came through, and only once: cached
    assert list((tmp_path / "run" / "tiles-cache" / "18").iterdir())


def test_scenes_failed_in_an_outage_are_redone_only_with_retry_failed(folder_run, region, tiny_model, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from amber_hunter.cli import main
    from amber_hunter.sources import HttpTileSource

    monkeypatch.setattr(HttpTileSource, "_backoff", lambda self, attempt: 0.01)
    run = tmp_path / "run"
    with tile_server(region.folder, fault=Fault("status", status=503, failures=None)) as server:
        args = ["scan", "--aoi", region.aoi, "--tiles", server.url + "/{z}/{x}/{y}.png", "--run", str(run),
                "--zoom", str(ZOOM), "--scene-tiles", str(SIZE), "--model", str(tiny_model)]
        down = CliRunner().invoke(main, args)
        assert down.exit_code == 1, down.output  # a run that ends with failed scenes exits non-zero
        with RunStore(run) as store:
            n_failed = store.status().failed
        assert n_failed > 0 and "--retry-failed" in down.output
        server.fault = None  # the outage is over
        plain = CliRunner().invoke(main, args)
        assert plain.exit_code == 1 and "0 scenes this run" in plain.output, plain.output
        retried = CliRunner().invoke(main, [*args, "--retry-failed"])
        assert retried.exit_code == 1, retried.output  # the region's two bad-tile scenes fail again
        assert f"{n_failed} scenes this run" in retried.output  # the bad tiles fail again, the rest are done
    assert results(run) == results(folder_run)
    assert f"requeued {n_failed} failed scenes" in (run / "log.txt").read_text()


# --- resume ------------------------------------------------------------------------------------


def test_rerun_resumes_and_counts_nothing_twice(folder_run, region, tiny_model, tmp_path):
    run = tmp_path / "run"
    config = region.config(region.folder, tiny_model)
    with RunStore(run, config) as store:  # as if a killed run had finished two scenes
        store.add_scenes(region_cells())
    first = scan(config, run)
    again = scan(config, run)
    assert (first.processed, again.processed) == (len(LAYOUT), 0)
    assert results(run) == results(folder_run)


def test_a_changed_config_is_refused_unless_forced(folder_run, region, tiny_model, tmp_path):
    run = shutil.copytree(folder_run, tmp_path / "run")  # a finished run of the same config
    with pytest.raises(RunStoreError, match=r"different min_positive.*--force"):
        scan(region.config(region.folder, tiny_model, min_positive=5), run)
    assert scan(region.config(region.folder, tiny_model, workers=3), run).processed == 0  # speed settings may change
    assert scan(region.config(region.folder, tiny_model, min_positive=5), run, force=True).processed == 0


def test_the_model_counts_by_its_content_and_each_scene_records_it(folder_run, region, tiny_model, texture_model, tmp_path):
    """A model retrained into the same folder is a changed config, though its path is the same."""
    model = shutil.copytree(tiny_model, tmp_path / "model")
    run = tmp_path / "run"
    first = scan(region.config(region.folder, model), run)
    with RunStore(run) as store:
        recorded = {s.model for s in store.scenes() if s.status == "done"}
    assert recorded == {region.config(region.folder, model).model_hash}
    shutil.rmtree(model)
    shutil.copytree(texture_model, model)  # "retrained" in place
    with pytest.raises(RunStoreError, match=r"different model;.*--force"):
        scan(region.config(region.folder, model), run)
    assert first.processed == len(region.ids)


def test_a_forced_regrid_never_counts_the_same_ground_twice(folder_run, region, tiny_model, tmp_path):
    """From 2x2-tile to 4x4-tile scenes with --force: the old scenes leave status, pending and export."""
    from amber_hunter.export.writers import export
    from amber_hunter.geo.tiles import scene_grid

    run = shutil.copytree(folder_run, tmp_path / "run")
    bigger = region.config(region.folder, tiny_model, scene_tiles=4)
    scan(bigger, run, force=True)
    new_ids = {c.scene_id for c in scene_grid(bigger.area, 18, 4)}
    with RunStore(run) as store:
        status = store.status()
        ids = {s.scene_id for s in store.scenes()}
        assert [e.message for e in store.events("regrid")] == [f"{len(region.ids)} scenes outside the new grid dropped"]
    assert ids == new_ids and status.total == len(new_ids) and status.dropped == len(region.ids)
    assert status.pending == 0
    _, summary = export(run, tmp_path / "out", basemap="none")
    assert summary.scenes_dropped == len(region.ids)
    assert summary.scenes_scanned + summary.scenes_failed + summary.scenes_no_imagery + summary.scenes_skipped == len(new_ids)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", CLI, *args]


def _done(run: Path) -> int:
    try:
        with RunStore(run) as store:
            return store.status().done
    except RunStoreError:
        return 0  # not created yet, or being created


def _start_and_wait_for_first_scene(args: list[str], run: Path) -> subprocess.Popen:
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _done(run) == 0:
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "the scan did not finish a scene within a minute"
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("how", ["kill -9", "ctrl-c"])
def test_an_interrupted_scan_resumes_to_the_same_results(how, folder_run, region, tiny_model, tmp_path):
    run = tmp_path / "run"
    # Every tile is answered after 0.2 s, so a scene takes about a second and the kill lands partway.
    with tile_server(region.folder, fault=Fault("slow", failures=None, delay=0.2)) as server:
        args = ["scan", "--aoi", region.aoi, "--tiles", server.url + "/{z}/{x}/{y}.png", "--run", str(run),
                "--zoom", str(ZOOM), "--scene-tiles", str(SIZE), "--model", str(tiny_model)]
        proc = _start_and_wait_for_first_scene(args, run)
        if how == "kill -9":
            proc.kill()
        else:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == (-signal.SIGKILL if how == "kill -9" else 130), err.decode()
        with RunStore(run) as store:
            assert 0 < store.status().done and store.status().pending > 0
        rerun = subprocess.run(_cli(*args), capture_output=True, timeout=120, check=False)
    assert rerun.returncode == 1, rerun.stderr.decode()  # the region's two bad-tile scenes fail, as they should
    assert results(run) == results(folder_run)
    if how == "ctrl-c":
        assert "interrupted after" in (run / "log.txt").read_text()
