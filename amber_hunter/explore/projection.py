"""2-D projections of what the classifier sees, cached by embedder, model and data.

Projecting raw CNN activations would show what ImageNet finds similar, not what the model uses.
So the projected space is the booster's own input (``classifier_view``): for a CNN embedder, the
score of each conv block's linear head next to the hand-made features; for a hand-made embedder,
its features. Every column is standardised, so no feature dominates by its units alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from .. import atomic
from ..errors import ConfigError

METHODS = ("umap", "pca", "tsne")
#: Bump when the projection of the same inputs changes, so stale cached layouts are not reused.
PROJECTION_VERSION = "1"


def classifier_view(features: np.ndarray, bundle=None) -> tuple[np.ndarray, str]:
    """The standardised space the classifier works in, and a sentence saying what it is.

    With a model whose embedder has CNN blocks: its heads' scores plus the hand-made columns.
    With no model: the features themselves (square-rooted first when they look like ReLU
    activations, as the heads do).
    """
    features = np.asarray(features, np.float32)
    if bundle is not None and bundle.classifier.heads:
        view = bundle.classifier.tree_features(features)
        what = (f"{bundle.metadata.embedder}: the score of each of the {len(bundle.classifier.heads)} conv-block "
                f"heads plus {view.shape[1] - len(bundle.classifier.heads)} hand-made features, standardised")
    else:
        view = features
        name = bundle.metadata.embedder if bundle is not None else "embedding"
        what = f"{name}: {features.shape[1]} features, standardised"
    view = np.nan_to_num(view.astype(np.float64))
    std = view.std(axis=0)
    return ((view - view.mean(axis=0)) / np.where(std > 0, std, 1.0)).astype(np.float32), what


@contextlib.contextmanager
def _without_tensorflow():
    """umap-learn's package import tries ParametricUMAP, which imports TensorFlow (a minute on a
    CPU box) when it is installed. Hide it for that import only, unless it is loaded already."""
    if "tensorflow" in sys.modules:
        yield
        return
    sys.modules["tensorflow"] = None  # makes ``import tensorflow`` raise ImportError
    try:
        yield
    finally:
        if sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]


def project(view: np.ndarray, method: str = "umap", seed: int = 0) -> np.ndarray:
    """``float32 (n, 2)`` coordinates of the rows of ``view``."""
    if method not in METHODS:
        raise ConfigError(f"unknown projection {method!r}; choose one of {', '.join(METHODS)}")
    n = len(view)
    if n < 3:
        raise ConfigError(f"{n} points are too few to project; explore needs at least 3 superpixels")
    if method == "pca" or view.shape[1] < 2:
        from sklearn.decomposition import PCA

        out = PCA(n_components=min(2, view.shape[1]), random_state=seed).fit_transform(view)
        if out.shape[1] < 2:
            out = np.column_stack([out, np.zeros(n)])
    elif method == "tsne":
        from sklearn.manifold import TSNE

        out = TSNE(2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed).fit_transform(view)
    else:
        with _without_tensorflow(), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import umap

        reducer = umap.UMAP(n_neighbors=min(15, n - 1), min_dist=0.1, random_state=seed, n_jobs=1,
                            init="spectral" if n > 15 else "random")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = reducer.fit_transform(view)
    return np.asarray(out, np.float32)


def cache_key(**parts) -> str:
    """A short hash of what decides a cached result (embedder, model, data, method, seed...)."""
    text = json.dumps({"version": PROJECTION_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class ArrayCache:
    """``.npz`` files in one folder, by key; written atomically, so a killed process leaves none
    half-written. A corrupt or unreadable entry counts as absent."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, kind: str, key: str) -> Path:
        return self.folder / f"{kind}-{key}.npz"

    def get(self, kind: str, key: str) -> dict[str, np.ndarray] | None:
        try:
            with np.load(self.path(kind, key), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError):
            return None

    def put(self, kind: str, key: str, **arrays) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        try:
            atomic.write_bytes(self.path(kind, key), buf.getvalue())
        except OSError:  # a read-only data folder: explore still works, just uncached
            pass


def cached_projection(view: np.ndarray, method: str, cache: ArrayCache | None, seed: int = 0,
                      **key_parts) -> tuple[np.ndarray, bool]:
    """``project`` through ``cache``; returns ``(xy, from_cache)``."""
    key = cache_key(kind="projection", method=method, seed=seed, n=len(view), dim=view.shape[1], **key_parts)
    if cache is not None:
        hit = cache.get("projection", key)
        if hit is not None and hit["xy"].shape == (len(view), 2):
            return hit["xy"], True
    xy = project(view, method, seed)
    if cache is not None:
        cache.put("projection", key, xy=xy)
    return xy, False
