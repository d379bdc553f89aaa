"""The other export formats: detections.csv and detections.gpkg open in geopandas with the right
CRS and columns, summary.png is a one-page picture, and --format is checked."""

from __future__ import annotations

import json

import pytest

from amber_hunter.errors import ConfigError
from amber_hunter.export.tables import CSV_COLUMNS
from amber_hunter.export.writers import check_formats, export

gpd = pytest.importorskip("geopandas")


@pytest.fixture(scope="module")
def exported(folder_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("tables")
    return export(folder_run, out, basemap="none", formats=["all"])


def test_csv_has_one_row_per_flagged_scene_with_both_areas(exported):
    paths, summary = exported
    import pandas as pd

    table = pd.read_csv(paths.csv)
    assert tuple(table.columns) == CSV_COLUMNS
    assert len(table) == summary.scenes_flagged > 0
    assert table["positive_superpixel_ha"].sum() == pytest.approx(summary.positive_superpixel_ha, abs=1e-3)
    assert table["disturbed_ha"].sum() == pytest.approx(summary.disturbed_ha, abs=1e-3)
    assert table["lat"].between(50.6, 50.65).all() and table["lon"].between(26.2, 26.4).all()
    assert table["max_probability"].map(lambda p: len(str(p).split(".")[-1]) <= 3).all()
    points = gpd.GeoDataFrame(table, geometry=gpd.points_from_xy(table["lon"], table["lat"]), crs="EPSG:4326")
    assert points.crs.to_epsg() == 4326


def test_geopackage_has_scene_and_superpixel_layers_in_wgs84(exported):
    paths, summary = exported
    geo = json.loads(paths.detections.read_text())["features"]
    scenes = gpd.read_file(paths.gpkg, layer="scenes")
    superpixels = gpd.read_file(paths.gpkg, layer="superpixels")
    assert scenes.crs.to_epsg() == 4326 and superpixels.crs.to_epsg() == 4326
    assert len(scenes) == summary.scenes_flagged
    assert len(superpixels) == sum(f["properties"]["kind"] == "superpixel" for f in geo)
    assert {"scene_id", "capture_date", "probability", "positive_area_m2", "disturbed_area_m2", "n_positive",
            "scene_area_m2", "geometry"} <= set(scenes.columns)
    assert {"scene_id", "label", "probability", "area_m2", "disturbed_m2", "geometry"} <= set(superpixels.columns)
    assert superpixels["area_m2"].sum() / 10_000 == pytest.approx(summary.positive_superpixel_ha, abs=1e-3)
    assert scenes.geometry.is_valid.all() and (scenes.geometry.geom_type == "Polygon").all()


def test_summary_png_is_one_page(exported):
    from PIL import Image

    paths, _ = exported
    with Image.open(paths.png) as picture:
        width, height = picture.size
    assert picture.format == "PNG" and height > width > 1000  # A4 portrait at 150 dpi


@pytest.mark.parametrize("formats, expected", [(["csv"], ("csv",)), (["all"], ("geojson", "map", "csv", "gpkg", "png")),
                                               (["csv", "csv", "map"], ("csv", "map"))])
def test_formats_are_checked_and_deduplicated(formats, expected):
    assert check_formats(formats) == expected


def test_an_unknown_format_names_the_choices(folder_run, tmp_path):
    with pytest.raises(ConfigError, match="--format 'shp' is not one of geojson, map, csv, gpkg, png"):
        export(folder_run, tmp_path / "out", formats=["shp"])


def test_only_the_formats_asked_for_are_written(folder_run, tmp_path):
    paths, _ = export(folder_run, tmp_path / "out", formats=["csv"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["detections.csv", "summary.json"]
    assert paths.map is None and paths.detections is None


def test_a_scene_partly_inside_a_licence_says_how_much_is_outside(folder_run, tmp_path):
    paths, _ = export(folder_run, tmp_path / "o0", basemap="none", formats=["geojson"])
    features = json.loads(paths.detections.read_text())["features"]
    scene = next(f["properties"]["scene_id"] for f in features if f["properties"]["kind"] == "scene")
    mine = [f for f in features if f["properties"]["kind"] == "superpixel" and f["properties"]["scene_id"] == scene]
    registry = tmp_path / "licence.geojson"
    registry.write_text(json.dumps({"type": "FeatureCollection", "features": [mine[0] | {"properties": {}}]}))
    paths, summary = export(folder_run, tmp_path / "o1", registry=registry, basemap="none", formats=["geojson", "csv"])
    props = next(f["properties"] for f in json.loads(paths.detections.read_text())["features"]
                 if f["properties"]["kind"] == "scene" and f["properties"]["scene_id"] == scene)
    assert props["licence_status"] == "partly licensed"
    assert props["unlicensed_area_m2"] == pytest.approx(props["positive_area_m2"] - mine[0]["properties"]["area_m2"], abs=0.1)
    assert summary.scenes_partly_licensed == 1
    assert "partly licensed" in paths.csv.read_text()
