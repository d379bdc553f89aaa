"""What every tile source shares: the result of one ``get``, the source interface, and templates.

A template names a tile's place with placeholders, ``{z}/{x}/{y}``, ``{-y}`` for TMS rows counted
from the south, ``{q}`` for a quadkey: HTTP sources fill one into a URL, folder sources into a path.
"""

from __future__ import annotations

import datetime as dt
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import mercantile

from ..errors import TileSourceError
from ..geo.tiles import flip_y, tile_to_quadkey

DEFAULT_SUBDOMAINS = ("a", "b", "c")
#: Placeholders a URL template may use.
PLACEHOLDERS = frozenset({"z", "x", "y", "-y", "q", "s", "key"})
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


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
    """Where tiles come from. Sources are safe to call from several threads at once.

    ``get`` turns every failure about one tile into a :class:`TileSourceError`, and a failure
    that dooms every later tile too (a refused key, a deleted file) into a
    :class:`~amber_hunter.errors.SourceUnavailableError`, so a scan can tell "skip this scene"
    from "stop now" without knowing what kind of source it reads.
    """

    #: Width (= height) of the source's tiles in pixels when the source says so cheaply (MBTiles
    #: metadata, a tilemapresource.xml), else None: the caller then learns it from the first tile.
    tile_size: int | None = None

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

    def cancel(self) -> None:
        """Stop waiting: sleeps before retries and rate-limit waits end at once, and later ``get``
        calls raise :class:`~amber_hunter.errors.ScanCancelledError`.

        For a user who asked the scan to stop: without it, a worker thread could sit out a server's
        Retry-After for minutes. Local files never wait, so here it does nothing.
        """

    def close(self) -> None:
        """Release connections and file handles."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


# --- templates ---------------------------------------------------------------------------------


def template_placeholders(template: str) -> list[str]:
    """The placeholder names in ``template``, in order, e.g. ``["z", "x", "y"]``."""
    return _PLACEHOLDER.findall(template)


def check_template(template: str, allowed: frozenset[str] = PLACEHOLDERS, *, kind: str = "URL template") -> list[str]:
    """Raise TileSourceError unless ``template`` uses only ``allowed`` placeholders and names a tile.

    Returns the placeholder names, so callers can check the ones only they care about.
    """
    names = template_placeholders(template)
    unknown = sorted(set(names) - allowed)
    if unknown:
        raise TileSourceError(
            f"{kind} {template}: unknown placeholder {{{unknown[0]}}}; "
            f"use only {', '.join('{' + p + '}' for p in sorted(allowed))}"
        )
    if not ("q" in names or ("z" in names and "x" in names and ("y" in names or "-y" in names))):
        raise TileSourceError(
            f"{kind} {template} does not name a tile; it needs {{z}}, {{x}} and {{y}} "
            "(or {-y} for TMS rows), or {q} for a quadkey"
        )
    return names


def expand_template(
    template: str, tile: mercantile.Tile, *, subdomains: Sequence[str] = DEFAULT_SUBDOMAINS, key: str = ""
) -> str:
    """Fill a URL or path template's placeholders for ``tile``.

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
