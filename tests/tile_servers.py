"""Real HTTP tile servers on 127.0.0.1 for the fetch tests, healthy or misbehaving on purpose, and
the tile folders and MBTiles files they and the file sources read.

The retry logic is only believable against real sockets: truncated bodies and read timeouts
surface as different exceptions in requests/urllib3 than any mock would raise. Servers bind to
port 0 on 127.0.0.1 only, run in a background thread, and always shut down when their ``with``
block ends. They speak HTTP/1.0 (one request per connection), so no idle keep-alive connection
can hold up the shutdown, and slow responses wait on an event that shutdown sets.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import mercantile
import numpy as np

from amber_hunter.images import encode_png


@dataclass(frozen=True)
class Fault:
    """How a faulty server misbehaves.

    Per path, ``failures`` bad responses come before each good one (1: every other request
    fails, starting with the first), or every response is bad if ``failures`` is None. A bad
    response is an HTTP ``status`` (with ``retry_after`` as its Retry-After header and ``body``
    as its body, sent as ``content_type``), a body cut to half its announced Content-Length
    (``truncate``), the good response sent only after ``delay`` seconds (``slow``), a 302 to
    ``location`` (``redirect``; None redirects to the same path: a loop), or the good body with
    a Content-Length header that contradicts itself (``bad_length``).
    """

    kind: Literal["status", "truncate", "slow", "redirect", "bad_length"]
    status: int = 500
    retry_after: str | None = None
    failures: int | None = 1
    delay: float = 0.5
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    location: str | None = None

    def fails(self, n: int) -> bool:
        """Whether the ``n``-th request (from 0) for a path gets a bad response."""
        return self.failures is None or n % (self.failures + 1) < self.failures


class TileServer(ThreadingHTTPServer):
    """Serves files under ``root`` by URL path (the query string is ignored) and counts hits."""

    daemon_threads = True

    def __init__(
        self,
        root: Path,
        fault: Fault | None = None,
        no_content: Sequence[str] = (),
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = Path(root).resolve()
        self.fault = fault
        self.no_content = frozenset(no_content)
        self.extra_headers = dict(headers or {})
        self.stopping = threading.Event()
        self.hits: Counter[str] = Counter()
        #: ``(path with query, headers)`` of every request, in arrival order.
        self.requests: list[tuple[str, dict[str, str]]] = []
        #: ``time.monotonic()`` at the arrival of every request, in the same order.
        self.times: list[float] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def record(self, target: str, headers: Mapping[str, str]) -> int:
        """Log a request; return how many earlier requests asked for the same path."""
        path = urlsplit(target).path
        with self._lock:
            self.requests.append((target, dict(headers)))
            self.times.append(time.monotonic())
            n = self.hits[path]
            self.hits[path] += 1
            return n

    def handle_error(self, request, client_address):
        # A client that gave up on a slow or truncated response leaves a broken pipe behind.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: TileServer
    timeout = 5  # socket timeout: a stuck client cannot pin a handler thread

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        server = self.server
        path = urlsplit(self.path).path
        n = server.record(self.path, self.headers)
        fault = server.fault
        failing = fault is not None and fault.fails(n)
        if failing and fault.kind == "status":
            self.send_response(fault.status)
            if fault.retry_after is not None:
                self.send_header("Retry-After", fault.retry_after)
            if fault.body:
                self.send_header("Content-Type", fault.content_type)
            self.send_header("Content-Length", str(len(fault.body)))
            self.end_headers()
            self.wfile.write(fault.body)
            return
        if failing and fault.kind == "redirect":
            self.send_response(302)
            self.send_header("Location", fault.location or self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if failing and fault.kind == "slow":
            server.stopping.wait(fault.delay)
        if path in server.no_content:
            self.send_response(204)
            self.end_headers()
            return
        file = (server.root / path.lstrip("/")).resolve()
        if not file.is_relative_to(server.root) or not file.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        bad_length = failing and fault.kind == "bad_length"
        self.send_header("Content-Length", f"{len(body)}, {len(body) + 1}" if bad_length else str(len(body)))
        for name, value in server.extra_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if failing and fault.kind == "truncate" else body)


@contextlib.contextmanager
def tile_server(
    root: str | Path,
    *,
    fault: Fault | None = None,
    no_content: Sequence[str] = (),
    headers: Mapping[str, str] | None = None,
) -> Iterator[TileServer]:
    """Run a TileServer for the ``with`` block; ``no_content`` paths answer 204, absent files 404."""
    server = TileServer(Path(root), fault, no_content, headers)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def png_bytes(seed: int, size: int = 32) -> bytes:
    """A small random RGB PNG, different for every seed."""
    rng = np.random.default_rng(seed)
    return encode_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def write_tile_folder(root: Path, tiles: Sequence[mercantile.Tile], suffix: str = ".png") -> dict:
    """Write a PNG per tile as ``{root}/{z}/{x}/{y}{suffix}``; return ``{tile: bytes}``."""
    written = {}
    for i, tile in enumerate(tiles):
        path = Path(root) / str(tile.z) / str(tile.x) / f"{tile.y}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        written[tile] = png_bytes(i)
        path.write_bytes(written[tile])
    return written


def write_mbtiles(path: Path, tiles: Sequence[mercantile.Tile], metadata=(("minzoom", "5"), ("maxzoom", "5"))) -> dict:
    """Write an MBTiles file (TMS rows) with a PNG per tile, in order; return ``{tile: bytes}``."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE metadata (name text, value text)")
    db.execute("CREATE TABLE tiles (zoom_level integer, tile_column integer, tile_row integer, tile_data blob)")
    db.executemany("INSERT INTO metadata VALUES (?, ?)", metadata)
    written = {}
    for i, t in enumerate(tiles):
        written[t] = png_bytes(100 + i)
        db.execute("INSERT INTO tiles VALUES (?, ?, ?, ?)", (t.z, t.x, 2**t.z - 1 - t.y, written[t]))
    db.commit()
    db.close()
    return written


#: A 2x2 block of zoom-5 tiles, the source tests' little world.
TILES = [mercantile.Tile(x, y, 5) for x in (17, 18) for y in (10, 11)]
#: An API key with characters that need URL quoting, which must never appear in any message.
SECRET = "s3cr3t/key+42"
#: Source options that keep retries and timeouts short in tests.
FAST = {"base_delay": 0.01, "timeout": (2.0, 2.0)}


def tilemap_xml(profile="mercator", srs="EPSG:3857", extension="png", width=256, height=256) -> str:
    """A ``tilemapresource.xml`` as gdal2tiles writes it beside a TMS tile folder (without --xyz)."""
    return f"""<?xml version="1.0" encoding="utf-8"?>
    <TileMap version="1.0.0" tilemapservice="http://tms.osgeo.org/1.0.0">
      <Title>area.tif</Title>
      <Abstract></Abstract>
      <SRS>{srs}</SRS>
      <BoundingBox minx="10.0" miny="50.0" maxx="11.0" maxy="51.0"/>
      <Origin x="10.0" y="50.0"/>
      <TileFormat width="{width}" height="{height}" mime-type="image/{extension}" extension="{extension}"/>
      <TileSets profile="{profile}">
        <TileSet href="5" units-per-pixel="4891.96981025000" order="5"/>
      </TileSets>
    </TileMap>
    """
