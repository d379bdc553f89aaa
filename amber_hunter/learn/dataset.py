"""Labelled superpixel datasets: the study's ``positive/`` + ``negative/`` folders, plus a labels CSV.

The study's file names carry the source scene (``<lat>_<lon>_<DD>_<Mon>_<YYYY>_GMT_super_<n>.png``).
The scene is what keeps an evaluation honest: crops of one scene share light, season and often the
same pit field, so they must never sit on both sides of a split. Neighbouring scenes overlap or
touch, so the same pits can appear in two scenes: splits therefore keep whole *footprint groups*
(connected scenes, ``footprint_groups``) on one side, not just whole scenes.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from functools import cached_property
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


#: The study's scenes sit on a grid with these steps, in degrees: neighbouring grid rows in the
#: file names are 0.0033342° apart and neighbouring columns 0.00543° (the dataset README rounds the
#: first to 0.00333°). A scene (about 1000×975 px at 0.38 m/px) covers about one step each way.
SCENE_STEP_LAT = 0.0033342
SCENE_STEP_LON = 0.00543
#: Footprints this close (degrees; ~1.1 m north-south, ~0.7 m east-west at 50.5°N) count as
#: touching. It must exceed the float noise in the names (~1e-12) and the gap an approximate step
#: leaves between grid rows (0.0000042° with the README's 0.00333°), and stay far below a step.
TOUCH_TOLERANCE = 1e-5


class _UnionFind:
    """Disjoint sets over ``0..n-1`` with path halving and union by size."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a == b:
            return
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]


def footprint_groups(
    scene_ids: Sequence[str],
    lat: Sequence[float | None],
    lon: Sequence[float | None],
    *,
    step_lat: float = SCENE_STEP_LAT,
    step_lon: float = SCENE_STEP_LON,
    tolerance: float = TOUCH_TOLERANCE,
) -> np.ndarray:
    """Footprint group per item: connected components of scenes whose footprints overlap or touch.

    Why: neighbouring scenes overlap (one pair of the study's scenes by ~95 %), so the same pit
    field can sit in two scenes with different ids. Grouping folds by scene id alone would put it
    on both sides of a split; grouping by connected footprints does not.

    A scene's footprint is one grid step (``step_lat`` × ``step_lon``) from its file-name
    coordinates. Neither the names nor the dataset README say whether those are the scene's
    centre or a corner; we take them as the centre (footprint ``lat ± step_lat/2``,
    ``lon ± step_lon/2``). The choice cannot change a group: every footprint has the same size,
    so two footprints anchored the same way meet exactly when their coordinates differ by at most
    one step on both axes, whichever anchor it is (and ``evaluate.spatial_bands`` is shift-
    invariant too). "Touch" allows ``tolerance`` degrees of slack on each axis, so edge- and
    corner-neighbours on the grid join despite float noise in their names; a negative tolerance
    keeps only footprints that overlap by more than it.

    On the shared texty-amber data this gives 358 groups, the largest 59 crops (overlap alone:
    570 groups, largest 12). The dataset README's 398 groups come from the coordinates rounded to
    the 5 decimals of a scene id with a 0.00333° step: rounding then decides whether two grid
    rows 0.0033342° apart touch, so some edge-neighbours stay apart (``tests/test_dataset.py``
    reproduces both counts).

    ``scene_ids``, ``lat`` and ``lon`` are per item (e.g. per crop; the first coordinates seen for
    a scene id are used). Items without coordinates (``None``/NaN) keep their own scene id as
    group. A group is named by its smallest scene id, so the labels are stable across runs.

    Candidate pairs come from a grid hash with cells of one step plus tolerance, so only the 3×3
    neighbouring cells are compared: O(n) for scenes spread over an area, not O(n²).
    """
    ids = [str(s) for s in scene_ids]
    coords: dict[str, tuple[float, float]] = {}
    for sid, a, b in zip(ids, lat, lon):
        if sid in coords or a is None or b is None or np.isnan(a) or np.isnan(b):
            continue
        coords[sid] = (float(a), float(b))
    scenes = list(coords)
    lats = [coords[sid][0] for sid in scenes]
    lons = [coords[sid][1] for sid in scenes]
    reach_lat, reach_lon = step_lat + tolerance, step_lon + tolerance
    cells: dict[tuple[int, int], list[int]] = {}
    for k in range(len(scenes)):
        cells.setdefault((math.floor(lats[k] / reach_lat), math.floor(lons[k] / reach_lon)), []).append(k)
    sets = _UnionFind(len(scenes))
    for (ci, cj), members in cells.items():
        # Each unordered pair of neighbouring cells once: the cell itself and 4 of its 8 neighbours.
        for di, dj in ((0, 0), (0, 1), (1, -1), (1, 0), (1, 1)):
            others = cells.get((ci + di, cj + dj))
            if others is None:
                continue
            for n, k in enumerate(members):
                for m in others[n + 1 :] if others is members else others:
                    if abs(lats[k] - lats[m]) <= reach_lat and abs(lons[k] - lons[m]) <= reach_lon:
                        sets.union(k, m)
    name: dict[int, str] = {}
    for k, sid in enumerate(scenes):
        root = sets.find(k)
        name[root] = min(name.get(root, sid), sid)
    by_scene = {sid: name[sets.find(k)] for k, sid in enumerate(scenes)}
    return np.array([by_scene.get(sid, sid) for sid in ids])


@dataclass(frozen=True)
class GroupSizes:
    """How a dataset splits into footprint groups: what bounds how finely folds can be cut."""

    n_groups: int
    largest: int  # crops in the largest group


def group_sizes(groups: np.ndarray) -> GroupSizes:
    """Number of groups and crops in the largest one."""
    if len(groups) == 0:
        return GroupSizes(0, 0)
    _, counts = np.unique(groups, return_counts=True)
    return GroupSizes(len(counts), int(counts.max()))


@dataclass(frozen=True)
class Dataset:
    """Samples in a fixed order (positives then negatives, each by file name, then CSV additions)."""

    samples: tuple[Sample, ...]

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], np.int32)

    @property
    def scene_ids(self) -> np.ndarray:
        """Source scene per sample (its path when the name carries no scene)."""
        return np.array([s.scene_id for s in self.samples])

    @cached_property
    def groups(self) -> np.ndarray:
        """Footprint group per sample (``footprint_groups``): what every split keeps whole,
        because overlapping or touching scenes can show the same pits."""
        return footprint_groups(
            [s.scene_id for s in self.samples], [s.lat for s in self.samples], [s.lon for s in self.samples]
        )

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.samples]

    def files(self, roots: Sequence[str | Path]) -> list[str]:
        """Each sample's path relative to the dataset folder holding it, for reports a user can
        open next to the data (prefixed with the folder's name when there are several; absolute
        for crops from outside them, e.g. added by a labels CSV)."""
        resolved = [Path(r).resolve() for r in roots]
        out = []
        for s in self.samples:
            path = s.path.resolve()
            for root in resolved:
                if path.is_relative_to(root):
                    rel = path.relative_to(root).as_posix()
                    out.append(rel if len(resolved) == 1 else f"{root.name}/{rel}")
                    break
            else:
                out.append(str(path))
        return out

    def coordinates(self, axis: str) -> np.ndarray:
        """Longitude or latitude per sample, for spatial splits; NaN where unknown."""
        attr = {"lon": "lon", "lat": "lat"}[axis]
        return np.array([np.nan if getattr(s, attr) is None else getattr(s, attr) for s in self.samples])

    def summary(self) -> dict:
        """Counts recorded in a model bundle, so a user can see what a model learned from."""
        labels = self.labels
        sizes = group_sizes(self.groups)
        return {
            "n_samples": len(self.samples),
            "n_positive": int(labels.sum()),
            "n_negative": int((labels == 0).sum()),
            "n_scenes": len(set(self.scene_ids.tolist())),
            "n_groups": sizes.n_groups,
            "largest_group": sizes.largest,
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


def row_path_problem(rel: str, file: Path) -> str | None:
    """What is wrong with the file a labels CSV row names, said so that it can be fixed, or None.

    "Unknown path" left the user to guess between a typo, a moved file and a path taken from the
    wrong folder; the resolved path answers that.
    """
    if not rel:
        return "the path is empty"
    if not file.exists():
        return f"{rel!r} does not exist (no file {file}; paths are relative to the CSV's folder)"
    if not file.is_file():
        return f"{rel!r} is not a file ({file})"
    return None


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
            rel = (row["path"] or "").strip()
            file = (path.parent / rel).resolve()
            label = LABEL_WORDS.get((row["label"] or "").strip().lower())
            if problem := row_path_problem(rel, file):
                problems.append(f"line {line}: {problem}")
            elif label is None:
                problems.append(f"line {line}: unknown label {row['label']!r} (use positive/negative or 1/0)")
            else:
                rows.append((file, label, (row.get("source") or "csv").strip() or "csv"))
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LabelsError(f"{path}: " + "; ".join(problems[:3]) + more)
    return rows
