"""Sources fail one tile at a time, or the whole run at once, and never with a raw exception.

Each fault is real: a 127.0.0.1 server that refuses, loops or lies about its headers; a folder
with a directory where a tile should be; an MBTiles file damaged on disk, deleted or replaced;
a tile cache with a garbled date. Also here: cancelling a source that waits on a server, one
rate limit across all of a provider's subdomains, and Python 3.10 compatibility.
"""

from __future__ import annotations

import ast
import datetime as dt
import email.utils
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mercantile
import pytest
from tile_servers import FAST, SECRET, TILES, Fault, tile_server, write_mbtiles

import amber_hunter.sources
from amber_hunter.errors import (
    ConfigError,
    RunAbortError,
    ScanCancelledError,
    SourceUnavailableError,
    TileSourceError,
)
from amber_hunter.sources import (
    MISSING,
    CachedTileSource,
    FolderSource,
    HttpTileSource,
    MBTilesSource,
    TileResult,
    open_source,
    parse_retry_after,
)

TILE = TILES[0]


def template(server, keyed=False):
    return server.url + "/{z}/{x}/{y}.png" + ("?key={key}" if keyed else "")


# --- HTTP: refusals stop the run, other answers fail one tile ------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_refused_key_stops_the_run_with_the_servers_reason_masked(tile_dir, monkeypatch, status):
    root, _ = tile_dir
    monkeypatch.setenv("TILE_KEY", SECRET)
    body = f"Invalid API key {SECRET} for this layer {'x' * 300}\nsecond line never shown\n".encode()
    with tile_server(root, fault=Fault("status", status=status, failures=None, body=body)) as server:
        source = HttpTileSource(template(server, keyed=True), api_key_env="TILE_KEY", **FAST)
        with pytest.raises(SourceUnavailableError) as info:
            source.get(TILE)
    message = str(info.value)
    assert isinstance(info.value, RunAbortError) and isinstance(info.value, TileSourceError)
    assert f"HTTP {status}" in message and "server said: Invalid API key *** for this layer xxx" in message
    assert "$TILE_KEY" in message and "key=***" in message
    assert SECRET not in message and "s3cr3t" not in message and "second line" not in message
    assert "\n" not in message and len(message) < 500  # 300 x's cut to a ~200-character excerpt
    assert sum(server.hits.values()) == 1  # not retried: the answer would not change


@pytest.mark.parametrize(
    "status, body, content_type, said",
    [
        (400, b"zoom level 5 is not served by this layer\n", "text/plain", "zoom level 5 is not served"),
        (410, b"<html><body><h1>Layer retired</h1>\n<p>Use v2</p></body></html>", "text/html", "Layer retired"),
    ],
)
def test_other_client_errors_fail_the_tile_only_and_quote_the_server(tile_dir, status, body, content_type, said):
    root, _ = tile_dir
    fault = Fault("status", status=status, failures=None, body=body, content_type=content_type)
    with (
        tile_server(root, fault=fault) as server,
        HttpTileSource(template(server), **FAST) as source,
        pytest.raises(TileSourceError) as info,
    ):
        source.get(TILE)
    assert not isinstance(info.value, RunAbortError)
    assert f"HTTP {status}" in str(info.value) and f"(server said: {said}" in str(info.value)
    assert "<" not in str(info.value)
    assert sum(server.hits.values()) == 1


@pytest.mark.parametrize(
    "fault, name",
    [
        (Fault("redirect", failures=None), "TooManyRedirects"),
        (Fault("redirect", failures=None, location="ftp://127.0.0.1/5/17/10.png"), "InvalidSchema"),
        (Fault("bad_length", failures=None), "InvalidHeader"),
    ],
    ids=["redirect-loop", "redirect-to-ftp", "contradictory-content-length"],
)
def test_unusable_answers_fail_the_tile_without_retries_or_the_key(tile_dir, monkeypatch, fault, name):
    root, _ = tile_dir
    monkeypatch.setenv("TILE_KEY", SECRET)
    with tile_server(root, fault=fault) as server:
        source = HttpTileSource(template(server, keyed=True), api_key_env="TILE_KEY", max_retries=3, **FAST)
        with pytest.raises(TileSourceError) as info:
            source.get(TILE)
        requests_made = sum(server.hits.values())
    message = str(info.value)
    assert type(info.value) is TileSourceError and f"unusable answer ({name}" in message
    assert "s3cr3t" not in message and "\n" not in message
    assert info.value.__context__ is None and info.value.__cause__ is None  # the original holds the key
    assert requests_made == (31 if name == "TooManyRedirects" else 1)  # requests follows 30 redirects, once


# --- HTTP: cancelling ----------------------------------------------------------------------------


def _in_thread(call) -> tuple[threading.Thread, dict]:
    """Run ``call`` in a daemon thread (a wait that cancel fails to end must not hang pytest)."""
    outcome = {}

    def run():
        try:
            outcome["result"] = call()
        except TileSourceError as exc:  # handed to the test, which checks its type
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_cancel_ends_a_wait_for_retry_after_at_once(tile_dir, tmp_path):
    root, _ = tile_dir
    fault = Fault("status", status=503, retry_after="30", failures=None)
    with tile_server(root, fault=fault) as server:
        source = CachedTileSource(HttpTileSource(template(server), **FAST), tmp_path / "cache")
        thread, outcome = _in_thread(lambda: source.get(TILE))
        _wait_for(lambda: server.hits["/5/17/10.png"] == 1)
        time.sleep(0.2)  # well into the 30 s the server asked for
        start = time.monotonic()
        source.cancel()  # through the cache, to the HTTP source
        thread.join(1.0)
        assert not thread.is_alive() and time.monotonic() - start < 1.0
        assert isinstance(outcome.get("error"), ScanCancelledError), outcome
        assert "cancelled" in str(outcome["error"]) and "/5/17/10.png" in str(outcome["error"])
        with pytest.raises(ScanCancelledError):  # and from now on, at once and without asking the server
            source.get(TILES[1])
    assert sum(server.hits.values()) == 1


def test_cancel_ends_a_rate_limit_wait_at_once(tile_dir):
    root, written = tile_dir
    with tile_server(root) as server, HttpTileSource(template(server), max_rps=0.2, **FAST) as source:
        assert source.get(TILE).data == written[TILE]  # the next request may start 5 s later
        thread, outcome = _in_thread(lambda: source.get(TILES[1]))
        time.sleep(0.2)
        start = time.monotonic()
        source.cancel()
        thread.join(1.0)
        assert not thread.is_alive() and time.monotonic() - start < 1.0
    assert isinstance(outcome.get("error"), ScanCancelledError), outcome
    assert sum(server.hits.values()) == 1


def test_cancel_is_harmless_for_local_sources(tile_dir):
    root, written = tile_dir
    source = FolderSource(root)
    source.cancel()  # nothing waits, so nothing to stop
    assert source.get(TILE).data == written[TILE]


# --- HTTP: one rate limit per provider -----------------------------------------------------------


def test_one_rate_limit_holds_across_all_subdomains(tile_dir):
    root, _ = tile_dir
    # Three spellings of 127.0.0.1 (inet_aton reads 127.1 and 127.0.1 as 127.0.0.1): three host
    # names for {s}, one server, like a.tile.example, b.tile.example, c.tile.example.
    hosts = "127.0.0.1,127.1,127.0.1"
    with tile_server(root) as server:
        spec = f"http://{{s}}:{server.server_port}/{{z}}/{{x}}/{{y}}.png"
        with open_source(spec, subdomains=hosts, max_rps=10, **FAST) as source, ThreadPoolExecutor(6) as pool:
            results = list(pool.map(source.get, [TILES[i % 4] for i in range(12)]))
    assert all(r.status == "ok" for r in results)
    assert {headers["Host"].rsplit(":", 1)[0] for _, headers in server.requests} == set(hosts.split(","))
    # 11 gaps of 1/10 s, whatever the host; a limit per host name allowed one host's 6 requests in 0.5 s.
    assert server.times[-1] - server.times[0] >= 1.1 * 0.85


def test_subdomains_from_a_comma_string():
    with open_source("https://{s}.tiles.example/{z}/{x}/{y}.png", subdomains="t0, t1,t2,t3") as source:
        assert source.subdomains == ("t0", "t1", "t2", "t3")


@pytest.mark.parametrize("subdomains", ["t0,,t2", "", " ", "a,b,", ["a", ""], ("a", 1)])
def test_empty_or_odd_subdomains_are_refused(subdomains):
    with pytest.raises(ConfigError, match="subdomains"):
        open_source("https://{s}.tiles.example/{z}/{x}/{y}.png", subdomains=subdomains)


# --- folders -------------------------------------------------------------------------------------


def test_folder_tiles_that_cannot_be_read_fail_that_tile_only(tile_dir):
    root, written = tile_dir
    tile_path = root / "5" / "17" / "10.png"
    tile_path.unlink()
    tile_path.mkdir()  # a directory where the tile should be
    shutil.rmtree(root / "5" / "18")
    (root / "5" / "18").write_bytes(b"a file where column 18 should be")
    source = FolderSource(root)
    with pytest.raises(TileSourceError, match=r"10\.png: cannot read the tile \(Is a directory\)") as directory:
        source.get(TILES[0])
    with pytest.raises(TileSourceError, match=r"cannot read the tile \(Not a directory\)") as not_directory:
        source.get(TILES[2])
    assert type(directory.value) is TileSourceError and type(not_directory.value) is TileSourceError
    assert source.get(TILES[1]).data == written[TILES[1]]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_folder_tile_without_read_permission_fails_that_tile_only(tile_dir):
    root, _ = tile_dir
    (root / "5" / "17" / "10.png").chmod(0)
    with pytest.raises(TileSourceError, match="Permission denied"):
        FolderSource(root).get(TILE)


@pytest.mark.parametrize("layout", ["plain", "template"])
def test_a_folder_deleted_while_scanning_stops_the_run(tile_dir, layout):
    root, written = tile_dir
    source = FolderSource(root if layout == "plain" else f"{root}/{{z}}/{{x}}/{{y}}.png")
    assert source.get(TILE).data == written[TILE]
    assert source.get(mercantile.Tile(0, 0, 5)) == MISSING  # a gap is not a deleted folder
    shutil.rmtree(root)
    for call in (lambda: source.get(TILES[1]), lambda: source.check_zoom(5)):
        with pytest.raises(SourceUnavailableError, match="tile folder is gone"):
            call()


# --- MBTiles -------------------------------------------------------------------------------------


def _mbtiles(tmp_path, name="area.mbtiles"):
    tiles = [mercantile.Tile(x, y, 5) for x in range(8) for y in range(8)]
    path = tmp_path / name
    return path, tiles, write_mbtiles(path, tiles)


def test_a_damaged_mbtiles_file_fails_tiles_not_the_run(tmp_path):
    path, tiles, _ = _mbtiles(tmp_path)
    source = MBTilesSource(path)  # reads the metadata and one tile: the damage comes after
    size = path.stat().st_size
    with path.open("r+b") as f:  # the last pages: where the tiles written last live
        f.seek(size - 16384)
        f.write(b"\xff" * 16384)
    with pytest.raises(TileSourceError, match=r"tile 5/7/7 is unreadable \(database disk image is malformed\)") as info:
        source.get(tiles[-1])
    assert type(info.value) is TileSourceError and "export it again" in str(info.value)
    source.check_zoom(5)  # the source still answers what it can


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_an_mbtiles_file_deleted_or_replaced_while_scanning_stops_the_run(tmp_path, change):
    path, tiles, written = _mbtiles(tmp_path)
    source = MBTilesSource(path)
    assert source.get(tiles[0]).data == written[tiles[0]]
    path.unlink()
    if change == "replaced":
        other, _, _ = _mbtiles(tmp_path, "other.mbtiles")
        other.rename(path)
    with pytest.raises(
        SourceUnavailableError, match=f"MBTiles file {'is gone' if change == 'deleted' else 'was replaced'}"
    ):
        source.get(tiles[1])


# --- cache ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [b"the fifth of never", b"\xff\xfe2022", b"", b"2022-13-45"])
def test_a_garbled_cached_date_is_unknown_not_a_failure(tile_dir, tmp_path, garbage):
    root, written = tile_dir
    with tile_server(root, headers={"X-Capture-Date": "2022-08-09"}) as server:
        cached = CachedTileSource(HttpTileSource(template(server), date_header="X-Capture-Date", **FAST), tmp_path)
        assert cached.get(TILE).capture_date == dt.date(2022, 8, 9)
        date_file = tmp_path / "5" / "17" / "10.date"
        date_file.write_bytes(garbage)
        assert cached.get(TILE) == TileResult("ok", written[TILE], None)
        assert not date_file.exists()  # removed: read once, warned once
        assert cached.get(TILE) == TileResult("ok", written[TILE], None)
    assert sum(server.hits.values()) == 1


def test_a_cached_tile_that_cannot_be_read_fails_that_tile_only(tile_dir, tmp_path):
    root, written = tile_dir
    (tmp_path / "5" / "17" / "10").mkdir(parents=True)
    with tile_server(root) as server:
        cached = CachedTileSource(HttpTileSource(template(server), **FAST), tmp_path)
        with pytest.raises(TileSourceError, match="cannot read the cached tile") as info:
            cached.get(TILE)
        assert type(info.value) is TileSourceError
        assert cached.get(TILES[1]).data == written[TILES[1]]


def test_a_tile_cache_that_cannot_be_written_stops_the_run(tile_dir, tmp_path):
    root, _ = tile_dir
    blocker = tmp_path / "cache"
    blocker.write_text("a file, not a folder")
    with tile_server(root) as server:
        cached = CachedTileSource(HttpTileSource(template(server), **FAST), blocker)
        with pytest.raises(SourceUnavailableError, match=r"cache: cannot write the tile cache \(Not a directory\)"):
            cached.get(TILE)


# --- Python 3.10 ---------------------------------------------------------------------------------


def test_the_package_has_no_python_311_datetime_utc():
    """setup.cfg promises Python 3.10, which has no ``datetime.UTC``: it would fail at run time."""
    package = Path(amber_hunter.sources.__file__).parents[1]
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            uses = (isinstance(node, ast.Attribute) and node.attr == "UTC") or (
                isinstance(node, ast.ImportFrom)
                and node.module == "datetime"
                and any(a.name == "UTC" for a in node.names)
            )
            if uses:
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    assert not found, f"datetime.UTC is Python 3.11+; use datetime.timezone.utc at {', '.join(found)}"


def test_retry_after_http_dates():
    now = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    assert parse_retry_after("Wed, 01 May 2024 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Wed, 01 May 2024 12:00:30 -0000", now) == 30.0  # naive: taken as UTC
    assert parse_retry_after("Wed, 01 May 2024 14:00:30 +0200", now) == 30.0
    soon = email.utils.format_datetime(dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=60), usegmt=True)
    assert 55.0 <= parse_retry_after(soon) <= 60.0  # against the real clock
    later = email.utils.format_datetime(dt.datetime.now() + dt.timedelta(seconds=60)).replace("+0000", "-0000")
    assert parse_retry_after(later) is not None
