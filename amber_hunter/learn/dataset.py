"""Labelled superpixel datasets: the study's ``positive/`` + ``negative/`` folders, plus a labels CSV.

The study's file names carry the source scene (``<lat>_<lon>_<DD>_<Mon>_<YYYY>_GMT_super_<n>.png``).
The scene is what keeps an evaluation honest: crops of one scene share light, season and often the
same pit field, so they must never sit on both sides of a split.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import numpy as np

from ..errors import DatasetError, LabelsError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
LABEL_WORDS = {"1": 1, "positive": 1, "mining": 1, "0": 0, "negative": 0, "clean": 0}
LABELS_HEADER = ["path", "label", "source", "note"]

_NAME = re.compile(
    r"^(?P<lat>-?\d+(?:\.\d+)?)_(?P<lon>-?\d+(?:\.\d+)?)_(?P<date>\d{1,2}_[A-Za-z]{3}_\d{4})(?:_GMT)?_super_(?P<n>\d+)$"
)


@dataclass(frozen=True)
class SceneName:
    """What a study file name says: scene id, centre lat/lon, capture date, SLIC label."""

    scene_id: str
    lat: float
    lon: float
    capture_date: date
    segment: int


@dataclass(frozen=True)
class Sample:
    """One labelled superpixel crop. ``scene_id`` groups crops of the same source scene; files
    not named the study's way get their own path as scene id and no coordinates."""

    path: Path
    label: int
    scene_id: str
    lat: float | None = None
    lon: float | None = None
    capture_date: date | None = None
    source: str = "folder"


def parse_name(path: str | Path) -> SceneName | None:
    """Parse a study file name; ``None`` when the name is not in the study's format."""
    m = _NAME.match(Path(path).stem)
    if not m:
        return None
    lat, lon = float(m["lat"]), float(m["lon"])
    try:
        when = datetime.strptime(m["date"], "%d_%b_%Y").date()
    except ValueError:  # a study-like name with an impossible date is just not a study name
        return None
    # Round the coordinates: the same scene appears with float noise in its name.
    scene_id = f"{lat:.5f}_{lon:.5f}_{when.isoformat()}"
    return SceneName(scene_id, lat, lon, when, int(m["n"]))


def make_sample(path: Path, label: int, source: str) -> Sample:
    """A sample whose scene and place come from its file name where the name allows."""
    name = parse_name(path)
    if name is None:
        return Sample(path, label, scene_id=str(path), source=source)
    return Sample(path, label, name.scene_id, name.lat, name.lon, name.capture_date, source)


@dataclass(frozen=True)
class Dataset:
    """Samples in a fixed order (positives then negatives, each by file name, then CSV additions)."""

    samples: tuple[Sample, ...]

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], np.int32)

    @property
    def groups(self) -> np.ndarray:
        return np.array([s.scene_id for s in self.samples])

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.samples]

    def coordinates(self, axis: str) -> np.ndarray:
        """Longitude or latitude per sample, for spatial splits; NaN where unknown."""
        attr = {"lon": "lon", "lat": "lat"}[axis]
        return np.array([np.nan if getattr(s, attr) is None else getattr(s, attr) for s in self.samples])

    def summary(self) -> dict:
        """Counts recorded in a model bundle, so a user can see what a model learned from."""
        labels = self.labels
        return {
            "n_samples": len(self.samples),
            "n_positive": int(labels.sum()),
            "n_negative": int((labels == 0).sum()),
            "n_scenes": len(set(self.groups.tolist())),
        }

    def content_hash(self, image_hashes: Sequence[str]) -> str:
        """A hash of what the model saw: image contents and their labels, independent of paths."""
        h = hashlib.sha256()
        for digest, s in sorted(zip(image_hashes, self.samples), key=lambda t: t[0]):
            h.update(f"{digest}:{s.label}\n".encode())
        return h.hexdigest()


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_dataset(dirs: Iterable[str | Path], labels_csv: str | Path | None = None) -> Dataset:
    """Load one or more ``positive/`` + ``negative/`` folders, then apply a labels CSV.

    The CSV (``path,label,source,note``) adds crops or overrides folder labels: it is where
    relabelling after readers' reports ends up. Paths in it are relative to the CSV's folder.
    """
    by_path: dict[Path, Sample] = {}
    for d in map(Path, dirs):
        if not d.is_dir():
            raise DatasetError(f"dataset folder {d} does not exist; pass a folder holding positive/ and negative/")
        for sub, label in (("positive", 1), ("negative", 0)):
            folder = d / sub
            if not folder.is_dir():
                raise DatasetError(f"{folder} is missing; a dataset folder needs positive/ and negative/ subfolders")
            files = _images_in(folder)
            if not files:
                raise DatasetError(f"{folder} holds no images (.png/.jpg/.tif); add labelled crops to it")
            for p in files:
                by_path[p.resolve()] = make_sample(p, label, "folder")
    if labels_csv is not None:
        for path, label, source in read_labels_csv(labels_csv):
            by_path[path] = make_sample(path, label, source)
    samples = tuple(by_path.values())
    labels = {s.label for s in samples}
    if labels != {0, 1}:
        raise DatasetError(
            f"the dataset has only {'positive' if 1 in labels else 'negative'} samples; training needs both classes"
        )
    return Dataset(samples)


def read_labels_csv(path: str | Path) -> list[tuple[Path, int, str]]:
    """Read and validate a labels CSV; every bad row is reported in one message."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"labels CSV {path} does not exist")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise LabelsError(f"{path}: header must be {','.join(LABELS_HEADER)}, got {reader.fieldnames}")
        rows, problems = [], []
        for line, row in enumerate(reader, start=2):
            file = (path.parent / (row["path"] or "").strip()).resolve()
            label = LABEL_WORDS.get((row["label"] or "").strip().lower())
            if not row["path"] or not file.is_file():
                problems.append(f"line {line}: unknown path {row['path']!r}")
            elif label is None:
                problems.append(f"line {line}: unknown label {row['label']!r} (use positive/negative or 1/0)")
            else:
                rows.append((file, label, (row.get("source") or "csv").strip() or "csv"))
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LabelsError(f"{path}: " + "; ".join(problems[:3]) + more)
    return rows
