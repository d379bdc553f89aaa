"""The library API behind ``train`` and ``evaluate``: datasets in, bundles and reports out.

The CLI only parses options and prints; notebooks and scripts call these same functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import __version__
from ..model.classify import (
    TARGET_PRECISION,
    XGB_PARAMS,
    ModelBundle,
    ModelMetadata,
    fit_with_threshold,
    load_bundle,
    now_iso,
    resolve_model,
    save_bundle,
)
from ..model.embed import Embedder, cnn_blocks, get_embedder
from ..model.segment import SLIC_SCALE, SlicParams
from .cache import embed_files
from .dataset import group_sizes, load_dataset
from .evaluate import (
    EvaluationReport,
    Fitter,
    at_half,
    compute_metrics,
    evaluate_features,
    fit_fixed,
    plot_pr_curve,
    predictions,
)


def _embedded_dataset(data_dirs, labels_csv, embedder: str | Embedder, cache_dir, progress):
    """The labelled crops, the embedder (built if named) and every crop's embedding, through the
    content-hash cache, with the image hashes."""
    dataset = load_dataset(data_dirs, labels_csv)
    embedder = get_embedder(embedder) if isinstance(embedder, str) else embedder
    features, hashes = embed_files(dataset.paths, embedder, cache_dir, progress)
    return dataset, embedder, features, hashes


def train_model(
    data_dirs: Sequence[str | Path],
    embedder: str | Embedder,
    out: str | Path,
    *,
    labels_csv: str | Path | None = None,
    target_precision: float = TARGET_PRECISION,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: Callable | None = None,
    slic: SlicParams | None = None,
) -> ModelBundle:
    """Train a bundle on labelled folders and write it atomically to ``out``.

    ``slic`` is how detection with the bundle segments scenes (default: ``SlicParams`` at
    ``SLIC_SCALE``). Training never segments, since each labelled crop is one superpixel already,
    so it changes no weight: it is the bundle's speed and superpixel fidelity at scan time.
    """
    dataset, embedder, features, hashes = _embedded_dataset(data_dirs, labels_csv, embedder, cache_dir, progress)
    blocks = cnn_blocks(embedder)
    classifier, choice = fit_with_threshold(features, dataset.labels, dataset.groups, blocks, target_precision, seed)
    metadata = ModelMetadata(
        embedder=embedder.name,
        embedder_version=embedder.version,
        embedder_params=embedder.params,
        dim=embedder.dim,
        cnn_blocks=[[list(r) for r in block] for block in blocks],
        threshold=choice.threshold,
        target_precision=target_precision,
        training={
            **dataset.summary(),
            "data_hash": dataset.content_hash(hashes),
            "sources": [str(Path(d)) for d in data_dirs],
            "labels_csv": None if labels_csv is None else str(labels_csv),
            "seed": seed,
        },
        metrics={
            "oof_precision": choice.precision,
            "oof_recall": choice.recall,
            "met_target_precision": choice.met_target,
        },
        xgb_params=XGB_PARAMS,
        random_weights=getattr(embedder, "random_weights", False),
        slic=asdict(slic or SlicParams(scale=SLIC_SCALE)),
        package_version=__version__,
        created=now_iso(),
    )
    bundle = ModelBundle(metadata, classifier)
    save_bundle(bundle, out)
    return bundle


def evaluate_protocol(
    data_dirs: Sequence[str | Path],
    embedder: str | Embedder,
    protocol: str,
    *,
    folds: int = 5,
    axis: str = "lon",
    labels_csv: str | Path | None = None,
    target_precision: float = TARGET_PRECISION,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: Callable | None = None,
    plot: str | Path | None = None,
    fitter: Fitter = fit_fixed,
    selection: str = "fixed",
) -> EvaluationReport:
    """Cross-validate an embedder on labelled folders under one protocol.

    Folds keep footprint groups whole (``Dataset.groups``: scenes that overlap or touch), and so
    do the inner folds that pick each fold's threshold. ``fitter``/``selection``: see
    ``evaluate_features`` (the nested check in ``training/evaluate_embedders.py`` uses them).
    """
    dataset, embedder, features, _ = _embedded_dataset(data_dirs, labels_csv, embedder, cache_dir, progress)
    report, y, probs = evaluate_features(
        features,
        dataset.labels,
        dataset.groups,
        [p.name for p in dataset.paths],
        protocol=protocol,
        embedder=embedder.name,
        cnn_blocks=cnn_blocks(embedder),
        folds=folds,
        coords=dataset.coordinates(axis) if protocol == "spatial" else None,
        axis=axis,
        target_precision=target_precision,
        seed=seed,
        files=dataset.files(data_dirs),
        fitter=fitter,
        selection=selection,
    )
    if plot is not None:
        plot_pr_curve(y, probs, f"{embedder.name}, {protocol}" + (f" ({axis})" if protocol == "spatial" else ""), plot)
    return report


def evaluate_model(
    data_dir: str | Path,
    model: str | Path,
    *,
    labels_csv: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: Callable | None = None,
    plot: str | Path | None = None,
) -> EvaluationReport:
    """Score a trained bundle, at its own threshold, on another labelled folder."""
    bundle = load_bundle(resolve_model(model))
    meta = bundle.metadata
    dataset, _, features, _ = _embedded_dataset([data_dir], labels_csv, bundle.build_embedder(), cache_dir, progress)
    probs = bundle.predict_proba(features)
    y = dataset.labels
    sizes = group_sizes(dataset.groups)
    report = EvaluationReport(
        protocol="external",
        embedder=meta.embedder,
        metrics=compute_metrics(y, probs, (probs >= meta.threshold).astype(np.int32)),
        at_half=at_half(y, probs),
        target_precision=meta.target_precision,
        n_groups=sizes.n_groups,
        largest_group=sizes.largest,
        predictions=predictions(dataset.files([data_dir]), y, probs, None, dataset.groups),
    )
    if plot is not None:
        plot_pr_curve(y, probs, f"{meta.embedder} model on {Path(data_dir).name}", plot)
    return report
