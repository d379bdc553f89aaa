"""Which unlabelled superpixels to label next, so that a few labels teach a model the most.

Why: a model trained in one area loses precision in the next (the README's spatial protocol). A
user who labels a few superpixels of the new area and retrains gets part of that back, and which
few matters. ``training/adaptation.py`` measures the strategies below on the shared data and
chose ``DEFAULT_STRATEGY`` by that measurement: ``stratified``. On the five longitude bands,
retrained with the picks and the threshold re-chosen on them (what ``retrain`` ships), its F1 on
the rest of the band was 0.809 / 0.881 / 0.887 at 10 / 20 / 50 labels against random picks'
0.758 / 0.840 / 0.865, and at 20 labels it beat random in each of the 3 seeds, at the retrained
model's own threshold too (``training/results/adaptation.md``). The others stay: the measurement
is on 860 crops in five bands, and a user's pool may differ.

Strategies, all seeded and deterministic:

- ``margin``: uncertainty sampling with the model itself. The superpixels whose probability is
  closest to the model's own threshold (not to 0.5: the threshold is where the model's decision
  flips, and it is set per model for a target precision).
- ``typical``: TypiClust (Hacohen, Dekel and Weinshall, ICML 2022). k-means splits the pool into
  ``n`` clusters in the standardised *classifier view* (the booster's inputs: one score per CNN
  block's linear head, then the hand-made features), and the most typical superpixel of each
  cluster is picked: the highest inverse mean distance to its ``TYPICALITY_NEIGHBOURS`` nearest
  neighbours in its cluster. The paper finds that with few labels typical, varied examples beat
  uncertain ones, which tend to be near-duplicates (superpixels of one confusing scene) or outliers.
- ``mix``: uncertainty first, then diversity (Zhdanov 2019, "Diverse mini-batch active
  learning"): the ``MIX_CANDIDATES`` × ``n`` superpixels closest to the threshold are clustered
  into ``n`` clusters and the most typical one of each is picked. So the picks are uncertain but
  not redundant. This was chosen over a half-margin/half-typical split because it never spends a
  label on a point the model is sure about.
- ``stratified``: the pool ranked by the model's probability and cut into ``n`` strata of equal
  size, one uniform draw from each. The picks cover the whole range of scores, so they hold both
  classes and the scores around any threshold: what re-choosing the threshold on them needs, in an
  area where the model's probabilities no longer mean what they did in training. Unlike
  ``margin`` it does not bet the budget on the old threshold, and unlike ``random`` it cannot
  leave out the top scores, where a new area's false positives sit.
- ``random``: uniform picks, the yardstick every strategy must beat.

scikit-activeml (1.0.1) was checked. Its ``UncertaintySampling`` margin is the gap between the two
class probabilities, i.e. distance to 0.5, not to the model's threshold, and it expects a
scikit-learn estimator wrapped in its own classifier class, while ours is a booster over linear
heads: it does not fit ``margin``. Its ``TypiClust`` does fit (run on the pool alone, with no
labelled points). On the held-out bands of ``training/adaptation.py``, with the same k-means seed
and neighbours, it picks the same superpixels as ``typical`` below except between equally typical
points (the two members of a 2-point cluster), where it draws at random and we take the lower
index. It is not used: these few lines on scikit-learn, already a dependency, do the same without
adding a package (and its ``makefun`` dependency) to every install.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DatasetError, ModelBundleError
from ..model.classify import Classifier, ModelBundle

STRATEGIES = ("margin", "typical", "mix", "stratified", "random")
#: Chosen by ``training/adaptation.py`` (``training/results/adaptation.md``): the strategy with the
#: best F1 on the rest of a held-out band after retraining with the threshold re-chosen on the
#: picks (as ``retrain`` does), averaged over 10, 20 and 50 labels.
DEFAULT_STRATEGY = "stratified"
#: TypiClust's neighbourhood for typicality (the paper's K=20), capped by the cluster's size.
TYPICALITY_NEIGHBOURS = 20
#: ``mix`` clusters this many times ``n`` of the superpixels closest to the threshold.
MIX_CANDIDATES = 3
#: k-means sees at most this many superpixels (a seeded sample stands for a larger pool), so a
#: country-wide run's pool costs seconds, not hours; typical points of a big sample are typical.
CLUSTER_SAMPLE = 20_000


@dataclass(frozen=True)
class Suggestion:
    """One superpixel worth labelling: its row in the pool, the strategy that picked it, the
    model's probability of mining for it, and why it was picked (for the user's list)."""

    index: int
    strategy: str
    probability: float
    reason: str


def suggest(
    model: ModelBundle | Classifier,
    features: np.ndarray,
    n: int,
    strategy: str = DEFAULT_STRATEGY,
    *,
    threshold: float | None = None,
    seed: int = 0,
    cluster_sample: int = CLUSTER_SAMPLE,
) -> list[Suggestion]:
    """The ``n`` superpixels of the pool ``features`` (one unlabelled embedding per row) most worth
    labelling next, best first; all of them when the pool holds ``n`` or fewer.

    ``threshold`` defaults to the bundle's own; a bare ``Classifier`` has none, so ``margin`` and
    ``mix`` need it passed. ``seed`` drives k-means and random picks; the same inputs give the
    same picks. ``cluster_sample``: see ``CLUSTER_SAMPLE``.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if n < 1:
        raise ConfigError(f"-n {n}: ask for at least 1 superpixel to label")
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or len(features) == 0:
        raise DatasetError("the pool holds no superpixels; point it at unlabelled images or a scanned run")
    if isinstance(model, ModelBundle):
        classifier = model.classifier
        probs = model.predict_proba(features)  # checks the embedding's width against the bundle
        threshold = model.metadata.threshold if threshold is None else threshold
    else:
        classifier = model
        if features.shape[1] != classifier.dim:
            raise ModelBundleError(
                f"pool features have {features.shape[1]} dimensions but the classifier expects {classifier.dim}; "
                "embed the pool with the model's embedder"
            )
        probs = classifier.predict_proba(features)
    if threshold is None and strategy in ("margin", "mix"):
        raise ConfigError(f"strategy {strategy!r} needs the model's threshold; pass a model bundle or a threshold")
    n = min(n, len(features))
    rng = np.random.default_rng(seed)
    if strategy == "random":
        picks = rng.choice(len(features), n, replace=False)
        return [Suggestion(int(i), strategy, float(probs[i]), "drawn at random") for i in picks]
    if strategy == "stratified":
        return [
            Suggestion(int(i), strategy, float(probs[i]), f"drawn from score stratum {k + 1} of {n}")
            for k, i in enumerate(score_strata_picks(probs, n, rng))
        ]
    if strategy == "margin":
        return [
            Suggestion(
                int(i), strategy, float(probs[i]), f"{abs(probs[i] - threshold):.3f} from threshold {threshold:.3f}"
            )
            for i in closest_to_threshold(probs, threshold, n)
        ]
    view = classifier_view(classifier, features)
    if strategy == "typical":
        candidates = np.arange(len(features))
    else:
        candidates = closest_to_threshold(probs, threshold, min(MIX_CANDIDATES * n, len(features)))
    out = []
    for i, cluster, size in typical_picks(view, candidates, n, rng, cluster_sample):
        where = f"most typical of cluster {cluster} ({size} superpixels"
        if strategy == "typical":
            out.append(Suggestion(int(i), strategy, float(probs[i]), where + ")"))
        else:
            near = f"{abs(probs[i] - threshold):.3f} from threshold {threshold:.3f}"
            out.append(Suggestion(int(i), strategy, float(probs[i]), f"{where} near the threshold), {near}"))
    return out


def score_strata_picks(probs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """One uniform draw from each of ``n`` equal-count strata of the pool ranked by probability,
    highest stratum first (ties in rank: lower index first)."""
    order = np.argsort(-np.asarray(probs, np.float64), kind="stable")
    return np.array([stratum[rng.integers(len(stratum))] for stratum in np.array_split(order, n)], np.int64)


def closest_to_threshold(probs: np.ndarray, threshold: float, n: int) -> np.ndarray:
    """Indices of the ``n`` probabilities closest to ``threshold``, closest first (ties: lower index)."""
    return np.argsort(np.abs(np.asarray(probs, np.float64) - threshold), kind="stable")[:n]


def classifier_view(classifier: Classifier, features: np.ndarray) -> np.ndarray:
    """The booster's inputs, standardised over the pool: the space in which this model tells
    superpixels apart. Raw embeddings would let thousands of CNN channels the model summarises
    into a few head scores dominate every distance."""
    view = classifier.tree_features(features).astype(np.float64)
    return (view - view.mean(axis=0)) / (view.std(axis=0) + 1e-9)


def typical_picks(
    view: np.ndarray, candidates: np.ndarray, n: int, rng: np.random.Generator, cluster_sample: int
) -> list[tuple[int, int, int]]:
    """TypiClust over ``view[candidates]``: ``(index, cluster, cluster size)`` of the most typical
    member of each of ``n`` k-means clusters, largest cluster first.

    Identical points can leave clusters empty; the remaining picks then go to the most typical
    points not yet picked, so exactly ``min(n, len(candidates))`` come back.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    if len(candidates) > cluster_sample:
        candidates = np.sort(rng.choice(candidates, cluster_sample, replace=False))
    n = min(n, len(candidates))
    points = view[candidates]
    seed = int(rng.integers(2**31 - 1))
    with warnings.catch_warnings():  # identical points leave clusters empty: handled below
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = KMeans(n_clusters=n, random_state=seed).fit_predict(points)
    typicality = np.empty(len(points))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        typicality[members] = _typicality(points[members])
    ids, sizes = np.unique(labels, return_counts=True)
    picks = []
    for c, size in sorted(zip(ids, sizes), key=lambda t: (-t[1], t[0])):
        members = np.flatnonzero(labels == c)
        picks.append((int(candidates[members[np.argmax(typicality[members])]]), int(c), int(size)))
    chosen = {i for i, _, _ in picks}
    for k in np.argsort(-typicality, kind="stable"):
        if len(picks) == n:
            break
        if candidates[k] not in chosen:
            picks.append((int(candidates[k]), int(labels[k]), int(sizes[ids == labels[k]][0])))
    return picks


def _typicality(points: np.ndarray) -> np.ndarray:
    """Inverse mean distance to the ``TYPICALITY_NEIGHBOURS`` nearest other points (TypiClust)."""
    if len(points) == 1:
        return np.ones(1)
    from sklearn.neighbors import NearestNeighbors

    k = min(TYPICALITY_NEIGHBOURS, len(points) - 1)
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
    return 1.0 / (dist[:, 1:].mean(axis=1) + 1e-9)
