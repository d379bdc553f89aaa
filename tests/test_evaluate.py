"""Evaluation reports: per-crop predictions and group counts in the JSON, and the nested
hyper-parameter selection (same model as ``train`` for the shipped settings, and a choice made
on the training part only). Also the results bookkeeping of ``training/evaluate_embedders.py``."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from amber_hunter.learn.dataset import group_sizes, load_dataset
from amber_hunter.learn.evaluate import (
    NESTED_GRID,
    Candidate,
    NestedFitter,
    _fit_candidate,
    evaluate_features,
    fit_fixed,
)
from amber_hunter.learn.workflows import evaluate_model, evaluate_protocol
from amber_hunter.model.classify import LINEAR_C, fit_classifier

REPO = Path(__file__).resolve().parents[1]


# --- predictions in the report ------------------------------------------------------------------


@pytest.fixture(scope="module")
def grouped_report(small_data, shared_cache):
    report = evaluate_protocol([small_data], "texture", "grouped", folds=3, cache_dir=shared_cache)
    return json.loads(json.dumps(report.to_json()))  # what --json writes: plain JSON


def test_report_lists_every_crop_with_its_fold_and_group(grouped_report, small_data):
    d = grouped_report
    ds = load_dataset([small_data])
    preds = d["predictions"]
    assert len(preds) == d["n"] == 65
    assert [p["file"] for p in preds] == [f"{p.parent.name}/{p.name}" for p in ds.paths]
    assert all((small_data / p["file"]).is_file() for p in preds)
    assert [p["label"] for p in preds] == ds.labels.tolist()
    assert [p["group"] for p in preds] == ds.groups.tolist()
    assert {p["fold"] for p in preds} == {0, 1, 2}
    assert all(0.0 <= p["probability"] <= 1.0 for p in preds)
    sizes = group_sizes(ds.groups)
    assert (d["n_groups"], d["largest_group"]) == (sizes.n_groups, sizes.largest)
    assert d["selection"] == "fixed"
    # No group is tested in two folds.
    fold_of = {}
    for p in preds:
        assert fold_of.setdefault(p["group"], p["fold"]) == p["fold"], p["group"]


def test_predictions_reproduce_the_reported_confusion(grouped_report):
    """Each prediction at its fold's threshold gives back the report's confusion matrix and
    fold sizes: the list is what was scored, not a recomputation."""
    d = grouped_report
    thresholds = {f["fold"]: f["threshold"] for f in d["folds"]}
    confusion = np.zeros((2, 2), int)
    for p in d["predictions"]:
        confusion[p["label"], int(p["probability"] >= thresholds[p["fold"]])] += 1
    assert confusion.tolist() == d["confusion"]
    sizes = np.bincount([p["fold"] for p in d["predictions"]])
    assert sizes.tolist() == [f["n_test"] for f in d["folds"]]


def test_seed_split_predictions_cover_only_the_test_part(small_data, shared_cache):
    d = evaluate_protocol([small_data], "texture", "seed-split", cache_dir=shared_cache).to_json()
    assert len(d["predictions"]) == d["n"] == 20
    assert {p["fold"] for p in d["predictions"]} == {0}


def test_external_model_predictions_have_no_fold(other_data, texture_model, shared_cache):
    d = evaluate_model(other_data, texture_model, cache_dir=shared_cache).to_json()
    assert len(d["predictions"]) == d["n"] == 24
    assert {p["fold"] for p in d["predictions"]} == {None}
    assert all((other_data / p["file"]).is_file() for p in d["predictions"])


# --- nested selection ---------------------------------------------------------------------------


def synthetic_stack(n=120, k=24, extra=4, seed=0):
    """'CNN' columns that carry the signal, then a few noise columns; two scenes per group."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 3 == 0).astype(np.int32)
    cnn = np.abs(rng.normal(size=(n, k))) + labels[:, None] * np.linspace(0, 1.2, k)
    rest = rng.normal(size=(n, extra))
    groups = np.array([f"g{i // 2}" for i in range(n)])
    return np.hstack([cnn, rest]).astype(np.float32), labels, groups


BLOCKS = [[(0, 12)], [(12, 24)]]


def test_candidate_fit_is_fit_classifier_for_the_shipped_settings():
    features, labels, groups = synthetic_stack()
    (ours,) = _fit_candidate(features, labels, groups, BLOCKS, [Candidate(LINEAR_C)], seed=0)
    reference = fit_classifier(features, labels, groups, BLOCKS, seed=0)
    np.testing.assert_array_equal(ours.predict_proba(features), reference.predict_proba(features))


def test_nested_with_only_the_shipped_settings_is_the_fixed_fit():
    features, labels, groups = synthetic_stack()
    nested = NestedFitter(grid=(Candidate(LINEAR_C),))(features, labels, groups, BLOCKS, 0.9, 0)
    fixed = fit_fixed(features, labels, groups, BLOCKS, 0.9, 0)
    assert nested.choice == fixed.choice
    np.testing.assert_array_equal(nested.classifier.predict_proba(features), fixed.classifier.predict_proba(features))
    assert nested.params["linear_c"] == LINEAR_C and fixed.params == {}


def test_nested_picks_the_candidate_that_ranks_best_on_inner_folds():
    """A candidate whose heads are regularised to nothing sees no signal (the non-CNN columns
    are noise); listed first, it must still lose."""
    features, labels, groups = synthetic_stack()
    useless = Candidate(1e-9, {"max_depth": 2})
    model = NestedFitter(grid=(useless, Candidate(LINEAR_C)))(features, labels, groups, BLOCKS, 0.9, 0)
    assert model.params["linear_c"] == LINEAR_C
    assert model.params["inner_pr_auc"] > 0.8


def test_nested_grid_is_small_and_holds_the_shipped_settings():
    assert len(NESTED_GRID) <= 6
    assert Candidate(LINEAR_C, {"max_depth": 3}) in NESTED_GRID
    # Without CNN blocks linear_c is moot: only the distinct XGBoost settings are fitted, and
    # the report does not claim a linear_c was chosen.
    assert len(NestedFitter().candidates(())) == len({tuple(c.xgb.items()) for c in NESTED_GRID})
    features, labels, groups = synthetic_stack(n=60)
    model = NestedFitter()(features[:, 20:], labels, groups, (), 0.9, 0)
    assert "linear_c" not in model.params and model.params["max_depth"] in (2, 3)


def test_nested_report_records_choices_per_fold():
    features, labels, groups = synthetic_stack()
    names = [f"c{i}.png" for i in range(len(labels))]
    report, _, _ = evaluate_features(
        features,
        labels,
        groups,
        names,
        protocol="grouped",
        embedder="synthetic",
        cnn_blocks=BLOCKS,
        folds=3,
        fitter=NestedFitter(grid=(Candidate(0.003), Candidate(0.03))),
        selection="nested",
    )
    d = report.to_json()
    assert d["selection"] == "nested" and len(d["folds"]) == 3
    assert all(f["params"]["linear_c"] in (0.003, 0.03) for f in d["folds"])
    assert len(d["predictions"]) == len(labels)


# --- training/evaluate_embedders.py bookkeeping -------------------------------------------------


@pytest.fixture(scope="module")
def script():
    name = "amber_training_evaluate_embedders"
    spec = importlib.util.spec_from_file_location(name, REPO / "training" / "evaluate_embedders.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def fake_run(embedder, protocol, axis, selection="fixed", seed=0, f1=0.5):
    return {
        "embedder": embedder,
        "protocol": protocol,
        "axis": axis if protocol == "spatial" else None,
        "selection": selection,
        "seed": seed,
        "f1": f1,
        "precision": 0.9,
        "recall": 0.4,
        "roc_auc": 0.95,
    }


def test_run_tags_and_plan(script):
    Run = script.Run
    assert Run("vgg16", "grouped", "lon").tag == "vgg16_grouped"
    assert Run("vgg16", "spatial", "lat", "nested").tag == "vgg16_spatial_lat_nested"
    assert Run("vgg16", "grouped", "lon", "fixed", 2).tag == "vgg16_grouped_seed2"
    assert Run("a", "grouped", "lon").main
    assert not Run("a", "grouped", "lon", "nested").main and not Run("a", "grouped", "lon", "fixed", 1).main
    tags = [r.tag for r in script.plan(["a"], ["fixed", "nested"], [0, 1])]
    assert tags == [
        "a_grouped",
        "a_spatial_lon",
        "a_spatial_lat",
        "a_grouped_nested",
        "a_spatial_lon_nested",
        "a_spatial_lat_nested",
        "a_grouped_seed1",
    ]


def test_new_embedders_merge_into_existing_results_and_table(script):
    Run = script.Run
    old = {Run("vgg16", p, a).tag: fake_run("vgg16", p, a) for p, a in script.PROTOCOLS}
    old["vgg16_grouped_nested"] = fake_run("vgg16", "grouped", "lon", "nested")
    new = {Run("efflite0", p, a).tag: fake_run("efflite0", p, a, f1=0.7) for p, a in script.PROTOCOLS}
    merged = script.merge(old, new)
    assert set(merged) == set(old) | set(new)
    text = script.table(merged, {"vgg16": "4.6"})
    rows = [line for line in text.splitlines() if line.startswith(("| vgg16", "| efflite0"))]
    assert rows[0].startswith("| vgg16 | fixed | 0.500") and rows[0].endswith("| 4.6 |")
    assert rows[1].startswith("| vgg16 | nested | 0.500") and "n/a" in rows[1]  # spatial nested missing
    assert rows[2].startswith("| efflite0 | fixed | 0.700")
    # A rerun replaces a run, it does not duplicate it.
    again = script.merge(merged, {"vgg16_grouped": fake_run("vgg16", "grouped", "lon", f1=0.6)})
    assert len(again) == len(merged) and again["vgg16_grouped"]["f1"] == 0.6


def test_seed_table_appears_with_several_seeds(script):
    runs = {
        "a_grouped": fake_run("a", "grouped", "lon"),
        "a_grouped_seed1": fake_run("a", "grouped", "lon", seed=1, f1=0.4),
    }
    text = script.table(runs, {})
    assert "| a | 1 | 0.400 |" in text and "grouped fold seed" in text
    assert "grouped fold seed" not in script.table({"a_grouped": runs["a_grouped"]}, {})


def test_report_text_is_json_with_one_line_per_prediction(script):
    d = {"f1": 0.5, "predictions": [{"file": "positive/a.png", "label": 1, "probability": 0.123456789, "fold": 0,
                                     "group": "g"}] * 3}  # fmt: skip
    text = script.report_text(d)
    back = json.loads(text)
    assert back["f1"] == 0.5 and len(back["predictions"]) == 3
    assert back["predictions"][0]["probability"] == 0.12346
    assert sum('"file"' in line for line in text.splitlines()) == 3
    assert json.loads(script.report_text({"f1": 0.5, "predictions": []})) == {"f1": 0.5}
