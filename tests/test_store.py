"""The run store and its config: one transaction per scene, resume, refusal of changed configs, and
clear errors (the database left intact) when the disk is full or the directory unwritable."""

from __future__ import annotations

import dataclasses
import errno
import json
import os

import numpy as np
import pytest

from amber_hunter import atomic
from amber_hunter.errors import AreaError, ConfigError, RunStoreError
from amber_hunter.geo.tiles import Bounds, SceneCell
from amber_hunter.model.detect import SceneResult
from amber_hunter.run.config import RunConfig
from amber_hunter.run.store import RegionRecord, RunStore, SceneRecord

CELLS = [SceneCell(18, 150186 + 4 * k, 88196, 4) for k in range(3)]
BOX = Bounds(26.0, 50.0, 26.01, 50.01)


@pytest.fixture
def config(tmp_path):
    return RunConfig(aoi="26.24,50.61,26.27,50.63", tiles=str(tmp_path))


def done(scene_id: str, n: int = 3, flagged: bool = True) -> SceneRecord:
    probs = [0.9] * n
    result = SceneResult(flagged=flagged, n_positive=n, n_superpixels=n, probabilities=probs, positive_labels=list(range(1, n + 1)),
                         threshold=0.5, min_positive=2, max_probability=0.9, positive_area_px=100 * n, positive_area_m2=14.4 * n)
    polygon = {"type": "Polygon", "coordinates": [[[26.0, 50.0], [26.001, 50.0], [26.001, 50.001], [26.0, 50.0]]]}
    regions = tuple(RegionRecord(i, 0.9, True, 14.4, BOX, polygon) for i in range(1, n + 1))
    return SceneRecord(scene_id, "done", BOX, result=result, regions=regions, embeddings=np.ones((n, 5), np.float32),
                       embedder="texture", overlay=np.zeros((8, 8, 3), np.uint8) if flagged else None)


def test_a_scenes_label_map_is_stored_with_it_and_goes_with_it(tmp_path, config):
    from amber_hunter.model.segment import pack_labels

    labels = np.repeat(np.arange(1, 5, dtype=np.int32), 6).reshape(4, 6)
    run = tmp_path / "run"
    with RunStore(run, config) as store:
        store.add_scenes(CELLS)
        store.record(dataclasses.replace(done(CELLS[0].scene_id), segmentation=pack_labels(labels)))
        store.record(done(CELLS[1].scene_id))
        assert np.array_equal(store.segmentation(CELLS[0].scene_id), labels)
        assert store.segmentation(CELLS[1].scene_id) is None and store.segmentation("18/1/2/4") is None
        size = store.segmentation_bytes()
        assert size == len(pack_labels(labels))
        store.record(SceneRecord(CELLS[0].scene_id, "failed", BOX, error="decode"))  # recorded again: no stale map
        assert store.segmentation(CELLS[0].scene_id) is None and store.segmentation_bytes() == 0


# --- config ------------------------------------------------------------------------------------


def test_config_round_trips_and_never_holds_a_key(monkeypatch):
    monkeypatch.setenv("TILE_KEY", "s3cr3t")
    c = RunConfig(aoi="26.24,50.61,26.27,50.63", tiles="https://t/{z}/{x}/{y}.png?k={key}", api_key_env="TILE_KEY", max_rps=4)
    text = json.dumps(c.to_json())
    assert "s3cr3t" not in text
    assert RunConfig.from_json(json.loads(text)) == c


def test_geojson_area_is_stored_so_a_moved_file_still_resumes(tmp_path):
    path = tmp_path / "aoi.geojson"
    ring = [[26.24, 50.61], [26.27, 50.61], [26.25, 50.63], [26.24, 50.61]]
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    c = RunConfig(aoi=str(path), tiles=str(tmp_path))
    path.unlink()
    assert RunConfig.from_json(c.to_json()).area == c.area and c.area.polygons


@pytest.mark.parametrize("options, error, words", [
    ({"aoi": "26.3,50.6,26.2,50.7"}, AreaError, "W must be < E"),
    ({"aoi": "no-such.geojson"}, AreaError, "neither W,S,E,N nor an existing GeoJSON"),
    ({"zoom": 30}, ConfigError, "--zoom 18"),
    ({"scene_tiles": 3}, ConfigError, "power of two"),
    ({"workers": 0}, ConfigError, "--workers 2"),
    ({"max_rps": -1}, ConfigError, "--max-rps 8"),
    ({"min_positive": -1}, ConfigError, "--min-positive 2"),
    ({"api_key_env": "abc-123=secret"}, ConfigError, "not the key itself"),
])
def test_bad_config_values_are_named_with_their_fix(options, error, words, tmp_path):
    with pytest.raises(error, match=words):
        RunConfig(**{"aoi": "26.24,50.61,26.27,50.63", "tiles": str(tmp_path), **options})


# --- store -------------------------------------------------------------------------------------


def test_scenes_are_recorded_once_and_resume_skips_them(tmp_path, config):
    run = tmp_path / "run"
    with RunStore(run, config) as store:
        store.add_scenes(CELLS)
        store.record(done(CELLS[0].scene_id))
        store.record(SceneRecord(CELLS[1].scene_id, "failed", BOX, error="tile 1/2/3: HTTP 403"))
    with RunStore(run, config) as store:
        store.add_scenes(CELLS)  # a resume registers the grid again: known scenes keep their status
        assert list(store.pending()) == [CELLS[2].scene_id]
        store.record(done(CELLS[0].scene_id, n=2, flagged=False))  # a rerun overwrites, never duplicates
        s = store.status()
        assert (s.total, s.done, s.failed, s.pending, s.flagged) == (3, 1, 1, 1, 0)
        assert len(store.regions(CELLS[0].scene_id)) == 2
        assert store.embeddings().num_rows == 2
        assert [x.error for x in store.scenes() if x.status == "failed"] == ["tile 1/2/3: HTTP 403"]
    assert (run / "config.json").is_file() and (run / "scenes").is_dir()


def test_retry_failed_requeues_only_failed_scenes(tmp_path, config):
    with RunStore(tmp_path / "run", config) as store:
        store.add_scenes(CELLS)
        store.record(done(CELLS[0].scene_id))
        store.record(SceneRecord(CELLS[1].scene_id, "failed", BOX, error="tile 1/2/3: HTTP 503"))
        store.record(SceneRecord(CELLS[2].scene_id, "no-imagery", BOX, error="no imagery"))
        assert list(store.pending()) == []
        assert store.retry_failed() == 1
        assert list(store.pending()) == [CELLS[1].scene_id]
        assert store.retry_failed() == 0  # nothing left to requeue; no second event
        s = store.status()
        assert (s.done, s.failed, s.no_imagery, s.pending) == (1, 0, 1, 1)
        assert [x.error for x in store.scenes() if x.scene_id == CELLS[1].scene_id] == [None]
    with RunStore(tmp_path / "run") as store:
        assert [e.message for e in store.events("retry-failed")] == ["1 failed scenes requeued"]


def test_a_changed_config_is_refused_naming_the_fields(tmp_path, config):
    RunStore(tmp_path / "run", config).close()
    changed = RunConfig(aoi="26.24,50.61,26.28,50.63", tiles=config.tiles, zoom=17)
    with pytest.raises(RunStoreError, match=r"different area, zoom; .*--force"):
        RunStore(tmp_path / "run", changed)
    RunStore(tmp_path / "run", RunConfig(aoi=config.aoi, tiles=config.tiles, workers=4, max_rps=2)).close()
    with RunStore(tmp_path / "run", changed, force=True) as store:
        assert store.config.zoom == 17


def test_reading_a_folder_that_is_not_a_run_is_an_error(tmp_path):
    with pytest.raises(RunStoreError, match="not a run directory"):
        RunStore(tmp_path)


def test_a_full_database_is_a_clear_error_and_loses_nothing(tmp_path, config):
    with RunStore(tmp_path / "run", config) as store:
        store.add_scenes(CELLS)
        store.record(done(CELLS[0].scene_id))
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")  # the database cannot grow: SQLITE_FULL
        big = done(CELLS[1].scene_id, n=400)
        with pytest.raises(RunStoreError, match="disk is full; free some space"):
            store.record(big)
    with RunStore(tmp_path / "run") as store:
        assert [s.status for s in store.scenes()] == ["done", "pending", "pending"]
        assert store.regions(CELLS[1].scene_id) == []


def test_a_full_disk_while_writing_files_leaves_the_scene_pending(tmp_path, config, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with RunStore(tmp_path / "run", config) as store:
        store.add_scenes(CELLS)
        monkeypatch.setattr(atomic, "write_bytes", full)
        with pytest.raises(RunStoreError, match="disk is full"):
            store.record(done(CELLS[0].scene_id))
        assert store.status().pending == 3


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_an_unwritable_run_directory_is_a_clear_error(tmp_path, config):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(RunStoreError, match="not writable"):
            RunStore(locked / "run", config)
    finally:
        locked.chmod(0o700)


def test_a_run_directory_under_a_file_is_a_clear_error(tmp_path, config):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunStoreError, match="cannot open the run directory"):
        RunStore(tmp_path / "file" / "run", config)
