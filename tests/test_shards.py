"""Embeddings in shards of many scenes: staged in each scene's transaction, sealed into one Parquet
file at a time, read back by streaming; a kill at any point loses no committed scene and counts
none twice; ``status`` reads small tables (counts kept by triggers, per-session stage times), never
a pass over the scene or event rows."""

from __future__ import annotations

import errno
import os
import sqlite3
import time

import numpy as np
import pytest
from kill9 import kill_when_printed

from amber_hunter import atomic
from amber_hunter.errors import RunStoreError
from amber_hunter.geo.tiles import Bounds, SceneCell
from amber_hunter.model.detect import SceneResult
from amber_hunter.run import store as store_module
from amber_hunter.run.config import RunConfig
from amber_hunter.run.store import (
    STAGES,
    ModelVersion,
    RegionRecord,
    RescoredRegion,
    RescoredScene,
    RunStore,
    SceneRecord,
    StageTimes,
)

CELLS = [SceneCell(18, 150186 + 4 * k, 88196, 4) for k in range(10)]
BOX = Bounds(26.0, 50.0, 26.01, 50.01)
DIM = 6


@pytest.fixture
def config(tmp_path):
    return RunConfig(aoi="26.24,50.61,26.27,50.63", tiles=str(tmp_path))


def vectors_of(scene_id: str, n: int, version: int = 0) -> np.ndarray:
    """Vectors that say which scene, superpixel and recording they belong to."""
    k = CELLS.index(next(c for c in CELLS if c.scene_id == scene_id))
    return np.array([[k, g, version, 0.1, -1e-7, 3e5][:DIM] for g in range(1, n + 1)], np.float32)


def done(scene_id: str, n: int = 3, version: int = 0, flagged: bool = False, valid_fraction: float = 1.0,
         timings: StageTimes | None = None) -> SceneRecord:
    result = SceneResult(flagged=flagged, n_positive=n if flagged else 0, n_superpixels=n, probabilities=[0.9] * n,
                         positive_labels=list(range(1, n + 1)) if flagged else [], threshold=0.5, min_positive=2,
                         max_probability=0.9, positive_area_px=100, positive_area_m2=14.4)
    regions = tuple(RegionRecord(g, 0.9, flagged, 14.4, BOX) for g in range(1, n + 1))
    return SceneRecord(scene_id, "done", BOX, result=result, regions=regions, embeddings=vectors_of(scene_id, n, version),
                       embedder="texture", valid_fraction=valid_fraction, timings=timings)


def current(store: RunStore) -> dict[tuple[str, int], tuple]:
    rows = {}
    for batch in store.embedding_batches(batch_rows=4):
        assert len(batch.labels) <= 4 and batch.vectors.dtype == np.float32 and batch.embedder == "texture"
        for scene_id, label, vector in zip(batch.scene_ids, batch.labels.tolist(), batch.vectors):
            assert (scene_id, label) not in rows, "a superpixel read twice"
            rows[(scene_id, label)] = tuple(vector.tolist())
    return rows


def expected(records: dict[str, SceneRecord]) -> dict[tuple[str, int], tuple]:
    return {(r.scene_id, g): tuple(v.tolist()) for r in records.values() if r.embeddings is not None
            for g, v in zip(range(1, len(r.embeddings) + 1), r.embeddings)}


def shards(run) -> list[str]:
    return sorted(p.name for p in (run / "embeddings").glob("*.parquet"))


def test_scenes_are_staged_then_sealed_into_few_shards_and_read_back_exactly(tmp_path, config, monkeypatch):
    monkeypatch.setattr(store_module, "SHARD_SCENES", 4)
    run = tmp_path / "run"
    records = {c.scene_id: done(c.scene_id, n=2 + k % 3) for k, c in enumerate(CELLS)}
    with RunStore(run, config) as store:
        store.add_scenes(CELLS)
        for k, record in enumerate(records.values()):
            store.record(record)
            assert store.status().done == k + 1  # committed at once, sealed or not
        assert shards(run) == ["shard-000001.parquet", "shard-000002.parquet"]  # 2 scenes still staged
        assert current(store) == expected(records)
    assert shards(run) == ["shard-000001.parquet", "shard-000002.parquet", "shard-000003.parquet"]
    with RunStore(run) as store:
        assert store._db.execute("SELECT COUNT(*) FROM staged").fetchone()[0] == 0
        assert current(store) == expected(records)
        assert store.embedders() == {"texture": DIM}
        assert store.embedding_rows() == sum(len(r.embeddings) for r in records.values())
        table = store.embeddings()
        assert table.num_rows == store.embedding_rows() and table.column("vector").type.list_size == DIM


def test_a_scene_recorded_again_is_read_from_its_newest_rows_only(tmp_path, config, monkeypatch):
    monkeypatch.setattr(store_module, "SHARD_SCENES", 3)
    records = {c.scene_id: done(c.scene_id) for c in CELLS[:6]}
    with RunStore(tmp_path / "run", config) as store:
        store.add_scenes(CELLS[:6])
        for record in records.values():
            store.record(record)  # two shards sealed
        again = done(CELLS[0].scene_id, n=2, version=1)  # its old rows stay in shard 1
        failed = SceneRecord(CELLS[4].scene_id, "failed", BOX, error="tile 1/2/3: HTTP 500")
        store.record(again)
        store.record(failed)
        records |= {again.scene_id: again, failed.scene_id: failed}
        assert current(store) == expected(records)  # one staged, the rest in shards, stale rows skipped
        store.flush()
        assert current(store) == expected(records)
        assert store.embedding_rows() >= len(expected(records))
        keys = list(zip(store.embeddings().column("scene_id").to_pylist(), store.embeddings().column("label").to_pylist()))
        assert len(keys) == len(set(keys)) == len(expected(records))


def test_a_store_left_by_an_error_keeps_its_scenes_staged_for_the_next_session(tmp_path, config):
    with pytest.raises(KeyboardInterrupt), RunStore(tmp_path / "run", config) as store:
        store.add_scenes(CELLS[:2])
        store.record(done(CELLS[0].scene_id))
        raise KeyboardInterrupt  # a second Ctrl-C: no shard is written on the way out
    assert shards(tmp_path / "run") == []
    with RunStore(tmp_path / "run", config) as store:
        assert store.status().done == 1 and list(current(store)) == [(CELLS[0].scene_id, g) for g in (1, 2, 3)]
    assert shards(tmp_path / "run") == ["shard-000001.parquet"]  # sealed by the next session's normal end


def test_an_orphan_shard_from_a_failure_before_its_commit_is_overwritten(tmp_path, config, monkeypatch):
    records = {c.scene_id: done(c.scene_id) for c in CELLS[:3]}
    original = atomic.write_bytes

    def written_then_lost(path, data):
        original(path, data)
        raise OSError(errno.EIO, "input/output error")  # the shard is on disk, its transaction never runs

    with RunStore(tmp_path / "run", config) as store:
        store.add_scenes(CELLS[:3])
        for record in records.values():
            store.record(record)
        monkeypatch.setattr(atomic, "write_bytes", written_then_lost)
        with pytest.raises(RunStoreError, match="cannot seal an embeddings shard"):
            store.flush()
        monkeypatch.setattr(atomic, "write_bytes", original)
        assert shards(tmp_path / "run") == ["shard-000001.parquet"]  # the orphan
        assert store._db.execute("SELECT COUNT(*) FROM shards").fetchone()[0] == 0
        assert current(store) == expected(records)  # still read from the staged rows
        records[CELLS[0].scene_id] = done(CELLS[0].scene_id, version=2)
        store.record(records[CELLS[0].scene_id])
    assert shards(tmp_path / "run") == ["shard-000001.parquet"]  # rewritten, not a shard 2 beside it
    with RunStore(tmp_path / "run") as store:
        assert current(store) == expected(records)


KILLED = """
import sys, time
import numpy as np
from amber_hunter import atomic
from amber_hunter.run import store as s
sys.path.insert(0, sys.argv[2])
from test_shards import CELLS, done
from amber_hunter.run.config import RunConfig
original = atomic.write_bytes
def slow(path, data):
    original(path, data)
    if path.name.startswith("shard-"):
        print("sealed", flush=True)  # the shard file is in place, its transaction not yet run
        time.sleep(120)
atomic.write_bytes = slow
s.SHARD_SCENES = 4
store = s.RunStore(sys.argv[1], RunConfig(aoi="26.24,50.61,26.27,50.63", tiles=sys.argv[3]))
store.add_scenes(CELLS)
for c in CELLS:
    store.record(done(c.scene_id))
"""


def test_a_scan_killed_while_sealing_loses_no_scene_and_counts_none_twice(tmp_path, config):
    run = tmp_path / "run"
    tests = os.path.dirname(__file__)
    kill_when_printed(KILLED, [str(run), tests, config.tiles], "sealed", 60, "sealing a shard")
    with RunStore(run, config) as store:
        s = store.status()
        assert (s.done, s.pending) == (4, len(CELLS) - 4)  # the four recorded scenes, staged
        assert list(store.pending()) == [c.scene_id for c in CELLS[4:]]
        assert set(current(store)) == {(c.scene_id, g) for c in CELLS[:4] for g in (1, 2, 3)}
        for c in CELLS[4:]:  # the rerun does the rest
            store.record(done(c.scene_id))
    with RunStore(run) as store:
        assert store.status().done == len(CELLS)
        assert current(store) == expected({c.scene_id: done(c.scene_id) for c in CELLS})


def test_a_missing_shard_is_one_clear_line(tmp_path, config):
    with RunStore(tmp_path / "run", config) as store:
        store.add_scenes(CELLS[:2])
        store.record(done(CELLS[0].scene_id))
    (tmp_path / "run" / "embeddings" / "shard-000001.parquet").unlink()
    with RunStore(tmp_path / "run") as store, pytest.raises(RunStoreError, match="shard-000001.parquet is missing") as info:
        list(store.embedding_batches())
    assert "\n" not in str(info.value)


def test_a_run_of_the_one_file_per_scene_layout_is_refused_with_a_rescan(tmp_path, config):
    RunStore(tmp_path / "run", config).close()
    db = sqlite3.connect(tmp_path / "run" / "run.sqlite")
    db.execute("PRAGMA user_version = 2")
    db.close()
    with pytest.raises(RunStoreError, match=r"schema 2, this one reads 3\); rescan the area into a new run") as info:
        RunStore(tmp_path / "run")
    assert "\n" not in str(info.value)


# --- status ------------------------------------------------------------------------------------


def _counted(store: RunStore) -> tuple:
    """What status says, against the same figures counted from the scene rows."""
    s = store.status()
    db = store._db
    counts = dict(db.execute("SELECT status, COUNT(*) FROM scenes WHERE in_grid GROUP BY status").fetchall())
    flagged, partial, dropped = db.execute(
        "SELECT SUM(in_grid AND status = 'done' AND flagged), SUM(in_grid AND status = 'done' AND valid_fraction < 1), "
        "SUM(NOT in_grid) FROM scenes").fetchone()
    truth = (sum(counts.values()), counts.get("pending", 0), counts.get("done", 0), counts.get("failed", 0),
             counts.get("no-imagery", 0), counts.get("skipped", 0), flagged or 0, partial or 0, dropped or 0)
    return (s.total, s.pending, s.done, s.failed, s.no_imagery, s.skipped, s.flagged, s.partial, s.dropped), truth


def test_status_counts_follow_every_kind_of_change(tmp_path, config):
    with RunStore(tmp_path / "run", config) as store:
        store.add_scenes(CELLS[:6])
        store.record(done(CELLS[0].scene_id, flagged=True, valid_fraction=0.5))
        store.record(done(CELLS[1].scene_id, flagged=True))
        store.record(SceneRecord(CELLS[2].scene_id, "failed", BOX, error="x"))
        store.record(SceneRecord(CELLS[3].scene_id, "no-imagery", BOX))
        store.record(SceneRecord(CELLS[4].scene_id, "skipped", BOX))
        got, truth = _counted(store)
        assert got == truth == (6, 1, 2, 1, 1, 1, 2, 1, 0)
        store.record(done(CELLS[0].scene_id, flagged=False))  # recorded again: unflagged, whole
        store.retry_failed()
        store.add_scenes(CELLS[:6])  # a resume registers the grid again
        got, truth = _counted(store)
        assert got == truth == (6, 2, 2, 0, 1, 1, 1, 0, 0)
        store.apply_rescore([RescoredScene(CELLS[1].scene_id, False, 0, 0.1, 0.0, (RescoredRegion(1, 0.1, False),))],
                            ModelVersion(1, tmp_path / "run" / "models" / "v1", "h", None, None, {}, 0.0, True), "m")
        got, truth = _counted(store)
        assert got == truth and got[6] == 0
    with RunStore(tmp_path / "run", RunConfig(aoi="26.24,50.61,26.28,50.63", tiles=config.tiles), force=True) as store:
        store.add_scenes(CELLS[3:8])  # a forced regrid drops three scenes
        got, truth = _counted(store)
        assert got == truth == (5, 3, 0, 0, 1, 1, 0, 0, 3)


def test_status_adds_up_the_stage_times_and_the_latest_session_rate(tmp_path, config):
    t = StageTimes(fetch=0.5, decode=0.25, slic=1.0, embed=2.0, classify=0.125, store=0.0)
    with RunStore(tmp_path / "run", config) as store:
        store.add_scenes(CELLS)
        for c in CELLS[:3]:
            store.record(done(c.scene_id, timings=t))
            time.sleep(0.01)
        store.record(SceneRecord(CELLS[3].scene_id, "failed", BOX, error="x"))  # untimed
        s = store.status()
    assert s.timed_scenes == 3 and s.rate is not None and s.rate > 0
    for name in STAGES[:-1]:
        assert getattr(s.stage_seconds, name) == pytest.approx(3 * getattr(t, name))
    assert 0 < s.stage_seconds.store < 10  # the store times itself, for every scene
    with RunStore(tmp_path / "run", config) as store:  # a session with nothing to do keeps the last rate
        assert store.status().rate == s.rate and store.status().timed_scenes == 3


def _plans(store: RunStore) -> list[str]:
    """The query plans of every statement ``status()`` runs."""
    statements = []
    store._db.set_trace_callback(statements.append)
    store.status()
    store._db.set_trace_callback(None)
    assert statements
    return [" | ".join(row[3] for row in store._db.execute(f"EXPLAIN QUERY PLAN {sql}")) for sql in statements]


def test_status_on_a_big_run_reads_no_scene_or_event_rows(tmp_path, config):
    n = 200_000
    with RunStore(tmp_path / "run", config) as store:
        store.add_scenes(CELLS[:1])
        with store._db:  # generated inside SQLite: 200,000 rows of each in a second or two
            rows = f"WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM k WHERE i < {n - 1}) "
            store._db.execute(
                f"INSERT INTO scenes (scene_id, status, flagged, valid_fraction) {rows}"
                "SELECT '18/' || i || '/0/4', CASE i % 3 WHEN 0 THEN 'done' WHEN 1 THEN 'pending' ELSE 'failed' END, "
                "i % 7 = 0, 1.0 - (i % 5 = 0) * 0.5 FROM k")
            store._db.execute(f"INSERT INTO events (ts, kind, scene_id, message) {rows}"
                              "SELECT 1e9 + i, 'scene', '18/' || i || '/0/4', 'done' FROM k")
        store._db.execute("ANALYZE")
        plans = _plans(store)
        got, truth = _counted(store)
    assert got == truth and got[0] == n + 1
    for plan in plans:
        assert "SCAN scenes" not in plan and "SCAN events" not in plan and "SCAN regions" not in plan, plan
