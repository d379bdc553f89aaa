"""The points of the scatterplot: a labelled dataset's crops or a run's superpixels.

A labelled dataset gets out-of-fold predictions from the grouped protocol (``learn.evaluate``,
every fold trained as ``train`` does, threshold included), so each crop falls in a confusion cell
(TP, FP, FN, TN) that says how a model would have treated it had it never seen its scene. They
are cached by embedder, data and settings. A run's superpixels get the probability the scan gave
them (or the one ``--model`` gives their stored embeddings).

Pictures: a dataset crop is its file. A run's superpixel is cut from its scene, stitched again
from the run's tiles (a local source, or the run's tile cache for an HTTP source: never
refetched) and segmented again with the model's SLIC settings, which gives back the scan's
superpixels exactly.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, RunStoreError, SceneUnavailableError
from ..learn.labels import CropKey, LabelStore, SuperpixelKey
from ..run.rescore import stored_vectors
from ..run.resegment import Resegmented, resegment
from .projection import ArrayCache, cache_key, cached_projection, classifier_view

#: Confusion cells and their colours (ColorBrewer RdYlBu, mistakes in warm colours).
CELLS = ("TP", "FP", "FN", "TN")
CELL_COLOURS = {"TP": "#1a9850", "FP": "#d73027", "FN": "#fc8d59", "TN": "#4575b4", "": "#999999"}
LABEL_COLOURS = {"mining": "#d73027", "not mining": "#4575b4", "unlabelled": "#bbbbbb"}
CLUSTER_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd")
THUMB_PX = 96
CONTEXT_PX = 320
#: The outline drawn around a superpixel in its context picture.
OUTLINE_RGB = (255, 255, 0)
#: ImageNet-like ground scale of the data: 0.38 m per pixel.
M_PER_PX = 0.38


def _viridis(p: np.ndarray) -> list[str]:
    from bokeh.palettes import Viridis256

    out = []
    for v in p:
        out.append("#999999" if not np.isfinite(v) else Viridis256[int(np.clip(v, 0, 1) * 255)])
    return out


# --- plain words for the hand-made features ----------------------------------------------------


def _blob_metres(tag: str) -> str:
    sigma = float(tag[1:])
    return f"{3.6 * sigma * M_PER_PX:.0f} m"


def plain_words(name: str) -> str:
    """A texture feature's name in words a journalist reads (``round_pit_count_s2.4`` → …)."""
    colours = {"red_share": "share of red", "green_share": "share of green",
               "excess_green": "greenness (vegetation)", "saturation": "colour saturation"}
    tenth = {"10": "in its lowest tenth", "50": "typically", "90": "in its highest tenth"}
    if m := re.fullmatch(r"(red_share|green_share|excess_green|saturation)_q(\d+)", name):
        return f"{colours[m[1]]} {tenth.get(m[2], m[2])}"
    if m := re.fullmatch(r"lum_q(\d+)", name):
        return f"brightness {tenth.get(m[1], m[1])}"
    if name == "lum_spread_ratio":
        return "contrast between light and dark"
    if m := re.fullmatch(r"(bright|dark)_frac_([\d.]+)", name):
        return f"area much {'brighter' if m[1] == 'bright' else 'darker'} than the rest ({m[2]}× the spread)"
    if name == "sand_frac":
        return "area of bright bare sand"
    if m := re.fullmatch(r"(dark|bright)_blob_mean_(s[\d.]+)", name):
        return f"strength of {m[1]} blobs about {_blob_metres(m[2])} across"
    if m := re.fullmatch(r"(dark|bright)_blob_frac_(s[\d.]+)", name):
        return f"area covered by {m[1]} blobs about {_blob_metres(m[2])} across"
    if m := re.fullmatch(r"(dark|bright)_blob_count_(s[\d.]+)_t([\d.]+)", name):
        strength = {"0.5": "faint", "1": "clear", "2": "strong"}.get(m[3], m[3])
        return f"number of {strength} {m[1]} blobs about {_blob_metres(m[2])} across"
    if m := re.fullmatch(r"rimmed_pit_count_(s[\d.]+)", name):
        return f"number of dark pits about {_blob_metres(m[1])} across with bright sand rims"
    if m := re.fullmatch(r"round_pit_count_(s[\d.]+)", name):
        return f"number of round dark pits about {_blob_metres(m[1])} across"
    if m := re.fullmatch(r"pit_roundness_(s[\d.]+)", name):
        return f"roundness of dark pits about {_blob_metres(m[1])} across"
    if name.startswith("gradient_"):
        return "strength of edges" + (" (strongest tenth)" if name.endswith("q90") else "")
    if m := re.fullmatch(r"(coherence_weighted|coherence_mean|coherent_frac)_w(\d+)(?:_c([\d.]+))?", name):
        return f"straight, linear texture such as roads or field rows, over about {int(m[2]) * M_PER_PX:.0f} m"
    if name == "bbox_anisotropy":
        return "elongated shape of the superpixel"
    if m := re.fullmatch(r"head (\d+)", name):
        return f"what CNN block {m[1]}'s linear head sees (learned, not hand-made)"
    return name.replace("_", " ")


def tree_feature_names(embedder, bundle) -> list[str]:
    """Names of the booster's input columns: one per CNN head, then the other columns."""
    names = []
    for part in getattr(embedder, "parts", [embedder]):
        own = getattr(part, "feature_names", None)
        names += list(own) if own and len(own) == part.dim else [f"{part.name}[{j}]" for j in range(part.dim)]
    heads = bundle.classifier.heads
    if not heads:
        return names
    from ..model.classify import _column_index

    cnn = set(np.concatenate([_column_index(h.columns) for h in heads]).tolist())
    return [f"head {k + 1}" for k in range(len(heads))] + [n for j, n in enumerate(names) if j not in cnn]


# --- the points --------------------------------------------------------------------------------


@dataclass
class Points:
    """Everything the app shows about ``n`` superpixels, in one order.

    ``truth`` is the dataset's label (folder or labels CSV; -1 on a run), ``probability`` the
    out-of-fold (dataset) or scan (run) probability, ``cell`` the confusion cell ("" on a run).
    ``keys`` are the label-store keys. ``roots`` are the only folders whose files are served.
    """

    kind: str  # "dataset" | "run"
    xy: np.ndarray
    view: np.ndarray
    features: np.ndarray
    probability: np.ndarray
    predicted: np.ndarray
    truth: np.ndarray
    cell: list[str]
    scene: list[str]
    name: list[str]
    keys: list
    cluster: np.ndarray
    roots: list[Path]
    threshold: float
    what: str
    method: str
    title: str
    bundle: object
    cluster_method: str
    tree_names: list[str]
    #: Dataset: (root index, path relative to it) per point.
    files: list[tuple[int, str]] = field(default_factory=list)
    #: Run: scene id, SLIC label and whether the scene was flagged, per point.
    segments: list[int] = field(default_factory=list)
    flagged: np.ndarray | None = None
    run: object = None  # RunPictures for a run
    timings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.xy)

    # --- questions about one point ---------------------------------------------------------------

    def neighbours(self, i: int, k: int = 8) -> list[int]:
        """The ``k`` nearest other points in the classifier's (standardised) space."""
        d = ((self.view - self.view[i]) ** 2).sum(axis=1)
        d[i] = np.inf
        k = min(k, len(d) - 1)
        nearest = np.argpartition(d, k)[:k] if k < len(d) else np.arange(len(d))
        return [int(j) for j in nearest[np.argsort(d[nearest])]]

    def explain(self, i: int, top: int = 5) -> list[dict]:
        """The features that pushed this point's model score up or down most (XGBoost
        ``pred_contribs``, in log-odds), in plain words, with the value against the median."""
        return self.explain_many([i], top)[0]

    def explain_many(self, indices: Sequence[int], top: int = 5) -> list[list[dict]]:
        import xgboost as xgb

        clf = self.bundle.classifier
        tree = clf.tree_features(self.features[list(indices)])
        contribs = clf.booster.predict(xgb.DMatrix(tree), pred_contribs=True)[:, :-1]
        return [self._reasons(tree[k], contribs[k], top) for k in range(len(tree))]

    def _reasons(self, row: np.ndarray, contribs: np.ndarray, top: int) -> list[dict]:
        medians = self._tree_medians()
        order = np.argsort(-np.abs(contribs))[:top]
        out = []
        for j in order:
            value, median = float(row[j]), float(medians[j])
            out.append({
                "feature": self.tree_names[j], "words": plain_words(self.tree_names[j]),
                "contribution": round(float(contribs[j]), 4), "value": round(value, 4),
                "compared": "high" if value > median else "low" if value < median else "typical",
                "direction": "towards mining" if contribs[j] > 0 else "away from mining",
            })
        return out

    def _tree_medians(self) -> np.ndarray:
        if not hasattr(self, "_medians"):
            sample = self.features[:: max(1, len(self.features) // 2000)]
            self._medians = np.median(self.bundle.classifier.tree_features(sample), axis=0)
        return self._medians

    def model_probability(self, i: int) -> float:
        return float(self.bundle.predict_proba(self.features[i : i + 1])[0])

    # --- labels --------------------------------------------------------------------------------

    def current_labels(self, store: LabelStore | None) -> tuple[list[str], list[str]]:
        """``(label text, where it comes from)`` per point: the store's latest label wins over the
        dataset's folder label."""
        latest = store.latest() if store is not None else {}
        texts, origins = [], []
        for i, key in enumerate(self.keys):
            row = latest.get(key.key)
            if row is not None:
                texts.append("mining" if row.label == 1 else "not mining")
                origins.append("label store")
            elif self.truth[i] >= 0:
                texts.append("mining" if self.truth[i] == 1 else "not mining")
                origins.append("dataset")
            else:
                texts.append("unlabelled")
                origins.append("")
        return texts, origins

    # --- pictures ------------------------------------------------------------------------------

    def file(self, i: int) -> Path:
        root, rel = self.files[i]
        return self.roots[root] / rel

    def crop(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """What the embedder saw: the superpixel's bbox crop, and its mask over the crop (a
        dataset crop has none: the study kept the bbox only)."""
        if self.kind == "dataset":
            from ..images import read_rgb

            return read_rgb(self.file(i)), None
        return self.run.crop(self.scene[i], self.segments[i])

    def thumbnail(self, i: int, size: int = THUMB_PX, fmt: str = "PNG") -> bytes:
        return _png(self.crop(i)[0], size, fmt)

    def gradcam(self, i: int, embedder) -> tuple[bytes, str] | None:
        """The Grad-CAM picture of why the model scores this superpixel as it does (heat over the
        crop, the superpixel outlined on a run) and its one-line note; None for a model without
        CNN heads, whose reasons are the feature contributions alone."""
        from ..model.gradcam import gradcam, overlay

        crop, mask = self.crop(i)
        cam = gradcam(self.bundle, crop, mask, embedder=embedder)
        if cam is None:
            return None
        return _png(overlay(crop, cam.heatmap, mask), CONTEXT_PX), cam.note

    def context(self, i: int) -> bytes:
        """The superpixel in its context, outlined: the crop itself for a dataset (a crop *is*
        the superpixel's bbox), the surrounding scene for a run."""
        if self.kind == "dataset":
            from ..images import read_rgb

            image = read_rgb(self.file(i))
            return _png(_outline_box(image), CONTEXT_PX)
        return _png(self.run.context(self.scene[i], self.segments[i]), CONTEXT_PX)


def _png(image: np.ndarray, size: int, fmt: str = "PNG") -> bytes:
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image))
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    picture.save(buf, format=fmt, **({"quality": 80} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _outline_box(image: np.ndarray, width: int = 2) -> np.ndarray:
    out = image.copy()
    out[:width], out[-width:], out[:, :width], out[:, -width:] = OUTLINE_RGB, OUTLINE_RGB, OUTLINE_RGB, OUTLINE_RGB
    return out


#: How the cluster view groups superpixels: k-means (every point in a group, a fixed number of
#: groups) or HDBSCAN (groups of any number and shape; points in no dense group stay "unclustered").
CLUSTER_METHODS = ("kmeans", "hdbscan")


def clusters(view: np.ndarray, method: str = "kmeans", seed: int = 0) -> np.ndarray:
    """Groups of similar superpixels in the classifier's space, for labelling a group at once.

    k-means makes about one group per 60 points (2 to 16), so a dataset of a few hundred crops
    gives a list one can read in a minute. HDBSCAN finds the dense groups, whatever their number,
    and marks the rest -1: better for a run, where a few mining look-alikes (cemeteries, quarries)
    form small tight groups among a mass of fields and forest."""
    n = len(view)
    if method == "kmeans":
        from sklearn.cluster import KMeans

        k = min(int(np.clip(n // 60, 2, 16)), n)
        return KMeans(k, n_init=3, random_state=seed).fit_predict(view).astype(np.int32)
    if method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        if n < 3:
            return np.full(n, -1, np.int32)
        return HDBSCAN(min_cluster_size=max(5, n // 100), min_samples=5).fit_predict(view).astype(np.int32)
    raise ConfigError(f"unknown cluster method {method!r}; use one of {', '.join(CLUSTER_METHODS)}")


def _load_bundle(model):
    from ..model.classify import load_bundle, resolve_model

    return load_bundle(resolve_model(model))


def _model_hash(model) -> str:
    from ..run.config import model_hash

    return model_hash(None if model is None else str(model))


# --- a labelled dataset ------------------------------------------------------------------------


def load_dataset_points(
    data_dirs: Sequence[str | Path],
    model: str | Path | None = None,
    *,
    method: str = "umap",
    cache_dir: str | Path | None = None,
    labels_csv: str | Path | None = None,
    folds: int = 5,
    target_precision: float | None = None,
    seed: int = 0,
    cluster_method: str = "kmeans",
    progress: Callable | None = None,
) -> Points:
    """The crops of labelled folders, embedded with ``model``'s embedder (through the embedding
    cache), with grouped out-of-fold predictions and a projection, both cached."""
    import time

    from ..learn.cache import default_cache_dir, embed_files, embedder_key
    from ..learn.dataset import load_dataset
    from ..learn.evaluate import evaluate_features
    from ..model.embed import cnn_blocks

    t0 = time.perf_counter()
    bundle = _load_bundle(model)
    embedder = bundle.build_embedder()
    dataset = load_dataset(data_dirs, labels_csv)
    features, hashes = embed_files(dataset.paths, embedder, cache_dir, progress)
    t1 = time.perf_counter()
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = ArrayCache(cache_root / "explore")
    data_hash = dataset.content_hash(hashes)
    target = bundle.metadata.target_precision if target_precision is None else target_precision
    labels = dataset.labels
    oof_key = cache_key(kind="oof", embedder=embedder_key(embedder), data=data_hash, folds=folds, seed=seed,
                        target=target, order=hashlib.sha256("\n".join(hashes).encode()).hexdigest())
    hit = cache.get("oof", oof_key)
    if hit is None or hit["probability"].shape != (len(labels),):
        roots = [Path(d) for d in data_dirs]
        report, _, _ = evaluate_features(
            features, labels, dataset.groups, [p.name for p in dataset.paths], protocol="grouped",
            embedder=embedder.name, cnn_blocks=cnn_blocks(embedder), folds=folds, target_precision=target,
            seed=seed, files=dataset.files(roots),
        )
        probability = np.full(len(labels), np.nan, np.float32)
        predicted = np.zeros(len(labels), np.int8)
        thresholds = {f.fold: f.threshold for f in report.folds}
        index = {f: i for i, f in enumerate(dataset.files(roots))}
        for p in report.predictions:
            i = index[p.file]
            probability[i] = p.probability
            predicted[i] = p.probability >= thresholds[p.fold]
        cache.put("oof", oof_key, probability=probability, predicted=predicted)
    else:
        probability, predicted = hit["probability"], hit["predicted"]
    t2 = time.perf_counter()
    view, what = classifier_view(features, bundle)
    xy, _ = cached_projection(view, method, cache, seed, embedder=embedder_key(embedder),
                              model=_model_hash(model), data=data_hash)
    t3 = time.perf_counter()
    cell = [("T" if p == y else "F") + ("P" if p else "N") for p, y in zip(predicted, labels)]
    resolved = [Path(d).resolve() for d in data_dirs]
    files, keys = [], []
    for s, digest in zip(dataset.samples, hashes):
        path = s.path.resolve()
        root = next((k for k, r in enumerate(resolved) if path.is_relative_to(r)), None)
        if root is None:  # a crop a labels CSV added from elsewhere: its own folder is its root
            resolved.append(path.parent)
            root = len(resolved) - 1
        rel = path.relative_to(resolved[root]).as_posix()
        files.append((root, rel))
        keys.append(CropKey(digest, str(resolved[root]), rel))
    points = Points(
        kind="dataset", xy=xy, view=view, features=features, probability=probability,
        predicted=predicted.astype(np.int8), truth=labels.astype(np.int8), cell=cell,
        scene=[s.scene_id for s in dataset.samples], name=[s.path.name for s in dataset.samples], keys=keys,
        cluster=clusters(view, cluster_method, seed), roots=resolved, threshold=bundle.metadata.threshold, what=what,
        method=method, cluster_method=cluster_method, title=f"{len(labels)} crops of {', '.join(Path(d).name for d in data_dirs)}",
        bundle=bundle, tree_names=tree_feature_names(embedder, bundle), files=files,
    )
    points.timings = {"embed_s": t1 - t0, "oof_s": t2 - t1, "projection_s": t3 - t2}
    return points


# --- a run -------------------------------------------------------------------------------------


class RunPictures:
    """Scenes of a run, stitched again from its tiles and segmented as the scan did
    (``run.resegment``: never from the network); the last few are kept in memory."""

    KEEP = 6

    def __init__(self, store, bundle):
        self.store = store
        self.slic = bundle.slic_params()
        self._scenes: OrderedDict[str, Resegmented] = OrderedDict()
        self._lock = threading.Lock()

    def scene(self, scene_id: str) -> Resegmented:
        with self._lock:
            if scene_id in self._scenes:
                self._scenes.move_to_end(scene_id)
                return self._scenes[scene_id]
        entry = resegment(self.store, scene_id, self.slic)
        with self._lock:
            self._scenes[scene_id] = entry
            while len(self._scenes) > self.KEEP:
                self._scenes.popitem(last=False)
        return entry

    def _region(self, scene_id: str, segment: int):
        scene = self.scene(scene_id)
        if segment not in scene.regions:
            raise SceneUnavailableError(f"scene {scene_id} has no superpixel {segment} when segmented again")
        return scene, scene.regions[segment]

    def crop(self, scene_id: str, segment: int) -> tuple[np.ndarray, np.ndarray]:
        """The superpixel's bbox crop and its mask over the crop."""
        scene, region = self._region(scene_id, segment)
        return region.crop(scene.image), region.mask

    def context(self, scene_id: str, segment: int, margin: float = 1.0) -> np.ndarray:
        """The superpixel's bbox grown by ``margin`` bbox sides each way, its outline drawn."""
        from skimage.segmentation import find_boundaries

        scene, region = self._region(scene_id, segment)
        r0, c0, r1, c1 = region.bbox
        dr, dc = int((r1 - r0) * margin), int((c1 - c0) * margin)
        h, w = scene.labels.shape
        rs, cs = slice(max(r0 - dr, 0), min(r1 + dr, h)), slice(max(c0 - dc, 0), min(c1 + dc, w))
        out = scene.image[rs, cs].copy()
        edge = find_boundaries(scene.labels[rs, cs] == segment, mode="inner")
        edge |= np.roll(edge, 1, 0) | np.roll(edge, 1, 1)  # 2 px wide, visible once scaled down
        out[edge] = OUTLINE_RGB
        return out


def load_run_points(
    run_dir: str | Path,
    model: str | Path | None = None,
    *,
    method: str = "umap",
    seed: int = 0,
    cluster_method: str = "kmeans",
) -> Points:
    """The scored superpixels of a run, from its stored embeddings; ``model`` rescores them (its
    embedder must be the run's)."""
    from ..run.store import RunStore

    run_dir = Path(run_dir)
    store = RunStore(run_dir)
    try:
        done = [s for s in store.scenes() if s.status == "done"]
        if not done:
            raise RunStoreError(f"{run_dir} has no finished scene yet; run 'amber-hunter scan --run {run_dir}' first")
        if not store.embedders():
            raise RunStoreError(f"{run_dir} has no stored embeddings; rerun 'amber-hunter scan --run {run_dir} --force'")
        config = store.config
        run_model = config.model
        bundle = _load_bundle(model if model is not None else run_model)
        index, all_vectors = stored_vectors(store, bundle)  # checks the embedder and the width
        flagged_scene = {s.scene_id: s.flagged for s in done}
        stored = {}
        for s in done:
            for r in store.regions(s.scene_id):
                stored[(s.scene_id, r.label)] = r
        keys = sorted(k for k in index if k[0] in flagged_scene and k in stored)
        scene_ids = [s for s, _ in keys]
        seg_labels = [int(g) for _, g in keys]
        vectors = all_vectors[[index[k] for k in keys]].reshape(len(keys), -1)
        rescored = model is not None
        if rescored:
            probability = bundle.predict_proba(vectors)
        else:
            probability = np.array([stored[k].probability for k in zip(scene_ids, seg_labels)], np.float32)
        threshold = bundle.metadata.threshold
        predicted = (probability >= threshold).astype(np.int8)
        view, what = classifier_view(vectors, bundle)
        digest = hashlib.sha256(vectors.tobytes())
        digest.update("\n".join(f"{s}:{g}" for s, g in zip(scene_ids, seg_labels)).encode())
        xy, _ = cached_projection(view, method, ArrayCache(run_dir / "explore-cache"), seed,
                                  embedder=bundle.metadata.embedder, model=_model_hash(model or run_model),
                                  data=digest.hexdigest())
        pictures = RunPictures(store, _load_bundle(run_model))
    except BaseException:
        store.close()
        raise
    n = len(scene_ids)
    run_key = str(run_dir.resolve())
    return Points(
        kind="run", xy=xy, view=view, features=vectors, probability=probability, predicted=predicted,
        truth=np.full(n, -1, np.int8), cell=[""] * n, scene=scene_ids,
        name=[f"{s} #{g}" for s, g in zip(scene_ids, seg_labels)],
        keys=[SuperpixelKey(run_key, s, g) for s, g in zip(scene_ids, seg_labels)],
        cluster=clusters(view, cluster_method, seed), roots=[run_dir.resolve()], threshold=threshold,
        what=what + (" (rescored with --model)" if rescored else ""), method=method, cluster_method=cluster_method,
        title=f"run {run_dir.name}: {n} superpixels of {len(set(scene_ids))} scenes", bundle=bundle,
        tree_names=tree_feature_names(bundle.build_embedder(), bundle), segments=seg_labels,
        flagged=np.array([flagged_scene[s] for s in scene_ids], bool), run=pictures,
    )


def synthetic_points(n: int, dim: int = 88, seed: int = 0, method: str = "umap") -> np.ndarray:
    """A projection of ``n`` synthetic points in 8 blobs (for the 50,000-point benchmark)."""
    from .projection import project

    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (8, dim))
    data = centres[rng.integers(0, 8, n)] + rng.normal(0, 1, (n, dim))
    return project(data.astype(np.float32), method, seed)


def load_points(paths: Sequence[str | Path], model=None, **options) -> Points:
    """A run directory (it holds ``run.sqlite``) or labelled dataset folders."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and (paths[0] / "run.sqlite").is_file():
        run_options = {k: options[k] for k in ("method", "seed", "cluster_method") if k in options}
        return load_run_points(paths[0], model, **run_options)
    for p in paths:
        if (p / "run.sqlite").is_file():
            raise ConfigError(f"{p} is a run directory; explore one run on its own, or dataset folders together")
    return load_dataset_points(paths, model, **options)
