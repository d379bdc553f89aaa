"""Evaluation protocols, from the study's optimistic split to the honest spatial one.

- ``seed-split``: the study's published 70/30 split (random_state=43), for comparison only: crops
  of one scene land on both sides, so it rewards memorising scenes.
- ``grouped``: k-fold with every footprint group (scenes that overlap or touch, see
  ``dataset.footprint_groups``) wholly in one fold: the honest number within one area.
- ``spatial``: k bands along longitude or latitude, train on k-1, test on the held-out band:
  what users meet when they scan a new area. Footprint groups are kept whole here too.

Every fold trains exactly as ``train`` does, threshold selection included, so the reported
precision is the precision a shipped model would have, not one tuned on the test fold. The
hyper-parameters (``LINEAR_C``, ``XGB_PARAMS``) are fixed module constants unless a nested
``fitter`` chooses them inside each fold from that fold's training part alone.

Reports carry every tested crop's probability, fold and group (``predictions``), so a model's
mistakes can be looked at crop by crop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DatasetError
from ..model.classify import TARGET_PRECISION, Classifier, ThresholdChoice, fit_with_threshold, grouped_splits
from .dataset import group_sizes

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
class Prediction:
    """One tested crop: what the model said about it, and where it was tested.

    ``file`` is relative to the dataset folder; ``fold`` is the fold that tested it (``None``
    for a trained model scored on another folder); ``group`` is its footprint group.
    """

    file: str
    label: int
    probability: float
    fold: int | None
    group: str


@dataclass(frozen=True)
class FoldResult:
    """One fold's threshold (picked on its own training part), its test metrics, and the
    hyper-parameters it used when a nested selection chose them (empty otherwise)."""

    fold: int
    n_test: int
    threshold: float
    roc_auc: float
    f1: float
    precision: float
    recall: float
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationReport:
    """What ``amber-hunter evaluate`` prints and writes with ``--json``.

    ``n_groups`` and ``largest_group`` describe the footprint groups of the evaluated crops: a
    few huge groups would make folds lopsided. ``selection`` says where the hyper-parameters came
    from: ``fixed`` (the module constants, chosen on this project's data) or ``nested`` (chosen
    inside each fold). ``predictions`` come last: they are long.
    """

    protocol: str
    embedder: str
    metrics: Metrics
    at_half: dict  # precision/recall/f1 at threshold 0.5, as the study reported them
    folds: list[FoldResult] = field(default_factory=list)
    target_precision: float = TARGET_PRECISION
    axis: str | None = None
    n_groups: int = 0
    largest_group: int = 0
    selection: str = "fixed"
    predictions: list[Prediction] = field(default_factory=list)

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
    """Band index per sample along one axis, with every group wholly in one band.

    A group (footprint group, or any grouping the caller passes) can straddle a band edge: its
    scenes span up to a few grid steps. It is assigned whole to the band of its *midpoint* (the
    middle of its crops' coordinate range), so no group is split across train and test; its
    footprint may still reach a little over the edge into the neighbouring band. One coordinate
    per group also absorbs the float noise with which a scene's crops carry its coordinates.

    Edges sit at the quantiles of the positive groups' midpoints, so every band holds positives.
    A constant shift of all coordinates (e.g. names giving a corner instead of the centre) moves
    the edges with them and changes no band.
    """
    if np.isnan(coords).any():
        raise DatasetError(
            f"{int(np.isnan(coords).sum())} crops have no coordinates in their file names; the spatial "
            "protocol needs the study's <lat>_<lon>_<date>_super_<n> names (use --protocol grouped)"
        )
    names, index = np.unique(groups, return_inverse=True)
    low = np.full(len(names), np.inf)
    high = np.full(len(names), -np.inf)
    np.minimum.at(low, index, coords)
    np.maximum.at(high, index, coords)
    midpoint = (low + high) / 2
    positive = np.zeros(len(names), bool)
    positive[index[labels == 1]] = True
    pos_coords = np.sort(midpoint[positive])
    if len(pos_coords) < folds:
        raise DatasetError(
            f"only {len(pos_coords)} positive scene groups for {folds} spatial bands (scenes that overlap or "
            "touch count as one); use fewer --folds"
        )
    edges = np.quantile(pos_coords, np.linspace(0, 1, folds + 1)[1:-1])
    return np.digitize(midpoint, edges)[index]


def spatial_folds(coords, labels, groups, folds: int):
    bands = spatial_bands(coords, labels, groups, folds)
    return [(np.flatnonzero(bands != b), np.flatnonzero(bands == b)) for b in range(folds)]


@dataclass(frozen=True)
class FoldModel:
    """What one fold's training produced: the classifier, its threshold, and the
    hyper-parameters a nested selection chose for it (empty for the fixed constants)."""

    classifier: Classifier
    choice: ThresholdChoice
    params: dict = field(default_factory=dict)


#: Trains one fold: ``(features, labels, groups, cnn_blocks, target_precision, seed) -> FoldModel``.
Fitter = Callable[[np.ndarray, np.ndarray, np.ndarray, Sequence, float, int], FoldModel]


def fit_fixed(features, labels, groups, cnn_blocks, target_precision: float, seed: int) -> FoldModel:
    """Train as ``amber-hunter train`` does, with the module's fixed hyper-parameters."""
    clf, choice = fit_with_threshold(features, labels, groups, cnn_blocks, target_precision, seed)
    return FoldModel(clf, choice)


@dataclass(frozen=True)
class Candidate:
    """One hyper-parameter setting a nested selection may choose: the linear heads' inverse L2
    strength and overrides of ``XGB_PARAMS``."""

    linear_c: float
    xgb: dict = field(default_factory=dict)

    def as_params(self) -> dict:
        return {"linear_c": self.linear_c, **self.xgb}


#: The nested check's grid: the shipped ``LINEAR_C`` (0.01) and ``max_depth`` (3) and their
#: neighbours. Small on purpose (6 settings): every setting costs a full inner cross-validation.
NESTED_GRID = tuple(Candidate(c, {"max_depth": d}) for c in (0.003, 0.01, 0.03) for d in (2, 3))


def _fit_candidate(features, labels, groups, cnn_blocks, candidates: Sequence[Candidate], seed: int) -> list:
    """Fit ``fit_classifier``'s model once per candidate, sharing the linear heads between
    candidates with the same ``linear_c`` (they do not depend on the XGBoost settings).

    Mirrors ``classify.fit_classifier`` step for step (out-of-fold head scores for the booster,
    heads refitted on everything); a test checks both give the same model for the defaults.
    """
    from ..model.classify import LinearHead, fit_booster

    dim = features.shape[1]
    heads_by_c: dict[float, tuple[list, np.ndarray | None]] = {}
    models = []
    for cand in candidates:
        if cand.linear_c not in heads_by_c:
            if cnn_blocks:
                oof = np.zeros((len(labels), len(cnn_blocks)), np.float32)
                for train, test in grouped_splits(labels, groups, 5, seed):
                    for k, block in enumerate(cnn_blocks):
                        head = LinearHead.fit(features[train], labels[train], block, c=cand.linear_c)
                        oof[test, k] = head.score(features[test])
                heads = [LinearHead.fit(features, labels, block, c=cand.linear_c) for block in cnn_blocks]
                heads_by_c[cand.linear_c] = (heads, oof)
            else:
                heads_by_c[cand.linear_c] = ([], None)
        heads, oof = heads_by_c[cand.linear_c]
        partial = Classifier(None, heads, dim)
        booster = fit_booster(partial.tree_features(features, oof), labels, seed, cand.xgb)
        models.append(Classifier(booster, heads, dim))
    return models


@dataclass(frozen=True)
class NestedFitter:
    """A ``Fitter`` that chooses its hyper-parameters inside the fold it trains.

    Why: ``LINEAR_C``, ``XGB_PARAMS`` (and the target precision) were chosen by looking at the
    same grouped and spatial results the README reports, so those figures are optimistic by an
    unknown amount. Here each outer fold runs an inner grouped cross-validation on its training
    part only, scores every candidate by the average precision (PR AUC) of its pooled inner
    out-of-fold probabilities, keeps the best (ties: the first in ``grid``), picks the threshold
    on that candidate's inner out-of-fold probabilities (the same rule and folds as
    ``fit_with_threshold``), and refits it on the whole training part. The outer test fold is
    never looked at. The target precision itself is not re-chosen: it is an operating point the
    user picks, and its threshold is still set on training data only.

    Candidates with no CNN blocks to apply ``linear_c`` to collapse to their distinct XGBoost
    settings, so a texture-only embedder pays only for those.
    """

    grid: tuple[Candidate, ...] = NESTED_GRID
    inner_folds: int = 5

    def candidates(self, cnn_blocks) -> list[Candidate]:
        if cnn_blocks:
            return list(self.grid)
        distinct: dict[str, Candidate] = {}
        for cand in self.grid:
            distinct.setdefault(repr(sorted(cand.xgb.items())), cand)
        return list(distinct.values())

    def __call__(self, features, labels, groups, cnn_blocks, target_precision: float, seed: int) -> FoldModel:
        from sklearn.metrics import average_precision_score

        from ..model.classify import choose_threshold

        candidates = self.candidates(cnn_blocks)
        oof = np.zeros((len(candidates), len(labels)), np.float32)
        for train, test in grouped_splits(labels, groups, self.inner_folds, seed):
            models = _fit_candidate(features[train], labels[train], groups[train], cnn_blocks, candidates, seed)
            for k, model in enumerate(models):
                oof[k, test] = model.predict_proba(features[test])
        scores = [float(average_precision_score(labels, p)) for p in oof]
        best = int(np.argmax(scores))
        choice = choose_threshold(labels, oof[best], target_precision)
        (model,) = _fit_candidate(features, labels, groups, cnn_blocks, [candidates[best]], seed)
        params = candidates[best].as_params()
        if not cnn_blocks:  # no head to regularise: linear_c was not chosen
            params.pop("linear_c")
        return FoldModel(model, choice, {**params, "inner_pr_auc": scores[best]})


@dataclass(frozen=True)
class CrossValidation:
    """Out-of-fold results over all samples: ``probs`` is NaN and ``fold`` -1 where a sample
    was never tested (the seed-split's training part)."""

    probs: np.ndarray
    predicted: np.ndarray
    fold: np.ndarray
    folds: list[FoldResult]

    @property
    def tested(self) -> np.ndarray:
        return self.fold >= 0


def cross_validate(
    features, labels, groups, splits, cnn_blocks, target_precision: float, seed: int = 0, fitter: Fitter = fit_fixed
) -> CrossValidation:
    """Train with ``fitter`` (by default as ``train`` does) on each split and score its test part."""
    probs = np.full(len(labels), np.nan, np.float32)
    predicted = np.zeros(len(labels), np.int32)
    fold_of = np.full(len(labels), -1, np.int32)
    rows = []
    for k, (train, test) in enumerate(splits):
        model = fitter(features[train], labels[train], groups[train], cnn_blocks, target_precision, seed)
        p = model.classifier.predict_proba(features[test])
        probs[test], predicted[test], fold_of[test] = p, (p >= model.choice.threshold), k
        m = compute_metrics(labels[test], p, predicted[test])
        rows.append(
            FoldResult(k, len(test), model.choice.threshold, m.roc_auc, m.f1, m.precision, m.recall, model.params)
        )
    return CrossValidation(probs, predicted, fold_of, rows)


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
    files: Sequence[str] | None = None,
    fitter: Fitter = fit_fixed,
    selection: str = "fixed",
) -> tuple[EvaluationReport, np.ndarray, np.ndarray]:
    """Run one protocol on precomputed features; also return the pooled labels and probabilities
    (for the PR curve).

    ``groups`` are what folds keep whole (footprint groups from ``Dataset.groups``); ``names``
    are file names (the seed-split sorts by them); ``files`` name the crops in the report's
    predictions (default: ``names``). ``fitter`` trains each fold; ``selection`` names it in the
    report.
    """
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
    cv = cross_validate(features, labels, groups, splits, cnn_blocks, target_precision, seed, fitter)
    tested = cv.tested
    y, probs = labels[tested], cv.probs[tested]
    sizes = group_sizes(groups)
    return (
        EvaluationReport(
            protocol=protocol,
            embedder=embedder,
            metrics=compute_metrics(y, probs, cv.predicted[tested]),
            at_half=at_half(y, probs),
            folds=cv.folds,
            target_precision=target_precision,
            axis=axis if protocol == "spatial" else None,
            n_groups=sizes.n_groups,
            largest_group=sizes.largest,
            selection=selection,
            predictions=predictions(files if files is not None else names, labels, cv.probs, cv.fold, groups),
        ),
        y,
        probs,
    )


def predictions(files: Sequence[str], labels, probs, fold, groups) -> list[Prediction]:
    """One ``Prediction`` per tested crop (``fold`` < 0 or NaN probability: untested, left out),
    in dataset order. ``fold`` may be ``None`` for all crops (a trained model scored as is)."""
    out = []
    for i, (f, y, p, g) in enumerate(zip(files, labels, probs, groups)):
        k = None if fold is None else int(fold[i])
        if np.isnan(p) or (k is not None and k < 0):
            continue
        out.append(Prediction(str(f), int(y), float(p), k, str(g)))
    return out


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
