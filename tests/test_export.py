"""Exports of a finished scan: GeoJSON, summary in hectares, the self-contained map, the licence
cross-check, and the ``status``/``export`` commands (which must not load TensorFlow)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from amber_hunter.cli.scan import export as export_command
from amber_hunter.cli.scan import status as status_command
from amber_hunter.errors import ConfigError, RunStoreError
from amber_hunter.export.writers import export
from amber_hunter.run.config import RunConfig
from amber_hunter.run.store import RunStore


def _flagged(run):
    with RunStore(run) as store:
        return [(s, store.regions(s.scene_id, positive_only=True)) for s in store.scenes(flagged_only=True)]


def test_export_writes_detections_summary_and_map(folder_run, tmp_path):
    paths, _ = export(folder_run, tmp_path / "out")
    flagged = _flagged(folder_run)
    geo = json.loads(paths.detections.read_text())
    kinds = [f["properties"]["kind"] for f in geo["features"]]
    assert kinds.count("scene") == len(flagged) > 0
    assert kinds.count("superpixel") == sum(len(r) for _, r in flagged)
    for f in geo["features"]:
        assert {"scene_id", "probability", "capture_date", "kind"} <= set(f["properties"])
        assert f["geometry"]["type"] == "Polygon" and "licensed" not in f["properties"]
    data = json.loads(paths.summary.read_text())
    assert {"scenes_scanned", "scenes_flagged", "positive_superpixel_ha", "positive_superpixel_ha_by_year",
            "disturbed_ha", "disturbed_ha_by_year"} <= set(data)
    assert (data["scenes_scanned"], data["scenes_flagged"]) == (3, len(flagged))
    expected_ha = sum(s.positive_area_m2 for s, _ in flagged) / 10_000
    assert data["positive_superpixel_ha"] == pytest.approx(expected_ha, abs=1e-3) and data["positive_superpixel_ha"] > 0
    assert data["positive_superpixel_ha_by_year"] == {"unknown": data["positive_superpixel_ha"]}
    # the estimate is measured on every flagged scene (its tiles are local) and lies below the bound
    assert data["scenes_estimated"] == len(flagged)
    assert 0 < data["disturbed_ha"] < data["positive_superpixel_ha"]
    page = paths.map.read_text()
    assert "Leaflet 1.9." in page and "MarkerClusterGroup" in page
    table = json.loads(re.search(r"window.AMBER = (.*?);</script>", page)[1])
    assert sorted(s[0] for s in table["scenes"]) == sorted(s.scene_id for s, _ in flagged)
    assert "data:image/png;base64" not in page.split("window.AMBER")[1]  # pictures are files, not inline
    files = paths.map.parent / "map_files"
    for scene, _ in flagged:
        stem = scene.scene_id.replace("/", "_")
        assert (files / "pictures" / f"{stem}.png").is_file() and (files / "scenes" / f"{stem}.js").is_file()
    assert len(list((files / "imagery").glob("*.jpg"))) == 3  # every analysed scene, flagged or not
    assert "<script src=" not in page and "<link " not in page  # Leaflet is inlined; no CDN asset is left
    assert "tile.openstreetmap.org" in page  # the default base map, for users online


def test_scene_and_positive_areas_have_two_names_and_the_layer_sums_once(folder_run, tmp_path):
    """A GIS user who sums ``area_m2`` over the layer gets the damage once: scene features carry
    their footprint and positive area under other names."""
    paths, summary = export(folder_run, tmp_path / "out")
    features = json.loads(paths.detections.read_text())["features"]
    scenes = [f["properties"] for f in features if f["properties"]["kind"] == "scene"]
    pixels = [f["properties"] for f in features if f["properties"]["kind"] == "superpixel"]
    assert scenes and all("area_m2" not in s for s in scenes)
    assert all({"scene_area_m2", "positive_area_m2"} <= set(s) for s in scenes)
    # A 2x2-tile scene at zoom 18 near 50.6 N: 512 px at ~0.38 m/px, ~3.8 ha.
    assert all(35_000 < s["scene_area_m2"] < 40_000 and s["positive_area_m2"] < s["scene_area_m2"] for s in scenes)
    layer_ha = sum(f.get("area_m2", 0) for f in (p for p in pixels + scenes)) / 10_000
    assert layer_ha == pytest.approx(summary.positive_superpixel_ha, abs=1e-3)
    estimate_ha = sum(p["disturbed_m2"] for p in pixels) / 10_000
    assert estimate_ha == pytest.approx(summary.disturbed_ha, abs=1e-3)
    assert all(s["disturbed_area_m2"] <= s["positive_area_m2"] for s in scenes)


@pytest.mark.parametrize("basemap, expected", [
    ("none", '"basemap":null'),
    ("https://tiles.example.org/{z}/{x}/{-y}.png", '"maxNativeZoom":18'),
    ("https://t{s}.example.net/tiles/a{q}.jpeg?g=1", '"subdomains":["a","b","c"]'),
])
def test_basemap_is_none_or_any_template_a_scan_accepts(basemap, expected, folder_run, tmp_path):
    page = export(folder_run, tmp_path / "out", basemap=basemap)[0].map.read_text()
    assert "openstreetmap.org/{z}" not in page and expected in page
    if basemap != "none":
        assert json.dumps(basemap) in page


@pytest.mark.parametrize(("basemap", "message"), [
    ("https://t.example.org/{z}/{x}/{y}?k={key}", "has {key}; name the environment variable"),
    ("https://t.example.org/{zoom}/{x}/{y}", "unknown placeholder {zoom}"),
    ("/data/tiles", "is not osm, none, or an http(s) URL template"),
    ("satellite", "'satellite' is not osm, none, or an http(s) URL template")])
def test_a_basemap_the_page_cannot_draw_is_refused_before_writing(basemap, message, folder_run, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        export(folder_run, tmp_path / "out", basemap=basemap)
    assert not (tmp_path / "out").exists()


def test_a_basemap_key_comes_from_the_environment(folder_run, tmp_path, monkeypatch):
    monkeypatch.setenv("AMBER_TEST_MAP_KEY", "k123")
    page = export(folder_run, tmp_path / "out", basemap="https://t.example.org/{z}/{x}/{y}?k={key}",
                  basemap_key_env="AMBER_TEST_MAP_KEY")[0].map.read_text()
    assert '"key":"k123"' in page


def test_a_run_without_detections_maps_the_area_it_scanned(tmp_path):
    config = RunConfig(aoi="26.25,50.62,26.26,50.63", tiles=str(tmp_path / "tiles"))
    RunStore(tmp_path / "run", config).close()
    paths, summary = export(tmp_path / "run", tmp_path / "out", basemap="none")
    page = paths.map.read_text()
    assert summary.scenes_flagged == 0 and json.loads(paths.detections.read_text())["features"] == []
    table = json.loads(re.search(r"window.AMBER = (.*?);</script>", page)[1])
    assert table["scenes"] == [] and table["bounds"] == [50.62, 26.25, 50.63, 26.26]  # the view fits the area


def test_registry_marks_detections_inside_licensed_areas(folder_run, tmp_path):
    flagged = _flagged(folder_run)
    licensed_scene = flagged[0][0]
    b = licensed_scene.bounds
    ring = [[b.west, b.south], [b.east, b.south], [b.east, b.north], [b.west, b.north], [b.west, b.south]]
    registry = tmp_path / "licensed.geojson"
    registry.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    paths, summary = export(folder_run, tmp_path / "out", registry=registry)
    features = json.loads(paths.detections.read_text())["features"]
    for f in features:
        assert f["properties"]["licensed"] == (f["properties"]["scene_id"] == licensed_scene.scene_id)
        if f["properties"]["kind"] == "scene":
            inside = f["properties"]["scene_id"] == licensed_scene.scene_id
            assert f["properties"]["licence_status"] == ("licensed" if inside else "unlicensed")
            assert (f["properties"]["unlicensed_area_m2"] == 0) == inside
    assert summary.scenes_unlicensed == len(flagged) - 1
    assert summary.superpixels_unlicensed == sum(len(r) for s, r in flagged[1:])
    assert json.loads(paths.summary.read_text())["scenes_unlicensed"] == summary.scenes_unlicensed


def test_export_of_a_folder_that_is_no_run_is_a_clear_error(tmp_path):
    with pytest.raises(RunStoreError, match="not a run directory"):
        export(tmp_path, tmp_path / "out")


def test_status_and_export_commands(folder_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(status_command, [str(folder_run)])
    assert result.exit_code == 0, result.output
    assert "done 3  failed 2  no-imagery 1  skipped 1  pending 0  total 7" in result.output
    result = runner.invoke(export_command, [str(folder_run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "map: " in result.output and (tmp_path / "out" / "map.html").is_file()


def test_status_and_export_do_not_import_tensorflow_or_xgboost():
    code = ("import sys, amber_hunter.cli.scan, amber_hunter.export.writers, amber_hunter.run.store; "
            "print([m for m in ('tensorflow', 'xgboost', 'keras') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("crs", [{"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::3857"}}, None],
                         ids=["named-crs", "metre-coordinates"])
def test_a_registry_in_a_projected_crs_says_so_and_names_the_fix(crs, folder_run, tmp_path):
    x, y = 2_921_000.0, 6_552_000.0  # Rivne in EPSG:3857 metres
    ring = [[x, y], [x + 500, y], [x + 500, y + 500], [x, y + 500], [x, y]]
    registry = {"type": "FeatureCollection",
                "features": [{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}
    if crs:
        registry["crs"] = crs
    path = tmp_path / "licences.geojson"
    path.write_text(json.dumps(registry))
    with pytest.raises(ConfigError) as caught:
        export(folder_run, tmp_path / "out", registry=path, basemap="none")
    message = str(caught.value)
    assert "Web Mercator" not in message and "ogr2ogr -t_srs EPSG:4326" in message
    assert ("EPSG::3857" in message) if crs else ("looks projected" in message)
    assert not (tmp_path / "out").exists()


def test_refresh_rewrites_only_this_runs_exports_and_reports_what_it_cannot(folder_run, tmp_path, monkeypatch):
    import shutil

    from amber_hunter.export.writers import refresh_exports

    run = tmp_path / "run"
    shutil.copytree(folder_run, run)
    export(run, tmp_path / "plain", basemap="none")
    monkeypatch.setenv("AMBER_TEST_MAP_KEY", "k123")
    export(run, tmp_path / "keyed", basemap="https://t.example.org/{z}/{x}/{y}?k={key}", basemap_key_env="AMBER_TEST_MAP_KEY")
    monkeypatch.delenv("AMBER_TEST_MAP_KEY")
    (tmp_path / "plain" / "map.html").unlink()
    done, failed = refresh_exports(run)
    assert [p.map for p in done] == [tmp_path / "plain" / "map.html"] and (tmp_path / "plain" / "map.html").is_file()
    assert failed == [(str((tmp_path / "keyed").resolve()), failed[0][1])] and "AMBER_TEST_MAP_KEY" in failed[0][1]
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert refresh_exports(copy) == ([], [])  # the original's exports are not the copy's to overwrite


def test_review_marks_key_survives_a_retrain(folder_run, tiny_model, tmp_path):
    """The browser keeps an editor's marks under the page's runKey: a rescore must not change it,
    or marks not yet downloaded would vanish from the refreshed map."""
    import dataclasses
    import shutil

    from amber_hunter.model.classify import load_bundle, save_bundle
    from amber_hunter.run.rescore import rescore_run

    run = tmp_path / "run"
    shutil.copytree(folder_run, run)
    key = lambda: re.search(r'"runKey":\s*"([^"]+)"', export(run, tmp_path / "out", basemap="none")[0].map.read_text())[1]
    before = key()
    bundle = load_bundle(tiny_model)
    rescore_run(run, save_bundle(dataclasses.replace(bundle, metadata=dataclasses.replace(bundle.metadata, threshold=0.3)),
                                 tmp_path / "m"))
    assert key() == before and before.startswith("run:")


def test_an_export_that_fails_half_way_leaves_the_published_map_and_its_files(folder_run, tmp_path, monkeypatch):
    from amber_hunter.export import map as map_module

    out = tmp_path / "out"
    export(folder_run, out, basemap="none")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "summary.json"}
    assert any(str(p).startswith("map_files/") for p in before)

    def broken(data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(map_module, "render", broken)
    with pytest.raises(OSError):
        export(folder_run, out, basemap="none")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*")
             if p.is_file() and p.name != "summary.json" and not str(p.relative_to(out)).startswith("map_files.tmp")}
    assert after == before
    monkeypatch.undo()
    export(folder_run, out, basemap="none")  # and the next export goes through, leaving no tmp folder
    assert not (out / "map_files.tmp").exists() and (out / "map_files").is_dir()
