"""Rescore a whole run with another model from the embeddings it stored: no tile, no CNN pass.

The study needed two weeks to reprocess 450,000 images after its readers' corrections. Embedding
is what costs (a CNN pass per superpixel); the classifier on stored embeddings costs microseconds
per superpixel. So a run keeps every scored superpixel's embedding (``embeddings/``), and a
retrained model (or any model with the same embedder) rescores it in minutes:

1. every stored embedding is scored again, and every done scene is decided again with the scene
   rule ("more than ``min_positive`` positive superpixels");
2. a superpixel that becomes positive gets its outline from the label map the scan stored
   (``resegment.scene_labels``; a run scanned before label maps were stored segments the scene
   again from its stored tiles, and when those are gone too the superpixel keeps its bbox only);
3. the new verdicts, and the model version that made them, are stored in one transaction, and a
   diff of what changed is written (``diff.geojson``, ``diff.json``).

No picture is drawn: the scan's map picture of a scene whose positives changed is deleted (it
would show the old ones), and ``map.html`` draws the scene's picture from its tiles as it does for
every scene. Drawing it here (with SLIC again for the outlines) cost about 0.7 s a changed scene,
against about 4 ms a scene for the rest of a rescore (``benchmarks/bench_rescore.py``), for a
picture the map redraws anyway.

Model versions live in ``RUN_DIR/models/vN`` and are never overwritten: ``v1`` is a copy of the
scan's own model, made on the first rescore, so a rollback to it works even if the original
bundle moves.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import atomic
from ..errors import AmberHunterError, ModelBundleError, RunStoreError
from ..geo.tiles import Bounds
from ..model.classify import ModelBundle, load_bundle, resolve_model
from .config import model_hash
from .store import ModelVersion, RescoredRegion, RescoredScene, RunStore

#: Above this share of superpixels changing verdict, the diff says so loudly: either the model
#: really is that different, or it was trained for another area or resolution.
LARGE_CHANGE = 0.2


@dataclass
class DiffSide:
    """Scenes and superpixels on one side of a diff, with the hectares of their superpixels."""

    scenes: list[str] = field(default_factory=list)
    superpixels: list[tuple[str, int]] = field(default_factory=list)
    hectares: float = 0.0


@dataclass(frozen=True)
class RescoreDiff:
    """What a rescore changed: flagged scenes and positive superpixels added, removed and kept."""

    before: int | None
    after: int
    added: DiffSide
    removed: DiffSide
    kept: DiffSide
    outlines_missing: int = 0

    def summary(self) -> dict:
        side = lambda d: {"scenes": len(d.scenes), "superpixels": len(d.superpixels), "hectares": round(d.hectares, 3)}
        return {"from_version": self.before, "to_version": self.after, "added": side(self.added),
                "removed": side(self.removed), "kept": side(self.kept), "outlines_missing": self.outlines_missing,
                "scenes_added": self.added.scenes, "scenes_removed": self.removed.scenes}


def _check_compatible(store: RunStore, bundle: ModelBundle) -> None:
    """Refuse a model whose embedder or width is not that of the run's stored embeddings."""
    embedders = store.embedders()
    if embedders and set(embedders) != {bundle.metadata.embedder}:
        names = ", ".join(sorted(embedders))
        raise ModelBundleError(
            f"the run's embeddings come from {names} but the model uses {bundle.metadata.embedder}; pick a model "
            f"trained on {names}, or rescan with 'amber-hunter scan --run {store.run_dir} --model M --force'")
    for dim in embedders.values():
        if dim != bundle.metadata.dim:
            raise ModelBundleError(f"the run's embeddings have {dim} dimensions, the model {bundle.metadata.dim}; "
                                   "pick a model with the run's embedder")


def stored_vectors(store: RunStore, bundle: ModelBundle) -> tuple[dict[tuple[str, int], int], np.ndarray]:
    """Row index of every stored embedding by (scene, label), and the vectors (float32), checked.
    For callers that need them all at once; they are read shard by shard into one array."""
    _check_compatible(store, bundle)
    vectors = np.empty((store.embedding_rows(), bundle.metadata.dim), np.float32)
    index: dict[tuple[str, int], int] = {}
    n = 0
    for batch in store.embedding_batches():
        vectors[n:n + len(batch.labels)] = batch.vectors
        index.update(((i, g), n + k) for k, (i, g) in enumerate(zip(batch.scene_ids, batch.labels.tolist())))
        n += len(batch.labels)
    return index, vectors[:n]


class _SceneProbabilities:
    """Every stored superpixel's new probability, found by scene: the vectors are scored batch by
    batch as they stream from the shards, and only (scene, label, probability) is kept, 12 bytes
    a superpixel, so memory does not grow with the embeddings' width."""

    def __init__(self, store: RunStore, bundle: ModelBundle):
        codes: dict[str, int] = {}
        scenes, labels, probs = [], [], []
        for batch in store.embedding_batches():
            scenes.append(np.fromiter((codes.setdefault(i, len(codes)) for i in batch.scene_ids), np.int32,
                                      len(batch.scene_ids)))
            labels.append(batch.labels)
            probs.append(bundle.predict_proba(batch.vectors))
        self._codes = codes
        scene = np.concatenate(scenes) if scenes else np.zeros(0, np.int32)
        order = np.argsort(scene, kind="stable")
        self._labels = np.concatenate(labels)[order] if labels else np.zeros(0, np.int32)
        self._probs = np.concatenate(probs)[order] if probs else np.zeros(0, np.float32)
        self._starts = np.searchsorted(scene[order], np.arange(len(codes) + 1))

    def of(self, scene_id: str) -> dict[int, float]:
        """The new probability of each stored superpixel of ``scene_id``, by label."""
        code = self._codes.get(scene_id)
        if code is None:
            return {}
        rows = slice(self._starts[code], self._starts[code + 1])
        return dict(zip(self._labels[rows].tolist(), self._probs[rows].tolist()))


def ensure_first_version(store: RunStore) -> ModelVersion:
    """The current version; on the first rescore, version 1: a copy of the model the scan used,
    registered at once, so that every version a run was ever scored with stays in the run."""
    current = store.current_version()
    if current is not None:
        return current
    config = store.config
    source = resolve_model(config.model)
    if config.model_hash and model_hash(str(source)) != config.model_hash:
        raise ModelBundleError(f"the scan's model {source} has changed since the scan (retrained in place?), so it "
                               "cannot be kept as version 1; put the original bundle back, or rescan into a new run")
    n, folder = store.next_version_dir()
    _copy_bundle(source, folder)
    first = ModelVersion(n, folder, config.model_hash or model_hash(config.model), None, None,
                         {"what": f"the scan's own model ({source})"}, time.time(), True)
    store.apply_rescore([], first, "version 1: the scan's own model")
    return first


def _copy_bundle(source: Path, folder: Path) -> None:
    """Copy a bundle folder atomically: to a temporary sibling, then renamed into place."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)  # an uncommitted leftover of an interrupted retrain
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, tmp)
    tmp.rename(folder)


def _decide(regions, probs: dict[int, float], threshold: float, min_positive: int):
    new = []
    for g in regions:
        p = probs.get(g.label)
        new.append(RescoredRegion(g.label, p, p is not None and p >= threshold))
    positive = [g for g in new if g.positive]
    areas = {g.label: g.area_m2 for g in regions}
    scored = [g.probability for g in new if g.probability is not None]
    return new, len(positive) > min_positive, sum(areas[g.label] for g in positive), max(scored) if scored else None


def rescore_run(run_dir: str | Path, model: str | Path, *, changes: dict | None = None,
                version: ModelVersion | None = None, progress=None) -> RescoreDiff:
    """Score every stored superpixel of ``run_dir`` with ``model`` and decide every scene again.

    ``model`` becomes a new version of the run (copied into ``models/vN``) unless ``version``
    names an existing one (a rollback). ``changes`` says what went into the model (from retrain).
    """
    from ..model.segment import regions_of
    from .resegment import scene_labels
    from .scan import region_outline
    from .scenes import cell_from_id

    run_dir = Path(run_dir)
    with RunStore(run_dir) as store:
        path = resolve_model(model) if version is None else version.path
        bundle = load_bundle(path)
        _check_compatible(store, bundle)
        before = ensure_first_version(store)
        slic = bundle.slic_params()
        scanned = load_bundle(before.path).slic_params()
        if slic != scanned:  # the stored embeddings belong to the scan's superpixels, not this model's
            raise ModelBundleError(
                f"the model segments with {slic} but the run was scanned with {scanned}, so the stored embeddings "
                "are not of its superpixels; pick a model with the run's SLIC settings, or rescan with this model")
        scored = _SceneProbabilities(store, bundle)
        threshold, min_positive = bundle.metadata.threshold, store.config.min_positive
        rescored, added, removed, kept = [], DiffSide(), DiffSide(), DiffSide()
        missing = 0
        scenes = [s for s in store.scenes() if s.status == "done"]
        for k, scene in enumerate(scenes):
            regions = store.regions(scene.scene_id, outlines=False)
            stored = scored.of(scene.scene_id)
            probs = {g.label: stored[g.label] for g in regions if g.label in stored}
            new, flagged, area, max_p = _decide(regions, probs, threshold, min_positive)
            was = {g.label for g in regions if g.positive}
            now = {g.label for g in new if g.positive}
            if now - was:  # outlines of the new positives, from the scan's label map
                try:
                    again = {r.label: r for r in regions_of(scene_labels(store, scene.scene_id, slic), only=now - was)}
                except AmberHunterError:  # no stored label map and no tiles: the new positives keep their bboxes
                    again = {}
                missing += len((now - was) - again.keys())
                cell, boxes = cell_from_id(scene.scene_id), {g.label: g.bbox for g in regions}
                new = [dataclasses.replace(g, polygon=region_outline(again[g.label], cell) if g.label in again
                                           else _rectangle(boxes[g.label])) if g.label in now - was else g
                       for g in new]
            rescored.append(RescoredScene(scene.scene_id, flagged, len(now), max_p, area, tuple(new),
                                          stale_picture=now != was))
            areas = {g.label: g.area_m2 / 10_000 for g in regions}
            for side, labels in ((added, now - was), (removed, was - now), (kept, now & was)):
                side.superpixels.extend((scene.scene_id, g) for g in sorted(labels))
                side.hectares += sum(areas[g] for g in labels)
            if flagged and not scene.flagged:
                added.scenes.append(scene.scene_id)
            elif scene.flagged and not flagged:
                removed.scenes.append(scene.scene_id)
            elif flagged:
                kept.scenes.append(scene.scene_id)
            if progress is not None:
                progress(k + 1, len(scenes))
        if version is None:
            n, folder = store.next_version_dir()
            _copy_bundle(path, folder)
            version = ModelVersion(n, folder, model_hash(str(folder)), before.version,
                                   bundle.metadata.training.get("data_hash"), changes or {"what": f"rescored with {path}"},
                                   time.time(), True)
        diff = RescoreDiff(before.version, version.version, added, removed, kept, missing)
        outlines = {(s.scene_id, g.label): g.polygon for s in rescored for g in s.regions if g.polygon is not None}
        _write_diff(store, diff, {s.scene_id: s.bounds for s in scenes}, outlines)
        store.apply_rescore(rescored, version, json.dumps(diff.summary()))
    return diff


def _write_diff(store: RunStore, diff: RescoreDiff, bounds: dict[str, Bounds], outlines: dict) -> None:
    """``diff.geojson``: one feature per changed or kept scene and superpixel (outline where the
    rescore made one or the run has one, else its bbox), with ``change`` = added / removed / kept;
    ``diff.json``: counts. It is written before the rescore's commit, so a new positive's outline
    comes from ``outlines`` (by scene and label), not the store. The features are encoded one by
    one, so a diff of many flagged scenes holds its bytes only."""
    out = io.BytesIO()
    out.write(b'{"type": "FeatureCollection", "features": [\n')
    for k, feature in enumerate(_diff_features(store, diff, bounds, outlines)):
        out.write(b",\n" * (k > 0) + json.dumps(feature).encode())
    out.write(b"\n]}\n")
    try:
        atomic.write_bytes(store.run_dir / "diff.geojson", out.getbuffer())
        atomic.write_json(store.run_dir / "diff.json", diff.summary())
    except OSError as exc:
        raise RunStoreError(f"cannot write the diff in {store.run_dir} ({exc.strerror or exc}); free some space "
                            "and rerun") from None


def _diff_features(store: RunStore, diff: RescoreDiff, bounds: dict[str, Bounds], outlines: dict) -> Iterator[dict]:
    for change, side in (("added", diff.added), ("removed", diff.removed), ("kept", diff.kept)):
        for scene_id in side.scenes:
            yield _feature(_rectangle(bounds[scene_id]), {"kind": "scene", "scene_id": scene_id, "change": change})
        by_scene: dict[str, list[int]] = {}
        for scene_id, label in side.superpixels:
            by_scene.setdefault(scene_id, []).append(label)
        for scene_id, labels in by_scene.items():
            stored = {g.label: g for g in store.regions(scene_id)}
            for label in labels:
                g = stored[label]
                yield _feature(outlines.get((scene_id, label)) or g.polygon or _rectangle(g.bbox), {
                    "kind": "superpixel", "scene_id": scene_id, "label": label, "change": change,
                    "area_ha": round(g.area_m2 / 10_000, 4)})


def _rectangle(b: Bounds) -> dict:
    return {"type": "Polygon", "coordinates": [[[b.west, b.south], [b.east, b.south], [b.east, b.north],
                                                [b.west, b.north], [b.west, b.south]]]}


def _feature(geometry: dict, properties: dict) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def rollback(run_dir: str | Path, version: int) -> RescoreDiff:
    """Make model version ``version`` current again and rescore the run with it."""
    with RunStore(Path(run_dir)) as store:
        versions = {v.version: v for v in store.model_versions()}
    if version not in versions:
        have = ", ".join(f"v{v}" for v in sorted(versions)) or "none yet"
        raise RunStoreError(f"{run_dir} has no model version v{version} (it has {have}); see 'amber-hunter feedback "
                            f"list {run_dir}'")
    return rescore_run(run_dir, versions[version].path, version=versions[version])
