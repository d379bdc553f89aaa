"""Choosing a tile source from what a user typed."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from ..errors import ConfigError, TileSourceError
from .base import TileSource, template_placeholders
from .files import FolderSource, MBTilesSource
from .http import HttpTileSource


def open_source(spec: str | os.PathLike, **options) -> TileSource:
    """Open a tile source from a URL template, an ``.mbtiles`` file, a folder or a path template.

    A path template is a local path with placeholders, such as ``/data/{z}/{x}/{-y}.jpg``, for
    folders whose layout or extension differs from ``{z}/{x}/{y}.png``. ``options`` go to the
    source's constructor (``subdomains``, ``max_rps``... for HTTP, ``scheme`` for folders);
    options set to None mean "use the default", so a CLI can pass all of its flags through
    unchanged.
    """
    options = {name: value for name, value in options.items() if value is not None}
    spec = str(spec)
    if spec.startswith(("http://", "https://")):
        kind, factory = "HTTP", HttpTileSource
    elif spec.lower().endswith(".mbtiles"):
        kind, factory = "MBTiles", MBTilesSource
    elif "://" not in spec and (Path(spec).is_dir() or template_placeholders(spec)):
        kind, factory = "folder", FolderSource
    else:
        raise TileSourceError(
            f"tile source {spec!r} is not usable; give an http(s):// URL template with {{z}}/{{x}}/{{y}} or {{q}}, "
            "a path to an .mbtiles file, an existing folder of {z}/{x}/{y}.png tiles, "
            "or a path template such as /data/{z}/{x}/{y}.jpg"
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
