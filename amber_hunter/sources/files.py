"""Tiles from local files: MBTiles (SQLite) and tile folders, laid out as people have them.

A folder may count rows from the north (XYZ, as web maps do) or from the south (TMS, as gdal2tiles
writes by default, with a ``tilemapresource.xml`` beside them), or follow its own layout, given
as a path template such as ``/data/{z}/{x}/{-y}.jpg``. A file or folder that disappears while a
scan runs stops the scan, rather than turning every later tile into "no imagery".
"""

from __future__ import annotations

import os
import sqlite3
import threading
import urllib.parse
from pathlib import Path
from typing import Literal
from xml.etree import ElementTree

import mercantile

from ..errors import ConfigError, SourceUnavailableError, TileSourceError
from ..geo.tiles import flip_y
from .base import MISSING, TileResult, TileSource, check_template, expand_template, template_placeholders

#: Placeholders a folder's path template may use: a local path has no host ``{s}`` and no ``{key}``.
PATH_PLACEHOLDERS = frozenset({"z", "x", "y", "-y", "q"})
SCHEMES = ("xyz", "tms")
TILEMAP_FILE = "tilemapresource.xml"
_MERCATOR_PROFILES = {"mercator", "global-mercator"}
_MERCATOR_SRS = {"EPSG:3857", "EPSG:900913", "EPSG:3785", "OSGEO:41001"}


def _positive_int(value: object) -> int | None:
    try:
        number = int(str(value).strip())
    except ValueError:
        return None
    return number if number > 0 else None


class MBTilesSource(TileSource):
    """Tiles from an MBTiles file (SQLite), opened read-only so a scan can never alter it.

    MBTiles numbers rows TMS-style, from the south: ``tile_row = 2**z - 1 - y``. The tile size
    comes from the ``tilesize`` (or ``tile_size``) metadata some writers add, TileJSON style.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise TileSourceError(f"{self.path}: no such MBTiles file; check the path")
        uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"
        self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._lock = threading.Lock()
        try:
            # Identity of the file opened: on Linux a deleted or replaced file stays readable
            # through the open handle, so only its path can tell that it has gone.
            self._identity = self._stat_identity()
            metadata = dict(self._db.execute("SELECT name, value FROM metadata").fetchall())
            self._db.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles LIMIT 1").fetchall()
        except (sqlite3.DatabaseError, OSError) as exc:
            self._db.close()
            raise TileSourceError(
                f"{self.path}: not a readable MBTiles file ({exc}); export it again as MBTiles"
            ) from None
        try:
            self._zoom_range = (int(metadata["minzoom"]), int(metadata["maxzoom"]))
        except (KeyError, ValueError):
            self._zoom_range = None  # metadata is silent: check_zoom asks the tiles table
        self.tile_size = _positive_int(metadata.get("tilesize", metadata.get("tile_size")))
        self._zooms_present: set[int] = set()

    def _stat_identity(self) -> tuple[int, int]:
        stat = self.path.stat()
        return stat.st_dev, stat.st_ino

    def describe(self) -> str:
        return f"MBTiles {self.path}"

    def close(self) -> None:
        self._db.close()

    def _query(self, sql: str, params: tuple, what: str) -> tuple | None:
        try:
            current = self._stat_identity()
        except FileNotFoundError:
            current = None
        if current != self._identity:
            change = "is gone (deleted or moved" if current is None else "was replaced ("
            raise SourceUnavailableError(
                f"{self.path}: the MBTiles file {change} while the scan ran); put it back and run the scan again"
            )
        try:
            with self._lock:
                return self._db.execute(sql, params).fetchone()
        except sqlite3.ProgrammingError:
            raise  # used after close(): a bug in the caller, not a bad file
        except sqlite3.DatabaseError as exc:
            raise TileSourceError(
                f"{self.path}: {what} is unreadable ({exc}); the file is damaged, export it again as MBTiles"
            ) from None

    def check_zoom(self, zoom: int) -> None:
        if self._zoom_range is not None:
            low, high = self._zoom_range
            if not low <= zoom <= high:
                raise TileSourceError(
                    f"{self.path}: zoom {zoom} is outside the file's zooms {low}-{high}; scan at a zoom in that range"
                )
        elif zoom not in self._zooms_present:
            if self._query("SELECT 1 FROM tiles WHERE zoom_level = ? LIMIT 1", (zoom,), f"zoom {zoom}") is None:
                raise TileSourceError(f"{self.path}: has no tiles at zoom {zoom}; scan at a zoom the file holds")
            self._zooms_present.add(zoom)

    def get(self, tile: mercantile.Tile) -> TileResult:
        self.check_zoom(tile.z)
        row = self._query(
            "SELECT tile_data FROM tiles WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?",
            (tile.z, tile.x, flip_y(tile)),
            f"tile {tile.z}/{tile.x}/{tile.y}",
        )
        if not (row and row[0]):
            return MISSING
        if not isinstance(row[0], (bytes, memoryview)):
            raise TileSourceError(
                f"{self.path}: tile {tile.z}/{tile.x}/{tile.y} holds {type(row[0]).__name__}, not image bytes; "
                "export the file again as MBTiles"
            )
        return TileResult("ok", bytes(row[0]))


def read_tilemap(path: str | os.PathLike) -> tuple[str | None, int | None]:
    """``(extension, tile_size)`` from a TMS ``tilemapresource.xml``; either is None when not given.

    Raises TileSourceError for a file that is unreadable or describes tiles that are not Web
    Mercator (gdal2tiles' geodetic and raster profiles): read as Web Mercator they would put every
    detection in the wrong place.
    """
    path = Path(path)
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as exc:
        raise TileSourceError(f"{path}: not a readable {TILEMAP_FILE} ({exc}); fix or delete it") from None
    tilesets = root.find("TileSets")
    profile = (tilesets.get("profile", "") if tilesets is not None else "").strip().lower()
    srs = (root.findtext("SRS") or "").strip().upper()
    if not (profile in _MERCATOR_PROFILES or (not profile and srs in _MERCATOR_SRS)):
        raise TileSourceError(
            f"{path}: profile {profile or None!r} with SRS {srs or None!r} is not Web Mercator; "
            "cut the tiles again with gdal2tiles --profile=mercator"
        )
    tile_format = root.find("TileFormat")
    if tile_format is None:
        return None, None
    extension = tile_format.get("extension", "").strip().lstrip(".").lower() or None
    width, height = _positive_int(tile_format.get("width")), _positive_int(tile_format.get("height"))
    return extension, width if width == height else None


class FolderSource(TileSource):
    """Tiles from a folder laid out as ``{root}/{z}/{x}/{y}.png`` (or ``.jpg``/``.jpeg``), or from
    a path template such as ``/data/{z}/{x}/{-y}.jpg`` for any other layout or extension.

    ``scheme`` says how a plain folder counts rows: ``"xyz"`` from the north, ``"tms"`` from the
    south (``y_tms = 2**z - 1 - y``). Left out, a folder with a ``tilemapresource.xml`` is TMS,
    because gdal2tiles writes that file only for TMS output; its extension and tile size are read
    from it too. A path template says the scheme itself, with ``{y}`` or ``{-y}``.
    """

    SUFFIXES = (".png", ".jpg", ".jpeg")

    def __init__(self, root: str | os.PathLike, *, scheme: Literal["xyz", "tms"] | None = None):
        if scheme is not None and scheme not in SCHEMES:
            raise ConfigError(f"scheme={scheme!r} must be xyz (rows from the north) or tms (rows from the south)")
        spec = str(root)
        self.template: str | None = None
        if not Path(spec).is_dir() and template_placeholders(spec):
            self._open_template(spec, scheme)
        else:
            self.root = Path(spec)
            if not self.root.is_dir():
                raise TileSourceError(f"{self.root}: no such tile folder; check the path")
            extension, self.tile_size = None, None
            if (self.root / TILEMAP_FILE).is_file():
                extension, self.tile_size = read_tilemap(self.root / TILEMAP_FILE)
                scheme = scheme or "tms"
            self.scheme = scheme or "xyz"
            self._pattern = "{z}/{x}/{-y}" if self.scheme == "tms" else "{z}/{x}/{y}"
            first = (f".{extension}",) if extension else ()
            self._suffixes = first + tuple(s for s in self.SUFFIXES if s not in first)

    def _open_template(self, template: str, scheme: str | None) -> None:
        check_template(template, PATH_PLACEHOLDERS, kind="path template")
        if scheme is not None:
            raise ConfigError(
                f"scheme={scheme!r} does not apply to the path template {template}; "
                "write {-y} in it for TMS rows, {y} for XYZ rows"
            )
        parts = Path(template).parts
        fixed = next(i for i, part in enumerate(parts) if template_placeholders(part))
        self.template = template
        self.root = Path(*parts[:fixed]) if fixed else Path(".")
        if not self.root.is_dir():
            raise TileSourceError(f"{self.root}: no such tile folder for the path template {template}; check the path")
        self.scheme = "tms" if "-y" in template_placeholders(template) else "xyz"
        self._pattern = "/".join(parts[fixed:])
        self._suffixes = ("",)

    def describe(self) -> str:
        if self.template:
            return f"folder {self.template}"
        return f"folder {self.root}" + (" (TMS rows, from the south)" if self.scheme == "tms" else "")

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise SourceUnavailableError(
                f"{self.root}: the tile folder is gone (deleted, moved or unmounted while the scan ran); "
                "put it back and run the scan again"
            )

    def _zoom_folder(self, zoom: int) -> Path | None:
        """The folder every tile of ``zoom`` lies in, when the layout has one (``{z}`` alone as the
        first templated part of the path); None when it cannot be told without listing files."""
        first = self._pattern.split("/")[0]
        if set(template_placeholders(first)) != {"z"}:
            return None
        return self.root / first.replace("{z}", str(zoom))

    def check_zoom(self, zoom: int) -> None:
        folder = self._zoom_folder(zoom)
        if folder is None or not folder.is_dir():
            self._check_root()
        if folder is not None and not folder.is_dir():
            layout = self.template or f"{self.root}/{{z}}/{{x}}/{{y}}.png"
            raise TileSourceError(
                f"{self.root}: no folder for zoom {zoom} ({folder}); tiles must be laid out as {layout}"
            )

    def get(self, tile: mercantile.Tile) -> TileResult:
        self.check_zoom(tile.z)
        base = self.root / expand_template(self._pattern, tile)
        for suffix in self._suffixes:
            path = base.with_name(base.name + suffix)
            try:
                return TileResult("ok", path.read_bytes())
            except FileNotFoundError:
                continue
            except OSError as exc:  # a directory where the tile should be, no permission, an I/O error
                raise TileSourceError(
                    f"{path}: cannot read the tile ({exc.strerror or exc}); check the file and its permissions"
                ) from None
        self._check_root()  # a folder deleted under a running scan is not a run of "missing" tiles
        return MISSING
