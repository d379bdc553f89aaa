"""Rescoring a run from its stored embeddings: the same model changes nothing, another threshold
changes exactly what it should (with outlines for new positives and a diff), versions are kept
and a rollback restores the first verdicts, an incompatible model is refused in one line, and a
rescore killed with -9 leaves the run as it was."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from kill9 import kill_when_printed
from scan_fixtures import results

from amber_hunter.errors import ModelBundleError, RunStoreError
from amber_hunter.model.classify import bundled_model_path, load_bundle, save_bundle
from amber_hunter.run.rescore import rescore_run, rollback
from amber_hunter.run.store import RunStore


def _with_threshold(model: Path, threshold: float, out: Path) -> Path:
    bundle = load_bundle(model)
    return save_bundle(dataclasses.replace(bundle, metadata=dataclasses.replace(bundle.metadata, threshold=threshold)), out)


@pytest.fixture
def run(folder_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(folder_run, copy)
    return copy


def _same(a, b) -> bool:
    """Two ``results`` equal but for float noise in probabilities: the scan scored float64
    features, a rescore the float32 embeddings the run stored (differences ~1e-5)."""
    (scenes_a, regions_a), (scenes_b, regions_b) = a, b
    strip = lambda rows, k: [r[:k] + r[k + 1:] for r in rows]
    return (strip(scenes_a, 5) == strip(scenes_b, 5) and strip(regions_a, 2) == strip(regions_b, 2)
            and all(abs(x[5] - y[5]) < 1e-4 for x, y in zip(scenes_a, scenes_b) if x[5] is not None)
            and all(abs(x[2] - y[2]) < 1e-4 for x, y in zip(regions_a, regions_b)))


def _flagged(run: Path) -> set[str]:
    with RunStore(run) as store:
        return {s.scene_id for s in store.scenes(flagged_only=True)}


def test_the_same_model_changes_nothing(run, tiny_model):
    scenes, regions = results(run)
    diff = rescore_run(run, tiny_model)
    assert (diff.before, diff.after) == (1, 2)
    assert diff.added.superpixels == diff.removed.superpixels == [] and diff.added.scenes == diff.removed.scenes == []
    assert len(diff.kept.scenes) == len(_flagged(run)) > 0
    assert _same(results(run), (scenes, regions))
    with RunStore(run) as store:
        versions = store.model_versions()
        assert [(v.version, v.current, v.parent) for v in versions] == [(1, False, None), (2, True, 1)]
        assert all((v.path / "model.json").is_file() for v in versions)
        assert store.config.model == str(run / "models" / "v2")


def test_a_stricter_model_unflags_writes_a_diff_and_rollback_restores(run, tiny_model, tmp_path):
    before = results(run)
    flagged = _flagged(run)
    strict = _with_threshold(tiny_model, 0.9999, tmp_path / "strict")
    diff = rescore_run(run, strict)
    assert sorted(diff.removed.scenes) == sorted(flagged) and _flagged(run) == set()
    assert diff.removed.hectares > 0 and diff.added.superpixels == []
    geo = json.loads((run / "diff.geojson").read_text())
    removed = {f["properties"]["scene_id"] for f in geo["features"]
               if f["properties"]["kind"] == "scene" and f["properties"]["change"] == "removed"}
    assert removed == flagged
    assert json.loads((run / "diff.json").read_text())["removed"]["scenes"] == len(flagged)
    diff = rollback(run, 1)
    assert sorted(diff.added.scenes) == sorted(flagged)
    assert _same(results(run), before)
    with RunStore(run) as store:
        assert [(v.version, v.current) for v in store.model_versions()] == [(1, True), (2, False)]
    with pytest.raises(RunStoreError, match="no model version v7"):
        rollback(run, 7)


def _new_outlines(run: Path, diff) -> dict:
    with RunStore(run) as store:
        return {(scene_id, label): next(g for g in store.regions(scene_id) if g.label == label).polygon
                for scene_id, label in diff.added.superpixels}


def test_new_positives_get_outlines_from_the_stored_label_maps_with_no_tile_read(run, tiny_model, tmp_path,
                                                                                monkeypatch):
    from amber_hunter.errors import SceneUnavailableError
    from amber_hunter.run import resegment as resegment_module

    def no_tiles(store, scene_id, slic):
        raise SceneUnavailableError(f"scene {scene_id}: the test reads no tile")

    monkeypatch.setattr(resegment_module, "resegment", no_tiles)
    with RunStore(run) as store:
        pictures = {s.scene_id for s in store.scenes(flagged_only=True) if store.overlay_path(s.scene_id).is_file()}
        before = {s.scene_id: {g.label for g in store.regions(s.scene_id, positive_only=True)} for s in store.scenes()}
    assert pictures == _flagged(run)
    lenient = _with_threshold(tiny_model, 0.02, tmp_path / "lenient")
    diff = rescore_run(run, lenient)
    assert diff.added.superpixels and diff.outlines_missing == 0
    outlines = _new_outlines(run, diff)
    assert all(p is not None and p["type"] == "Polygon" and len(p["coordinates"][0]) >= 4 for p in outlines.values())
    geo = json.loads((run / "diff.geojson").read_text())
    assert {(f["properties"]["scene_id"], f["properties"]["label"]): f["geometry"] for f in geo["features"]
            if f["properties"]["kind"] == "superpixel" and f["properties"]["change"] == "added"} == outlines
    with RunStore(run) as store:
        for scene_id, labels in before.items():
            now = {g.label for g in store.regions(scene_id, positive_only=True)}
            # a picture showing other positives than the scene's is deleted (the map redraws it); others stay
            assert store.overlay_path(scene_id).is_file() == (scene_id in pictures and now == labels)


def test_a_run_without_stored_label_maps_outlines_from_its_tiles_the_same_way(run, tiny_model, tmp_path):
    import sqlite3

    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    with sqlite3.connect(twin / "run.sqlite") as db:  # as a run scanned before label maps were stored
        db.execute("DROP TABLE segments")
    lenient = _with_threshold(tiny_model, 0.02, tmp_path / "lenient")
    stored, resegmented = rescore_run(run, lenient), rescore_run(twin, lenient)
    assert stored.added.superpixels == resegmented.added.superpixels and resegmented.outlines_missing == 0
    assert _new_outlines(run, stored) == _new_outlines(twin, resegmented)


def test_a_model_with_another_embedder_is_refused(run):
    with pytest.raises(ModelBundleError, match="pick a model trained on texture.*or rescan") as info:
        rescore_run(run, bundled_model_path("default"))
    assert "\n" not in str(info.value)
    with RunStore(run) as store:
        assert store.model_versions() == []



def test_a_model_with_other_slic_settings_is_refused(run, tiny_model, tmp_path):
    """The stored embeddings are of the scan's superpixels: a model that segments otherwise
    would outline and count superpixels the vectors do not belong to."""
    bundle = load_bundle(tiny_model)
    other = dataclasses.replace(bundle, metadata=dataclasses.replace(bundle.metadata, slic={**bundle.metadata.slic, "scale": 3}))
    with pytest.raises(ModelBundleError, match=r"^the model segments with SlicParams\(.*scale=3\) but the run was "
                                                r"scanned with SlicParams\(.*scale=1\).*or rescan with this model$"):
        rescore_run(run, save_bundle(other, tmp_path / "other"))
    with RunStore(run) as store:  # version 1 (the scan's model) is registered; nothing was rescored
        assert [v.version for v in store.model_versions()] == [1]


KILLED = """
import sys, time
from amber_hunter.run import store as s
original = s.RunStore._event
def slow(self, kind, scene_id=None, message=None):
    original(self, kind, scene_id, message)
    if kind == "rescore" and message and message.startswith("{"):  # inside the transaction
        print("committing", flush=True)
        time.sleep(120)
s.RunStore._event = slow
from amber_hunter.run.rescore import rescore_run
rescore_run(sys.argv[1], sys.argv[2])
"""


def test_a_rescore_killed_before_its_commit_leaves_the_run_as_it_was(run, tiny_model, tmp_path):
    before = results(run)
    strict = _with_threshold(tiny_model, 0.9999, tmp_path / "strict")
    kill_when_printed(KILLED, [str(run), str(strict)], "committing", 120, "its transaction")
    assert results(run) == before
    with RunStore(run) as store:
        assert [(v.version, v.current) for v in store.model_versions()] == [(1, True)]
    diff = rescore_run(run, strict)  # the leftover models/v2 folder is reused
    assert diff.after == 2 and _flagged(run) == set()


def test_a_kill_between_commit_and_config_is_finished_on_reopen(run, tiny_model):
    rescore_run(run, tiny_model)
    config = json.loads((run / "config.json").read_text())
    config["model"] = str(tiny_model)  # as if killed after the commit, before config.json
    (run / "config.json").write_text(json.dumps(config))
    with RunStore(run) as store:
        assert store.config.model == str(run / "models" / "v2")


def test_the_original_scan_command_resumes_with_the_retrained_model(run, region, tiny_model, tmp_path):
    """After a rescore, rerunning the scan as first typed is neither refused as a changed model
    nor scores new scenes with the old one: it resumes with the run's current version."""
    from amber_hunter.run.scan import scan

    lenient = _with_threshold(tiny_model, 0.02, tmp_path / "lenient")
    rescore_run(run, lenient)
    scan(region.config(region.folder, tiny_model), run, retry_failed=True)  # refused before the fix
    with RunStore(run) as store:
        assert store.config.model == str(run / "models" / "v2")
        assert {s.model for s in store.scenes() if s.status == "done"} == {store.current_version().model_hash}


def test_rescoring_streams_the_shards_batch_by_batch(run, tiny_model, monkeypatch):
    """The vectors are never read all at once: in batches of 16 rows the rescore decides exactly
    as the scan did, without the whole-table read."""
    from amber_hunter.run import store as store_module

    before = results(run)
    monkeypatch.setattr(store_module, "BATCH_BYTES", 1)  # the smallest batch: 16 rows
    monkeypatch.setattr(RunStore, "embeddings", lambda self: pytest.fail("rescore read every embedding at once"))
    seen = []
    original = RunStore.embedding_batches

    def counted(self, batch_rows=None):
        for batch in original(self, batch_rows):
            seen.append(len(batch.labels))
            yield batch

    monkeypatch.setattr(RunStore, "embedding_batches", counted)
    diff = rescore_run(run, tiny_model)
    assert diff.added.superpixels == diff.removed.superpixels == []
    assert len(seen) > 1 and max(seen) <= 16 and sum(seen) == len(before[1])
    monkeypatch.undo()
    assert _same(results(run), before)
