"""The on-disk tile cache, so an interrupted or repeated run never downloads a tile twice."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from pathlib import Path

import mercantile

from .. import atomic
from ..errors import SourceUnavailableError, TileSourceError
from .base import MISSING, TileResult, TileSource

log = logging.getLogger(__name__)


class CachedTileSource(TileSource):
    """Any source behind an on-disk cache at ``{cache_dir}/{z}/{x}/{y}``.

    Tiles are written atomically, so a killed run leaves whole tiles or none, and "missing" is
    remembered with an empty ``{y}.missing`` marker so gaps are not asked for again. The cache
    has no notion of which source filled it: give each source its own ``cache_dir``.
    """

    def __init__(self, source: TileSource, cache_dir: str | os.PathLike):
        self.source = source
        self.cache_dir = Path(cache_dir)

    @property
    def tile_size(self) -> int | None:
        return self.source.tile_size

    def describe(self) -> str:
        return f"{self.source.describe()} cached in {self.cache_dir}"

    def check_zoom(self, zoom: int) -> None:
        self.source.check_zoom(zoom)

    def cancel(self) -> None:
        self.source.cancel()

    def close(self) -> None:
        self.source.close()

    @staticmethod
    def _cached_date(path: Path) -> dt.date | None:
        """The capture date cached beside a tile, or None.

        The date only annotates detections, so a damaged ``.date`` file (a hand edit, a disk
        error) means "unknown", never a failed tile; it is removed so the warning comes once.
        """
        try:
            return dt.date.fromisoformat(path.read_text(encoding="utf-8").strip())
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
            log.warning("tile cache: %s is unreadable (%s); its capture date is taken as unknown", path, exc)
            with contextlib.suppress(OSError):
                path.unlink()
            return None

    def get(self, tile: mercantile.Tile) -> TileResult:
        column = self.cache_dir / str(tile.z) / str(tile.x)
        data_path = column / str(tile.y)
        date_path = column / f"{tile.y}.date"
        missing_path = column / f"{tile.y}.missing"
        try:
            data = data_path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # not cached (NotADirectory: caught on writing)
            if missing_path.exists():
                return MISSING
        except OSError as exc:
            raise TileSourceError(
                f"{data_path}: cannot read the cached tile ({exc.strerror or exc}); delete it so it is fetched again"
            ) from None
        else:
            return TileResult("ok", data, self._cached_date(date_path))
        result = self.source.get(tile)
        try:
            if result.status == "missing":
                atomic.write_bytes(missing_path, b"")
            else:
                if result.capture_date:  # written first: a tile on disk always has its date beside it
                    atomic.write_bytes(date_path, result.capture_date.isoformat().encode())
                atomic.write_bytes(data_path, result.data)
        except OSError as exc:  # a full disk or a read-only folder fails every later tile the same way
            raise SourceUnavailableError(
                f"{self.cache_dir}: cannot write the tile cache ({exc.strerror or exc}); "
                "free disk space, fix the folder's permissions or give another tile cache folder"
            ) from None
        return result
