"""``suggest``: which superpixels to label next. Synthetic features and a small XGBoost model, so
the picks can be checked against what each strategy promises (nearest the threshold, one per
cluster, the most typical of it) in well under a second per test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from amber_hunter.errors import ConfigError, DatasetError, ModelBundleError
from amber_hunter.learn.suggest import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    Suggestion,
    classifier_view,
    suggest,
)
from amber_hunter.model.classify import ModelBundle, ModelMetadata, fit_classifier

RESULTS = Path(__file__).resolve().parents[1] / "training" / "results" / "adaptation.json"
DIM = 4


@pytest.fixture(scope="module")
def classifier():
    """XGBoost on 4 features where the first one decides the label: probabilities spread over (0, 1)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, DIM)).astype(np.float32)
    y = (x[:, 0] + rng.normal(scale=0.8, size=300) > 0.3).astype(np.int32)
    return fit_classifier(x, y, np.arange(300).astype(str))


@pytest.fixture(scope="module")
def pool():
    return np.random.default_rng(1).normal(size=(120, DIM)).astype(np.float32)


def blobs(sizes, seed=0):
    """Blobs far apart, each a centre, a ring of points at distance 1 around it and one outlier at
    distance 3: its centre is the blob's most typical point. Returns (features, centre indices)."""
    rng = np.random.default_rng(seed)
    rows, centres = [], []
    for b, size in enumerate(sizes):
        centre = np.zeros(DIM)
        centre[b % DIM] = 40.0 * (1 + b // DIM)
        centres.append(len(rows))
        rows.append(centre)
        for _ in range(size - 2):
            direction = rng.normal(size=DIM)
            rows.append(centre + direction / np.linalg.norm(direction))
        rows.append(centre + 3.0 * np.eye(DIM)[(b + 1) % DIM])
    return np.array(rows, np.float32), centres


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_inputs_same_picks(classifier, pool, strategy):
    first = suggest(classifier, pool, 10, strategy, threshold=0.4, seed=3)
    again = suggest(classifier, pool, 10, strategy, threshold=0.4, seed=3)
    assert first == again
    assert len({s.index for s in first}) == 10
    assert all(isinstance(s, Suggestion) and s.strategy == strategy and s.reason for s in first)


def test_random_picks_change_with_the_seed(classifier, pool):
    picks = [{s.index for s in suggest(classifier, pool, 10, "random", seed=seed)} for seed in (0, 1)]
    assert picks[0] != picks[1]


def test_margin_picks_are_nearest_the_models_threshold(classifier, pool):
    probs = classifier.predict_proba(pool)
    threshold = 0.25
    picks = suggest(classifier, pool, 15, "margin", threshold=threshold)
    chosen = np.array([s.index for s in picks])
    gap = np.abs(probs - threshold)
    others = np.setdiff1d(np.arange(len(pool)), chosen)
    assert gap[chosen].max() <= gap[others].min()
    assert list(gap[chosen]) == sorted(gap[chosen])  # closest first
    assert [s.probability for s in picks] == pytest.approx(probs[chosen].tolist())
    # Not the same as uncertainty around 0.5: the threshold, not the class balance, decides.
    assert set(chosen) != set(np.argsort(np.abs(probs - 0.5))[:15])


def test_stratified_takes_one_pick_from_each_score_stratum(classifier, pool):
    probs = classifier.predict_proba(pool)
    picks = suggest(classifier, pool, 12, "stratified", seed=5)
    rank = np.empty(len(pool), int)
    rank[np.argsort(-probs, kind="stable")] = np.arange(len(pool))
    assert [int(rank[s.index]) // 10 for s in picks] == list(range(12))  # 120 ranks, 12 strata of 10, top first
    assert [s.probability for s in picks] == pytest.approx(probs[[s.index for s in picks]].tolist())
    other = suggest(classifier, pool, 12, "stratified", seed=6)
    assert [s.index for s in other] != [s.index for s in picks]  # drawn within the strata, by the seed


def test_a_bundle_brings_its_own_threshold(classifier, pool):
    meta = ModelMetadata(
        embedder="synthetic", embedder_version="0", embedder_params={}, dim=DIM, threshold=0.7, target_precision=0.9
    )
    bundle = ModelBundle(meta, classifier)
    assert suggest(bundle, pool, 8, "margin") == suggest(classifier, pool, 8, "margin", threshold=0.7)


def test_typical_picks_the_centre_of_each_cluster_largest_first(classifier):
    features, centres = blobs([6, 14, 9, 11])
    picks = suggest(classifier, features, 4, "typical")
    assert [s.index for s in picks] == [centres[1], centres[3], centres[2], centres[0]]
    assert "14 superpixels" in picks[0].reason


def test_typical_on_a_sample_of_a_big_pool_still_covers_every_cluster(classifier):
    features, _ = blobs([60, 60, 60])
    owner = np.repeat(np.arange(3), 60)
    picks = suggest(classifier, features, 3, "typical", cluster_sample=40)
    assert sorted(owner[[s.index for s in picks]]) == [0, 1, 2]


def test_mix_clusters_only_the_uncertain(classifier, pool):
    probs = classifier.predict_proba(pool)
    picks = suggest(classifier, pool, 5, "mix", threshold=0.5)
    nearest = set(np.argsort(np.abs(probs - 0.5), kind="stable")[:15].tolist())
    assert {s.index for s in picks} <= nearest
    assert len({s.reason.split(" (")[0] for s in picks}) == 5  # five distinct clusters


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_more_asked_than_the_pool_holds_gives_the_whole_pool(classifier, pool, strategy):
    picks = suggest(classifier, pool[:7], 20, strategy, threshold=0.5)
    assert sorted(s.index for s in picks) == list(range(7))


def test_identical_superpixels_still_give_n_distinct_picks(classifier):
    features = np.repeat(np.eye(DIM, dtype=np.float32)[:3], 4, axis=0)  # 3 distinct points, 4 copies each
    picks = suggest(classifier, features, 5, "typical")
    assert len({s.index for s in picks}) == 5


def test_the_classifier_view_has_one_column_per_head_then_the_rest():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 10)).astype(np.float32)
    y = (x[:, :8].sum(axis=1) > 0).astype(np.int32)
    clf = fit_classifier(x, y, np.arange(60).astype(str), [[(0, 8)]])
    view = classifier_view(clf, x)
    assert view.shape == (60, 3)
    assert np.allclose(view.mean(axis=0), 0, atol=1e-6)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_empty_pool_is_refused(classifier):
    with pytest.raises(DatasetError) as exc:
        suggest(classifier, np.zeros((0, DIM), np.float32), 5, "typical")
    assert "no superpixels" in one_line(exc)


def test_unknown_strategy_is_refused_with_the_choices(classifier, pool):
    with pytest.raises(ConfigError) as exc:
        suggest(classifier, pool, 5, "entropy")
    assert "margin, typical, mix, stratified, random" in one_line(exc)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"n": 0}, ConfigError, "at least 1"),
        ({"strategy": "margin"}, ConfigError, "threshold"),
        ({"features": np.zeros((5, DIM + 1), np.float32)}, ModelBundleError, "dimensions"),
    ],
)
def test_bad_requests_are_one_line_errors(classifier, pool, kwargs, error, words):
    args = {"features": pool, "n": 5, "strategy": "typical", **kwargs}
    with pytest.raises(error) as exc:
        suggest(classifier, args["features"], args["n"], args["strategy"])
    assert words in one_line(exc)


def test_the_default_strategy_is_the_measured_one():
    """``DEFAULT_STRATEGY`` must follow ``training/adaptation.py``'s measurement, not taste."""
    assert DEFAULT_STRATEGY == json.loads(RESULTS.read_text())["default_strategy"]
