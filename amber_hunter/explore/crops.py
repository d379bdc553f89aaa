"""Labels given to a run's superpixels, cut out as crops so that they can join a training dataset.

A label on a run's superpixel points at a scene and a SLIC label, not at a file. ``train`` reads
files, so export cuts each labelled superpixel's bounding box from the run's tiles (its tile cache
for an HTTP source: nothing is fetched again), exactly as the scan segmented it, and names the PNG
the study's way (``<lat>_<lon>_<DD>_<Mon>_<YYYY>_GMT_super_<n>.png``, the scene's centre and
capture date). The name keeps the crop groupable: ``footprint_groups`` reads its coordinates, so
crops of one scene, or of touching scenes, stay on one side of every split.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .. import atomic
from ..errors import AmberHunterError, LabelsError
from ..learn.labels import LabelRow, LabelStore
from .data import RunPictures, _load_bundle, _png


@dataclass(frozen=True)
class CutCrop:
    """A run superpixel's label, now a crop file (``path`` relative to the CSV's folder)."""

    path: str
    label: int
    source: str
    note: str | None


@dataclass(frozen=True)
class CropExport:
    """What an export cut, and which labels it could not (with why)."""

    crops: list[CutCrop]
    skipped: list[tuple[str, str]]  # (label key, reason)


def crop_name(lat: float, lon: float, date: dt.date | None, segment: int) -> str:
    """The study's file name. A scene without a capture date gets 1 Jan 1970: the name must
    parse, and the date is only a label; the coordinates are what grouping uses."""
    date = date or dt.date(1970, 1, 1)
    return f"{lat:.7f}_{lon:.7f}_{date.day:02d}_{date.strftime('%b')}_{date.year}_GMT_super_{segment}.png"


def export_superpixel_crops(store: LabelStore, out_dir: str | Path, csv_dir: str | Path) -> CropExport:
    """Cut every run superpixel with a current label into ``out_dir``; one run's scene at a time.

    Labels whose run directory is gone, whose scene is no longer in the run, or whose tiles were
    pruned from the cache are skipped with the reason; the rest are still written."""
    from ..run.store import RunStore

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = Path(csv_dir).resolve()
    by_run: dict[str, list[LabelRow]] = defaultdict(list)
    for row in store.latest("superpixel").values():
        by_run[row.run].append(row)
    crops, skipped = [], []
    for run, rows in sorted(by_run.items()):
        if not (Path(run) / "run.sqlite").is_file():
            skipped += [(r.key, f"run {run} is gone") for r in rows]
            continue
        with RunStore(Path(run)) as run_store:
            scenes = {s.scene_id: s for s in run_store.scenes()}
            pictures = RunPictures(run_store, _load_bundle(run_store.config.model))
            for r in sorted(rows, key=lambda r: (r.scene_id, r.segment)):
                scene = scenes.get(r.scene_id)
                if scene is None or scene.bounds is None:
                    skipped.append((r.key, f"scene {r.scene_id} is not in run {run}"))
                    continue
                try:
                    image, _ = pictures.crop(r.scene_id, r.segment)
                except AmberHunterError as exc:  # tiles pruned, a superpixel gone, a source moved
                    skipped.append((r.key, str(exc)))
                    continue
                b = scene.bounds
                name = crop_name((b.north + b.south) / 2, (b.east + b.west) / 2, scene.capture_date, r.segment)
                path = out_dir / name
                try:
                    atomic.write_bytes(path, _png(image, max(image.shape[:2])))
                except OSError as exc:
                    raise LabelsError(f"cannot write {path} ({exc.strerror or exc}); choose another --crops folder") from None
                crops.append(CutCrop(Path(os.path.relpath(path.resolve(), base)).as_posix(), r.label, r.source, r.note))
    return CropExport(crops, skipped)
