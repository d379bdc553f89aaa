"""Licensed areas: a GeoJSON of polygons, and which detections fall inside one.

Licence status is decided per superpixel (by its centroid), because a pit field can straddle a
licence boundary: a scene is then "partly licensed", and the export says how much of its
positive area lies outside.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AreaError, ConfigError
from ..geo.tiles import Area, parse_geojson
from ..geo.tiles import contains as _point_in_polygons


def centroid(ring: list) -> tuple[float, float]:
    """Area-weighted centroid of a closed ring (its vertex mean if the ring has no area)."""
    x = [p[0] for p in ring]
    y = [p[1] for p in ring]
    cross = [x[i] * y[i + 1] - x[i + 1] * y[i] for i in range(len(ring) - 1)]
    area = sum(cross) / 2
    if abs(area) < 1e-18:
        return sum(x) / len(x), sum(y) / len(y)
    cx = sum((x[i] + x[i + 1]) * cross[i] for i in range(len(cross))) / (6 * area)
    cy = sum((y[i] + y[i + 1]) * cross[i] for i in range(len(cross))) / (6 * area)
    return cx, cy


class Registry:
    """Licensed areas from a GeoJSON file of polygons; a detection inside one is licensed."""

    def __init__(self, path: str | Path):
        try:
            obj = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--registry {path}: not a readable GeoJSON file ({exc}); "
                              "give a GeoJSON of licensed polygons") from None
        try:
            self.area: Area = parse_geojson(obj)
        except AreaError as exc:
            raise ConfigError(f"--registry {path}: {exc}") from None
        self.polygons = self.area.polygons

    def licensed(self, geometry: dict) -> bool:
        """Whether the centroid of a GeoJSON Polygon lies inside a licensed polygon."""
        return _point_in_polygons(self.polygons, *centroid(geometry["coordinates"][0]))

    def geojson(self) -> dict:
        """The licensed polygons as one GeoJSON MultiPolygon geometry, for the map."""
        return {"type": "MultiPolygon", "coordinates": self.area.polygon_coordinates()}
