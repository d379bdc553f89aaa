"""A night's run survives what goes wrong in one scene, and stops at once on what is wrong with all.

Every escape found by reading the code is reproduced for real: a directory where a tile should be,
a decompression-bomb tile, a corrupt MBTiles file, a redirect loop, a malformed date in the tile
cache, a bug in detection. Each fails its own scene only; the others are analysed as in the
reference run. A refused API key stops the run with one line and exit 2; a scan whose scenes all
failed exits non-zero and says why; a second Ctrl-C stops within 2 seconds even while fetch
threads sleep in a retry back-off.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from scan_fixtures import LAYOUT, results
from tile_servers import Fault, tile_server

from amber_hunter.run.scan import fetch_threads, scan
from amber_hunter.run.store import RunStore

CLI = "from amber_hunter.cli import main; main()"


def _reference(folder_run) -> dict:
    scenes, _ = results(folder_run)
    return {sid: (status, flagged, n) for sid, status, flagged, n, *_ in scenes}


def _outcome(run: Path) -> tuple[dict, dict]:
    scenes, _ = results(run)
    with RunStore(run) as store:
        errors = {s.scene_id: s.error for s in store.scenes()}
    return {sid: (status, flagged, n) for sid, status, flagged, n, *_ in scenes}, errors


def _bomb_png() -> bytes:
    """A PNG whose header claims 100,000 x 100,000 px: decoding it would need 30 GB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _first_tile(region, name: str, root: Path) -> Path:
    sid = next(s for s, n in region.ids.items() if n == name)
    z, x, y, _ = sid.split("/")
    return root / z / x / f"{y}.png"


@pytest.mark.parametrize("fault", ["directory", "bomb"])
def test_a_broken_tile_file_fails_only_its_scene(fault, region, tiny_model, folder_run, tmp_path):
    folder = tmp_path / "tiles"
    shutil.copytree(region.folder, folder)
    victim = _first_tile(region, "positive1", folder)
    victim.unlink()
    if fault == "directory":
        victim.mkdir()
    else:
        victim.write_bytes(_bomb_png())
    scan(region.config(folder, tiny_model), tmp_path / "run")
    outcome, errors = _outcome(tmp_path / "run")
    expected = _reference(folder_run)
    sid = next(s for s, n in region.ids.items() if n == "positive1")
    assert outcome.pop(sid)[0] == "failed"
    expected.pop(sid)
    assert outcome == expected
    assert errors[sid] and "\n" not in errors[sid]


def test_a_corrupt_mbtiles_file_fails_scenes_not_the_run(region, tiny_model, tmp_path):
    """Garbage over the middle of the file: SQLite reports a malformed database on some reads."""
    path = tmp_path / "region.mbtiles"
    shutil.copy(region.mbtiles, path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 3)
        f.write(os.urandom(size // 3))
    scan(region.config(path, tiny_model), tmp_path / "run")
    with RunStore(tmp_path / "run") as store:
        status = store.status()
        failures = store.failure_reasons()
    assert status.pending == 0 and status.total == len(LAYOUT)
    assert status.failed >= 1, failures
    assert all("Traceback" not in reason for reason, _ in failures)


class _RedirectLoop(http.server.BaseHTTPRequestHandler):
    """Every tile path redirects to itself."""

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_redirect_loop_fails_the_scenes_and_the_run_goes_on(region, tiny_model, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RedirectLoop)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{{z}}/{{x}}/{{y}}.png"
        summary = scan(region.config(url, tiny_model, max_rps=200), tmp_path / "run")
    finally:
        server.shutdown()
        server.server_close()
    assert summary.status.pending == 0
    assert summary.status.failed == len(LAYOUT)
    assert any("redirect" in reason.lower() for reason, _ in summary.failures), summary.failures


def test_a_malformed_date_in_the_tile_cache_does_not_stop_the_run(region, tiny_model, folder_run, tmp_path):
    with tile_server(region.folder) as server:
        url = server.url + "/{z}/{x}/{y}.png"
        cache = tmp_path / "cache"
        tile = _first_tile(region, "positive1", region.folder)
        cached = cache / tile.parent.parent.name / tile.parent.name / tile.stem
        cached.parent.mkdir(parents=True)
        cached.write_bytes(tile.read_bytes())
        cached.with_name(f"{tile.stem}.date").write_text("the fifth of never")
        scan(region.config(url, tiny_model, tile_cache=str(cache)), tmp_path / "run")
    outcome, _ = _outcome(tmp_path / "run")
    assert outcome == _reference(folder_run)


def test_a_bug_in_detection_fails_only_its_scene(region, tiny_model, folder_run, tmp_path, monkeypatch):
    """Not every error is foreseen: an unexpected exception is recorded with its type."""
    from amber_hunter.model.detect import Detector

    original = Detector.prepare
    victim = next(s for s, n in region.ids.items() if n == "negative1")
    calls = []

    def prepare(self, image, m_per_px=None, valid=None):
        calls.append(1)
        if len(calls) == 2:  # negative1 is the second scene with imagery, in grid order
            raise ValueError("an odd scene")
        return original(self, image, m_per_px, valid)

    monkeypatch.setattr(Detector, "prepare", prepare)
    scan(region.config(region.folder, tiny_model), tmp_path / "run")
    outcome, errors = _outcome(tmp_path / "run")
    expected = _reference(folder_run)
    assert outcome.pop(victim)[0] == "failed" and errors[victim] == "ValueError: an odd scene"
    expected.pop(victim)
    assert outcome == expected


def _cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], check=False, capture_output=True, text=True, timeout=180,
                          **kwargs)


def test_a_refused_api_key_stops_the_run_with_one_line(region, tiny_model, tmp_path):
    with tile_server(region.folder, fault=Fault("status", status=401, failures=None)) as server:
        result = _cli("scan", "--aoi", region.aoi, "--tiles", server.url + "/{z}/{x}/{y}.png", "--zoom", "18",
                      "--scene-tiles", "2", "--model", str(tiny_model), "--run", str(tmp_path / "run"), "--workers", "1")
        hits = sum(server.hits.values())
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "scanning" not in line]
    assert len(lines) == 1 and lines[0].startswith("amber-hunter: error: ") and "401" in lines[0], result.stderr
    # It stopped at once, not after asking for every tile of the region: at most one request per
    # fetch thread (fetch_threads(1) == 3) and one more started as the first 401 came back.
    assert hits <= fetch_threads(1) + 1
    assert not (tmp_path / "run").exists()  # refused before its first scene: no run left to resume or refuse


def test_an_all_failed_scan_exits_non_zero_and_says_why(region, tiny_model, tmp_path):
    garbage = tmp_path / "garbage"
    for tile in region.folder.rglob("*.png"):
        target = garbage / tile.relative_to(region.folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"<html>rate limited</html>")
    result = _cli("scan", "--aoi", region.aoi, "--tiles", str(garbage), "--zoom", "18", "--scene-tiles", "2",
                  "--model", str(tiny_model), "--run", str(tmp_path / "run"))
    n = len(LAYOUT)
    assert result.returncode == 1, result.stderr
    # Every scene with tiles failed; the one without any tile has no imagery, which is no failure.
    assert f"{n - 1} of {n} scenes failed" in result.stderr
    assert f"  {n - 1} x tile z/x/y: not a readable image" in result.stderr
    report = json.loads(_cli("status", str(tmp_path / "run"), "--json").stdout)
    assert (report["failed"], report["no_imagery"], report["total"]) == (n - 1, 1, n)
    assert report["failure_reasons"][0]["count"] == n - 1


def test_the_second_ctrl_c_stops_at_once_during_a_back_off(region, tiny_model, tmp_path):
    fault = Fault("status", status=503, retry_after="30", failures=None)
    with tile_server(region.folder, fault=fault) as server:
        process = subprocess.Popen(
            [sys.executable, "-c", CLI, "scan", "--aoi", region.aoi, "--tiles", server.url + "/{z}/{x}/{y}.png",
             "--zoom", "18", "--scene-tiles", "2", "--model", str(tiny_model), "--workers", "2",
             "--run", str(tmp_path / "run")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 60
        while sum(server.hits.values()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(server.hits.values()) >= 2, "the scan never reached the server"
        time.sleep(0.3)  # both fetch threads are now asleep in a 30 s back-off
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        second = time.monotonic()
        process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=10)
        finally:
            process.kill()
        elapsed = time.monotonic() - second
    assert elapsed < 2.0, f"took {elapsed:.1f} s after the second Ctrl-C"
    assert process.returncode == 130, err
    assert "Traceback" not in err
