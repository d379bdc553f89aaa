"""Tiles from HTTP tile servers, built for long unattended runs.

A scan asks for thousands of tiles, so: pooled connections, timeouts on every request, retries
with backoff on whatever a busy server throws (dropped connections, 429, 5xx, truncated bodies),
one rate limit per provider to stay within its terms, and a quick stop when the user cancels.
A refused key (401/403) stops the whole run at once; anything else wrong with one answer fails
only that tile. So does a tile no answer came for at all, unless no tile has had an answer yet
(a typo in the host or port, a server that is down) or it is one of a run of such tiles (the
server went down): then the whole run stops, rather than spend every retry on every tile all night.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import os
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Sequence

import mercantile
import requests
import urllib3
from requests.adapters import HTTPAdapter

from ..errors import ConfigError, ScanCancelledError, SourceUnavailableError, TileSourceError, plain
from .base import DEFAULT_SUBDOMAINS, MISSING, TileResult, TileSource, check_template, expand_template

PROJECT_URL = "https://github.com/amber-hunter/amber-hunter"
_MASK = "***"
#: Longest piece of a server's error body quoted in a message.
_BODY_EXCERPT = 200
#: Failures worth another try: the server or the network may well behave next time.
TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)
#: Failures in which no answer came at all: no connection (refused, a host name that does not
#: resolve) or none in time. A run of them across tiles means the server is down, not a bad tile.
UNREACHABLE_ERRORS = (requests.ConnectionError, requests.Timeout)
#: Tiles in a row with no answer, each after all its retries (about 30 s of them by default),
#: after which a source stops the run: about five minutes of a dead server with one worker.
MAX_UNANSWERED_TILES = 10
#: Failures that asking again would only repeat: a redirect loop, a malformed header, a redirect
#: to a scheme requests cannot follow. Caught after TRANSIENT_ERRORS, whose classes they include.
_UNUSABLE_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError)
_TAG = re.compile(r"<[^>]*>")


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None.

    Decimal seconds are accepted too, though RFC 9110 only allows whole ones. Written for Python
    3.10, which has no ``datetime.UTC``.
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
        if when.tzinfo is None:  # "-0000": UTC by RFC 5322, which parsedate leaves naive
            when = when.replace(tzinfo=dt.timezone.utc)
        seconds = (when - (now or dt.datetime.now(dt.timezone.utc))).total_seconds()
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


def _subdomains(value: Sequence[str] | str) -> tuple[str, ...]:
    """``"t0,t1"`` or ``("t0", "t1")`` as a tuple; an empty part is a typo, never a host."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(part, str) for part in parts):
        raise ConfigError(f"subdomains {value!r} must be strings; give them comma-separated, e.g. a,b,c")
    parts = [part.strip() for part in parts]
    if not all(parts):
        raise ConfigError(
            f"subdomains {value!r} have an empty part; give them comma-separated without gaps, e.g. a,b,c"
        )
    return tuple(parts)


class _RateLimiter:
    """Starts requests at least ``1 / max_rps`` seconds apart.

    A caller reserves the next start time under the lock and waits outside it, so threads queue
    in order without one waiting thread blocking the others' reservations. The wait is on the
    source's cancel event, so a cancelled scan does not sit out the queue.
    """

    def __init__(self, max_rps: float):
        self._interval = 1.0 / max_rps
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self, cancelled: threading.Event) -> None:
        """Wait for this caller's turn, or until ``cancelled`` is set."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            cancelled.wait(start - now)


class HttpTileSource(TileSource):
    """Tiles from a slippy-map URL template such as ``https://{s}.example.com/{z}/{x}/{y}.png``.

    ``subdomains`` fill ``{s}`` (a sequence or a comma-separated string such as ``"t0,t1,t2"``).
    ``api_key_env`` names the environment variable holding the key for ``{key}``: the key then
    never appears in a config file, a run record, ``repr`` or an error message. ``max_rps`` limits
    requests per second to the provider: one limit for the whole template, however many
    subdomains ``{s}`` spreads the requests over, because providers count requests per client, not
    per host name. Retries back off exponentially from ``base_delay`` up to ``max_delay`` seconds,
    or wait as long as the server's Retry-After says (capped likewise, so a server cannot stall a
    scan for hours). ``date_header`` names a response header carrying the imagery's capture date.
    A tile without any answer (see ``UNREACHABLE_ERRORS``) raises :class:`SourceUnavailableError`,
    which stops a scan, when no tile has had an answer yet or when it is the ``max_unanswered``-th
    in a row: every later ``get`` would most likely wait out its retries for nothing too.
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
        max_unanswered: int = MAX_UNANSWERED_TILES,
    ):
        self.template = template
        self.subdomains = _subdomains(subdomains)
        self.api_key_env = api_key_env
        self.max_retries = max_retries
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self.date_header = date_header
        self.max_unanswered = max_unanswered
        self._validate(max_rps)
        raw_key = self._read_key()
        self._key = urllib.parse.quote(raw_key, safe="")
        self._secrets = {s for s in (raw_key, self._key) if s}
        self._limiter = _RateLimiter(max_rps) if max_rps is not None else None
        self._cancelled = threading.Event()
        #: Tiles in a row, over all threads, that got no answer at all; any answer resets it.
        self._unanswered = 0
        self._answered = False
        #: Why the source stopped, once ``max_unanswered`` tiles in a row got no answer.
        self._down: str | None = None
        self._unanswered_lock = threading.Lock()
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers["User-Agent"] = user_agent()

    def _validate(self, max_rps: float | None) -> None:
        names = check_template(self.template)
        if "s" in names and not self.subdomains:
            raise ConfigError(f"subdomains {self.subdomains!r} are empty but the template uses {{s}}; give e.g. a,b,c")
        if ("key" in names) != (self.api_key_env is not None):
            raise TileSourceError(
                f"URL template {self.template} and api_key_env={self.api_key_env!r} disagree; put {{key}} in the "
                "template where the key goes and set --api-key-env to the environment variable holding it"
            )
        if max_rps is not None and not (isinstance(max_rps, (int, float)) and max_rps > 0):
            raise ConfigError(f"max_rps={max_rps!r} must be a positive number of requests per second, e.g. 8")
        if not (isinstance(self.max_retries, int) and self.max_retries >= 0):
            raise ConfigError(f"max_retries={self.max_retries!r} must be a whole number >= 0, e.g. 6")
        if not (isinstance(self.max_unanswered, int) and self.max_unanswered >= 1):
            raise ConfigError(f"max_unanswered={self.max_unanswered!r} must be a whole number >= 1, e.g. 10")
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

    def cancel(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        self._session.close()

    def _shown(self, tile: mercantile.Tile) -> str:
        """The tile's URL as it may appear in a message: with the key masked."""
        return expand_template(self.template, tile, subdomains=self.subdomains, key=_MASK)

    def _mask(self, text: str) -> str:
        """``text`` (an exception's or a server's) with the key masked, on one line, without reprs."""
        for secret in self._secrets:
            text = text.replace(secret, _MASK)
        return plain(text)

    def _said(self, response: requests.Response) -> str:
        """The first line of an error response's body, as ``" (server said: ...)"``, or "".

        Providers explain a refusal there ("API key expired", "daily quota exceeded"), which is
        the one thing the user needs to fix it. Masked, because some echo the key back.
        """
        if response.headers.get("Content-Type", "").startswith("image/"):
            return ""
        text = response.content[:4096].decode("utf-8", "replace")
        if "html" in response.headers.get("Content-Type", ""):
            text = _TAG.sub(" ", text)
        line = next((line.strip() for line in text.splitlines() if line.strip()), "")
        line = "".join(c if c.isprintable() else " " for c in self._mask(line))  # mask first: no half keys
        if len(line) > _BODY_EXCERPT:
            line = line[: _BODY_EXCERPT - 3] + "..."
        return f" (server said: {line})" if line else ""

    def _backoff(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2**attempt) * (1.0 + 0.1 * random.random())

    def _no_answer(self, tile: mercantile.Tile, last: str) -> TileSourceError:
        """The error for a tile that got no answer after every retry: it fails that tile, or the
        whole run if the server never answered or ``max_unanswered`` tiles in a row got none. With
        several fetch threads more tiles fail before the scan stops; they all say that first run, so
        the user reads one number whichever failure reaches the scan first."""
        where = f"{self._shown(tile)}: no answer after {self.max_retries} retries (last: {last})"
        with self._unanswered_lock:
            self._unanswered += 1
            if self._answered and self._unanswered == self.max_unanswered:
                self._down = (f"{where}, nor for the {self._unanswered - 1} tiles before it; the server is down or "
                              "unreachable: rerun with --retry-failed once it answers again")
            answered, down = self._answered, self._down
        if not answered:
            return SourceUnavailableError(f"{where}; check that the server is up and that the URL's host and port are right")
        if down:  # other fetch threads fail on after the stop: each says the same first run of failures
            return SourceUnavailableError(down)
        return TileSourceError(f"{where}; the server or the network may be down")

    def get(self, tile: mercantile.Tile) -> TileResult:
        url = expand_template(self.template, tile, subdomains=self.subdomains, key=self._key)
        last, delay, unanswered = "no response", 0.0, False
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._cancelled.wait(delay)  # returns at once on cancel()
            if self._limiter:
                self._limiter.wait(self._cancelled)
            if self._cancelled.is_set():
                raise ScanCancelledError(
                    f"{self._shown(tile)}: not fetched, the scan was cancelled; run it again to resume"
                )
            try:
                response = self._session.get(url, timeout=self.timeout)
            except TRANSIENT_ERRORS as exc:
                last, delay = f"{type(exc).__name__}: {self._mask(str(exc))}", self._backoff(attempt)
                unanswered = isinstance(exc, UNREACHABLE_ERRORS)
                continue
            except _UNUSABLE_ERRORS as exc:
                unusable = f"{type(exc).__name__}: {self._mask(str(exc))}"
            else:
                unusable = None
            with self._unanswered_lock:  # the server is there, whatever it said
                self._unanswered, self._answered, self._down = 0, True, None
            unanswered = False
            if unusable:  # raised here, not in the except clause: the exception's text holds the key
                raise TileSourceError(f"{self._shown(tile)}: unusable answer ({unusable}); check the URL template")
            status = response.status_code
            if status == 200 and response.content:
                date = parse_capture_date(response.headers.get(self.date_header)) if self.date_header else None
                return TileResult("ok", response.content, date)
            if status in (200, 204, 404):  # 200 with an empty body is how some servers say 204
                return MISSING
            if status in (401, 403):  # about the client, not the tile: every other tile gets the same
                fix = (
                    f"check that ${self.api_key_env} holds a valid key and that its account may use this layer"
                    if self.api_key_env
                    else "the server wants a key or refuses this client: put {key} in the template and set --api-key-env"
                )
                raise SourceUnavailableError(
                    f"{self._shown(tile)}: HTTP {status} {response.reason}{self._said(response)}; {fix}"
                )
            if status != 429 and status < 500:
                hint = f" and ${self.api_key_env}" if self.api_key_env else ""
                raise TileSourceError(
                    f"{self._shown(tile)}: HTTP {status} {response.reason}{self._said(response)}; "
                    f"check the URL template{hint}"
                )
            last = f"HTTP {status} {response.reason}"
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            delay = self._backoff(attempt) if retry_after is None else min(self.max_delay, retry_after)
        if unanswered:
            raise self._no_answer(tile, last)
        raise TileSourceError(
            f"{self._shown(tile)}: still failing after {self.max_retries} retries (last: {last}); the server is "
            "busy or failing: lower --max-rps, or rerun later with --retry-failed"
        )
