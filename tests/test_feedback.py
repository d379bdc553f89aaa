"""Reader feedback: reports read with their bad lines listed, mapped onto the run's own
superpixels (a point takes the one under it, a polygon those it covers by more than half),
reasons for reports that touch nothing, then retraining and rescoring with no tile fetched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from kill9 import kill_when_printed
from tile_servers import tile_server

from amber_hunter.errors import FeedbackError
from amber_hunter.feedback.reports import import_feedback, read_reports
from amber_hunter.feedback.retrain import retrain
from amber_hunter.learn.labels import LabelStore, SuperpixelKey
from amber_hunter.model.classify import AREA_MIN_LABELS, AREA_MIN_PER_CLASS, choose_threshold, load_bundle
from amber_hunter.run.resegment import resegment
from amber_hunter.run.scan import scan
from amber_hunter.run.scenes import cell_from_id
from amber_hunter.run.store import RunStore


def _pixel_point(run: Path, scene_id: str, label: int) -> tuple[float, float]:
    """lon, lat of a pixel well inside superpixel ``label`` of the scene."""
    from scipy import ndimage

    with RunStore(run) as store:
        again = resegment(store, scene_id, load_bundle(store.config.model).slic_params())
    inside = ndimage.distance_transform_edt(again.labels == label)
    r, c = np.unravel_index(np.argmax(inside), inside.shape)
    lon, lat = cell_from_id(scene_id).pixel_to_lonlat(r + 0.5, c + 0.5)
    return float(lon), float(lat)


def _scene_polygon(run: Path, scene_id: str, shrink: float = 0.0) -> list:
    with RunStore(run) as store:
        b = next(s.bounds for s in store.scenes() if s.scene_id == scene_id)
    dx, dy = (b.east - b.west) * shrink, (b.north - b.south) * shrink
    w, s, e, n = b.west + dx, b.south + dy, b.east - dx, b.north - dy
    return [[[w, s], [e, s], [e, n], [w, n], [w, s]]]


def _geojson(path: Path, features: list[tuple[str, list, str]]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"verdict": verdict, "note": "reader"},
         "geometry": {"type": kind, "coordinates": coords}} for kind, coords, verdict in features]}))
    return path


def test_bad_lines_are_listed_and_the_rest_kept(tmp_path):
    path = tmp_path / "reports.csv"
    path.write_text("lat,lon,verdict,note\n50.6,26.2,mining,pits\n50.6,26.2,maybe,\nnorth,26.2,not-mining,\n"
                    "150,26.2,mining,\n50.6,26.3,Not mining,clearing\n")
    reports, bad = read_reports(path)
    assert [(r.line, r.verdict, r.note) for r in reports] == [(2, "mining", "pits"), (6, "not-mining", "clearing")]
    assert [b.line for b in bad] == [3, 4, 5]
    assert "unknown verdict 'maybe'" in bad[0].reason and "malformed" in bad[1].reason and "not a place" in bad[2].reason
    multi = _geojson(tmp_path / "r.geojson", [("MultiPoint", [[26.2, 50.6], [26.3, 50.7]], "mining"),
                                              ("LineString", [[26.2, 50.6], [26.3, 50.7]], "mining")])
    reports, bad = read_reports(multi)
    assert len(reports) == 2 and [b.line for b in bad] == [2] and "LineString" in bad[0].reason
    with pytest.raises(FeedbackError, match="does not exist"):
        read_reports(tmp_path / "none.csv")


@pytest.fixture
def run(folder_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(folder_run, copy)
    return copy


def test_reports_map_onto_superpixels_or_say_why_not(run, region, tmp_path):
    flagged = {v: k for k, v in region.ids.items()}
    scene = flagged["positive1"]
    with RunStore(run) as store:
        label = next(g.label for g in store.regions(scene) if g.positive)
        n_regions = len(store.regions(scene))
    lon, lat = _pixel_point(run, scene, label)
    reports = _geojson(tmp_path / "reports.geojson", [
        ("Point", [lon, lat], "not-mining"),
        ("Polygon", _scene_polygon(run, scene, shrink=-0.001), "mining"),  # the whole scene, and a bit more
        ("Point", [0.0, 0.0], "mining"),
        ("Polygon", _scene_polygon(run, flagged["garbage"], shrink=0.1), "mining"),
        ("Polygon", _scene_polygon(run, flagged["missing"], shrink=0.1), "mining"),
    ])
    with LabelStore(tmp_path / "labels.sqlite") as labels:
        done = import_feedback(run, reports, labels)
        rows = done.rows
        assert rows[0].matched == ((scene, label),) and rows[0].reason is None
        assert len(rows[1].matched) == n_regions and {s for s, _ in rows[1].matched} == {scene}
        assert rows[2].matched == () and rows[2].reason == "outside the scanned area"
        assert "failed" in rows[3].reason and "has no imagery" in rows[4].reason
        latest = labels.latest("superpixel")
        assert len(latest) == n_regions  # the point's superpixel, relabelled by the polygon after it
        assert {r.source for r in latest.values()} == {"feedback"}
        history = labels.history(f"superpixel:{run.resolve()}:{scene}:{label}")
        assert [(h.label, h.previous) for h in history] == [(0, None), (1, 0)]
    with RunStore(run) as store:
        assert [(r.line, len(r.matched)) for r in store.feedback()] == [(1, 1), (2, n_regions), (3, 0), (4, 0), (5, 0)]


def test_reports_read_the_stored_label_maps_and_old_runs_their_tiles(run, region, tmp_path, monkeypatch):
    import sqlite3

    from amber_hunter.errors import SceneUnavailableError
    from amber_hunter.run import resegment as resegment_module

    scene = {v: k for k, v in region.ids.items()}["positive1"]
    with RunStore(run) as store:
        label = next(g.label for g in store.regions(scene) if g.positive)
    reports = _geojson(tmp_path / "reports.geojson", [("Point", list(_pixel_point(run, scene, label)), "not-mining")])
    twin = tmp_path / "old-run"
    shutil.copytree(run, twin)
    with sqlite3.connect(twin / "run.sqlite") as db:  # as a run scanned before label maps were stored
        db.execute("DROP TABLE segments")

    def no_tiles(store, scene_id, slic):
        raise SceneUnavailableError(f"scene {scene_id}: the test reads no tile")

    with monkeypatch.context() as patch:
        patch.setattr(resegment_module, "resegment", no_tiles)
        with LabelStore(tmp_path / "labels.sqlite") as labels:
            assert import_feedback(run, reports, labels).rows[0].matched == ((scene, label),)
            row = import_feedback(twin, reports, labels).rows[0]
        assert row.matched == () and "the test reads no tile" in row.reason  # the old run needs its tiles
    with LabelStore(tmp_path / "labels2.sqlite") as labels:
        assert import_feedback(twin, reports, labels).rows[0].matched == ((scene, label),)


def _retrained_flags(run: Path, small_data, tmp_path: Path, name: str) -> set[str]:
    """The control: the flagged scenes after a retrain of a copy of ``run`` with no report. A
    retrain picks its own threshold, which alone can flip scenes; a report's effect is only what
    differs from this."""
    control = tmp_path / name
    shutil.copytree(run, control)
    with LabelStore(tmp_path / f"{name}.sqlite") as labels:
        retrain(control, data=[small_data], labels=labels)
    with RunStore(control) as store:
        return {s.scene_id for s in store.scenes(flagged_only=True)}


def test_reported_false_positive_scene_is_unflagged_after_retrain_with_no_fetch(region, tiny_model, small_data, tmp_path):
    cache, run = tmp_path / "tile-cache", tmp_path / "http-run"
    with tile_server(region.folder) as server:
        scan(region.config(server.url + "/{z}/{x}/{y}.png", tiny_model, tile_cache=str(cache)), run)
        fetched = len(server.requests)
        control = _retrained_flags(run, small_data, tmp_path, "control")
        victim = {v: k for k, v in region.ids.items()}["positive2"]
        assert victim in control, "the control retrain already unflags the scene: the test would prove nothing"
        report = _geojson(tmp_path / "report.geojson", [("Polygon", _scene_polygon(run, victim, -0.001), "not-mining")])
        with LabelStore(tmp_path / "labels.sqlite") as labels:
            imported = import_feedback(run, report, labels)
            assert imported.superpixels > 10
            done = retrain(run, data=[small_data], labels=labels)
        assert len(server.requests) == fetched, "feedback and retrain fetched tiles"
    assert victim in done.diff.removed.scenes
    with RunStore(run) as store:
        assert victim not in {s.scene_id for s in store.scenes(flagged_only=True)}
        versions = store.model_versions()
        assert [(v.version, v.current, v.parent) for v in versions] == [(1, False, None), (2, True, 1)]
        assert versions[1].changes["run_superpixels"] == imported.superpixels
    geo = json.loads((run / "diff.geojson").read_text())
    assert any(f["properties"] == {"kind": "scene", "scene_id": victim, "change": "removed"} for f in geo["features"])


def test_confirmed_mining_flags_a_scene_after_retrain(region, tiny_model, small_data, tmp_path):
    run = tmp_path / "run"
    scan(region.config(region.folder, tiny_model, min_positive=20), run)  # flag at 21 positives or more
    control = _retrained_flags(run, small_data, tmp_path, "control")
    target = {v: k for k, v in region.ids.items()}["positive1"]
    assert target not in control, "the control retrain already flags the scene: the test would prove nothing"
    report = tmp_path / "report.geojson"
    _geojson(report, [("Polygon", _scene_polygon(run, target, -0.001), "mining")])
    with LabelStore(tmp_path / "labels.sqlite") as labels:
        import_feedback(run, report, labels)
        done = retrain(run, data=[small_data], labels=labels)
    assert target in done.diff.added.scenes
    with RunStore(run) as store:
        assert target in {s.scene_id for s in store.scenes(flagged_only=True)}


def test_retrain_needs_enough_examples_and_its_data(run, tmp_path):
    with pytest.raises(FeedbackError, match="training data .* is not on this machine; give it with --data"):
        retrain(run, data=[tmp_path / "nowhere"])
    few = tmp_path / "few"
    for sub in ("positive", "negative"):
        (few / sub).mkdir(parents=True)
    src = sorted((Path(__file__).parent / "fixtures").glob("*.png"))[:1]
    for sub in ("positive", "negative"):
        for k, f in enumerate(src * 3):
            shutil.copy(f, few / sub / f"{k}.png")
    with pytest.raises(FeedbackError, match="at least 10 examples of each class; it has 3 positive and 3 negative"):
        retrain(run, data=[few])



def _label_extremes(run: Path, labels: LabelStore, positives: int, negatives: int, source: str = "explore") -> None:
    """Label the run's most probable superpixels mining and its least probable not mining, as a
    user labels suggested superpixels of a new area."""
    with RunStore(run) as store:
        ranked = sorted((r.probability, s.scene_id, r.label) for s in store.scenes() for r in store.regions(s.scene_id))
    top, bottom = ranked[len(ranked) - positives:], ranked[:negatives]
    assert len(ranked) >= positives + negatives
    labels.add_many([(SuperpixelKey.of(run.resolve(), scene, segment), 1) for _, scene, segment in top]
                    + [(SuperpixelKey.of(run.resolve(), scene, segment), 0) for _, scene, segment in bottom],
                    source=source)


@pytest.mark.parametrize(("positives", "negatives", "source", "threshold", "shipped"), [
    (6, 6, "explore", "area", "area"),  # enough of both classes: the run's labels choose the threshold
    (6, 6, "explore", "training", "training"),  # asked for the training set's
    (0, 12, "explore", "area", "training"),  # one class only
    (4, 4, "explore", "area", "training"),  # fewer labels than AREA_MIN_LABELS
    (6, 6, "feedback", "area", "training"),  # readers' reports are not a sample of the area
])
def test_retrain_chooses_the_threshold_on_the_runs_own_labels_when_they_are_enough(
        run, small_data, tmp_path, positives, negatives, source, threshold, shipped):
    assert AREA_MIN_LABELS == 10 and AREA_MIN_PER_CLASS == 1  # the cases above are built around these
    with LabelStore(tmp_path / "labels.sqlite") as labels:
        _label_extremes(run, labels, positives, negatives, source)
        done = retrain(run, data=[small_data], labels=labels, threshold=threshold)
    assert done.run_superpixels == positives + negatives
    assert done.area_labels == (positives + negatives if source == "explore" else 0)
    assert done.threshold_from == shipped
    with RunStore(run) as store:
        version = store.model_versions()[-1]
    assert version.changes["threshold_from"] == shipped
    bundle = load_bundle(version.path)
    assert bundle.metadata.metrics["threshold_from"] == shipped
    if shipped == "area":
        assert done.area is not None and round(bundle.metadata.threshold, 4) == done.area.threshold
        assert done.area.threshold != done.after.threshold, "the two rules agree here: the test would prove nothing"
    else:
        assert done.area is None and round(bundle.metadata.threshold, 4) == done.after.threshold


def test_the_area_threshold_comes_from_the_run_rows_out_of_fold_probabilities(run, small_data, tmp_path, monkeypatch):
    """The run's rows are the last of the training rows: their out-of-fold probabilities, and no
    others, choose the threshold. Known random probabilities stand in for the real ones."""
    import amber_hunter.feedback.retrain as module

    seen = {}

    def fake(features, labels, groups, *args):
        classifier, _, oof = real(features, labels, groups, *args)
        seen["labels"], seen["oof"], seen["target"] = labels, np.random.default_rng(7).random(len(oof)), args[1]
        return classifier, choose_threshold(labels, seen["oof"], args[1]), seen["oof"]

    real = module.fit_with_oof
    monkeypatch.setattr(module, "fit_with_oof", fake)
    with LabelStore(tmp_path / "labels.sqlite") as labels:
        _label_extremes(run, labels, 6, 6)
        done = retrain(run, data=[small_data], labels=labels)
    with RunStore(run) as store:
        shipped = load_bundle(store.model_versions()[-1].path).metadata.threshold
    tail = slice(len(seen["labels"]) - 12, None)
    assert shipped == choose_threshold(seen["labels"][tail], seen["oof"][tail], seen["target"]).threshold
    assert done.threshold_from == "area" and sorted(seen["labels"][tail]) == [0] * 6 + [1] * 6


def test_an_unknown_threshold_source_is_refused(run, small_data):
    with pytest.raises(FeedbackError, match="threshold source 'best' is unknown; choose area or training"):
        retrain(run, data=[small_data], threshold="best")


def test_a_file_imported_twice_adds_nothing_the_second_time(run, region, tmp_path):
    scene = {v: k for k, v in region.ids.items()}["positive1"]
    first = _geojson(tmp_path / "first.geojson", [("Polygon", _scene_polygon(run, scene, -0.001), "not-mining")])
    again = _geojson(tmp_path / "again.geojson", [("Polygon", _scene_polygon(run, scene, -0.001), "not-mining"),
                                                  ("Polygon", _scene_polygon(run, scene, -0.001), "mining")])
    with LabelStore(tmp_path / "labels.sqlite") as labels:
        done = import_feedback(run, first, labels)
        history = len(labels.history())
        repeat = import_feedback(run, first, labels)
        assert (repeat.rows, repeat.repeated) == ([], [(1, "first.geojson line 1")])
        assert len(labels.history()) == history
        changed = import_feedback(run, again, labels)  # the same place with a new verdict is a new report
        assert [r.line for r in changed.rows] == [2] and changed.repeated == [(1, "first.geojson line 1")]
        assert len(labels.history()) == history + done.superpixels
    with RunStore(run) as store:
        assert [(r.file, r.line, r.verdict) for r in store.feedback()] == [
            ("first.geojson", 1, "not-mining"), ("again.geojson", 2, "mining")]
    with LabelStore(tmp_path / "other.sqlite") as other:  # another store still gets the earlier labels
        assert import_feedback(run, first, other).repeated == [(1, "first.geojson line 1")]
        assert len(other.latest("superpixel")) == done.superpixels


def test_a_report_on_a_scene_not_scanned_yet_says_so(run, region, tmp_path):
    scene = {v: k for k, v in region.ids.items()}["negative1"]
    polygon = _scene_polygon(run, scene, shrink=0.1)
    with RunStore(run) as store:  # as if the scan had not reached it yet: pending scenes have no bounds
        store._db.execute("UPDATE scenes SET status = 'pending', bounds = NULL WHERE scene_id = ?", (scene,))
        store._db.commit()
    report = _geojson(tmp_path / "r.geojson", [("Polygon", polygon, "mining")])
    with LabelStore(tmp_path / "labels.sqlite") as labels:
        (row,) = import_feedback(run, report, labels).rows
    assert row.matched == () and row.reason == f"scene {scene} is not scanned yet"


RETRAIN_KILLED = """
import sys, time
from amber_hunter.run import store as s
original = s.RunStore._event
def slow(self, kind, scene_id=None, message=None):
    original(self, kind, scene_id, message)
    if kind == "rescore" and message and message.startswith("{"):  # inside the rescore's transaction
        print("committing", flush=True)
        time.sleep(120)
s.RunStore._event = slow
from amber_hunter.feedback.retrain import retrain
from amber_hunter.learn.labels import LabelStore
with LabelStore(sys.argv[3]) as labels:
    retrain(sys.argv[1], data=[sys.argv[2]], labels=labels)
"""


def test_a_retrain_killed_with_minus_9_leaves_the_run_on_its_previous_model(run, region, small_data, tmp_path):

    from scan_fixtures import results

    victim = {v: k for k, v in region.ids.items()}["positive2"]
    report = _geojson(tmp_path / "r.geojson", [("Polygon", _scene_polygon(run, victim, -0.001), "not-mining")])
    with LabelStore(tmp_path / "labels.sqlite") as labels:
        import_feedback(run, report, labels)
    before = results(run)
    kill_when_printed(RETRAIN_KILLED, [str(run), str(small_data), str(tmp_path / "labels.sqlite")], "committing", 300,
                      "its rescore's transaction")
    assert (run / "models" / "v2" / "model.json").is_file()  # written before the transaction, never committed
    assert results(run) == before
    with RunStore(run) as store:
        assert [(v.version, v.current) for v in store.model_versions()] == [(1, True)]
        assert store.config.model == str(run / "models" / "v1")
    with LabelStore(tmp_path / "labels.sqlite") as labels:  # and the next retrain goes through, as v2
        assert retrain(run, data=[small_data], labels=labels).version == 2
