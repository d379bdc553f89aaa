"""The tile cache's size limit: least recently used tiles go first (their date and missing markers
with them), the index outlives the process, a damaged or lost index is rebuilt from the files,
processes sharing a cache agree, and a pruned scene is said, not refetched."""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import sqlite3
from collections import Counter
from pathlib import Path

import mercantile
import pytest

from amber_hunter.errors import ConfigError, SceneUnavailableError
from amber_hunter.sources import MISSING, CachedTileSource, TileResult, TileSource
from amber_hunter.sources.cache import INDEX_NAME, _tile, disk_bytes

DATE = dt.date(2023, 5, 1)
#: Three blocks of tile and one of date: each cached tile takes 16 KiB on disk.
TILE_BYTES = 3 * 4096
ONE_TILE = disk_bytes(TILE_BYTES, len(DATE.isoformat()))


def tile(i: int) -> mercantile.Tile:
    return mercantile.Tile(1000 + i % 40, 2000 + i // 40, 12)


class MadeUpSource(TileSource):
    """Tiles invented on request and counted; ``missing`` are gaps in the imagery."""

    tile_size = 256

    def __init__(self, missing=()):
        self.fetched = Counter()
        self.missing = set(missing)

    def get(self, t):
        self.fetched[t] += 1
        return MISSING if t in self.missing else TileResult("ok", bytes([t.x % 251]) * TILE_BYTES, DATE)

    def describe(self):
        return "made-up tiles"


def on_disk(cache: Path) -> tuple[dict[mercantile.Tile, set[str]], int]:
    """The cached tiles' files by tile, and the disk they take (the index itself aside)."""
    files, total = {}, 0
    for path in cache.rglob("*"):
        if path.is_file() and not path.name.startswith(INDEX_NAME):
            z, x, name = path.relative_to(cache).parts
            y, _, suffix = name.partition(".")
            files.setdefault(mercantile.Tile(int(x), int(y), int(z)), set()).add(suffix)
            total += disk_bytes(path.stat().st_size)
    return files, total


def test_the_limit_holds_through_a_scan_and_the_newest_tiles_stay(tmp_path):
    cache, limit = tmp_path / "cache", 10 * ONE_TILE
    wanted = [tile(i) for i in range(60)]
    source = MadeUpSource(missing=wanted[5::7])
    with CachedTileSource(source, cache, max_bytes=limit) as cached:
        for t in wanted:
            assert cached.get(t) == (MISSING if t in source.missing else TileResult("ok", source.get(t).data, DATE))
            assert on_disk(cache)[1] <= limit
    files, total = on_disk(cache)
    assert total > 0.9 * limit - ONE_TILE  # pruned to ~90 %, a tile at most below, not emptied
    newest = wanted[-len(files):]
    assert set(files) == set(newest), "not the most recently used tiles"
    for t in newest:  # each tile whole: its data with its date, or its missing marker alone
        assert files[t] == ({"missing"} if t in source.missing else {"", "date"})


@pytest.mark.parametrize("reopen", [False, True], ids=["same-process", "reopened"])
def test_a_tile_read_recently_survives_pruning(tmp_path, reopen, caplog):
    """Reading tile 0 makes it the most recent: the next pruning takes tiles 1 and 2 instead. A
    reopened cache knows this from its index; a walk of the files would see tile 0 as oldest."""
    cache, limit, source = tmp_path / "cache", 10 * ONE_TILE, MadeUpSource()
    cached = CachedTileSource(source, cache, max_bytes=limit)
    for i in range(10):
        cached.get(tile(i))
    assert on_disk(cache)[1] == limit  # full, not past it: nothing pruned yet
    cached.get(tile(0))
    if reopen:
        cached.close()
        caplog.clear()
        cached = CachedTileSource(source, cache, max_bytes=limit)
    with caplog.at_level(logging.INFO, logger="amber_hunter.sources.cache"):
        cached.get(tile(10))
    cached.close()
    files, _ = on_disk(cache)
    assert set(files) == {tile(i) for i in (0, *range(3, 11))}
    assert source.fetched[tile(0)] == 1
    assert "pruned 2 least recently used tiles" in caplog.text
    assert "rebuild" not in caplog.text and "indexed" not in caplog.text  # the index, not a walk


@pytest.mark.parametrize("damage", ["garbage", "deleted"])
def test_a_damaged_or_lost_index_is_rebuilt_from_the_files_once(tmp_path, damage, caplog):
    cache, limit = tmp_path / "cache", 10 * ONE_TILE
    with CachedTileSource(MadeUpSource(), cache) as cached:  # no limit: still indexed
        for i in range(10):
            cached.get(tile(i))
    for suffix in ("-wal", "-shm"):
        Path(f"{cache / INDEX_NAME}{suffix}").unlink(missing_ok=True)
    if damage == "garbage":
        (cache / INDEX_NAME).write_bytes(b"not an index, a kill's or a disk's leftovers" * 200)
    else:
        (cache / INDEX_NAME).unlink()
    with (caplog.at_level(logging.INFO, logger="amber_hunter.sources.cache"),
          CachedTileSource(MadeUpSource(), cache, max_bytes=limit) as cached):
        for i in range(10, 15):
            cached.get(tile(i))
            assert on_disk(cache)[1] <= limit  # the files from before the damage are counted
    assert "indexed 10 cached tiles found on its disk" in caplog.text
    assert ("is damaged" in caplog.text) == (damage == "garbage")
    assert set(on_disk(cache)[0]) == {tile(i) for i in range(6, 15)}  # oldest first, by modification time
    caplog.clear()
    with (caplog.at_level(logging.INFO, logger="amber_hunter.sources.cache"),
          CachedTileSource(MadeUpSource(), cache, max_bytes=limit) as cached):
        cached.get(tile(15))
    assert "indexed" not in caplog.text and "damaged" not in caplog.text  # once, not at every open


def _share(cache: str, limit: int, first: int) -> None:
    """One of two processes filling one cache: a window of tiles, overlapping the other's, with
    every third tile read again."""
    with CachedTileSource(MadeUpSource(missing={tile(i) for i in range(0, 90, 11)}), cache, max_bytes=limit) as cached:
        for i in range(first, first + 60):
            cached.get(tile(i))
            if i % 3 == 0:
                cached.get(tile(i - 2))


def test_two_processes_sharing_a_cache_keep_it_consistent(tmp_path):
    cache, limit = tmp_path / "cache", 20 * ONE_TILE
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_share, args=(str(cache), limit, first)) for first in (0, 30)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    files, total = on_disk(cache)
    assert total <= limit
    with sqlite3.connect(cache / INDEX_NAME) as db:
        indexed = dict(db.execute("SELECT key, bytes FROM tiles"))
        counted = db.execute("SELECT value FROM meta WHERE name = 'bytes'").fetchone()[0]
    assert counted == sum(indexed.values()) >= total
    assert set(files) <= {_tile(key) for key in indexed}, "a cached tile nobody counts"
    for t, suffixes in files.items():
        assert suffixes in ({"", "date"}, {"missing"}), (t, suffixes)


@pytest.mark.parametrize("max_bytes", [0, -1, 1.5, True])
def test_a_bad_limit_is_refused(tmp_path, max_bytes):
    with pytest.raises(ConfigError, match=f"max_bytes={max_bytes!r}.*--tile-cache-max-gb"):
        CachedTileSource(MadeUpSource(), tmp_path, max_bytes=max_bytes)


def test_a_scene_pruned_from_the_cache_is_said_by_resegment(region, tiny_model, tmp_path):
    """A scan over HTTP with a cache too small for the region: the first scene's tiles are pruned,
    and segmenting it again (explore, feedback, rescore) names the scene and does not refetch."""
    from scan_fixtures import LAYOUT, region_cells
    from tile_servers import tile_server

    from amber_hunter.model.segment import SlicParams
    from amber_hunter.run.resegment import resegment
    from amber_hunter.run.scan import scan
    from amber_hunter.run.store import RunStore

    first = region_cells()[LAYOUT.index("positive1")]
    tiles = [region.folder / str(t.z) / str(t.x) / f"{t.y}.png" for t in first.tiles]
    limit = disk_bytes(*(path.stat().st_size for path in tiles[:2]))  # two of the first scene's tiles
    cache = tmp_path / "tile-cache"
    with tile_server(region.folder) as server:
        config = region.config(server.url + "/{z}/{x}/{y}.png", tiny_model, tile_cache=str(cache),
                               tile_cache_max_gb=limit / 2**30)
        scan(config, tmp_path / "run")
        fetched = len(server.requests)
        assert on_disk(cache)[1] <= limit
        with RunStore(tmp_path / "run") as store:
            assert {s.scene_id: s.status for s in store.scenes()}[first.scene_id] == "done"
            with pytest.raises(SceneUnavailableError) as info:
                resegment(store, first.scene_id, SlicParams())
        assert len(server.requests) == fetched, "resegment fetched tiles"
    message = str(info.value)
    assert first.scene_id in message and "no longer holds this scene's tiles" in message
    assert "not fetched again" in message
