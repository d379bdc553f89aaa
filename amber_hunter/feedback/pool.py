"""``suggest``'s pools: the unlabelled superpixels to pick from, and the labels CSV of the picks.

A pool is either a plain folder of images (each one a superpixel crop, as the study saved them),
embedded through the embedding cache, or a scanned run, whose stored embeddings are used as they
are (no tile fetched, no CNN run). Superpixels already labelled in the label store are left out:
asking a person twice about one superpixel wastes the few labels the loop is built on.

The picks are written as the ``path,label,source,note`` CSV ``train --labels`` reads, with the
label empty for the user to fill in. A run's picks have no file yet, so they are cut from the
run's stored tiles into a folder beside the CSV, named the study's way (``explore.crops``).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import atomic
from ..errors import DatasetError, FeedbackError
from ..explore.crops import crop_name
from ..learn.dataset import IMAGE_SUFFIXES, LABELS_HEADER
from ..learn.labels import LabelStore
from ..learn.suggest import Suggestion
from ..model.classify import ModelBundle


@dataclass(frozen=True)
class Pool:
    """Unlabelled superpixels: embeddings, and per row a crop file or a run superpixel."""

    features: np.ndarray
    files: list[Path] | None = None
    run: Path | None = None
    keys: list[tuple[str, int]] | None = None

    def name(self, i: int) -> str:
        return self.files[i].name if self.files is not None else f"{self.keys[i][0]} #{self.keys[i][1]}"


def folder_pool(folder: str | Path, bundle: ModelBundle, labels: LabelStore | None, cache_dir=None,
                progress=None) -> Pool:
    """The images of a flat folder, embedded with the bundle's embedder (cached by content)."""
    from ..learn.cache import embed_files
    from ..learn.labels import content_hash

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        hint = " (it holds positive/ and negative/: that is a labelled dataset)" if (folder / "positive").is_dir() else ""
        raise DatasetError(f"{folder} holds no images{hint}; give a flat folder of superpixel crops or a run directory")
    if labels is not None:
        labelled = {r.content_hash for r in labels.latest("crop").values()}
        files = [f for f in files if content_hash(f) not in labelled]
    features, _ = embed_files(files, bundle.build_embedder(), cache_dir, progress)
    return Pool(features, files=files)


def run_pool(run_dir: str | Path, bundle: ModelBundle, labels: LabelStore | None) -> Pool:
    """The scored superpixels of a run, from its stored embeddings."""
    from ..run.rescore import stored_vectors
    from ..run.store import RunStore

    run_dir = Path(run_dir).resolve()
    with RunStore(run_dir) as store:
        index, vectors = stored_vectors(store, bundle)
    labelled = set() if labels is None else {
        (r.scene_id, r.segment) for r in labels.latest("superpixel").values() if r.run == str(run_dir)}
    keys = sorted(k for k in index if k not in labelled)
    return Pool(vectors[[index[k] for k in keys]].reshape(len(keys), -1), run=run_dir, keys=keys)


def write_picks(pool: Pool, picks: list[Suggestion], out: str | Path) -> Path:
    """The picks as a labels CSV with the label left empty (a run's picks cut into crops first)."""
    out = Path(out)
    base = out.resolve().parent
    if pool.files is not None:
        paths = [pool.files[s.index] for s in picks]
    else:
        paths = _cut(pool, picks, base / f"{out.stem}-crops")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(LABELS_HEADER)
    for s, path in zip(picks, paths):
        writer.writerow([Path(os.path.relpath(path.resolve(), base)).as_posix(), "", "suggest",
                         f"{s.strategy}: {s.reason}"])
    try:
        atomic.write_bytes(out, buf.getvalue().encode())
    except OSError as exc:
        raise FeedbackError(f"cannot write {out} ({exc.strerror or exc}); choose another --out") from None
    return out


def _cut(pool: Pool, picks: list[Suggestion], folder: Path) -> list[Path]:
    from ..images import write_png
    from ..model.classify import load_bundle, resolve_model
    from ..run.resegment import resegment
    from ..run.store import RunStore

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with RunStore(pool.run) as store:
        slic = load_bundle(resolve_model(store.config.model)).slic_params()
        scenes = {s.scene_id: s for s in store.scenes()}
        for s in picks:
            scene_id, label = pool.keys[s.index]
            again = resegment(store, scene_id, slic)
            b = scenes[scene_id].bounds
            path = folder / crop_name((b.north + b.south) / 2, (b.east + b.west) / 2, scenes[scene_id].capture_date, label)
            write_png(path, again.regions[label].crop(again.image))
            paths.append(path)
    return paths

