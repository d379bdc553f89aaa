"""Tile folders as people have them: gdal2tiles TMS output, explicit schemes, path templates; and
the tile size a source can tell without decoding a tile."""

from __future__ import annotations

import mercantile
import pytest
from tile_servers import png_bytes, tilemap_xml, write_mbtiles, write_tile_folder

from amber_hunter.errors import ConfigError, TileSourceError
from amber_hunter.sources import (
    MISSING,
    CachedTileSource,
    FolderSource,
    HttpTileSource,
    MBTilesSource,
    open_source,
)

TILES = [mercantile.Tile(x, y, 5) for x in (17, 18) for y in (10, 11)]


def write_tms_folder(root, tiles, suffix=".png") -> dict:
    """Tiles at TMS rows, ``{root}/{z}/{x}/{2**z - 1 - y}{suffix}``, as gdal2tiles writes them."""
    written = {}
    for i, tile in enumerate(tiles):
        path = root / str(tile.z) / str(tile.x) / f"{2**tile.z - 1 - tile.y}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        written[tile] = png_bytes(50 + i)
        path.write_bytes(written[tile])
    return written


# --- TMS folders ---------------------------------------------------------------------------------


def test_gdal2tiles_folder_is_read_as_tms_with_its_tile_size(tmp_path):
    root = tmp_path / "gdal2tiles"
    written = write_tms_folder(root, TILES)
    (root / "tilemapresource.xml").write_text(tilemap_xml(width=512, height=512))
    source = open_source(root)
    assert source.scheme == "tms" and "TMS" in source.describe()
    assert {t: source.get(t).data for t in TILES} == written
    assert source.tile_size == 512


def test_explicit_scheme_overrides_the_tilemap(tmp_path):
    root = tmp_path / "gdal2tiles"
    written = write_tms_folder(root, TILES)
    (root / "tilemapresource.xml").write_text(tilemap_xml())
    source = open_source(root, scheme="xyz")  # e.g. an old --xyz fork that wrote the XML anyway
    tile = TILES[0]
    flipped = mercantile.Tile(tile.x, 2**tile.z - 1 - tile.y, tile.z)
    assert source.scheme == "xyz" and source.get(flipped).data == written[tile]
    assert source.get(tile) == MISSING


def test_plain_folder_with_tms_scheme(tmp_path):
    root = tmp_path / "tms"
    written = write_tms_folder(root, TILES, suffix=".jpg")
    source = FolderSource(root, scheme="tms")
    assert {t: source.get(t).data for t in TILES} == written
    assert source.tile_size is None  # nothing says so: the scan decodes the first tile
    assert open_source(tmp_path / "tms").get(TILES[0]) == MISSING  # rows counted from the north by default


def test_tilemap_extension_is_read_first(tmp_path):
    root = tmp_path / "webp"
    written = write_tms_folder(root, TILES, suffix=".webp")
    (root / "tilemapresource.xml").write_text(tilemap_xml(extension="webp", width=256, height=128))
    source = FolderSource(root)
    assert {t: source.get(t).data for t in TILES} == written
    assert source.tile_size is None  # not square: not a size the scan can use


@pytest.mark.parametrize(
    "xml, fragment",
    [
        (
            tilemap_xml(profile="geodetic", srs="EPSG:4326"),
            "profile 'geodetic' with SRS 'EPSG:4326' is not Web Mercator",
        ),
        (tilemap_xml(profile="raster", srs="EPSG:3857"), "profile 'raster'"),
        ("<TileMap><Title>cut off", "not a readable tilemapresource.xml"),
    ],
    ids=["geodetic", "raster", "broken"],
)
def test_tilemaps_that_cannot_be_web_mercator_are_refused(tmp_path, xml, fragment):
    root = tmp_path / "tiles"
    write_tms_folder(root, TILES)
    (root / "tilemapresource.xml").write_text(xml)
    with pytest.raises(TileSourceError, match=fragment):
        open_source(root, scheme="tms")


def test_tilemap_without_profile_is_judged_by_its_srs(tmp_path):
    root = tmp_path / "tiles"
    written = write_tms_folder(root, TILES)
    (root / "tilemapresource.xml").write_text(tilemap_xml(profile="", srs="EPSG:900913"))
    assert FolderSource(root).get(TILES[0]).data == written[TILES[0]]


@pytest.mark.parametrize("scheme", ["XYZ", "google", ""])
def test_unknown_scheme_is_refused(tmp_path, scheme):
    with pytest.raises(ConfigError, match=f"scheme={scheme!r} must be xyz"):
        FolderSource(tmp_path, scheme=scheme)


# --- path templates ------------------------------------------------------------------------------


def test_path_template_with_another_extension(tmp_path):
    written = write_tile_folder(tmp_path / "jpegs", TILES, suffix=".jpg")
    source = open_source(f"{tmp_path}/jpegs/{{z}}/{{x}}/{{y}}.jpg")
    assert isinstance(source, FolderSource) and source.describe().endswith("/jpegs/{z}/{x}/{y}.jpg")
    assert {t: source.get(t).data for t in TILES} == written
    assert source.get(mercantile.Tile(0, 0, 5)) == MISSING
    with pytest.raises(TileSourceError, match="no folder for zoom 7"):
        source.get(mercantile.Tile(0, 0, 7))


def test_path_template_with_tms_rows_and_another_layout(tmp_path):
    root = tmp_path / "layers" / "ortho"
    written = {}
    for i, tile in enumerate(TILES):
        path = root / f"z{tile.z}" / f"{tile.x}-{2**tile.z - 1 - tile.y}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        written[tile] = png_bytes(i)
        path.write_bytes(written[tile])
    source = open_source(f"{root}/z{{z}}/{{x}}-{{-y}}.png")
    assert source.scheme == "tms"
    assert {t: source.get(t).data for t in TILES} == written
    with pytest.raises(TileSourceError, match="no folder for zoom 6"):
        source.check_zoom(6)


def test_path_template_by_quadkey_accepts_every_zoom(tmp_path):
    (tmp_path / "q").mkdir()
    tile = TILES[0]
    (tmp_path / "q" / f"{mercantile.quadkey(tile)}.png").write_bytes(b"tile bytes")
    source = open_source(str(tmp_path / "q" / "{q}.png"))
    source.check_zoom(19)  # no folder per zoom to look at
    assert source.get(tile).data == b"tile bytes"
    assert source.get(mercantile.Tile(0, 0, 19)) == MISSING


@pytest.mark.parametrize(
    "suffix, options, error, fragment",
    [
        ("{z}/{x}/{y}/{s}.png", {}, TileSourceError, r"unknown placeholder \{s\}"),
        ("{z}/{x}/{y}.png?k={key}", {}, TileSourceError, r"unknown placeholder \{key\}"),
        ("{z}/{x}.png", {}, TileSourceError, "does not name a tile"),
        ("{z}/{x}/{y}.png", {"scheme": "tms"}, ConfigError, r"write \{-y\} in it for TMS rows"),
        ("missing/{z}/{x}/{y}.png", {}, TileSourceError, "no such tile folder"),
    ],
)
def test_bad_path_templates(tmp_path, suffix, options, error, fragment):
    with pytest.raises(error, match=fragment):
        open_source(f"{tmp_path}/{suffix}", **options)


def test_scheme_is_a_folder_option_only(tmp_path):
    path = tmp_path / "a.mbtiles"
    write_mbtiles(path, TILES)
    with pytest.raises(ConfigError, match="option scheme does not apply to the MBTiles source"):
        open_source(path, scheme="tms")
    with pytest.raises(ConfigError, match="option scheme does not apply to the HTTP source"):
        open_source("https://tiles.example/{z}/{x}/{y}.png", scheme="tms")


# --- tile size -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata, size",
    [
        ((("tilesize", "512"),), 512),
        ((("tile_size", " 256 "),), 256),
        ((), None),
        ((("tilesize", "large"),), None),
        ((("tilesize", "-256"),), None),
    ],
)
def test_mbtiles_tile_size_from_metadata(tmp_path, metadata, size):
    path = tmp_path / "a.mbtiles"
    write_mbtiles(path, TILES, metadata=(("minzoom", "5"), ("maxzoom", "5"), *metadata))
    source = MBTilesSource(path)
    assert source.tile_size == size
    assert CachedTileSource(source, tmp_path / "cache").tile_size == size


def test_http_and_plain_folders_do_not_know_their_tile_size(tmp_path):
    write_tile_folder(tmp_path, TILES)
    assert HttpTileSource("https://tiles.example/{z}/{x}/{y}.png").tile_size is None
    assert FolderSource(tmp_path).tile_size is None
