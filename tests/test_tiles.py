"""Properties of the tile math: round trips, covers that miss nothing, scenes that partition."""

from __future__ import annotations

import math

import mercantile
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amber_hunter.errors import AreaError, ConfigError
from amber_hunter.geo.tiles import (
    MAX_LAT,
    Area,
    Bounds,
    SceneCell,
    _crosses_interior,
    contains,
    flip_y,
    ground_resolution,
    parse_area,
    parse_bbox,
    parse_geojson,
    quadkey_to_tile,
    scene_grid,
    tile_bounds,
    tile_to_quadkey,
    tiles_covering,
)

# Within this of a tile edge, mercantile deliberately rounds to the next tile (its EPSILON is
# 1e-14 of the world, LL_EPSILON 1e-11 degrees); containment is checked to that tolerance.
EDGE_TOL = 1e-9

#: Modest example counts keep the suite fast; no example database is written into the repo.
props = settings(max_examples=60, deadline=None, database=None)


@st.composite
def tiles(draw, max_zoom=24):
    z = draw(st.integers(0, max_zoom))
    return mercantile.Tile(draw(st.integers(0, 2**z - 1)), draw(st.integers(0, 2**z - 1)), z)


@st.composite
def small_bboxes(draw, zoom):
    """A bbox spanning at most ~3 tiles each way at ``zoom``, so covers stay small."""
    span = 360.0 / 2**zoom * 3
    w = draw(st.floats(-180.0, 180.0 - 1e-6))
    e = draw(st.floats(w, min(180.0, w + span)).filter(lambda v: v > w))
    s = draw(st.floats(-80.0, 80.0))
    n = draw(st.floats(s, min(80.0, s + span / 2)).filter(lambda v: v > s))
    return w, s, e, n


def in_tile(tile, lon, lat, tol=EDGE_TOL):
    b = tile_bounds(tile)
    return b.west - tol <= lon <= b.east + tol and b.south - tol <= lat <= b.north + tol


# --- tiles and quadkeys ------------------------------------------------------------------------


@props
@given(tiles())
def test_quadkey_round_trip(tile):
    assert quadkey_to_tile(tile_to_quadkey(tile)) == tile


@props
@given(tiles())
def test_centre_of_bounds_maps_back_to_tile(tile):
    lon, lat = tile_bounds(tile).centre
    assert mercantile.tile(lon, lat, tile.z) == tile


@props
@given(tiles())
def test_flip_y_is_an_involution_within_the_zoom(tile):
    flipped = flip_y(tile)
    assert 0 <= flipped < 2**tile.z
    assert flip_y(mercantile.Tile(tile.x, flipped, tile.z)) == tile.y


def test_bad_quadkey():
    with pytest.raises(ConfigError, match="'0124'"):
        quadkey_to_tile("0124")


# --- covers ------------------------------------------------------------------------------------


@props
@given(st.data())
def test_bbox_cover_contains_every_point_and_only_touching_tiles(data):
    zoom = data.draw(st.integers(0, 12))
    w, s, e, n = data.draw(small_bboxes(zoom))
    cover = list(tiles_covering((w, s, e, n), zoom))
    assert cover and len(set(cover)) == len(cover)
    assert cover == sorted(cover, key=lambda t: (t.y, t.x))
    for _ in range(10):
        lon, lat = data.draw(st.floats(w, e)), data.draw(st.floats(s, n))
        assert any(in_tile(t, lon, lat) for t in cover), (lon, lat)
    for t in cover:  # and every covering tile reaches the bbox
        b = tile_bounds(t)
        assert b.west <= e + EDGE_TOL and b.east >= w - EDGE_TOL
        assert b.south <= n + EDGE_TOL and b.north >= s - EDGE_TOL


def triangle(lon, lat, size):
    return {"type": "Polygon", "coordinates": [[[lon, lat], [lon + size, lat], [lon, lat + size], [lon, lat]]]}


@props
@given(st.integers(4, 10), st.floats(-170, 120), st.floats(-70, 25), st.floats(0.01, 1.0), st.data())
def test_polygon_cover_contains_its_points_and_stays_within_the_bbox_cover(zoom, lon, lat, frac, data):
    size = 360.0 / 2**zoom * 2.5 * frac
    area = parse_geojson(triangle(lon, lat, size))
    cover = set(tiles_covering(area, zoom))
    bbox_cover = set(tiles_covering(Area(area.bounds), zoom))
    for t in cover - bbox_cover:  # mercantile rounds a sub-epsilon overlap to the next tile
        b = tile_bounds(t)
        assert min(b.east, area.bounds.east) - max(b.west, area.bounds.west) < EDGE_TOL or (
            min(b.north, area.bounds.north) - max(b.south, area.bounds.south) < EDGE_TOL
        )
    for _ in range(10):
        a, b = data.draw(st.floats(0, 1)), data.draw(st.floats(0, 1))
        if a + b > 1:
            a, b = 1 - a, 1 - b
        px, py = lon + a * size, lat + b * size
        assert any(in_tile(t, px, py) for t in cover), (px, py)
    for t in bbox_cover - cover:  # a dropped tile lies wholly beyond the hypotenuse
        b = tile_bounds(t)
        assert b.west - lon + b.south - lat >= size * (1 - 1e-9)


def test_polygon_cover_skips_holes_and_notches():
    # A 4x4-tile square at zoom 4 with a 2x2-tile hole in the middle: 12 tiles, not 16.
    w, n = tile_bounds(mercantile.Tile(4, 4, 4)).west, tile_bounds(mercantile.Tile(4, 4, 4)).north
    e, s = tile_bounds(mercantile.Tile(7, 7, 4)).east, tile_bounds(mercantile.Tile(7, 7, 4)).south
    hole_nw, hole_se = tile_bounds(mercantile.Tile(5, 5, 4)), tile_bounds(mercantile.Tile(6, 6, 4))
    # The outline is inset and the hole outset by a margin, so no tile merely touches an edge.
    m = 0.01
    outer = [[w + m, s + m], [e - m, s + m], [e - m, n - m], [w + m, n - m], [w + m, s + m]]
    hole = [
        [hole_nw.west - m, hole_se.south - m],
        [hole_nw.west - m, hole_nw.north + m],
        [hole_se.east + m, hole_nw.north + m],
        [hole_se.east + m, hole_se.south - m],
    ]
    cover = list(tiles_covering({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [outer, hole]}}, 4))
    assert len(cover) == 12
    assert not {(5, 5), (5, 6), (6, 5), (6, 6)} & {(t.x, t.y) for t in cover}
    # At zoom 6 the square is 16x16 tiles and the hole swallows 8x8 of them.
    assert len(list(tiles_covering({"type": "Polygon", "coordinates": [outer, hole]}, 6))) == 16 * 16 - 8 * 8


def test_outline_along_tile_edges_takes_no_neighbours():
    cell = SceneCell(12, 2200, 1340, 4)
    b = cell.bounds
    ring = [[b.west, b.south], [b.east, b.south], [b.east, b.north], [b.west, b.north], [b.west, b.south]]
    polygon = {"type": "Polygon", "coordinates": [ring]}
    assert set(tiles_covering(polygon, 12)) == set(cell.tiles)
    assert list(scene_grid(polygon, 12, 4)) == [cell]
    assert list(scene_grid(Area(b), 12, 4)) == [cell]


def test_multipolygon_in_a_feature_collection_is_the_union():
    multi = {"type": "MultiPolygon", "coordinates": [triangle(-20.0, -30.0, 0.001)["coordinates"]]}
    fc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": triangle(10.0, 10.0, 0.001), "properties": {}},
            {"type": "Feature", "geometry": multi, "properties": {}},
        ],
    }
    cover = tiles_covering(fc, 10)
    assert {mercantile.tile(10.0002, 10.0002, 10), mercantile.tile(-19.9998, -29.9998, 10)} == set(cover)


def listed_cover(area, zoom):
    """The cover as it was computed before it was streamed, kept as the oracle: an unordered
    quadtree descent (or mercantile's column-major bbox tiles) collected and sorted."""
    area = parse_area(area)
    if not area.polygons:
        w, s, e, n = area.bounds.west, area.bounds.south, area.bounds.east, area.bounds.north
        pad = 2 * mercantile.LL_EPSILON
        return sorted(mercantile.tiles(w, s, max(e, w + pad), max(n, s + pad), zoom), key=lambda t: (t.y, t.x))
    edges = [(*a, *b) for polygon in area.polygons for ring in polygon for a, b in zip(ring, ring[1:] + ring[:1])]
    found, stack = [], [(mercantile.Tile(0, 0, 0), edges)]
    while stack:
        tile, candidates = stack.pop()
        bounds = tile_bounds(tile)
        crossing = [edge for edge in candidates if _crosses_interior(edge, bounds)]
        if not crossing:
            if contains(area.polygons, *bounds.centre):
                shift = zoom - tile.z
                found += [mercantile.Tile(x, y, zoom) for y in range(tile.y << shift, (tile.y + 1) << shift)
                          for x in range(tile.x << shift, (tile.x + 1) << shift)]
        elif tile.z == zoom:
            found.append(tile)
        else:
            stack.extend((child, crossing) for child in mercantile.children(tile))
    return sorted(found, key=lambda t: (t.y, t.x))


@st.composite
def star_polygons(draw, zoom):
    """A star-shaped ring (vertices sorted by angle, so it never crosses itself) a few tiles
    across at ``zoom``, optionally with a smaller star-shaped hole around the same centre."""
    span = 360.0 / 2**zoom * 4
    lon, lat = draw(st.floats(-170.0, 170.0)), draw(st.floats(-75.0, 75.0))
    count = draw(st.integers(3, 12))
    angles = sorted(draw(st.lists(st.floats(0, 2 * math.pi, exclude_max=True), min_size=count, max_size=count,
                                  unique=True)))
    radii = draw(st.lists(st.floats(0.1, 1.0), min_size=count, max_size=count))
    def ring(scale):
        return [[lon + scale * span * r * math.cos(a), lat + scale * span / 2 * r * math.sin(a)]
                for a, r in zip(angles, radii)]
    rings = [ring(1.0)] + ([ring(0.05)] if draw(st.booleans()) else [])
    return {"type": "Polygon", "coordinates": rings}


@props
@given(st.data())
def test_streamed_cover_equals_the_sorted_list_it_replaces(data):
    zoom = data.draw(st.integers(0, 12))
    area = data.draw(st.one_of(small_bboxes(zoom), star_polygons(zoom)))
    try:
        expected = listed_cover(area, zoom)
    except AreaError:  # a star squeezed to a line has no area; both forms refuse it alike
        with pytest.raises(AreaError):
            tiles_covering(area, zoom)
        return
    cover = tiles_covering(area, zoom)
    assert not isinstance(cover, list)
    assert list(cover) == expected


@pytest.mark.parametrize("outline", [False, True])
def test_a_450000_scene_grid_is_streamed_not_held(outline):
    """~700x650 scenes of 4x4 tiles at zoom 18 (the study's region is 450,000 scenes): a list of
    them alone takes over 30 MB (8-byte slots plus a SceneCell each); streaming holds a row."""
    import tracemalloc

    first, last = mercantile.Tile(40000, 30000, 16), mercantile.Tile(40699, 30649, 16)
    w, n = tile_bounds(first).west, tile_bounds(first).north
    e, s = tile_bounds(last).east, tile_bounds(last).south
    if outline:  # the same square as a GeoJSON outline, so the quadtree path is streamed too
        ring = [[w, s], [e, s], [e, n], [w, n], [w, s]]
        area = {"type": "Polygon", "coordinates": [ring]}
    else:
        area = (w, s, e, n)
    tracemalloc.start()
    try:
        count, previous = 0, (-1, -1)
        for cell in scene_grid(area, 18, 4):
            assert (cell.y0, cell.x0) > previous
            previous, count = (cell.y0, cell.x0), count + 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 700 * 650
    assert peak < 2 * 2**20, f"peak {peak / 2**20:.1f} MB while streaming {count} scenes"


# --- scenes ------------------------------------------------------------------------------------


@props
@given(st.data())
def test_scene_grid_partitions_the_cover(data):
    scene_tiles = data.draw(st.sampled_from([1, 2, 4]))
    zoom = data.draw(st.integers(2, 14))
    bbox = data.draw(small_bboxes(zoom))
    cells = list(scene_grid(bbox, zoom, scene_tiles))
    assert cells == sorted(cells, key=lambda c: (c.y0, c.x0))
    assert len({c.scene_id for c in cells}) == len(cells)
    owner = {}
    for cell in cells:
        assert cell.x0 % scene_tiles == 0 and cell.y0 % scene_tiles == 0
        for t in cell.tiles:
            assert t not in owner
            owner[t] = cell
    cover = set(tiles_covering(bbox, zoom))
    assert cover <= set(owner)  # every covering tile is in exactly one scene
    for cell in cells:  # and no scene is wholly outside the area
        assert any(t in cover for t in cell.tiles)


@props
@given(st.data())
def test_pixel_to_lonlat_corners_are_the_scene_bounds(data):
    size = data.draw(st.sampled_from([1, 2, 4, 8]))
    zoom = data.draw(st.integers(3, 22))
    n = 2**zoom // size
    cell = SceneCell(zoom, data.draw(st.integers(0, n - 1)) * size, data.draw(st.integers(0, n - 1)) * size, size)
    tile_size = data.draw(st.sampled_from([256, 512]))
    side = size * tile_size
    b = cell.bounds
    lon, lat = cell.pixel_to_lonlat(np.array([0, 0, side, side]), np.array([0, side, 0, side]), tile_size)
    np.testing.assert_allclose(lon, [b.west, b.east, b.west, b.east], rtol=0, atol=1e-9)
    np.testing.assert_allclose(lat, [b.north, b.north, b.south, b.south], rtol=0, atol=1e-9)
    # Pixel centres of the first tile fall inside that tile.
    clon, clat = cell.pixel_to_lonlat(tile_size / 2, tile_size / 2, tile_size)
    assert mercantile.tile(float(clon), float(clat), zoom) == cell.tiles[0]


@props
@given(st.data())
def test_lonlat_to_pixel_inverts_pixel_to_lonlat(data):
    size = data.draw(st.sampled_from([1, 2, 4, 8]))
    zoom = data.draw(st.integers(3, 22))
    n = 2**zoom // size
    cell = SceneCell(zoom, data.draw(st.integers(0, n - 1)) * size, data.draw(st.integers(0, n - 1)) * size, size)
    side = size * 256
    row = data.draw(st.floats(0, side))
    col = data.draw(st.floats(0, side))
    lon, lat = cell.pixel_to_lonlat(row, col)
    back = cell.lonlat_to_pixel(lon, lat)
    # A tenth of a pixel: far below a superpixel; float64 degrees limit it at high zoom near the poles.
    np.testing.assert_allclose(back, (row, col), rtol=0, atol=0.1)


def test_scene_cell_records():
    cell = next(scene_grid("13.40,52.50,13.41,52.51", 18, 4))
    assert cell.scene_id == f"18/{cell.x0}/{cell.y0}/4"
    assert cell.tiles[:2] == [mercantile.Tile(cell.x0, cell.y0, 18), mercantile.Tile(cell.x0 + 1, cell.y0, 18)]
    assert cell.tiles[4] == mercantile.Tile(cell.x0, cell.y0 + 1, 18)
    assert cell.m_per_px() == pytest.approx(0.3634, rel=1e-3)
    assert cell.m_per_px(512) == pytest.approx(cell.m_per_px() / 2)


def test_ground_resolution():
    assert ground_resolution(50, 18) == pytest.approx(0.384, rel=1e-3)
    assert ground_resolution(0, 0) == pytest.approx(156543.03392)
    assert ground_resolution(0, 18, tile_size=512) == pytest.approx(156543.03392 / 2**19)


# --- areas and errors --------------------------------------------------------------------------


def test_area_forms_agree():
    area = parse_bbox("13.3, 52.45, 13.45, 52.55")
    assert area == parse_area([13.3, 52.45, 13.45, 52.55]) == parse_area(area)
    assert area.bounds == Bounds(13.3, 52.45, 13.45, 52.55) and area.polygons == ()
    assert parse_bbox(f"-180,-{MAX_LAT},180,{MAX_LAT}").bounds.north == MAX_LAT
    assert isinstance(parse_area(triangle(0, 0, 1)), Area)


@pytest.mark.parametrize(
    "bbox, fragment",
    [
        ("1,2,3", "not four numbers"),
        ("a,b,c,d", "not four numbers"),
        ("10,0,5,1", "W must be < E"),
        ("0,10,1,5", "W must be < E and S < N"),
        ("0,0,0,1", "empty"),
        ("nan,0,1,1", "not finite"),
        ("0,0,inf,1", "not finite"),
        ("0,0,1,86", "outside Web Mercator"),
        ("-181,0,1,1", "outside Web Mercator"),
    ],
)
def test_bad_bbox(bbox, fragment):
    with pytest.raises(AreaError, match=fragment):
        tiles_covering(bbox, 3)


@pytest.mark.parametrize(
    "geojson, fragment",
    [
        ({"type": "Point", "coordinates": [0, 0]}, "'Point' cannot be an area"),
        ({"type": "FeatureCollection", "features": []}, "no polygons"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]}, "fewer than 3"),
        ({"type": "Polygon", "coordinates": [[0, 0]]}, "malformed"),
        (triangle(500000.0, 5000000.0, 1000.0), "EPSG:4326"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [2, 0]]]}, "empty"),
    ],
)
def test_bad_geojson(geojson, fragment):
    with pytest.raises(AreaError, match=fragment):
        parse_geojson(geojson)


@pytest.mark.parametrize("zoom", [-1, 25, 1.5, True, "18"])
def test_bad_zoom(zoom):
    with pytest.raises(ConfigError, match="zoom"):
        tiles_covering("0,0,1,1", zoom)


@pytest.mark.parametrize("scene_tiles", [0, 3, 16, 2.0])
def test_bad_scene_tiles_fail_before_iteration(scene_tiles):
    with pytest.raises(ConfigError, match="scene_tiles"):
        scene_grid("0,0,1,1", 3, scene_tiles)


def test_errors_are_one_line():
    for bad in ("1,2,3", "0,0,1,86", "10,0,5,1"):
        with pytest.raises(AreaError) as info:
            parse_bbox(bad)
        assert "\n" not in str(info.value) and bad in str(info.value)
    assert math.isclose(MAX_LAT, 85.0511287798, abs_tol=1e-9)
