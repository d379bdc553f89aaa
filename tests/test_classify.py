"""Classifier, threshold and model bundle: round trips, compatibility checks, atomic saving,
and the detector's use of a bundle (refusing random-weight models, the aggregation rule)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from bundle_damage import edit_model_json, truncate_xgb_json

from amber_hunter import atomic
from amber_hunter.errors import ConfigError, ModelBundleError
from amber_hunter.learn.cache import embed_files
from amber_hunter.learn.dataset import load_dataset
from amber_hunter.model.classify import (
    BUNDLE_FORMAT,
    ModelBundle,
    ModelMetadata,
    area_threshold,
    choose_threshold,
    fit_classifier,
    load_bundle,
    save_bundle,
)
from amber_hunter.model.detect import Detector, aggregate, overlay
from amber_hunter.model.embed.texture import TextureEmbedder
from amber_hunter.model.segment import Segmentation, regions_of

MODEL_KEYS = {
    "embedder",
    "embedder_version",
    "embedder_params",
    "dim",
    "threshold",
    "target_precision",
    "cnn_blocks",
    "slic",
    "training",
    "metrics",
    "xgb_params",
    "random_weights",
    "package_version",
    "created",
    "format",
}


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest




@pytest.fixture(scope="module")
def small_features(small_data, shared_cache):
    ds = load_dataset([small_data])
    features, _ = embed_files(ds.paths, TextureEmbedder(), shared_cache)
    return ds, features


# --- the texture bundle -------------------------------------------------------------------------


def test_trained_bundle_round_trip(trained_texture, small_features):
    texture_model, trained = trained_texture
    ds, features = small_features
    bundle = load_bundle(texture_model)
    probs = bundle.predict_proba(features)
    np.testing.assert_array_equal(probs, trained.predict_proba(features))
    assert asdict(bundle.metadata) == asdict(trained.metadata)
    assert probs.shape == (len(ds.samples),) and probs.dtype == np.float32
    assert ((probs >= 0) & (probs <= 1)).all()
    # It learned something: positives score higher on average (training data, so it should).
    assert probs[ds.labels == 1].mean() > probs[ds.labels == 0].mean()
    # Saving and loading again changes nothing.
    again = load_bundle(save_bundle(bundle, texture_model.parent / "copy"))
    np.testing.assert_array_equal(again.predict_proba(features), probs)
    assert asdict(again.metadata) == asdict(bundle.metadata)


def test_model_json_contents(texture_model, small_data):
    from amber_hunter import __version__

    assert sorted(p.name for p in texture_model.iterdir()) == ["model.json", "xgb.json"]
    meta = json.loads((texture_model / "model.json").read_text())
    assert set(meta) == MODEL_KEYS
    assert meta["embedder"] == "texture" and meta["embedder_version"] == TextureEmbedder.version
    assert meta["dim"] == TextureEmbedder().dim and meta["embedder_params"] == {}
    assert 0.0 < meta["threshold"] < 1.0
    assert meta["cnn_blocks"] == [] and meta["random_weights"] is False
    assert meta["format"] == BUNDLE_FORMAT and meta["package_version"] == __version__
    assert meta["created"].startswith("20") and meta["created"].endswith("+00:00")
    assert meta["slic"] == {"n_segments": 30, "compactness": 35.0, "sigma": 1.0, "scale": 2}  # SLIC_SCALE
    training = meta["training"]
    assert {"n_samples", "n_positive", "n_negative", "n_scenes", "data_hash", "sources", "labels_csv", "seed"} <= set(
        training
    )
    assert (training["n_samples"], training["n_positive"], training["n_negative"]) == (65, 25, 40)
    assert len(training["data_hash"]) == 64
    assert training["sources"] == [str(small_data)]
    assert set(meta["metrics"]) == {"oof_precision", "oof_recall", "met_target_precision"}
    assert meta["xgb_params"]["max_depth"] == 3


def test_predict_proba_checks_dimensions(texture_model):
    bundle = load_bundle(texture_model)
    assert bundle.predict_proba(np.zeros((0, 3), np.float32)).shape == (0,)
    with pytest.raises(ModelBundleError, match="expects 88|expects"):
        bundle.predict_proba(np.zeros((2, bundle.metadata.dim + 1), np.float32))


def test_check_embedder(texture_model):
    bundle = load_bundle(texture_model)
    bundle.check_embedder("texture")
    bundle.check_embedder("texture", TextureEmbedder.version)
    for name, version in [("vgg16", None), ("vgg16+texture", "1+1"), ("texture", "0")]:
        with pytest.raises(ModelBundleError, match="--embedder texture or retrain") as info:
            bundle.check_embedder(name, version)
        assert "\n" not in str(info.value)


# --- a stacked (CNN + hand-made) bundle, from synthetic features --------------------------------


def synthetic_stack(n=90, k=40, extra=6, seed=0):
    """Features shaped like vgg16+texture: ``k`` non-negative 'CNN' columns, then ``extra`` others."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 3 == 0).astype(np.int32)
    cnn = np.abs(rng.normal(size=(n, k))) + labels[:, None] * np.linspace(0, 1.5, k)
    rest = rng.normal(size=(n, extra)) + labels[:, None] * 0.5
    groups = np.array([f"scene{i // 2}" for i in range(n)])
    return np.hstack([cnn, rest]).astype(np.float32), labels, groups


def test_stacked_bundle_round_trip(tmp_path):
    features, labels, groups = synthetic_stack()
    k, extra = 40, 6
    # Two "blocks", each split into two column ranges like VGG16's average- and max-pooled halves.
    blocks = [[(0, 10), (20, 30)], [(10, 20), (30, 40)]]
    clf = fit_classifier(features, labels, groups, cnn_blocks=blocks, seed=0)
    assert [h.coef.shape for h in clf.heads] == [(20,), (20,)]
    tree = clf.tree_features(features)
    assert tree.shape == (len(labels), extra + len(blocks))
    np.testing.assert_array_equal(tree[:, len(blocks) :], features[:, k:])
    meta = ModelMetadata(
        embedder="vgg16+texture",
        embedder_version="1+1",
        embedder_params={"vgg16": {"input_size": 224, "pooling": "avgmax"}, "texture": {}},
        dim=features.shape[1],
        threshold=0.5,
        target_precision=0.95,
        cnn_blocks=[[list(r) for r in block] for block in blocks],
    )
    bundle = ModelBundle(meta, clf)
    path = save_bundle(bundle, tmp_path / "stacked")
    assert sorted(p.name for p in path.iterdir()) == ["linear.json", "model.json", "xgb.json"]
    loaded = load_bundle(path)
    assert len(loaded.classifier.heads) == len(blocks)
    for got, want in zip(loaded.classifier.heads, clf.heads):
        np.testing.assert_array_equal(got.coef, want.coef)
    np.testing.assert_array_equal(loaded.predict_proba(features), bundle.predict_proba(features))
    probs = loaded.predict_proba(features)
    assert probs[labels == 1].mean() > probs[labels == 0].mean()
    loaded.check_embedder("vgg16+texture", "1+1")
    with pytest.raises(ModelBundleError):
        loaded.check_embedder("texture")
    # The heads are part of the bundle: without them the bundle is incomplete.
    (path / "linear.json").unlink()
    with pytest.raises(ModelBundleError, match="corrupt"):
        load_bundle(path)


# --- corrupt and incompatible bundles -----------------------------------------------------------


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda b: shutil.rmtree(b), "does not exist"),
        (lambda b: (b / "xgb.json").unlink(), "has no xgb.json"),
        (lambda b: (b / "model.json").unlink(), "has no model.json"),
        (lambda b: (b / "model.json").write_text("{not json"), "corrupt"),
        (lambda b: (b / "model.json").write_text("[1, 2]"), "corrupt"),
        (lambda b: (b / "model.json").write_text(json.dumps({"format": BUNDLE_FORMAT})), "corrupt"),
        (lambda b: edit_model_json(b, format=1), "format 1, this version reads"),  # one head over all CNN columns
        (lambda b: edit_model_json(b, format=99), "format 99"),
        (lambda b: edit_model_json(b, surprise=1), "corrupt"),
        (lambda b: (b / "xgb.json").write_text("garbage"), "not a readable XGBoost model"),
        (lambda b: (b / "xgb.json").write_bytes(b""), "not a readable XGBoost model"),
        (lambda b: truncate_xgb_json(b), "not a readable XGBoost model"),
        (lambda b: edit_model_json(b, dim=12), "booster has 88 features"),
    ],
    ids=[
        "missing",
        "no-xgb",
        "no-model-json",
        "garbage-model-json",
        "list-model-json",
        "bare-model-json",
        "old-format",
        "future-format",
        "unknown-key",
        "garbage-xgb",
        "empty-xgb",
        "truncated-xgb",
        "wrong-dim",
    ],
)
def test_bad_bundles_are_model_bundle_errors(damage, fragment, texture_model, tmp_path):
    bundle = copy_bundle(texture_model, tmp_path / "m")
    damage(bundle)
    with pytest.raises(ModelBundleError) as info:
        load_bundle(bundle)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


# --- atomic saving ------------------------------------------------------------------------------


def test_failed_save_keeps_the_old_bundle_and_leaves_no_temp_dirs(texture_model, tmp_path, monkeypatch):
    target = copy_bundle(texture_model, tmp_path / "models" / "m")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    bundle = load_bundle(target)
    bundle = ModelBundle(replace(bundle.metadata, threshold=0.123), bundle.classifier)

    def broken_write_json(path, obj):
        Path(path).write_text('{"half": ')  # what a crash mid-write would leave
        raise OSError("disk full")

    monkeypatch.setattr(atomic, "write_json", broken_write_json)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(bundle, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in target.parent.iterdir()] == ["m"], "temporary directories were left behind"
    assert load_bundle(target).metadata.threshold != 0.123

    # A first save that fails leaves nothing at all.
    with pytest.raises(OSError):
        save_bundle(bundle, tmp_path / "models" / "new")
    assert [p.name for p in target.parent.iterdir()] == ["m"]

    # And a save that succeeds replaces the bundle completely.
    monkeypatch.undo()
    save_bundle(bundle, target)
    assert load_bundle(target).metadata.threshold == pytest.approx(0.123)
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]


def test_atomic_directory_refuses_to_overwrite_when_asked(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("old")
    with pytest.raises(FileExistsError), atomic.directory(tmp_path / "d", overwrite=False) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["keep"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


# --- thresholds ---------------------------------------------------------------------------------


def test_choose_threshold_prefers_recall_at_target_precision():
    labels = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    choice = choose_threshold(labels, probs, 0.95)
    assert choice.met_target and choice.threshold == pytest.approx(0.6)
    assert (choice.precision, choice.recall) == (1.0, 0.75)
    loose = choose_threshold(labels, probs, 0.75)
    assert loose.met_target and loose.threshold == pytest.approx(0.4) and loose.recall == 1.0


def test_choose_threshold_falls_back_to_best_f1():
    labels = np.array([0, 1, 1, 0, 1, 0])  # the top score is a false alarm: precision never reaches 0.99
    probs = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    choice = choose_threshold(labels, probs, 0.99)
    assert not choice.met_target
    assert choice.threshold == pytest.approx(0.5)  # F1 0.75, the best of all thresholds
    assert (choice.precision, choice.recall) == (pytest.approx(0.6), 1.0)


def test_area_threshold_needs_enough_labels_of_each_class_then_follows_the_same_rule():
    labels = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    same = choose_threshold(labels, probs, 0.95)
    assert area_threshold(labels, probs, 0.95, min_per_class=4, min_labels=8) == same
    assert area_threshold(labels, probs, 0.95, min_per_class=5, min_labels=8) is None
    assert area_threshold(labels, probs, 0.95, min_per_class=1, min_labels=9) is None  # too few in all
    assert area_threshold(labels, probs, 0.95) is None  # the defaults: 10 labels at least
    assert area_threshold(labels[labels == 1], probs[labels == 1], 0.95, min_labels=1) is None  # one class only
    with pytest.raises(ConfigError, match="min_per_class 0: a threshold needs at least 1 label of each class"):
        area_threshold(labels, probs, 0.95, min_per_class=0)


# --- the detector on a bundle -------------------------------------------------------------------


def test_detector_refuses_random_weight_bundles(texture_model, tmp_path):
    bundle = load_bundle(texture_model)
    random = ModelBundle(replace(bundle.metadata, random_weights=True), bundle.classifier)
    with pytest.raises(ModelBundleError, match="--allow-random"):
        Detector(random)
    assert Detector(random, allow_random=True).embedder.name == "texture"
    save_bundle(random, tmp_path / "random")
    with pytest.raises(ModelBundleError, match="random-weight"):
        Detector.load(tmp_path / "random")
    assert isinstance(Detector.load(tmp_path / "random", allow_random=True), Detector)


def test_detector_refuses_a_bundle_for_another_embedder_version(texture_model, tmp_path):
    bundle = copy_bundle(texture_model, tmp_path / "m")
    edit_model_json(bundle, embedder_version="0")
    with pytest.raises(ModelBundleError, match="texture v0"):
        Detector.load(bundle)


def test_detector_on_a_real_scene(texture_model, scene_path):
    from amber_hunter.images import read_rgb

    image = read_rgb(scene_path)
    detector = Detector.load(texture_model)
    result, seg = detector.detect(image, m_per_px=0.38)
    assert result.n_superpixels == len(seg.regions) == len(result.probabilities)
    assert 15 <= result.n_superpixels <= 45
    assert result.n_positive == len(result.positive_labels) == sum(p >= result.threshold for p in result.probabilities)
    assert result.flagged == (result.n_positive > 2)
    assert result.positive_area_m2 == pytest.approx(result.positive_area_px * 0.38**2)
    picture = overlay(image, seg, result)
    assert picture.shape == image.shape and picture.dtype == np.uint8


def test_aggregate_flags_more_than_min_positive():
    labels = np.repeat(np.arange(1, 6, dtype=np.int32)[None, :], 3, axis=0)  # 5 one-column regions
    seg = Segmentation(labels, regions_of(labels))
    probs = np.array([0.9, 0.8, 0.2, 0.7, 0.1], np.float32)
    result = aggregate(probs, seg, threshold=0.5, min_positive=2)
    assert result.flagged and result.n_positive == 3 and result.positive_labels == [1, 2, 4]
    assert result.positive_area_px == 9 and result.positive_area_m2 is None
    assert result.max_probability == pytest.approx(0.9)
    assert not aggregate(probs, seg, threshold=0.5, min_positive=3).flagged
    assert not aggregate(probs, seg, threshold=0.75, min_positive=2).flagged  # exactly 2 is not "more than 2"
    empty = aggregate(np.zeros(0, np.float32), Segmentation(labels, []), 0.5)
    assert not empty.flagged and empty.max_probability == 0.0
    labels = np.repeat(np.repeat(np.arange(1, 6, dtype=np.int32), 8)[None, :], 12, axis=0)  # 12x40, 8-px columns
    seg = Segmentation(labels, regions_of(labels))
    result = aggregate(probs, seg, threshold=0.5)
    painted = overlay(np.zeros((12, 40, 3), np.uint8), seg, result)
    assert painted.shape == (12, 40, 3) and painted.dtype == np.uint8
    assert painted[6, 4, 0] > 100 and painted[6, 4, 1] == 0  # inside positive region 1: red fill
    assert tuple(painted[6, 20]) == (0, 0, 0)  # inside negative region 3: untouched
