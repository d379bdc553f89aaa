"""Evaluation protocols, from the study's optimistic split to the honest spatial one.

- ``seed-split``: the study's published 70/30 split (random_state=43), for comparison only: crops
  of one scene land on both sides, so it rewards memorising scenes.
- ``grouped``: k-fold with every scene wholly in one fold: the honest number within one area.
- ``spatial``: k bands along longitude or latitude, train on k-1, test on the held-out band:
  what users meet when they scan a new area.

Every fold trains exactly as ``train`` does, threshold selection included, so the reported
precision is the precision a shipped model would have, not one tuned on the test fold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DatasetError
from ..model.classify import TARGET_PRECISION, fit_with_threshold, grouped_splits

PROTOCOLS = ("seed-split", "grouped", "spatial")


@dataclass(frozen=True)
class Metrics:
    """Binary metrics at a decision threshold, plus ranking metrics over the probabilities."""

    precision: float
    recall: float
    f1: float
    f2: float
    roc_auc: float
    pr_auc: float
    confusion: list  # [[tn, fp], [fn, tp]]
    n: int
    n_positive: int


@dataclass(frozen=True)
class EvaluationReport:
    """What ``amber-hunter evaluate`` prints and writes with ``--json``."""

    protocol: str
    embedder: str
    metrics: Metrics
    at_half: dict  # precision/recall/f1 at threshold 0.5, as the study reported them
    folds: list = field(default_factory=list)
    target_precision: float = TARGET_PRECISION
    axis: str | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        flat = d.pop("metrics")
        return {**flat, **d}


def compute_metrics(labels: np.ndarray, probs: np.ndarray, predicted: np.ndarray) -> Metrics:
    from sklearn.metrics import (
        average_precision_score,
        confusion_matrix,
        fbeta_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    both = len(set(labels.tolist())) == 2
    return Metrics(
        precision=float(precision_score(labels, predicted, zero_division=0)),
        recall=float(recall_score(labels, predicted, zero_division=0)),
        f1=float(fbeta_score(labels, predicted, beta=1, zero_division=0)),
        f2=float(fbeta_score(labels, predicted, beta=2, zero_division=0)),
        roc_auc=float(roc_auc_score(labels, probs)) if both else float("nan"),
        pr_auc=float(average_precision_score(labels, probs)) if both else float("nan"),
        confusion=confusion_matrix(labels, predicted, labels=[0, 1]).tolist(),
        n=len(labels),
        n_positive=int(labels.sum()),
    )


def at_half(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Precision, recall and F1 at threshold 0.5, as the study reported them."""
    m = compute_metrics(labels, probs, (probs >= 0.5).astype(np.int32))
    return {"precision": m.precision, "recall": m.recall, "f1": m.f1}


def seed_split(names: list[str], labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The study's split: 70/30 with random_state=43, positives then negatives, each by file name."""
    from sklearn.model_selection import train_test_split

    train, test = [], []
    for cls in (1, 0):
        idx = sorted(np.flatnonzero(labels == cls), key=lambda i: names[i])
        tr, te = train_test_split(idx, test_size=0.3, random_state=43)
        train += tr
        test += te
    return [(np.array(sorted(train)), np.array(sorted(test)))]


def spatial_bands(coords: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: int) -> np.ndarray:
    """Band index per sample: edges at quantiles of the positive *scenes'* coordinates, so every
    band holds positives, and a scene's crops all fall in the band of its coordinate."""
    if np.isnan(coords).any():
        raise DatasetError(
            f"{int(np.isnan(coords).sum())} crops have no coordinates in their file names; the spatial "
            "protocol needs the study's <lat>_<lon>_<date>_super_<n> names (use --protocol grouped)"
        )
    # One coordinate per scene: crops of a scene carry it with float noise in their names, and an
    # edge falling between two noisy copies would split the scene across bands.
    scene_coord: dict[str, float] = {}
    for g, c in zip(groups, coords):
        scene_coord.setdefault(g, c)
    positive_scenes = {g for g, y in zip(groups, labels) if y == 1}
    pos_coords = np.array(sorted(scene_coord[g] for g in positive_scenes))
    if len(pos_coords) < folds:
        raise DatasetError(f"only {len(pos_coords)} positive scenes for {folds} spatial bands; use fewer --folds")
    edges = np.quantile(pos_coords, np.linspace(0, 1, folds + 1)[1:-1])
    return np.digitize([scene_coord[g] for g in groups], edges)


def spatial_folds(coords, labels, groups, folds: int):
    bands = spatial_bands(coords, labels, groups, folds)
    return [(np.flatnonzero(bands != b), np.flatnonzero(bands == b)) for b in range(folds)]


def cross_validate(features, labels, groups, splits, cnn_blocks, target_precision: float, seed: int = 0):
    """Train as ``train`` does on each split; return pooled probabilities, predictions, fold rows."""
    probs = np.full(len(labels), np.nan, np.float32)
    predicted = np.zeros(len(labels), np.int32)
    rows = []
    for k, (train, test) in enumerate(splits):
        clf, choice = fit_with_threshold(
            features[train], labels[train], groups[train], cnn_blocks, target_precision, seed
        )
        p = clf.predict_proba(features[test])
        probs[test], predicted[test] = p, (p >= choice.threshold)
        fold = compute_metrics(labels[test], p, predicted[test])
        rows.append(
            {
                "fold": k,
                "n_test": len(test),
                "threshold": choice.threshold,
                "roc_auc": fold.roc_auc,
                "f1": fold.f1,
                "precision": fold.precision,
                "recall": fold.recall,
            }
        )
    tested = ~np.isnan(probs)
    return probs[tested], predicted[tested], labels[tested], rows


def evaluate_features(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    names: list[str],
    *,
    protocol: str,
    embedder: str,
    cnn_blocks=(),
    folds: int = 5,
    coords: np.ndarray | None = None,
    axis: str = "lon",
    target_precision: float = TARGET_PRECISION,
    seed: int = 0,
) -> tuple[EvaluationReport, np.ndarray, np.ndarray]:
    """Run one protocol on precomputed features; also return the pooled labels and probabilities
    (for the PR curve)."""
    if folds < 2:
        raise ConfigError(f"--folds {folds} must be at least 2")
    if protocol == "seed-split":
        splits = seed_split(names, labels)
    elif protocol == "grouped":
        splits = grouped_splits(labels, groups, folds, seed)
    elif protocol == "spatial":
        splits = spatial_folds(coords, labels, groups, folds)
    else:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    probs, predicted, y, rows = cross_validate(features, labels, groups, splits, cnn_blocks, target_precision, seed)
    return (
        EvaluationReport(
            protocol=protocol,
            embedder=embedder,
            metrics=compute_metrics(y, probs, predicted),
            at_half=at_half(y, probs),
            folds=rows,
            target_precision=target_precision,
            axis=axis if protocol == "spatial" else None,
        ),
        y,
        probs,
    )


def plot_pr_curve(labels: np.ndarray, probs: np.ndarray, title: str, path: str | Path) -> None:
    """Precision-recall curve PNG: the picture that shows what a threshold trades away."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import average_precision_score, precision_recall_curve

    from .. import atomic

    precision, recall, _ = precision_recall_curve(labels, probs)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.plot(recall, precision, lw=2, label=f"AP {average_precision_score(labels, probs):.3f}")
    ax.axhline(labels.mean(), ls=":", c="grey", label="chance")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())
