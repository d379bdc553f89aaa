"""Tile sources: HTTP templates, MBTiles files and tile folders, with the on-disk tile cache,
rate limits and retries.

Sources know tiles and bytes only; they know nothing of superpixels, models or runs. One module
per concept: ``base`` (the interface, results, templates), ``http``, ``files`` (MBTiles and
folders), ``cache``, ``open`` (choosing a source); import the names from here.
"""

from .base import MISSING, TileResult, TileSource, expand_template
from .cache import CachedTileSource
from .files import FolderSource, MBTilesSource
from .http import TRANSIENT_ERRORS, HttpTileSource, parse_capture_date, parse_retry_after, user_agent
from .open import open_source

__all__ = [
    "MISSING",
    "TRANSIENT_ERRORS",
    "CachedTileSource",
    "FolderSource",
    "HttpTileSource",
    "MBTilesSource",
    "TileResult",
    "TileSource",
    "expand_template",
    "open_source",
    "parse_capture_date",
    "parse_retry_after",
    "user_agent",
]
