"""One scene through segment → embed → classify → aggregate, and the picture of the result.

The aggregation rule is the study's: a scene is a mining area when more than ``min_positive``
(default 2) of its superpixels are positive. One or two positives are too often a bright sand road
or a building roof; pit fields cover several superpixels.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ModelBundleError
from .classify import ModelBundle, load_bundle, resolve_model
from .embed import Embedder
from .segment import Region, Segmentation, boundaries, segment

MIN_POSITIVE = 2
#: A superpixel whose bounding box is more than this share nodata is not scored: its crop would
#: be mostly filler, unlike any crop the model was trained on.
MAX_NODATA = 0.5


@dataclass(frozen=True)
class SceneResult:
    """The verdict on one scene, with the per-superpixel evidence behind it."""

    flagged: bool
    n_positive: int
    n_superpixels: int
    probabilities: list[float | None]
    positive_labels: list[int]
    threshold: float
    min_positive: int
    max_probability: float
    positive_area_px: int
    positive_area_m2: float | None = None
    #: Superpixels left unscored because their crop is mostly nodata (probability None).
    unscored_labels: list[int] = field(default_factory=list)


def aggregate(
    probabilities: np.ndarray,
    segmentation: Segmentation,
    threshold: float,
    min_positive: int = MIN_POSITIVE,
    m_per_px: float | None = None,
) -> SceneResult:
    """Count positive superpixels and apply the "more than ``min_positive``" rule.

    A NaN probability marks a superpixel that was not scored: it is never positive, and its
    probability is reported as None.
    """
    scored = ~np.isnan(probabilities)
    positive = scored & (np.nan_to_num(probabilities, nan=0.0) >= threshold)
    regions = segmentation.regions
    labels = [r.label for r, p in zip(regions, positive) if p]
    area_px = int(sum(r.area_px for r, p in zip(regions, positive) if p))
    return SceneResult(
        flagged=bool(positive.sum() > min_positive),
        n_positive=int(positive.sum()),
        n_superpixels=len(regions),
        probabilities=[round(float(p), 6) if s else None for p, s in zip(probabilities, scored)],
        positive_labels=labels,
        threshold=float(threshold),
        min_positive=int(min_positive),
        max_probability=float(probabilities[scored].max(initial=0.0)),
        positive_area_px=area_px,
        positive_area_m2=None if m_per_px is None else area_px * m_per_px**2,
        unscored_labels=[r.label for r, s in zip(regions, scored) if not s],
    )


def nodata_share(region: Region, valid: np.ndarray) -> float:
    """Share of a superpixel's bounding box that holds no imagery."""
    r0, c0, r1, c1 = region.bbox
    return 1.0 - float(valid[r0:r1, c0:c1].mean())


@dataclass(frozen=True)
class Detection:
    """A scene's verdict with what produced it: the superpixels and their embeddings, which a
    region scan stores so that a retrained model can rescore without re-embedding."""

    result: SceneResult
    segmentation: Segmentation
    features: np.ndarray
    #: The label of each row of ``features``: the scored superpixels, in label order.
    feature_labels: list[int]


@dataclass(frozen=True)
class Prepared:
    """A scene segmented and given its hand-made features: everything before the CNN.

    Detection is split here because the two halves want different homes. SLIC and the texture
    features are single-threaded numpy, so a region scan runs them in worker processes, one scene
    per core; the CNN is already multi-threaded and fastest on big batches, so it runs in one
    place over the crops of several scenes at once (:meth:`Detector.features`).
    """

    image: np.ndarray
    m_per_px: float | None
    segmentation: Segmentation
    #: The superpixels to score (those whose crop is not mostly nodata), in label order.
    regions: list[Region]
    #: Features of the embedder's hand-made parts, by part index.
    handmade: dict[int, np.ndarray]
    slic_s: float
    handmade_s: float


class Detector:
    """A loaded model and its embedder, built once and reused for every scene of a run."""

    def __init__(self, bundle: ModelBundle, *, min_positive: int = MIN_POSITIVE, allow_random: bool = False):
        meta = bundle.metadata
        if meta.random_weights and not allow_random:
            raise ModelBundleError(
                "this model was trained on random-weight ResNet50 features and detects nothing real; "
                "retrain with --resnet-weights imagenet|PATH, or pass --allow-random for tests"
            )
        self.bundle = bundle
        self.min_positive = min_positive
        self.embedder: Embedder = bundle.build_embedder()
        self._parts: list[Embedder] = list(getattr(self.embedder, "parts", [self.embedder]))

    @classmethod
    def load(cls, model: str | Path | None = None, **options) -> Detector:
        """Load ``model`` (a bundle folder or a bundled name); ``None`` is the default model."""
        return cls(load_bundle(resolve_model(model)), **options)

    @property
    def needs_cnn(self) -> bool:
        """Whether :meth:`features` has CNN work to do (a texture-only model has none)."""
        return any(p.kind == "cnn" for p in self._parts)

    def prepare(self, image: np.ndarray, m_per_px: float | None = None, valid: np.ndarray | None = None) -> Prepared:
        """Segment one RGB scene and compute its hand-made features.

        ``valid`` marks the pixels that hold imagery (all of them when None): only they are
        segmented, and superpixels whose crop is mostly nodata are left unscored.
        """
        t0 = time.perf_counter()
        seg = segment(image, self.bundle.slic_params(), valid)
        regions = seg.regions if valid is None else [r for r in seg.regions if nodata_share(r, valid) <= MAX_NODATA]
        t1 = time.perf_counter()
        handmade = {i: p.embed(image, regions) for i, p in enumerate(self._parts) if p.kind != "cnn"}
        return Prepared(image, m_per_px, seg, regions, handmade, t1 - t0, time.perf_counter() - t1)

    def features(self, scenes: Sequence[Prepared]) -> list[np.ndarray]:
        """The full embedding of each prepared scene: its CNN parts computed here, joined with the
        hand-made columns in the embedder's order."""
        # A CNN part embeds the crops of all the scenes as one run of batches (CnnEmbedder.embed_many).
        columns = [part.embed_many([(s.image, s.regions) for s in scenes]) if part.kind == "cnn"
                   else [s.handmade[i] for s in scenes] for i, part in enumerate(self._parts)]
        return [np.concatenate([c[k] for c in columns], axis=1).astype(np.float32, copy=False)
                for k in range(len(scenes))]

    def finish(self, scene: Prepared, features: np.ndarray) -> Detection:
        """Classify a prepared scene's superpixels from their features and apply the scene rule."""
        seg = scene.segmentation
        probs = np.full(len(seg.regions), np.nan)
        if scene.regions:
            index = {r.label: i for i, r in enumerate(seg.regions)}
            probs[[index[r.label] for r in scene.regions]] = self.bundle.predict_proba(features)
        result = aggregate(probs, seg, self.bundle.metadata.threshold, self.min_positive, scene.m_per_px)
        return Detection(result, seg, features, [r.label for r in scene.regions])

    def run(self, image: np.ndarray, m_per_px: float | None = None, valid: np.ndarray | None = None) -> Detection:
        """Segment, embed, classify and count one RGB scene."""
        scene = self.prepare(image, m_per_px, valid)
        return self.finish(scene, self.features([scene])[0])

    def detect(self, image: np.ndarray, m_per_px: float | None = None) -> tuple[SceneResult, Segmentation]:
        """The verdict and the superpixels, for callers that do not keep embeddings."""
        detection = self.run(image, m_per_px)
        return detection.result, detection.segmentation


def overlay(image: np.ndarray, segmentation: Segmentation, result: SceneResult) -> np.ndarray:
    """The study's step-3 figure: every superpixel outlined, positive ones filled in red."""
    out = image.astype(np.float32)
    positive = np.isin(segmentation.labels, result.positive_labels)
    out[positive] = 0.55 * out[positive] + 0.45 * np.array([255, 0, 0], np.float32)
    out[boundaries(segmentation.labels)] = (255, 255, 0)
    out[boundaries(positive, inner=True)] = (255, 0, 0)
    return out.astype(np.uint8)
