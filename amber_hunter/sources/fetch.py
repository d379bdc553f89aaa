"""Tile sources: one ``get(tile)`` over HTTP tile servers, MBTiles files and tile folders.

A scan asks for thousands of tiles, so the HTTP source is built for long unattended runs: pooled
connections, timeouts on every request, retries with backoff on whatever a busy server throws
(dropped connections, 429, 5xx, truncated bodies), a per-host rate limit to stay within a
provider's terms, and an on-disk cache so an interrupted run never downloads a tile twice.
Sources return encoded bytes and know nothing of images, superpixels or models: the caller
decodes with :func:`amber_hunter.images.decode_rgb`.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import inspect
import math
import os
import random
import re
import sqlite3
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import mercantile
import requests
from requests.adapters import HTTPAdapter

from .. import atomic
from ..errors import ConfigError, TileSourceError
from ..geo.tiles import flip_y, tile_to_quadkey

PROJECT_URL = "https://github.com/amber-hunter/amber-hunter"
DEFAULT_SUBDOMAINS = ("a", "b", "c")
#: Placeholders a URL template may use.
PLACEHOLDERS = frozenset({"z", "x", "y", "-y", "q", "s", "key"})
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_MASK = "***"
#: Failures worth another try: the server or the network may well behave next time.
TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


@dataclass(frozen=True)
class TileResult:
    """What a source has for one tile: its encoded bytes, or "missing" (no imagery there).

    "missing" is an answer, not an error: coverage has gaps, and a scan skips them.
    """

    status: Literal["ok", "missing"]
    data: bytes | None = None
    capture_date: dt.date | None = None

    def __post_init__(self):
        if self.status not in ("ok", "missing") or (self.status == "ok") != (self.data is not None):
            raise ValueError(f"inconsistent TileResult: status {self.status!r} with data {type(self.data)}")


MISSING = TileResult("missing")


class TileSource(ABC):
    """Where tiles come from. Sources are safe to call from several threads at once."""

    @abstractmethod
    def get(self, tile: mercantile.Tile) -> TileResult:
        """Fetch one tile; a source failure is a :class:`TileSourceError`."""

    @abstractmethod
    def describe(self) -> str:
        """One line naming the source for logs and run records; never contains a secret."""

    def check_zoom(self, zoom: int) -> None:
        """Raise TileSourceError if the source has no tiles at ``zoom``.

        Lets a scan fail before its first scene rather than after hours of "missing" tiles. Sources
        that cannot tell (HTTP servers) accept every zoom.
        """

    def close(self) -> None:
        """Release connections and file handles."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


# --- HTTP --------------------------------------------------------------------------------------


def expand_template(
    template: str, tile: mercantile.Tile, *, subdomains: Sequence[str] = DEFAULT_SUBDOMAINS, key: str = ""
) -> str:
    """Fill a URL template's placeholders for ``tile``.

    ``{s}`` is chosen by ``(x + y) % len(subdomains)``, so a tile always comes from the same host
    (and the same HTTP cache entry) while neighbouring tiles spread over all hosts. ``key`` is
    inserted as given: URL-quote it first.
    """
    values = {
        "z": tile.z,
        "x": tile.x,
        "y": tile.y,
        "-y": flip_y(tile),
        "q": tile_to_quadkey(tile),
        "s": subdomains[(tile.x + tile.y) % len(subdomains)] if subdomains else "",
        "key": key,
    }
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None.

    Decimal seconds are accepted too, though RFC 9110 only allows whole ones.
    """
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - (now or dt.datetime.now(dt.UTC))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def parse_capture_date(value: str | None) -> dt.date | None:
    """A date from an ISO 8601 date/datetime or an HTTP date; None if absent or unreadable.

    The capture date only annotates detections, so a provider's odd header must not stop a scan.
    """
    if not value:
        return None
    value = value.strip()
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).date()
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(value).date()
    except (TypeError, ValueError):
        return None


def user_agent() -> str:
    """``amber-hunter/<version> (+<project url>)``, so tile providers can see who is calling."""
    try:
        from .. import __version__ as version  # late and guarded: works before the package is installed
    except ImportError:
        version = "dev"
    return f"amber-hunter/{version} (+{PROJECT_URL})"


class _RateLimiter:
    """Starts requests at least ``1 / max_rps`` seconds apart.

    A caller reserves the next start time under the lock and sleeps outside it, so threads queue
    in order without one sleeping thread blocking the others' reservations.
    """

    def __init__(self, max_rps: float):
        self._interval = 1.0 / max_rps
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            time.sleep(start - now)


class HttpTileSource(TileSource):
    """Tiles from a slippy-map URL template such as ``https://{s}.example.com/{z}/{x}/{y}.png``.

    ``api_key_env`` names the environment variable holding the key for ``{key}``: the key then
    never appears in a config file, a run record, ``repr`` or an error message. ``max_rps`` limits
    requests per second per host; retries back off exponentially from ``base_delay`` up to
    ``max_delay`` seconds, or wait as long as the server's Retry-After says (capped likewise, so a
    server cannot stall a scan for hours). ``date_header`` names a response header carrying the
    imagery's capture date.
    """

    def __init__(
        self,
        template: str,
        *,
        subdomains: Sequence[str] | str = DEFAULT_SUBDOMAINS,
        api_key_env: str | None = None,
        max_rps: float | None = None,
        max_retries: int = 6,
        base_delay: float = 0.5,
        max_delay: float = 60.0,
        timeout: tuple[float, float] = (10.0, 30.0),
        date_header: str | None = None,
        pool_size: int = 16,
    ):
        self.template = template
        self.subdomains = tuple(subdomains.split(",") if isinstance(subdomains, str) else subdomains)
        self.api_key_env = api_key_env
        self.max_retries = max_retries
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self.date_header = date_header
        self._validate(max_rps)
        raw_key = self._read_key()
        self._key = urllib.parse.quote(raw_key, safe="")
        self._secrets = {s for s in (raw_key, self._key) if s}
        self._max_rps = max_rps
        self._limiters: dict[str, _RateLimiter] = {}
        self._limiters_lock = threading.Lock()
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers["User-Agent"] = user_agent()

    def _validate(self, max_rps: float | None) -> None:
        names = _PLACEHOLDER.findall(self.template)
        unknown = sorted(set(names) - PLACEHOLDERS)
        if unknown:
            raise TileSourceError(
                f"URL template {self.template}: unknown placeholder {{{unknown[0]}}}; "
                f"use only {', '.join('{' + p + '}' for p in sorted(PLACEHOLDERS))}"
            )
        if not ("q" in names or ("z" in names and "x" in names and ("y" in names or "-y" in names))):
            raise TileSourceError(
                f"URL template {self.template} does not name a tile; it needs {{z}}, {{x}} and {{y}} "
                "(or {-y} for TMS rows), or {q} for a quadkey"
            )
        if "s" in names and not (self.subdomains and all(self.subdomains)):
            raise ConfigError(f"subdomains {self.subdomains!r} are empty but the template uses {{s}}; give e.g. a,b,c")
        if ("key" in names) != (self.api_key_env is not None):
            raise TileSourceError(
                f"URL template {self.template} and api_key_env={self.api_key_env!r} disagree; put {{key}} in the "
                "template where the key goes and set api_key_env to the environment variable holding it"
            )
        if max_rps is not None and not (isinstance(max_rps, (int, float)) and max_rps > 0):
            raise ConfigError(f"max_rps={max_rps!r} must be a positive number of requests per second, e.g. 8")
        if not (isinstance(self.max_retries, int) and self.max_retries >= 0):
            raise ConfigError(f"max_retries={self.max_retries!r} must be a whole number >= 0, e.g. 6")
        if not (self.base_delay >= 0 and self.max_delay >= 0):
            raise ConfigError(f"base_delay={self.base_delay!r} and max_delay={self.max_delay!r} must be >= 0 seconds")

    def _read_key(self) -> str:
        if self.api_key_env is None:
            return ""
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise TileSourceError(
                f"environment variable {self.api_key_env} is empty or unset; export it with your API key"
            )
        return key

    def describe(self) -> str:
        # The template holds the literal "{key}", never the key itself.
        keyed = f" (key from ${self.api_key_env})" if self.api_key_env else ""
        return f"{self.template}{keyed}"

    def close(self) -> None:
        self._session.close()

    def _shown(self, tile: mercantile.Tile) -> str:
        """The tile's URL as it may appear in a message: with the key masked."""
        return expand_template(self.template, tile, subdomains=self.subdomains, key=_MASK)

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _MASK)
        return text.replace("\n", " ")

    def _limiter(self, url: str) -> _RateLimiter | None:
        if self._max_rps is None:
            return None
        host = urllib.parse.urlsplit(url).netloc
        with self._limiters_lock:
            if host not in self._limiters:
                self._limiters[host] = _RateLimiter(self._max_rps)
            return self._limiters[host]

    def _backoff(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2**attempt) * (1.0 + 0.1 * random.random())

    def get(self, tile: mercantile.Tile) -> TileResult:
        url = expand_template(self.template, tile, subdomains=self.subdomains, key=self._key)
        limiter = self._limiter(url)
        last, delay = "no response", 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(delay)
            if limiter:
                limiter.wait()
            try:
                response = self._session.get(url, timeout=self.timeout)
            except TRANSIENT_ERRORS as exc:
                last = f"{type(exc).__name__}: {self._mask(str(exc))}"
                delay = self._backoff(attempt)
                continue
            status = response.status_code
            if status == 200 and response.content:
                date = parse_capture_date(response.headers.get(self.date_header)) if self.date_header else None
                return TileResult("ok", response.content, date)
            if status in (200, 204, 404):  # 200 with an empty body is how some servers say 204
                return MISSING
            if status != 429 and status < 500:
                hint = f" and ${self.api_key_env}" if self.api_key_env else ""
                raise TileSourceError(
                    f"{self._shown(tile)}: HTTP {status} {response.reason}; check the URL template{hint}"
                )
            last = f"HTTP {status} {response.reason}"
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            delay = self._backoff(attempt) if retry_after is None else min(self.max_delay, retry_after)
        raise TileSourceError(
            f"{self._shown(tile)}: still failing after {self.max_retries} retries (last: {last}); "
            "check the server, lower max_rps or raise max_retries"
        )


# --- files -------------------------------------------------------------------------------------


class MBTilesSource(TileSource):
    """Tiles from an MBTiles file (SQLite), opened read-only so a scan can never alter it.

    MBTiles numbers rows TMS-style, from the south: ``tile_row = 2**z - 1 - y``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise TileSourceError(f"{self.path}: no such MBTiles file; check the path")
        uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"
        self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._lock = threading.Lock()
        try:
            metadata = dict(self._db.execute("SELECT name, value FROM metadata").fetchall())
            self._db.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise TileSourceError(
                f"{self.path}: not a readable MBTiles file ({exc}); export it again as MBTiles"
            ) from None
        try:
            self._zoom_range = (int(metadata["minzoom"]), int(metadata["maxzoom"]))
        except (KeyError, ValueError):
            self._zoom_range = None  # metadata is silent: check_zoom asks the tiles table
        self._zooms_present: set[int] = set()

    def describe(self) -> str:
        return f"MBTiles {self.path}"

    def close(self) -> None:
        self._db.close()

    def _query(self, sql: str, params: tuple) -> tuple | None:
        with self._lock:
            return self._db.execute(sql, params).fetchone()

    def check_zoom(self, zoom: int) -> None:
        if self._zoom_range is not None:
            low, high = self._zoom_range
            if not low <= zoom <= high:
                raise TileSourceError(
                    f"{self.path}: zoom {zoom} is outside the file's zooms {low}-{high}; scan at a zoom in that range"
                )
        elif zoom not in self._zooms_present:
            if self._query("SELECT 1 FROM tiles WHERE zoom_level = ? LIMIT 1", (zoom,)) is None:
                raise TileSourceError(f"{self.path}: has no tiles at zoom {zoom}; scan at a zoom the file holds")
            self._zooms_present.add(zoom)

    def get(self, tile: mercantile.Tile) -> TileResult:
        self.check_zoom(tile.z)
        row = self._query(
            "SELECT tile_data FROM tiles WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?",
            (tile.z, tile.x, flip_y(tile)),
        )
        return TileResult("ok", bytes(row[0])) if row and row[0] else MISSING


class FolderSource(TileSource):
    """Tiles from a folder laid out as ``{root}/{z}/{x}/{y}.png`` (or ``.jpg``/``.jpeg``)."""

    SUFFIXES = (".png", ".jpg", ".jpeg")

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise TileSourceError(f"{self.root}: no such tile folder; check the path")

    def describe(self) -> str:
        return f"folder {self.root}"

    def check_zoom(self, zoom: int) -> None:
        if not (self.root / str(zoom)).is_dir():
            raise TileSourceError(
                f"{self.root}: no folder for zoom {zoom}; tiles must be laid out as {self.root}/{zoom}/<x>/<y>.png"
            )

    def get(self, tile: mercantile.Tile) -> TileResult:
        self.check_zoom(tile.z)
        column = self.root / str(tile.z) / str(tile.x)
        for suffix in self.SUFFIXES:
            try:
                return TileResult("ok", (column / f"{tile.y}{suffix}").read_bytes())
            except FileNotFoundError:
                continue
        return MISSING


# --- cache -------------------------------------------------------------------------------------


class CachedTileSource(TileSource):
    """Any source behind an on-disk cache at ``{cache_dir}/{z}/{x}/{y}``.

    Tiles are written atomically, so a killed run leaves whole tiles or none, and "missing" is
    remembered with an empty ``{y}.missing`` marker so gaps are not asked for again. The cache
    has no notion of which source filled it: give each source its own ``cache_dir``.
    """

    def __init__(self, source: TileSource, cache_dir: str | os.PathLike):
        self.source = source
        self.cache_dir = Path(cache_dir)

    def describe(self) -> str:
        return f"{self.source.describe()} cached in {self.cache_dir}"

    def check_zoom(self, zoom: int) -> None:
        self.source.check_zoom(zoom)

    def close(self) -> None:
        self.source.close()

    def get(self, tile: mercantile.Tile) -> TileResult:
        column = self.cache_dir / str(tile.z) / str(tile.x)
        data_path = column / str(tile.y)
        date_path = column / f"{tile.y}.date"
        missing_path = column / f"{tile.y}.missing"
        try:
            data = data_path.read_bytes()
        except FileNotFoundError:
            if missing_path.exists():
                return MISSING
        else:
            date = date_path.read_text().strip() if date_path.exists() else None
            return TileResult("ok", data, dt.date.fromisoformat(date) if date else None)
        result = self.source.get(tile)
        if result.status == "missing":
            atomic.write_bytes(missing_path, b"")
        else:
            if result.capture_date:  # written first: a tile on disk always has its date beside it
                atomic.write_bytes(date_path, result.capture_date.isoformat().encode())
            atomic.write_bytes(data_path, result.data)
        return result


# --- choosing a source -------------------------------------------------------------------------


def open_source(spec: str | os.PathLike, **options) -> TileSource:
    """Open a tile source from what a user typed: a URL template, an ``.mbtiles`` file or a folder.

    ``options`` go to the source's constructor (only HTTP sources take any); options set to None
    mean "use the default", so a CLI can pass all of its flags through unchanged.
    """
    options = {name: value for name, value in options.items() if value is not None}
    spec = str(spec)
    if spec.startswith(("http://", "https://")):
        kind, factory = "HTTP", HttpTileSource
    elif spec.lower().endswith(".mbtiles"):
        kind, factory = "MBTiles", MBTilesSource
    elif Path(spec).is_dir():
        kind, factory = "folder", FolderSource
    else:
        raise TileSourceError(
            f"tile source {spec!r} is not usable; give an http(s):// URL template with {{z}}/{{x}}/{{y}} or {{q}}, "
            "a path to an .mbtiles file, or an existing folder of {z}/{x}/{y}.png tiles"
        )
    accepted = {
        name
        for name, parameter in inspect.signature(factory).parameters.items()
        if parameter.kind is parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(f"option {', '.join(unknown)} does not apply to the {kind} source {spec}; drop it")
    return factory(spec, **options)
