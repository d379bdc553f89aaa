"""The label store: every label a person gives, on a dataset crop or on a run's superpixel.

One SQLite file in WAL mode, append-only. A label is never updated in place: each decision is a
new row that names the label it replaces (``previous``), so the history of every crop survives
and the latest row wins. Two writers (two ``explore`` windows, or ``explore`` and ``labels
import``) take SQLite's write lock for the read-previous-then-insert step (``BEGIN IMMEDIATE``),
so neither loses a label nor records a wrong ``previous``.

Keys:

- a dataset crop is keyed by its **content hash** (a moved or renamed file is the same crop); the
  row also keeps the dataset folder (``root``) and the path relative to it, which is what
  ``export`` writes into a labels CSV;
- a run's superpixel is keyed by the run directory, the scene id and the SLIC label.

``export_csv`` writes the ``path,label,source,note`` CSV that ``train --labels`` reads (paths
relative to the CSV's folder); ``import_csv`` reads one back.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import LabelsError
from .dataset import LABEL_WORDS, LABELS_HEADER, row_path_problem

#: ``PRAGMA user_version`` of the schema below.
SCHEMA_VERSION = 1
#: Where a label came from.
SOURCES = ("explore", "feedback", "import")
LABEL_NAMES = {1: "positive", 0: "negative"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('crop', 'superpixel')),
    content_hash TEXT,
    root TEXT,
    path TEXT,
    run TEXT,
    scene_id TEXT,
    segment INTEGER,
    label INTEGER NOT NULL CHECK (label IN (0, 1)),
    previous INTEGER CHECK (previous IN (0, 1)),
    source TEXT NOT NULL,
    note TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_by_key ON labels (key, id);
CREATE TRIGGER IF NOT EXISTS labels_append_only_u BEFORE UPDATE ON labels
    BEGIN SELECT RAISE(ABORT, 'the label store is append-only'); END;
CREATE TRIGGER IF NOT EXISTS labels_append_only_d BEFORE DELETE ON labels
    BEGIN SELECT RAISE(ABORT, 'the label store is append-only'); END;
"""


def content_hash(path: str | Path) -> str:
    """The crop's identity: SHA-256 of its bytes, 32 hex digits (the embedding cache's key)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:32]


@dataclass(frozen=True)
class CropKey:
    """A dataset crop: its content hash, its dataset folder and its path relative to that folder."""

    content_hash: str
    root: str
    path: str

    @property
    def key(self) -> str:
        return f"crop:{self.content_hash}"

    @classmethod
    def of(cls, root: str | Path, file: str | Path, digest: str | None = None) -> CropKey:
        """The key of ``file`` (absolute, or relative to ``root``) inside dataset folder ``root``."""
        root = Path(root).resolve()
        file = (root / file).resolve()
        try:
            rel = file.relative_to(root).as_posix()
        except ValueError:
            raise LabelsError(f"{file} is not inside the dataset folder {root}") from None
        return cls(digest or content_hash(file), str(root), rel)


@dataclass(frozen=True)
class SuperpixelKey:
    """A superpixel of a run: the run directory, its scene id and its SLIC label."""

    run: str
    scene_id: str
    segment: int

    @property
    def key(self) -> str:
        return f"superpixel:{self.run}:{self.scene_id}:{self.segment}"

    @classmethod
    def of(cls, run: str | Path, scene_id: str, segment: int) -> SuperpixelKey:
        return cls(str(Path(run).resolve()), str(scene_id), int(segment))


Key = CropKey | SuperpixelKey


@dataclass(frozen=True)
class LabelRow:
    """One stored decision. ``previous`` is the label this row replaced (None for a first label)."""

    id: int
    key: str
    kind: str
    label: int
    previous: int | None
    source: str
    note: str | None
    created: float
    content_hash: str | None = None
    root: str | None = None
    path: str | None = None
    run: str | None = None
    scene_id: str | None = None
    segment: int | None = None

    @property
    def file(self) -> Path | None:
        """The crop's file (dataset rows only)."""
        return None if self.root is None else Path(self.root) / self.path


_COLUMNS = "id, key, kind, label, previous, source, note, created, content_hash, root, path, run, scene_id, segment"


def parse_label(value) -> int:
    """1/0, positive/negative, mining/clean (as the labels CSV) or a bool."""
    if isinstance(value, bool) or value in (0, 1):
        return int(value)
    label = LABEL_WORDS.get(str(value).strip().lower())
    if label is None:
        raise LabelsError(f"unknown label {value!r}; use positive/negative (mining/not mining) or 1/0")
    return label


class LabelStore:
    """A label store file, created on first open. Safe to open from several processes at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 60000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise LabelsError(f"{self.path} is a label store of another version (schema {version}); use a new file")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise LabelsError(f"{self.path} is not a usable label store ({exc}); give another --labels file") from None
        except OSError as exc:
            raise LabelsError(f"cannot open the label store {self.path} ({exc})") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> LabelStore:  # noqa: PYI034
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- writing -------------------------------------------------------------------------------

    def add(self, key: Key, label, *, source: str = "explore", note: str | None = None) -> LabelRow:
        """Record one label; returns the stored row."""
        return self.add_many([(key, label)], source=source, note=note)[0]

    def add_many(self, items: Iterable[tuple], *, source: str = "explore", note: str | None = None) -> list[LabelRow]:
        """Record several labels in one transaction (a box selection labelled at once). Items are
        ``(key, label)`` or ``(key, label, note)``; ``note`` is the default note."""
        if source not in SOURCES:
            raise LabelsError(f"unknown label source {source!r}; use one of {', '.join(SOURCES)}")
        items = [(item[0], parse_label(item[1]), ((item[2] if len(item) > 2 else note) or "").strip() or None)
                 for item in items]
        ids = []
        try:
            self._db.execute("BEGIN IMMEDIATE")  # the write lock before reading ``previous``
            try:
                for key, label, row_note in items:
                    row = self._db.execute("SELECT label FROM labels WHERE key = ? ORDER BY id DESC LIMIT 1",
                                           (key.key,)).fetchone()
                    crop = isinstance(key, CropKey)
                    cur = self._db.execute(
                        "INSERT INTO labels (key, kind, content_hash, root, path, run, scene_id, segment, label, previous, "
                        "source, note, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (key.key, "crop" if crop else "superpixel",
                         key.content_hash if crop else None, key.root if crop else None, key.path if crop else None,
                         None if crop else key.run, None if crop else key.scene_id, None if crop else key.segment,
                         label, None if row is None else row[0], source, row_note, time.time()),
                    )
                    ids.append(cur.lastrowid)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            raise LabelsError(f"cannot write to the label store {self.path} ({exc})") from None
        return self._rows(f"WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id", ids) if ids else []

    # --- reading -------------------------------------------------------------------------------

    def _rows(self, where: str = "", params: Sequence = ()) -> list[LabelRow]:
        return [LabelRow(*r) for r in self._db.execute(f"SELECT {_COLUMNS} FROM labels {where}", params)]

    def history(self, key: Key | str | None = None) -> list[LabelRow]:
        """Every row, oldest first (of one key, if given)."""
        if key is None:
            return self._rows("ORDER BY id")
        return self._rows("WHERE key = ? ORDER BY id", (key if isinstance(key, str) else key.key,))

    def latest(self, kind: str | None = None) -> dict[str, LabelRow]:
        """The current label of every labelled key (its latest row), by key."""
        where = "WHERE kind = ?" if kind else ""
        rows = self._rows(
            f"WHERE id IN (SELECT MAX(id) FROM labels {where} GROUP BY key) ORDER BY id", (kind,) if kind else ()
        )
        return {r.key: r for r in rows}

    def get(self, key: Key | str) -> LabelRow | None:
        rows = self._rows("WHERE key = ? ORDER BY id DESC LIMIT 1", (key if isinstance(key, str) else key.key,))
        return rows[0] if rows else None

    # --- CSV -----------------------------------------------------------------------------------

    def export_csv(self, out: str | Path, cut: Sequence[tuple[str, int, str, str | None]] = ()) -> tuple[int, int]:
        """Write the current crop labels as a ``train --labels`` CSV (paths relative to the CSV's
        folder), then the ``cut`` rows ``(path, label, source, note)``: run superpixels already cut
        into crop files (``explore.crops``). Returns ``(rows written, superpixel labels left
        out)``: a run's superpixel has no crop file to point at until it is cut from the run's tiles."""
        from .. import atomic

        out = Path(out)
        latest = self.latest()
        crops = [r for r in latest.values() if r.kind == "crop"]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(LABELS_HEADER)
        base = out.resolve().parent
        for r in sorted(crops, key=lambda r: (r.root, r.path)):
            writer.writerow([Path(os.path.relpath(r.file, base)).as_posix(), LABEL_NAMES[r.label], r.source, r.note or ""])
        for path, label, source, note in cut:
            writer.writerow([path, LABEL_NAMES[label], source, note or ""])
        try:
            atomic.write_bytes(out, buf.getvalue().encode())
        except OSError as exc:
            raise LabelsError(f"cannot write {out} ({exc.strerror or exc}); choose another --out") from None
        return len(crops) + len(cut), len(latest) - len(crops) - len(cut)

    def import_csv(self, csv_path: str | Path, *, root: str | Path | None = None, source: str = "import") -> int:
        """Add the labels of a ``path,label,source,note`` CSV (paths relative to its folder) as
        crop labels; ``root`` is the dataset folder the paths are kept relative to (default: the
        CSV's folder). All rows are checked first, so a bad file adds nothing. Returns the count."""
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise LabelsError(f"labels CSV {csv_path} does not exist")
        root = Path(root if root is not None else csv_path.parent).resolve()
        items, problems = [], []
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
                raise LabelsError(f"{csv_path}: header must be {','.join(LABELS_HEADER)}, got {reader.fieldnames}")
            rows = list(reader)
        for line, row in enumerate(rows, start=2):
            rel = (row.get("path") or "").strip()
            file = (csv_path.parent / rel).resolve()
            label = LABEL_WORDS.get((row.get("label") or "").strip().lower())
            if problem := row_path_problem(rel, file):
                problems.append(f"line {line}: {problem}")
            elif label is None:
                problems.append(f"line {line}: unknown label {row.get('label')!r} (use positive/negative or 1/0)")
            elif not file.is_relative_to(root):
                problems.append(f"line {line}: {rel!r} is outside the dataset folder {root}")
            else:
                items.append((CropKey.of(root, file), label, (row.get("note") or "").strip() or None))
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            raise LabelsError(f"{csv_path}: " + "; ".join(problems[:3]) + more)
        self.add_many(items, source=source)  # one transaction: all or nothing
        return len(items)
