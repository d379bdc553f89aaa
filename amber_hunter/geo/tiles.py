"""Web Mercator tile math: areas of interest, the tiles and scenes covering them, pixel geography.

Pure functions on numbers, no file or network access, so every rule here can be property-tested
in isolation and the scan can plan its work before it opens a tile source. Tile ids, bounds and
quadkeys come from mercantile; this module adds what the scan needs on top: validated areas
(a bbox or GeoJSON polygons), polygon-exact covers, and *scenes*, the square blocks of tiles that
are stitched into one image because the study segmented ~1000 px scenes, not single tiles.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import astuple, dataclass

import mercantile
import numpy as np

from ..errors import AreaError, ConfigError

#: Highest latitude Web Mercator can show, ``atan(sinh(pi))`` in degrees.
MAX_LAT = math.degrees(math.atan(math.sinh(math.pi)))
MAX_ZOOM = 24
#: Metres per pixel at the equator at zoom 0 for 256 px tiles: 2 * pi * 6378137 m / 256.
_M_PER_PX_Z0 = 156543.03392

#: A polygon ring as ``(lon, lat)`` vertices, implicitly closed (no repeated last vertex).
Ring = tuple[tuple[float, float], ...]
#: A polygon as its exterior ring followed by its holes.
Polygon = tuple[Ring, ...]
_Segment = tuple[float, float, float, float]


@dataclass(frozen=True)
class Bounds:
    """A lon/lat rectangle in degrees."""

    west: float
    south: float
    east: float
    north: float

    @property
    def centre(self) -> tuple[float, float]:
        """``(lon, lat)`` of the middle of the rectangle."""
        return (self.west + self.east) / 2, (self.south + self.north) / 2


@dataclass(frozen=True)
class Area:
    """An area of interest: its bounding box and, for a GeoJSON area, the polygons themselves.

    A bbox area has no polygons: the rectangle is the area. A polygon area keeps the exact
    outline so a scan of a winding river valley does not pay for its whole bounding box.
    """

    bounds: Bounds
    polygons: tuple[Polygon, ...] = ()

    def polygon_coordinates(self) -> list:
        """The polygons as GeoJSON MultiPolygon coordinates (nested lists of [lon, lat])."""
        return [[list(map(list, ring)) for ring in polygon] for polygon in self.polygons]


@dataclass(frozen=True)
class SceneCell:
    """A square block of ``size x size`` tiles at ``zoom``, with top-left tile ``(x0, y0)``.

    Cells are aligned to multiples of ``size``, so every tile belongs to exactly one cell and a
    cell's id is stable across runs and areas: a resumed or overlapping scan finds the same cells.
    """

    zoom: int
    x0: int
    y0: int
    size: int

    @property
    def scene_id(self) -> str:
        """``"zoom/x0/y0/size"``, e.g. ``"18/146432/88928/4"``."""
        return f"{self.zoom}/{self.x0}/{self.y0}/{self.size}"

    @property
    def tiles(self) -> list[mercantile.Tile]:
        """The cell's tiles in row-major order, the order they are stitched in."""
        return [
            mercantile.Tile(self.x0 + dx, self.y0 + dy, self.zoom)
            for dy in range(self.size)
            for dx in range(self.size)
        ]

    @property
    def bounds(self) -> Bounds:
        """Lon/lat bounds of the whole cell."""
        nw = tile_bounds(mercantile.Tile(self.x0, self.y0, self.zoom))
        se = tile_bounds(mercantile.Tile(self.x0 + self.size - 1, self.y0 + self.size - 1, self.zoom))
        return Bounds(nw.west, se.south, se.east, nw.north)

    def m_per_px(self, tile_size: int = 256) -> float:
        """Ground resolution at the cell's centre latitude: one number for the whole scene, off by
        well under 0.1 % at its north and south edges for zoom-18 scenes."""
        return ground_resolution(self.bounds.centre[1], self.zoom, tile_size)

    def pixel_to_lonlat(self, row: float | np.ndarray, col: float | np.ndarray, tile_size: int = 256):
        """Map pixel coordinates of the stitched scene image to ``(lon, lat)``.

        Coordinates are continuous: ``(0, 0)`` is the north-west corner of the top-left pixel,
        ``(size * tile_size, size * tile_size)`` the south-east corner of the image, and a pixel's
        centre is at ``(r + 0.5, c + 0.5)``. ``row`` and ``col`` may be numpy arrays (a superpixel
        outline, say), which are converted in one vectorised call.
        """
        world = tile_size * 2.0**self.zoom
        x = (self.x0 * tile_size + np.asarray(col, dtype=float)) / world
        y = (self.y0 * tile_size + np.asarray(row, dtype=float)) / world
        return x * 360.0 - 180.0, np.degrees(np.arctan(np.sinh(np.pi * (1.0 - 2.0 * y))))

    def lonlat_to_pixel(self, lon: float | np.ndarray, lat: float | np.ndarray, tile_size: int = 256):
        """The inverse of :meth:`pixel_to_lonlat`: ``(row, col)`` of a lon/lat in the stitched scene
        image (continuous; outside ``[0, size * tile_size)`` when the point is outside the cell).
        How a reader's report, given in degrees, finds the superpixel under it."""
        world = tile_size * 2.0**self.zoom
        x = (np.asarray(lon, dtype=float) + 180.0) / 360.0
        y = (1.0 - np.arcsinh(np.tan(np.radians(np.asarray(lat, dtype=float)))) / np.pi) / 2.0
        return y * world - self.y0 * tile_size, x * world - self.x0 * tile_size


def source_tiles(cell: SceneCell, zoom_up: int = 0) -> list[tuple[mercantile.Tile, int, int]]:
    """The tiles ``zoom_up`` zooms above the cell's that cover it, each with its ``(row, col)``
    offset from the cell's top-left corner in cell tiles, row-major.

    A source of 512 px tiles "one zoom up" serves at zoom ``z - 1`` what a 256 px source serves at
    zoom ``z``: the same ground at the same pixel scale, one tile for each 2x2 block. Offsets may be
    negative when a source tile is larger than the cell; the caller crops.
    """
    k = zoom_up
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= cell.zoom:
        raise ConfigError(f"zoom_up={zoom_up!r} must be a whole number from 0 to the cell's zoom {cell.zoom}")
    last_x, last_y = (cell.x0 + cell.size - 1) >> k, (cell.y0 + cell.size - 1) >> k
    return [
        (mercantile.Tile(x, y, cell.zoom - k), (y << k) - cell.y0, (x << k) - cell.x0)
        for y in range(cell.y0 >> k, last_y + 1)
        for x in range(cell.x0 >> k, last_x + 1)
    ]


# --- areas -------------------------------------------------------------------------------------


def parse_area(value: Area | str | Sequence[float] | Mapping) -> Area:
    """Accept any form of area the CLI or a caller holds: an Area, a ``"W,S,E,N"`` string, four
    numbers, or a loaded GeoJSON object."""
    if isinstance(value, Area):
        return value
    if isinstance(value, Mapping):
        return parse_geojson(value)
    if isinstance(value, (str, Sequence)):
        return parse_bbox(value)
    raise AreaError(f"area {value!r} is neither a bbox nor GeoJSON; give W,S,E,N or a GeoJSON polygon")


def parse_bbox(value: str | Sequence[float]) -> Area:
    """Parse a ``W,S,E,N`` bbox in degrees, as a string or four numbers."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        w, s, e, n = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise AreaError(
            f"bbox {value!r} is not four numbers; give W,S,E,N in degrees, e.g. 13.30,52.45,13.45,52.55"
        ) from None
    for lon, lat in ((w, s), (e, n)):
        _check_lonlat(lon, lat, f"bbox {value!r}")
    return Area(_ordered_bounds(w, s, e, n, f"bbox {value!r}"))


def parse_geojson(obj: Mapping) -> Area:
    """Read the Polygon/MultiPolygon geometries of a loaded GeoJSON object into one Area.

    Accepts a FeatureCollection, a Feature or a bare geometry; the area is the union of all
    polygons. Coordinates must be lon/lat (WGS 84), as RFC 7946 requires.
    """
    _check_crs(obj)
    polygons = tuple(_polygons(obj, "GeoJSON"))
    if not polygons:
        raise AreaError("GeoJSON has no polygons; the area must contain a Polygon or MultiPolygon")
    lons = [lon for polygon in polygons for lon, _ in polygon[0]]
    lats = [lat for polygon in polygons for _, lat in polygon[0]]
    return Area(_ordered_bounds(min(lons), min(lats), max(lons), max(lats), "GeoJSON area"), polygons)


def _polygons(obj: object, where: str) -> Iterator[Polygon]:
    """The polygons of one GeoJSON object, recursing through collections and features."""
    kind = obj.get("type") if isinstance(obj, Mapping) else None
    if kind == "FeatureCollection":
        for i, feature in enumerate(obj.get("features") or ()):
            yield from _polygons(feature, f"{where} feature {i}")
    elif kind == "Feature":
        yield from _polygons(obj.get("geometry"), where)
    elif kind == "Polygon":
        yield _polygon(obj.get("coordinates"), where)
    elif kind == "MultiPolygon":
        for coordinates in obj.get("coordinates") or ():
            yield _polygon(coordinates, where)
    else:
        raise AreaError(f"{where}: type {kind!r} cannot be an area; use a Polygon or MultiPolygon geometry")


def _polygon(coordinates: object, where: str) -> Polygon:
    try:
        rings = tuple(tuple((float(p[0]), float(p[1])) for p in ring) for ring in coordinates)
    except (TypeError, ValueError, IndexError):
        raise AreaError(f"{where}: malformed Polygon coordinates; expected [[[lon, lat], ...], ...]") from None
    rings = tuple(ring[:-1] if len(ring) > 1 and ring[0] == ring[-1] else ring for ring in rings)
    if not rings or any(len(ring) < 3 for ring in rings):
        raise AreaError(f"{where}: a polygon ring has fewer than 3 distinct vertices; fix or drop that polygon")
    for ring in rings:
        for lon, lat in ring:
            _check_lonlat(lon, lat, where)
    return rings


#: How to turn a projected file into what GeoJSON (RFC 7946) requires, for the error messages.
REPROJECT_HINT = "reproject it to lon/lat, e.g. ogr2ogr -t_srs EPSG:4326 out.geojson in.geojson"
_LONLAT_CRS = ("CRS84", "EPSG::4326", "EPSG:4326", "CRS:84")


def _check_crs(obj: Mapping) -> None:
    """Refuse a file that names a projected CRS (the pre-RFC 7946 ``crs`` member, as QGIS and
    ogr2ogr still write it): its coordinates are metres, not degrees."""
    crs = obj.get("crs") if isinstance(obj, Mapping) else None
    name = crs.get("properties", {}).get("name") if isinstance(crs, Mapping) else None
    if isinstance(name, str) and not name.upper().endswith(_LONLAT_CRS):
        raise AreaError(f"GeoJSON is in {name}, a projected or non-WGS84 CRS, not lon/lat; {REPROJECT_HINT}")


def _check_lonlat(lon: float, lat: float, where: str) -> None:
    if not (math.isfinite(lon) and math.isfinite(lat)):
        raise AreaError(f"{where}: coordinate ({lon}, {lat}) is not finite; give numbers in degrees")
    if abs(lon) > 360 or abs(lat) > 90:
        raise AreaError(f"{where}: coordinate ({lon:.0f}, {lat:.0f}) looks projected (metres, not degrees); "
                        f"{REPROJECT_HINT}")
    if abs(lon) > 180 or abs(lat) > MAX_LAT:
        raise AreaError(
            f"{where}: coordinate ({lon}, {lat}) is outside Web Mercator; use lon/lat degrees (EPSG:4326) "
            f"with lon within ±180 and lat within ±{MAX_LAT:.4f}"
        )


def _ordered_bounds(w: float, s: float, e: float, n: float, where: str) -> Bounds:
    if w >= e or s >= n:
        raise AreaError(
            f"{where} is empty or inverted (W={w}, S={s}, E={e}, N={n}); W must be < E and S < N "
            "(split an area crossing the antimeridian in two)"
        )
    return Bounds(w, s, e, n)


# --- tiles -------------------------------------------------------------------------------------


def tile_bounds(tile: mercantile.Tile) -> Bounds:
    """Lon/lat bounds of a tile."""
    return Bounds(*mercantile.bounds(tile))


def tile_to_quadkey(tile: mercantile.Tile) -> str:
    """Bing-style quadkey of a tile (``""`` for the zoom-0 tile)."""
    return mercantile.quadkey(tile)


def quadkey_to_tile(quadkey: str) -> mercantile.Tile:
    """The tile a quadkey names.

    Checked here rather than by catching mercantile's QuadKeyError, whose base class is changing.
    """
    if not (isinstance(quadkey, str) and set(quadkey) <= set("0123") and len(quadkey) <= MAX_ZOOM):
        raise ConfigError(f"quadkey {quadkey!r} is invalid; quadkeys are up to {MAX_ZOOM} digits 0-3")
    return mercantile.quadkey_to_tile(quadkey)


def flip_y(tile: mercantile.Tile) -> int:
    """The TMS row of a tile (rows counted from the south), as MBTiles and ``{-y}`` URLs use."""
    return 2**tile.z - 1 - tile.y


def ground_resolution(lat: float, zoom: int, tile_size: int = 256) -> float:
    """Metres per pixel at latitude ``lat``: Mercator stretches the map by ``1 / cos(lat)``."""
    check_zoom(zoom)
    _check_lonlat(0.0, lat, "latitude")
    return _M_PER_PX_Z0 * 256 / tile_size * math.cos(math.radians(lat)) / 2**zoom


def tiles_covering(area: Area | str | Sequence[float] | Mapping, zoom: int) -> Iterator[mercantile.Tile]:
    """The tiles at ``zoom`` that share some area with the area of interest, row-major (by y, then x).

    A tile that merely touches the area along an edge or at a corner is left out, as mercantile
    does for a bbox: an outline drawn along tile or scene edges (a common way to mark an area)
    would otherwise drag in a ring of useless neighbours. Tiles inside holes or between the
    polygons of a MultiPolygon are left out too.

    The tiles are streamed, never held: a 70,000 km² region is millions of tiles, and memory
    grows with the outline and one row of tiles, not with the area. The arguments are checked
    here, before the first tile is asked for.
    """
    area = parse_area(area)
    check_zoom(zoom)
    if area.polygons:
        return _polygon_cover(area.polygons, zoom)
    # mercantile pulls the east and south edges in by LL_EPSILON degrees so that a tile's own
    # bounds cover just that tile; a bbox thinner than that would get no tiles at all.
    w, s, e, n = astuple(area.bounds)
    e, n = max(e, w + 2 * mercantile.LL_EPSILON), max(n, s + 2 * mercantile.LL_EPSILON)
    first = mercantile.tile(w, n, zoom)
    last = mercantile.tile(e - mercantile.LL_EPSILON, s + mercantile.LL_EPSILON, zoom)  # as mercantile.tiles
    return (
        mercantile.Tile(x, y, zoom) for y in range(first.y, last.y + 1) for x in range(first.x, last.x + 1)
    )


def scene_grid(
    area: Area | str | Sequence[float] | Mapping, zoom: int = 18, scene_tiles: int = 4
) -> Iterator[SceneCell]:
    """The scene cells covering the area, row-major (by y, then x).

    An aligned block of ``2**k x 2**k`` tiles at ``zoom`` is exactly one tile at ``zoom - k``, so
    the cells are the cover at that coarser zoom: a cell is kept if and only if one of its tiles
    is in the cover at ``zoom``. Arguments are checked here, before the first cell is asked for.
    """
    area = parse_area(area)
    check_scene_tiles(scene_tiles, zoom)
    k = scene_tiles.bit_length() - 1
    return (SceneCell(zoom, t.x << k, t.y << k, scene_tiles) for t in tiles_covering(area, zoom - k))


def check_zoom(zoom: int, example: str = "e.g. 18 for ~0.5 m/px") -> None:
    """A zoom level is a whole number from 0 to MAX_ZOOM; ``example`` ends the error message
    (the run config names its CLI option there)."""
    if isinstance(zoom, bool) or not isinstance(zoom, int) or not 0 <= zoom <= MAX_ZOOM:
        raise ConfigError(f"zoom {zoom!r} is not a whole number from 0 to {MAX_ZOOM}; {example}")


def check_scene_tiles(scene_tiles: int, zoom: int, example: str = "use e.g. 4 (1024 px scenes from 256 px tiles)") -> None:
    """A scene is an aligned block of ``2**k x 2**k`` tiles, so its side is a power of two that
    fits in the world at ``zoom``."""
    check_zoom(zoom)
    st = scene_tiles
    if isinstance(st, bool) or not isinstance(st, int) or st < 1 or st & (st - 1) or st > 2**zoom:
        raise ConfigError(f"scene_tiles={st!r} must be a power of two no larger than {2**zoom} at zoom {zoom}; {example}")


# --- polygon cover -----------------------------------------------------------------------------


def _polygon_cover(polygons: tuple[Polygon, ...], zoom: int) -> Iterator[mercantile.Tile]:
    """Quadtree descent from the zoom-0 tile, passing each tile only the edges that cross it.

    A tile whose interior no edge crosses is wholly inside or wholly outside the area, which one
    point-in-polygon test at its centre decides; inside, all its descendants at ``zoom`` are in
    the cover without further tests. An edge through a tile's interior has area on its inner side
    right there, so such a tile is in the cover. Work grows with the outline, not the area.

    The tiles come out row-major without being collected: the pending quadtree nodes wait in a
    heap keyed by the first tile (row, column) at ``zoom`` they can still give. Nodes are
    disjoint, so the smallest key is the next tile of the cover. A node wholly inside gives one
    row of its tiles and goes back with its next row. The heap holds the nodes along the current
    row and the siblings of their ancestors: it grows with the outline, not with the area.
    """
    edges = [(*a, *b) for polygon in polygons for ring in polygon for a, b in _ring_edges(ring)]
    # Keys are unique (the nodes are disjoint), so the heap never compares the nodes themselves.
    heap: list[tuple[int, int, mercantile.Tile, list[_Segment] | None]] = [(0, 0, mercantile.Tile(0, 0, 0), edges)]
    while heap:
        row, col, tile, candidates = heapq.heappop(heap)
        shift = zoom - tile.z
        if candidates is not None:  # not yet decided: inside, outside, or crossed by the outline
            bounds = tile_bounds(tile)
            crossing = [edge for edge in candidates if _crosses_interior(edge, bounds)]
            if crossing and shift:
                for child in mercantile.children(tile):
                    key = (child.y << (shift - 1), child.x << (shift - 1))
                    heapq.heappush(heap, (*key, child, crossing))
                continue
            if not crossing and not contains(polygons, *bounds.centre):
                continue
        # Inside (or a crossed tile at ``zoom``): the node's row ``row`` from column ``col`` on.
        yield from (mercantile.Tile(x, row, zoom) for x in range(col, (tile.x + 1) << shift))
        if row + 1 < (tile.y + 1) << shift:
            heapq.heappush(heap, (row + 1, col, tile, None))


def _ring_edges(ring: Ring):
    return zip(ring, ring[1:] + ring[:1])


def _crosses_interior(segment: _Segment, b: Bounds) -> bool:
    """Whether a segment meets the open interior of a rectangle (Liang-Barsky clipping with
    strict inequalities, so running along an edge or through a corner does not count)."""
    x0, y0, x1, y1 = segment
    dx, dy = x1 - x0, y1 - y0
    t0, t1 = 0.0, 1.0
    for p, q in ((-dx, x0 - b.west), (dx, b.east - x0), (-dy, y0 - b.south), (dy, b.north - y0)):
        if p == 0:
            if q <= 0:
                return False
            continue
        t = q / p
        if p < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
    return t0 < t1


def contains(polygons: tuple[Polygon, ...], lon: float, lat: float) -> bool:
    """Even-odd ray casting per polygon (holes flip the parity back), then any polygon."""
    for polygon in polygons:
        crossings = 0
        for ring in polygon:
            for (x0, y0), (x1, y1) in _ring_edges(ring):
                if (y0 > lat) != (y1 > lat) and lon < x0 + (lat - y0) * (x1 - x0) / (y1 - y0):
                    crossings += 1
        if crossings % 2:
            return True
    return False
