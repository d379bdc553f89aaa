"""Retrain a run's model from its training data, every label in the store and the readers'
feedback; then rescore the run from its stored embeddings (``run.rescore``) and diff it.

What goes in, and why:

- the crops the run's model was trained on (its bundle's ``training.sources``, or ``--data``),
  with their embeddings from the embedding cache: nothing is embedded twice;
- every current label in the label store: a crop label overrides the folder's label (or adds a
  crop); a label on one of *this run's* superpixels trains on the embedding the run stored, so no
  tile is fetched and no CNN runs;
- the run's feedback: a reported false positive is a hard negative and confirmed mining a positive
  (both already in the label store, source ``feedback``); and a training positive whose scene lies
  inside an area reported as not mining is dropped, as the study dropped its deforestation
  clearings after its readers' reports. The dropped crops are listed.

The threshold: ``train`` chooses it on grouped out-of-fold predictions of the whole training set,
at the parent model's target precision. Retrain then re-chooses it by the same rule on the
out-of-fold predictions of the run's own labelled superpixels alone (the area being scanned), when
they are enough (``model.classify.area_threshold``): in a new area the same probability means
something else, and on the longitude bands of ``training/adaptation.py`` this lifted F1 from 0.80
to 0.88 with 20 stratified picks. Only labels a user gave (explore, imported), not readers'
reports: reports are a sample readers chose, mostly of false positives, and a threshold chosen on
them says little about the rest of the area. ``threshold="training"`` keeps the training set's
choice. Before/after figures come from the same grouped protocol: the parent's training set and
the new one, each through its out-of-fold predictions.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import FeedbackError
from ..learn.cache import embed_files
from ..learn.dataset import Dataset, load_dataset
from ..learn.labels import LabelStore
from ..model.classify import (
    ModelBundle,
    ThresholdChoice,
    area_threshold,
    choose_threshold,
    fit_with_oof,
    load_bundle,
    out_of_fold,
    save_bundle,
)
from ..model.embed import cnn_blocks
from ..run.config import model_hash
from ..run.rescore import RescoreDiff, ensure_first_version, rescore_run, stored_vectors
from ..run.store import ModelVersion, RunStore

#: Fewer examples of a class than this, and a grouped threshold cannot be chosen honestly.
MIN_PER_CLASS = 10
#: Where the shipped threshold comes from: the run's labelled superpixels when they are enough
#: (else the training set), or always the training set.
THRESHOLD_SOURCES = ("area", "training")


@dataclass(frozen=True)
class Figures:
    """Grouped out-of-fold figures of one training set at its chosen threshold."""

    precision: float
    recall: float
    f1: float
    threshold: float


@dataclass(frozen=True)
class RetrainReport:
    """What a retrain used, what it measured, and what the rescore changed."""

    version: int
    parent: int
    crops: int
    positives: int
    negatives: int
    run_superpixels: int
    dropped_positives: list[str]
    before: Figures
    after: Figures
    #: Share of the feedback superpixels each model gets right (the parent, the new one).
    feedback_right: tuple[float, float] | None
    diff: RescoreDiff
    #: Out-of-fold figures on the run's own labelled superpixels at the threshold re-chosen on
    #: them, when they were enough to re-choose it (see the module docstring).
    area: Figures | None = None
    #: "area" or "training": which threshold the new version ships with (``after.threshold`` is
    #: the training set's choice either way).
    threshold_from: str = "training"
    #: The run's labelled superpixels that may choose the threshold (all but readers' reports).
    area_labels: int = 0


def _figures(choice: ThresholdChoice) -> Figures:
    p, r = choice.precision, choice.recall
    return Figures(round(p, 4), round(r, 4), round(2 * p * r / (p + r) if p + r else 0.0, 4), round(choice.threshold, 4))


def _inside(polygons: list[dict], lon: float, lat: float) -> bool:
    from matplotlib.path import Path as Ring

    for geometry in polygons:
        outer, *holes = geometry["coordinates"]
        if Ring(outer).contains_point((lon, lat)) and not any(Ring(h).contains_point((lon, lat)) for h in holes):
            return True
    return False


def _training_set(bundle: ModelBundle, data) -> tuple[Dataset, list[Path]]:
    """The labelled folders the model was trained on (or ``data``), with the labels CSV it was
    trained with (a model trained with ``--labels`` keeps those crops and relabels)."""
    training = bundle.metadata.training
    sources = [Path(d).resolve() for d in (data or training.get("sources") or [])]
    missing = [str(d) for d in sources if not d.is_dir()]
    if not sources or missing:
        raise FeedbackError(f"the model's training data ({', '.join(missing) or 'none recorded'}) is not on this "
                            "machine; give it with --data DIR (e.g. the texty-amber dataset)")
    labels_csv = None if data else training.get("labels_csv")
    if labels_csv and not Path(labels_csv).is_file():
        raise FeedbackError(f"the model's labels CSV {labels_csv} is not on this machine; give the data with --data "
                            "DIR (and add the CSV's labels to the store with 'amber-hunter labels import')")
    return load_dataset(sources, labels_csv), sources


def retrain(run_dir: str | Path, *, data=None, labels: LabelStore | None = None, cache_dir=None, seed: int = 0,
            threshold: str = "area", progress=None) -> RetrainReport:
    """Build the next model version of ``run_dir`` and rescore the run with it. ``threshold``: one
    of ``THRESHOLD_SOURCES`` (see the module docstring)."""
    if threshold not in THRESHOLD_SOURCES:
        raise FeedbackError(f"threshold source {threshold!r} is unknown; choose {' or '.join(THRESHOLD_SOURCES)}")
    run_dir = Path(run_dir).resolve()
    with RunStore(run_dir) as store:
        parent_version = ensure_first_version(store)
        parent = load_bundle(parent_version.path)
        feedback = store.feedback()
        index, vectors = stored_vectors(store, parent)
        n, folder = store.next_version_dir()
    dataset, sources = _training_set(parent, data)
    embedder = parent.build_embedder()
    features, hashes = embed_files(dataset.paths, embedder, cache_dir, progress)
    old_labels = dataset.labels.astype(np.int8)
    new_labels = old_labels.copy()
    keep = np.ones(len(old_labels), bool)

    crop_rows, run_rows = {}, []
    if labels is not None:
        for row in labels.latest().values():
            if row.kind == "crop":
                crop_rows[row.content_hash] = row.label
            elif row.run == str(run_dir) and (row.scene_id, row.segment) in index:
                run_rows.append(row)
    for i, digest in enumerate(hashes):
        if digest in crop_rows:
            new_labels[i] = crop_rows[digest]

    not_mining = [r.geometry for r in feedback if r.verdict == "not-mining" and r.geometry
                  and r.geometry["type"] == "Polygon"]
    dropped = []
    for i, sample in enumerate(dataset.samples):
        if new_labels[i] == 1 and sample.lat is not None and _inside(not_mining, sample.lon, sample.lat):
            keep[i] = False
            dropped.append(sample.path.name)

    run_features = np.array([vectors[index[(r.scene_id, r.segment)]] for r in run_rows], np.float32).reshape(
        len(run_rows), features.shape[1])
    run_labels = np.array([r.label for r in run_rows], np.int8)
    groups = np.concatenate([dataset.groups[keep], np.array([f"run:{r.scene_id}" for r in run_rows], object)])
    all_features = np.concatenate([features[keep], run_features])
    all_labels = np.concatenate([new_labels[keep], run_labels])
    positives, negatives = int(all_labels.sum()), int((all_labels == 0).sum())
    if min(positives, negatives) < MIN_PER_CLASS:
        raise FeedbackError(f"retraining needs at least {MIN_PER_CLASS} examples of each class; it has {positives} "
                            f"positive and {negatives} negative; label more in 'amber-hunter explore' or give --data")

    blocks = cnn_blocks(embedder)
    target = parent.metadata.target_precision
    before = _figures(choose_threshold(old_labels, out_of_fold(features, old_labels, dataset.groups, blocks, seed),
                                       target))
    classifier, choice, oof = fit_with_oof(all_features, all_labels, groups, blocks, target, seed)
    after = _figures(choice)
    run_oof = oof[len(oof) - len(run_rows):]  # the run's rows come last
    chosen = np.array([r.source != "feedback" for r in run_rows], bool)
    local = area_threshold(run_labels[chosen], run_oof[chosen], target) if threshold == "area" else None
    area = None if local is None else _figures(local)
    shipped = choice.threshold if local is None else local.threshold
    threshold_from, area_labels = "training" if local is None else "area", int(chosen.sum())
    kept = [h for h, k in zip(hashes, keep) if k]
    data_hash = hashlib.sha256("\n".join(
        [f"{h}:{y}" for h, y in zip(kept, new_labels[keep])] +
        [f"{r.scene_id}#{r.segment}:{r.label}" for r in run_rows]).encode()).hexdigest()[:16]
    changes = {"parent": parent_version.version, "crops": int(keep.sum()), "run_superpixels": len(run_rows),
               "dropped_positives": dropped, "relabelled_crops": int((new_labels != old_labels).sum()),
               "feedback_reports": len(feedback), "before": asdict(before), "after": asdict(after),
               "area": None if area is None else asdict(area), "area_labels": area_labels,
               "threshold": shipped, "threshold_from": threshold_from}
    metadata = replace(parent.metadata, threshold=shipped, training={
        **parent.metadata.training, "sources": [str(s) for s in sources], "data_hash": data_hash,
        "parent_version": parent_version.version, "seed": seed, "retrain": changes},
        metrics={"oof_precision": after.precision, "oof_recall": after.recall,
                 "met_target_precision": after.precision >= target, "threshold_from": threshold_from,
                 **({} if area is None else {"area_oof_precision": area.precision, "area_oof_recall": area.recall,
                                             "area_labels": area_labels})})
    bundle = ModelBundle(metadata, classifier)
    save_bundle(bundle, folder)

    feedback_right = None
    if len(run_rows):
        old_p = parent.predict_proba(run_features) >= parent.metadata.threshold
        new_p = bundle.predict_proba(run_features) >= shipped
        feedback_right = (round(float((old_p == run_labels).mean()), 4), round(float((new_p == run_labels).mean()), 4))
        changes["feedback_right"] = list(feedback_right)
    version = ModelVersion(n, folder, model_hash(str(folder)), parent_version.version, data_hash, changes,
                           time.time(), True)
    diff = rescore_run(run_dir, folder, version=version)
    return RetrainReport(n, parent_version.version, int(keep.sum()), positives, negatives, len(run_rows), dropped,
                         before, after, feedback_right, diff, area, threshold_from, area_labels)
