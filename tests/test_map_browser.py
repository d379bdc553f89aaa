"""map.html in real headless Chromium (Selenium): it opens offline from file:// with no console
error and no request leaving the machine, shows its title, legend, totals and area of interest,
a detection's popup has rounded, labelled values with lat/lon and date, and a "false positive"
mark downloads as the GeoJSON that ``feedback import`` reads (its schema, then a real import)."""

from __future__ import annotations

import json
import re
import shutil
import time

import chromium
import pytest

from amber_hunter.export.writers import export
from amber_hunter.run.store import RunStore

pytestmark = [pytest.mark.skipif(not chromium.available(), reason="Debian packages chromium and chromium-driver are needed"),
              pytest.mark.slow]
pytest.importorskip("selenium")

VERDICTS = {"mining", "not-mining"}


def check_feedback_geojson(obj: dict) -> None:
    """The schema of issue 9's ``feedback import`` GeoJSON: points or polygons, each with a
    ``verdict`` of mining or not-mining and an optional string ``note``."""
    assert obj["type"] == "FeatureCollection" and isinstance(obj["features"], list)
    for f in obj["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] in ("Point", "Polygon")
        assert f["properties"]["verdict"] in VERDICTS
        assert isinstance(f["properties"].get("note", ""), str)
        rings = [f["geometry"]["coordinates"]] if f["geometry"]["type"] == "Point" else f["geometry"]["coordinates"][0]
        for lon, lat in rings:
            assert -180 <= lon <= 180 and -90 <= lat <= 90


@pytest.fixture
def browser(tmp_path):
    b = chromium.Browser(tmp_path / "profile", downloads=tmp_path / "downloads")
    try:
        yield b
    finally:
        b.quit()


def _open_a_popup(browser) -> str:
    """Click markers (zooming into clusters) as a user does until a scene's popup is open."""
    for _ in range(12):
        if browser.js("return !!document.querySelector('.amber-popup')"):
            return browser.js("return document.querySelector('.amber-popup').dataset.scene")
        target = browser.js("return document.querySelector('.amber-marker') || document.querySelector('.marker-cluster')")
        assert target is not None, "no marker or cluster on the map"
        target.click()
        time.sleep(0.6)
    raise AssertionError("clicking markers opened no popup")


def test_map_explains_itself_and_reviews_download_as_feedback(folder_run, browser, tmp_path):
    paths, summary = export(folder_run, tmp_path / "out", basemap="none")
    with RunStore(folder_run) as store:
        positives = {s.scene_id: store.regions(s.scene_id, positive_only=True) for s in store.scenes(flagged_only=True)}
    browser.driver.get(paths.map.as_uri())
    browser.wait("return !!(window.amber && window.amber.ready)", "the page never got ready")

    title = browser.js("return document.querySelector('.amber-title').textContent")
    assert folder_run.name in title and "suspected surface mining" in title and "started 20" in title
    legend = browser.js("return document.querySelector('.amber-legend').textContent")
    for entry in ("scene flagged", "positive superpixel", "no imagery", "failed", "licensed area"):
        assert entry in legend
    totals = browser.js("return document.querySelector('.amber-totals').innerText")
    assert re.search(r"Scenes scanned\s+3\b", totals) and re.search(rf"Scenes flagged\s+{summary.scenes_flagged}\b", totals)
    assert f"{summary.positive_superpixel_ha:.1f} ha" in totals and f"{summary.disturbed_ha:.1f} ha" in totals
    assert "unknown" in totals  # the capture year of a source without dates
    assert browser.js("return document.querySelectorAll('path[stroke-dasharray=\"6 4\"]').length") == 1  # the area
    # the failed and no-imagery scenes are a layer of their own (canvas), listed in the layer control
    assert "failed and no-imagery scenes" in browser.js("return document.querySelector('.leaflet-control-layers').textContent")

    scene = _open_a_popup(browser)
    assert scene in positives
    browser.wait("const im = document.querySelector('.amber-picture'); return im && im.complete && im.naturalWidth > 0",
                 "the popup's picture did not load")
    browser.wait("return !document.querySelector('.amber-sp').textContent.includes('loading')", "outlines never loaded")
    popup = browser.js("return document.querySelector('.amber-popup').innerText")
    assert re.search(r"Max probability\s+0\.\d\d\s", popup) and "Captured\tunknown" in popup.replace("\n", "\t")
    assert re.search(r"Positive superpixel area\s+\d+\.\d\d ha \(upper bound\)", popup)
    assert re.search(r"Disturbed ground \(est\.\)\s+\d+\.\d\d ha", popup)
    assert len(re.findall(r"#\d+ p 0\.\d\d\b", popup)) == len(positives[scene])
    assert not re.search(r"\d\.\d{4,}", popup.replace(browser.js("return document.querySelector('.amber-coords').value"), ""))
    coords = browser.js("return document.querySelector('.amber-coords').value")
    assert re.fullmatch(r"50\.\d{5}, 26\.\d{5}", coords)
    links = browser.js("return [...document.querySelectorAll('.amber-popup a')].map(a => a.href)")
    assert any("openstreetmap.org" in link and coords.split(", ")[0] in link for link in links)

    browser.js("document.querySelector('.amber-note').value = 'a sand quarry';"
               "document.querySelector('[data-review=\"false-positive\"]').click()")
    browser.wait("return document.querySelector('.amber-marked').textContent === 'marked: false-positive'", "no mark")
    browser.wait("return document.querySelector('.amber-reviews').textContent.includes('1 false positive')", "no count")
    browser.js("document.getElementById('amber-download').click()")
    downloads = tmp_path / "downloads"
    deadline = time.monotonic() + 20
    while not list(downloads.glob("*.geojson")) and time.monotonic() < deadline:
        time.sleep(0.1)
    (download,) = downloads.glob("*.geojson")
    feedback = json.loads(download.read_text())
    check_feedback_geojson(feedback)
    assert len(feedback["features"]) == len(positives[scene])
    assert {f["properties"]["verdict"] for f in feedback["features"]} == {"not-mining"}
    assert {f["properties"]["note"] for f in feedback["features"]} == {"a sand quarry"}
    stored = {r.label: r.polygon["coordinates"] for r in positives[scene]}
    for f in feedback["features"]:
        assert f["properties"]["scene_id"] == scene
        assert f["geometry"]["coordinates"] == [[[round(x, 7), round(y, 7)] for x, y in ring]
                                                 for ring in stored[f["properties"]["superpixel"]]]

    # and `feedback import` reads it: each outline takes back exactly its own superpixel
    from amber_hunter.feedback.reports import import_feedback
    from amber_hunter.learn.labels import LabelStore

    run_copy = tmp_path / "run"
    shutil.copytree(folder_run, run_copy)
    with LabelStore(tmp_path / "labels.sqlite") as labels:
        imported = import_feedback(run_copy, download, labels)
    assert imported.bad == []
    assert [r.matched for r in imported.rows] == [((scene, f["properties"]["superpixel"]),) for f in feedback["features"]]

    # the mark survives a reload (localStorage), and nothing left the machine
    browser.driver.refresh()
    browser.wait("return !!(window.amber && window.amber.ready)", "the page never got ready after a reload")
    assert browser.js("return window.amber.reviews()[arguments[0]].review", scene) == "false-positive"
    assert browser.errors() == []
    assert browser.outside_requests() == []
