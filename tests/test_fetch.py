"""Tile sources against real sockets, files and SQLite: retries, limits, caching, secrets."""

from __future__ import annotations

import datetime as dt
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import mercantile
import pytest
from tile_servers import FAST, SECRET, TILES, Fault, tile_server, write_mbtiles, write_tile_folder

from amber_hunter.errors import ConfigError, SourceUnavailableError, TileSourceError
from amber_hunter.images import decode_rgb
from amber_hunter.sources import (
    MISSING,
    CachedTileSource,
    FolderSource,
    HttpTileSource,
    MBTilesSource,
    TileResult,
    expand_template,
    open_source,
    parse_capture_date,
    parse_retry_after,
)


def template(server):
    return server.url + "/{z}/{x}/{y}.png"


# --- URL templates -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, expected",
    [
        ("https://t/{z}/{x}/{y}.png", "https://t/5/17/10.png"),
        ("https://t/{z}/{x}/{-y}.png", "https://t/5/17/21.png"),
        ("https://t/q/{q}.jpeg", "https://t/q/" + mercantile.quadkey(17, 10, 5) + ".jpeg"),
        ("https://{s}.t/{z}/{x}/{y}", "https://a.t/5/17/10"),  # (17 + 10) % 3 == 0
        ("https://t/{z}/{x}/{y}?k={key}", "https://t/5/17/10?k=K"),
    ],
)
def test_expand_template(template, expected):
    assert expand_template(template, mercantile.Tile(17, 10, 5), key="K") == expected


def test_subdomains_spread_neighbours_and_stick_per_tile():
    hosts = [expand_template("{s}", mercantile.Tile(x, 0, 5), subdomains=("a", "b", "c")) for x in range(6)]
    assert hosts == ["a", "b", "c", "a", "b", "c"]
    source = HttpTileSource("https://{s}.t/{z}/{x}/{y}.png", subdomains="mt0,mt1")
    assert source.subdomains == ("mt0", "mt1")


@pytest.mark.parametrize(
    "template, options, error, fragment",
    [
        ("https://t/{z}/{x}.png", {}, TileSourceError, "does not name a tile"),
        ("https://t/{z}/{x}/{y}/{layer}.png", {}, TileSourceError, "unknown placeholder {layer}"),
        ("https://t/{z}/{x}/{y}?k={key}", {}, TileSourceError, "api_key_env"),
        ("https://t/{z}/{x}/{y}", {"api_key_env": "TILE_KEY"}, TileSourceError, "disagree"),
        ("https://t/{z}/{x}/{y}?k={key}", {"api_key_env": "UNSET_TILE_KEY"}, TileSourceError, "UNSET_TILE_KEY"),
        ("https://{s}.t/{z}/{x}/{y}", {"subdomains": ()}, ConfigError, "subdomains"),
        ("https://t/{z}/{x}/{y}", {"max_rps": 0}, ConfigError, "max_rps"),
        ("https://t/{z}/{x}/{y}", {"max_retries": -1}, ConfigError, "max_retries"),
    ],
)
def test_bad_templates_and_options(monkeypatch, template, options, error, fragment):
    monkeypatch.delenv("UNSET_TILE_KEY", raising=False)
    monkeypatch.setenv("TILE_KEY", SECRET)
    with pytest.raises(error, match=fragment.replace("{", r"\{").replace("}", r"\}")):
        HttpTileSource(template, **options)


# --- HTTP --------------------------------------------------------------------------------------


def test_healthy_server_serves_tiles_with_user_agent(tile_dir):
    root, written = tile_dir
    with tile_server(root) as server, HttpTileSource(template(server), **FAST) as source:
        for tile, data in written.items():
            result = source.get(tile)
            assert result == TileResult("ok", data)
            assert decode_rgb(result.data).shape == (32, 32, 3)
    agent = server.requests[0][1]["User-Agent"]
    assert agent.startswith("amber-hunter/") and "(+https://" in agent


def test_api_key_is_sent_but_never_shown(tile_dir, monkeypatch):
    root, written = tile_dir
    monkeypatch.setenv("TILE_KEY", SECRET)
    keyed = "/{z}/{x}/{y}.png?key={key}"
    with tile_server(root) as server:
        source = HttpTileSource(server.url + keyed, api_key_env="TILE_KEY", **FAST)
        assert source.get(TILES[0]).data == written[TILES[0]]
        assert server.requests[0][0].endswith("?key=s3cr3t%2Fkey%2B42")
        assert SECRET not in repr(source) and "TILE_KEY" in source.describe()
    with tile_server(root, fault=Fault("status", status=403, failures=None)) as server:
        with pytest.raises(SourceUnavailableError) as forbidden:
            HttpTileSource(server.url + keyed, api_key_env="TILE_KEY", **FAST).get(TILES[0])
        assert server.hits["/5/17/10.png"] == 1  # a 403 is not retried
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(TileSourceError) as refused:
        HttpTileSource(dead + keyed, api_key_env="TILE_KEY", max_retries=1, **FAST).get(TILES[0])
    for info in (forbidden, refused):
        message = str(info.value)
        assert "key=***" in message and "\n" not in message
        assert "s3cr3t" not in message and "s3cr3t" not in repr(info.value.__cause__ or info.value.__context__)
    assert "HTTP 403" in str(forbidden.value) and "ConnectionError" in str(refused.value)


@pytest.mark.parametrize(
    "fault",
    [
        Fault("status", status=429, retry_after="0"),
        Fault("status", status=500),
        Fault("status", status=503, failures=3),
        Fault("truncate"),
        Fault("slow", delay=1.0),
    ],
    ids=["429", "500", "503x3", "truncated", "slow"],
)
def test_retries_get_the_same_bytes_as_a_healthy_server(tile_dir, fault):
    root, written = tile_dir
    options = {"base_delay": 0.01, "timeout": (2.0, 0.3)}
    with tile_server(root, fault=fault) as server, HttpTileSource(template(server), **options) as source:
        assert {tile: source.get(tile).data for tile in TILES} == written
    assert all(hits == fault.failures + 1 for hits in server.hits.values())


def test_retry_after_is_honoured(tile_dir):
    root, written = tile_dir
    with tile_server(root, fault=Fault("status", status=429, retry_after="1")) as server:
        start = time.monotonic()
        assert HttpTileSource(template(server), **FAST).get(TILES[0]).data == written[TILES[0]]
        assert time.monotonic() - start >= 0.95


def test_parse_retry_after():
    now = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    assert parse_retry_after("3", now) == 3.0
    assert parse_retry_after("Wed, 01 May 2024 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Wed, 01 May 2024 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None and parse_retry_after(None) is None
    assert parse_retry_after("nan") is None


def test_permanent_failure_raises_after_retries(tile_dir):
    root, _ = tile_dir
    with tile_server(root, fault=Fault("status", status=500, failures=None)) as server:
        source = HttpTileSource(template(server), max_retries=3, **FAST)
        with pytest.raises(TileSourceError, match=r"/5/17/10\.png: still failing after 3 retries \(last: HTTP 500"):
            source.get(TILES[0])
    assert server.hits["/5/17/10.png"] == 4


def test_404_and_204_are_missing_not_errors(tile_dir):
    root, _ = tile_dir
    with tile_server(root, no_content=["/5/0/0.png"]) as server, HttpTileSource(template(server), **FAST) as source:
        assert source.get(mercantile.Tile(0, 0, 5)) == MISSING  # 204
        assert source.get(mercantile.Tile(1, 1, 5)) == MISSING  # 404
    assert sum(server.hits.values()) == 2


def test_rate_limit_holds_across_threads(tile_dir):
    root, _ = tile_dir
    with tile_server(root) as server, HttpTileSource(template(server), max_rps=50, **FAST) as source:
        start = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(source.get, [TILES[i % 4] for i in range(20)]))
        elapsed = time.monotonic() - start
    assert all(r.status == "ok" for r in results)
    assert elapsed >= 0.35  # 19 gaps of 1/50 s


def test_capture_date_from_header(tile_dir):
    root, _ = tile_dir
    with tile_server(root, headers={"X-Capture-Date": "2023-05-17T10:30:00Z"}) as server:
        dated = HttpTileSource(template(server), date_header="x-capture-date", **FAST)
        assert dated.get(TILES[0]).capture_date == dt.date(2023, 5, 17)
        assert HttpTileSource(template(server), **FAST).get(TILES[0]).capture_date is None
    assert parse_capture_date("2021-02-03") == dt.date(2021, 2, 3)
    assert parse_capture_date("Tue, 15 Nov 1994 08:12:31 GMT") == dt.date(1994, 11, 15)
    assert parse_capture_date("last spring") is None


# --- cache -------------------------------------------------------------------------------------


def test_cache_never_downloads_a_tile_twice(tile_dir, tmp_path):
    root, written = tile_dir
    gap = mercantile.Tile(0, 0, 5)
    with tile_server(root, headers={"X-Capture-Date": "2022-08-09"}) as server:
        for _ in range(2):  # a second run, with a fresh source over the same cache
            http = HttpTileSource(template(server), date_header="X-Capture-Date", **FAST)
            with CachedTileSource(http, tmp_path / "cache") as cached:
                for tile, data in written.items():
                    assert cached.get(tile) == TileResult("ok", data, dt.date(2022, 8, 9))
                assert cached.get(gap) == MISSING
    assert sum(server.hits.values()) == len(written) + 1
    assert (tmp_path / "cache" / "5" / "17" / "10").read_bytes() == written[TILES[0]]


def test_cache_does_not_store_failures(tile_dir, tmp_path):
    root, _ = tile_dir
    with tile_server(root, fault=Fault("status", status=500, failures=None)) as server:
        cached = CachedTileSource(HttpTileSource(template(server), max_retries=0, **FAST), tmp_path / "cache")
        for _ in range(2):
            with pytest.raises(TileSourceError):
                cached.get(TILES[0])
    assert server.hits["/5/17/10.png"] == 2


# --- files -------------------------------------------------------------------------------------


def test_mbtiles_source_flips_rows_and_checks_zoom(tmp_path):
    path = tmp_path / "area one.mbtiles"
    written = write_mbtiles(path, TILES)
    with open_source(str(path)) as source:
        assert isinstance(source, MBTilesSource)
        assert {t: source.get(t).data for t in TILES} == written
        assert source.get(mercantile.Tile(0, 0, 5)) == MISSING
        with pytest.raises(TileSourceError, match="zoom 6 is outside the file's zooms 5-5"):
            source.get(mercantile.Tile(0, 0, 6))
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            source._db.execute("DELETE FROM tiles")


def test_mbtiles_without_zoom_metadata_asks_the_tiles_table(tmp_path):
    path = tmp_path / "bare.mbtiles"
    write_mbtiles(path, TILES, metadata=())
    source = MBTilesSource(path)
    source.check_zoom(5)
    with pytest.raises(TileSourceError, match="no tiles at zoom 4"):
        source.check_zoom(4)


def test_folder_source_reads_png_and_jpeg(tmp_path):
    root = tmp_path / "folder"
    written = write_tile_folder(root, TILES[:2]) | write_tile_folder(root, TILES[2:], suffix=".jpeg")
    source = open_source(root)
    assert isinstance(source, FolderSource)
    assert {t: source.get(t).data for t in TILES} == written
    assert source.get(mercantile.Tile(0, 0, 5)) == MISSING
    with pytest.raises(TileSourceError, match="no folder for zoom 7"):
        source.get(mercantile.Tile(0, 0, 7))


# --- open_source -------------------------------------------------------------------------------


def test_open_source_picks_http_and_passes_options():
    with open_source("https://tiles.example/{z}/{x}/{y}.png", max_retries=2, date_header=None) as source:
        assert isinstance(source, HttpTileSource)
        assert source.max_retries == 2 and source.date_header is None


@pytest.mark.parametrize(
    "spec, error, fragment",
    [
        ("ftp://tiles.example/{z}/{x}/{y}.png", TileSourceError, "not usable"),
        ("no/such/folder", TileSourceError, "an .mbtiles file, an existing folder"),
        ("missing.mbtiles", TileSourceError, "no such MBTiles file"),
        ("not-sqlite.mbtiles", TileSourceError, "not a readable MBTiles file"),
        ("plain.txt", TileSourceError, "not usable"),
    ],
)
def test_bad_specs(tmp_path, monkeypatch, spec, error, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not-sqlite.mbtiles").write_bytes(b"PNG? no, just text" * 100)
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(error, match=fragment):
        open_source(spec)


def test_http_only_options_are_refused_for_files(tmp_path):
    (tmp_path / "5").mkdir()
    with pytest.raises(ConfigError, match="option max_rps does not apply to the folder source"):
        open_source(str(tmp_path), max_rps=3)
    assert isinstance(open_source(str(tmp_path), max_rps=None), FolderSource)
