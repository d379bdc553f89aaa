"""The run directory: where a scan keeps its config, results, embeddings and log.

Layout (this module is the only one that knows it)::

    run/
      config.json     the RunConfig; a resume with other result-deciding settings is refused
      run.sqlite      scenes, regions (superpixels), each done scene's SLIC label map (zlib, about
                      25 kB a scene) and events, in WAL mode
      embeddings/     Parquet shards of many scenes: scene_id, label, embedder, vector (float32);
                      run.sqlite says which shard holds each scene's current rows
      scenes/         a small overlay PNG per flagged scene, for the map's popups
      models/v1, v2…  model versions after a retrain or rescore (v1: the scan's own model), never
                      overwritten; run.sqlite says which is current
      diff.geojson    what the latest rescore changed (diff.json: its counts and hectares)
      tiles-cache/    downloaded tiles of an HTTP source (unless the config names another cache)
      log.txt

Crash safety rests on two rules. A scene's files (its overlay) are written atomically *before*
its database transaction, under names derived from its scene id: a kill between the two leaves an
orphan file that the rerun overwrites, never a row without its file. And a scene's row, its region
rows and its embeddings are committed in one transaction, upserted by scene id, so a scene is never
half-recorded and never counted twice.

Embeddings are the bulk of a run (a default-model scene stores about 30 vectors of 5,512 numbers),
so one file per scene would make 500,000 files. A scene's vectors are first *staged* in run.sqlite,
in the scene's own transaction; once enough are staged (``SHARD_BYTES``, ``SHARD_SCENES``), or when
a writing store is closed normally, they are *sealed* into one Parquet shard: the shard file is
written atomically first, then one transaction points its scenes at it and drops their staged rows.
A kill between the two leaves an orphan shard that the next seal overwrites (shard numbers come
from the committed ones). A scene recorded again points at its new rows; its rows in an older shard
are ignored by every reader. Readers stream shards batch by batch, so memory does not grow with the
run.

``status`` reads small tables kept up to date in the same transactions (counts by status kept by
triggers, one row per scan session with its scene count and per-stage seconds), never the scene or
event rows, so it stays instant on a 500,000-scene run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import io
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .. import atomic
from ..errors import RunStoreError
from ..geo.tiles import Bounds, SceneCell
from ..images import write_png
from .config import RunConfig

if TYPE_CHECKING:  # detect pulls in scikit-image; status and export do not need it
    from ..model.detect import SceneResult

StoredStatus = Literal["pending", "done", "failed", "no-imagery", "skipped"]
_PAGE = 1000
#: ``PRAGMA user_version`` of the schema below; a run made with another one is refused.
SCHEMA_VERSION = 3
#: Parquet options of a shard. Vectors stay float32, stored losslessly and compactly: byte-stream
#: split then zstd keeps a demo-region default-model scene in 387 kB (554 kB as the old per-scene
#: files). float16 would take 200 kB, but it moves XGBoost's texture splits: rescoring the fast
#: model's 860 training crops from float16 flips 3 verdicts (probabilities move by up to 0.16),
#: and rescoring with the same model must change nothing (benchmarks/results-shards.json).
_PARQUET = {"compression": "zstd", "use_dictionary": ["scene_id", "embedder"],
            "use_byte_stream_split": ["vector.list.element"]}
#: Staged embeddings are sealed into a shard once they reach this many bytes or scenes: a few
#: thousand shards for a 450,000-scene default-model run, each small enough to write in one go.
SHARD_BYTES = 64 * 2**20
SHARD_SCENES = 4096
#: Vector bytes per row group of a shard and per batch read back: what a reader holds at once.
BATCH_BYTES = 16 * 2**20
#: ``scenes.shard`` of a scene whose vectors are staged in run.sqlite, not yet in a shard file.
_STAGED = 0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scenes (
    scene_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed', 'no-imagery', 'skipped')),
    error TEXT,
    flagged INTEGER NOT NULL DEFAULT 0,
    n_positive INTEGER,
    n_superpixels INTEGER,
    max_probability REAL,
    positive_area_m2 REAL,
    capture_date TEXT,
    bounds TEXT,
    valid_fraction REAL,
    model TEXT,
    in_grid INTEGER NOT NULL DEFAULT 1,
    updated_at REAL,
    shard INTEGER  -- where the scene's embeddings are: NULL none, 0 staged, k embeddings/shard-k.parquet
);
CREATE INDEX IF NOT EXISTS scenes_by_status ON scenes (status);
CREATE INDEX IF NOT EXISTS scenes_by_shard ON scenes (shard);
CREATE TABLE IF NOT EXISTS staged (
    scene_id TEXT PRIMARY KEY,
    embedder TEXT NOT NULL,
    dim INTEGER NOT NULL,
    labels BLOB NOT NULL,   -- int32
    vectors BLOB NOT NULL   -- float32, (len(labels), dim)
);
CREATE TABLE IF NOT EXISTS shards (
    shard INTEGER PRIMARY KEY,
    embedder TEXT NOT NULL,
    dim INTEGER NOT NULL,
    scenes INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS scene_counts (
    in_grid INTEGER NOT NULL,
    status TEXT NOT NULL,
    flagged INTEGER NOT NULL,
    partial INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (in_grid, status, flagged, partial)
);
CREATE TRIGGER IF NOT EXISTS scenes_counted AFTER INSERT ON scenes BEGIN
    INSERT INTO scene_counts VALUES (NEW.in_grid, NEW.status, NEW.flagged, COALESCE(NEW.valid_fraction < 1, 0), 1)
        ON CONFLICT DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS scenes_recounted AFTER UPDATE OF in_grid, status, flagged, valid_fraction ON scenes
WHEN OLD.in_grid IS NOT NEW.in_grid OR OLD.status IS NOT NEW.status OR OLD.flagged IS NOT NEW.flagged
     OR COALESCE(OLD.valid_fraction < 1, 0) IS NOT COALESCE(NEW.valid_fraction < 1, 0) BEGIN
    UPDATE scene_counts SET n = n - 1 WHERE in_grid = OLD.in_grid AND status = OLD.status AND flagged = OLD.flagged
        AND partial = COALESCE(OLD.valid_fraction < 1, 0);
    INSERT INTO scene_counts VALUES (NEW.in_grid, NEW.status, NEW.flagged, COALESCE(NEW.valid_fraction < 1, 0), 1)
        ON CONFLICT DO UPDATE SET n = n + 1;
END;
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    scenes INTEGER NOT NULL DEFAULT 0,
    first REAL,
    last REAL,
    timed INTEGER NOT NULL DEFAULT 0,
    fetch REAL NOT NULL DEFAULT 0,
    decode REAL NOT NULL DEFAULT 0,
    slic REAL NOT NULL DEFAULT 0,
    embed REAL NOT NULL DEFAULT 0,
    classify REAL NOT NULL DEFAULT 0,
    store REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS regions (
    scene_id TEXT NOT NULL,
    label INTEGER NOT NULL,
    probability REAL,
    positive INTEGER NOT NULL,
    area_m2 REAL NOT NULL,
    bbox TEXT NOT NULL,
    polygon TEXT,
    note TEXT,
    PRIMARY KEY (scene_id, label)
);
CREATE TABLE IF NOT EXISTS segments (
    scene_id TEXT PRIMARY KEY,
    labels BLOB NOT NULL  -- the scan's SLIC label map, model.segment.pack_labels
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    scene_id TEXT,
    message TEXT
);
CREATE INDEX IF NOT EXISTS events_by_kind ON events (kind, ts);
"""


@dataclass(frozen=True)
class RegionRecord:
    """One superpixel's verdict: ``bbox`` in lon/lat; ``polygon`` (a GeoJSON Polygon geometry) is
    kept for positive superpixels only, as outlines of all of them would dwarf the rest of the run.

    ``area_m2`` counts the superpixel's valid pixels only. ``probability`` is None for a
    superpixel left unscored, and ``note`` says why (its crop is mostly nodata, say).
    """

    label: int
    probability: float | None
    positive: bool
    area_m2: float
    bbox: Bounds
    polygon: dict | None = None
    note: str | None = None


@dataclass(frozen=True)
class StageTimes:
    """Seconds one scene spent in each stage of a scan (or, in :class:`RunStatus`, all scenes), so
    a slow run says where its time goes: tile fetching, image decoding, SLIC, the CNN, the
    classifier, or the run store (which :meth:`RunStore.record` times itself)."""

    fetch: float = 0.0
    decode: float = 0.0
    slic: float = 0.0
    embed: float = 0.0
    classify: float = 0.0
    store: float = 0.0


#: The shards some scene's embeddings are in: shards no scene points to any more are not read.
_LIVE_SHARDS = "shard IN (SELECT DISTINCT shard FROM scenes WHERE shard > 0)"
#: The stages, in the order of ``StageTimes``'s fields (and of the sessions table's columns).
STAGES = tuple(f.name for f in dataclasses.fields(StageTimes))


@dataclass(frozen=True)
class EmbeddingBatch:
    """A slice of a run's stored embeddings: ``vectors`` ``float32 (n, dim)`` of superpixels
    (``scene_ids[i]``, ``labels[i]``), all from ``embedder``."""

    scene_ids: list[str]
    labels: np.ndarray
    vectors: np.ndarray
    embedder: str


@dataclass(frozen=True)
class SceneRecord:
    """Everything a scan learned about one scene, stored together by :meth:`RunStore.record`.

    ``result``, ``regions`` and ``embeddings`` (``float32 (n_superpixels, dim)`` from ``embedder``)
    are set for a "done" scene; ``error`` says why a scene failed or was skipped. ``overlay`` is the
    picture shown on the map for a flagged scene. ``segmentation`` is the SLIC label map of every
    done scene, packed (``model.segment.pack_labels``), so a rescore or a reader's report never
    segments it again.
    """

    scene_id: str
    status: StoredStatus
    bounds: Bounds
    error: str | None = None
    capture_date: dt.date | None = None
    result: SceneResult | None = None
    regions: tuple[RegionRecord, ...] = ()
    embeddings: np.ndarray | None = None
    embedder: str | None = None
    overlay: np.ndarray | None = None
    segmentation: bytes | None = None
    #: Share of the scene's pixels that hold imagery; below 1 the scene is partial.
    valid_fraction: float | None = None
    #: Content hash of the model that scored the scene.
    model: str | None = None
    #: The labels of the rows of ``embeddings`` (the scored superpixels).
    embedding_labels: tuple[int, ...] = ()
    #: Where the scan spent its time on this scene; ``store`` is filled in by the store.
    timings: StageTimes | None = None


@dataclass(frozen=True)
class StoredScene:
    """A scene row as read back from the store."""

    scene_id: str
    status: StoredStatus
    error: str | None
    flagged: bool
    n_positive: int | None
    n_superpixels: int | None
    max_probability: float | None
    positive_area_m2: float | None
    capture_date: dt.date | None
    bounds: Bounds | None
    valid_fraction: float | None = None
    model: str | None = None


@dataclass(frozen=True)
class StoredEvent:
    """One line of the run's history: when (a Unix time), what, and about which scene."""

    ts: float
    kind: str
    scene_id: str | None
    message: str | None


_VERSIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    version INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    model_hash TEXT NOT NULL,
    parent INTEGER,
    data_hash TEXT,
    changes TEXT NOT NULL,
    created REAL NOT NULL,
    current INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    file TEXT NOT NULL,
    line INTEGER NOT NULL,
    verdict TEXT,
    note TEXT,
    geometry TEXT,
    matched TEXT NOT NULL,
    reason TEXT,
    imported REAL NOT NULL
);
"""


@dataclass(frozen=True)
class ModelVersion:
    """One model the run has been scored with: ``path`` is its bundle (``models/vN``), ``parent``
    the version it was retrained from, ``changes`` what went into it (counts, dropped positives)."""

    version: int
    path: Path
    model_hash: str
    parent: int | None
    data_hash: str | None
    changes: dict
    created: float
    current: bool


@dataclass(frozen=True, slots=True)  # a rescore holds one per superpixel of the run
class RescoredRegion:
    """A superpixel's new verdict; ``polygon`` None keeps the stored one (or none)."""

    label: int
    probability: float | None
    positive: bool
    polygon: dict | None = None


@dataclass(frozen=True, slots=True)
class RescoredScene:
    """A done scene decided again from its stored embeddings."""

    scene_id: str
    flagged: bool
    n_positive: int
    max_probability: float | None
    positive_area_m2: float
    regions: tuple[RescoredRegion, ...]
    #: The scan's map picture no longer shows the scene's positives: the store deletes it.
    stale_picture: bool = False


@dataclass(frozen=True)
class FeedbackRow:
    """One report line of an imported feedback file: the superpixels it touched, or why none."""

    file: str
    line: int
    verdict: str | None
    note: str | None
    geometry: dict | None
    matched: tuple[tuple[str, int], ...]
    reason: str | None
    imported: float = 0.0


@dataclass(frozen=True)
class RunStatus:
    """Scene counts by status, flagged scenes, and the speed of the latest session (scenes/s).

    Scenes dropped from the grid by a forced change of area, zoom or scene size are not counted
    (``dropped`` says how many there are). ``partial`` counts done scenes with some nodata.
    ``stage_seconds`` adds up the stage times of the ``timed_scenes`` recorded with timings, over
    all sessions of the run.
    """

    total: int
    pending: int
    done: int
    failed: int
    no_imagery: int
    skipped: int
    flagged: int
    rate: float | None
    partial: int = 0
    dropped: int = 0
    stage_seconds: StageTimes = StageTimes()
    timed_scenes: int = 0


def _hint(exc: BaseException) -> str:
    text = str(exc).lower()
    if getattr(exc, "errno", None) == errno.ENOSPC or "disk is full" in text or "database or disk is full" in text:
        return "the disk is full; free some space and rerun the same command to resume"
    if isinstance(exc, PermissionError) or "readonly" in text or "read-only" in text or getattr(exc, "errno", None) in (errno.EACCES, errno.EROFS):
        return "the run directory is not writable; fix its permissions or choose another --run directory"
    return "check the run directory and disk, then rerun the same command to resume"


def _bounds_json(b: Bounds) -> str:
    return json.dumps([b.west, b.south, b.east, b.north])


def _bounds(text: str | None) -> Bounds | None:
    return None if text is None else Bounds(*json.loads(text))


def _file_stem(scene_id: str) -> str:
    """A file-name form of a scene id (``18/1/2/4`` → ``18_1_2_4``); unique because ids are numbers."""
    return scene_id.replace("/", "_")


def _batch_rows(dim: int) -> int:
    return max(16, BATCH_BYTES // (4 * dim))


def current_model_config(run_dir: str | Path, config: RunConfig) -> RunConfig:
    """``config`` with the run's current model version when the model given is one the run has
    been retrained from: rerunning the original scan command after a ``retrain`` resumes with the
    retrained model, instead of being refused as a changed model (or, with ``--force``, scoring new
    scenes with the old one). Any other model is left as given (a real change of model)."""
    db = Path(run_dir) / "run.sqlite"
    if not db.is_file():
        return config
    with RunStore(run_dir) as store:
        if not store._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'models'").fetchone():
            return config
        versions = store.model_versions()
    current = next((v for v in versions if v.current), None)
    if current is None or config.model_hash == current.model_hash:
        return config
    if any(v.model_hash == config.model_hash for v in versions):
        return dataclasses.replace(config, model=str(current.path), model_hash=current.model_hash)
    return config


class RunStore:
    """One run directory, opened for a scan (with its config) or for reading (``config=None``)."""

    def __init__(self, run_dir: str | Path, config: RunConfig | None = None, *, force: bool = False):
        self.run_dir = Path(run_dir)
        self.config_path = self.run_dir / "config.json"
        self.db_path = self.run_dir / "run.sqlite"
        self.embeddings_dir = self.run_dir / "embeddings"
        self.scenes_dir = self.run_dir / "scenes"
        self.log_path = self.run_dir / "log.txt"
        #: Where downloaded tiles are kept unless the config names a shared cache.
        self.tile_cache_dir = self.run_dir / "tiles-cache"
        self._regrid = False
        #: The scan session this store records into (a row of ``sessions``); None when reading.
        self._session: int | None = None
        if config is None and not self.db_path.is_file():
            raise RunStoreError(f"{self.run_dir} is not a run directory (no run.sqlite); start one with 'amber-hunter scan --run {self.run_dir}'")
        with self._guard("open the run directory"):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.db_path, timeout=30)
            try:
                self._check_schema()
                if self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'models'").fetchone():
                    self._sync_config()  # a rescore killed between its commit and config.json
                if config is not None:
                    self._db.execute("PRAGMA journal_mode=WAL")
                    self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across kill -9
                    self._db.executescript(_SCHEMA)
                    self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    self._adopt(config, force)
            except BaseException:
                self._db.close()
                raise

    # --- plumbing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Turn disk and database failures into one RunStoreError line; SQLite rolls back."""
        try:
            yield
        except (sqlite3.OperationalError, sqlite3.DatabaseError, OSError) as exc:
            raise RunStoreError(f"{self.run_dir}: cannot {action} ({exc}); {_hint(exc)}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RunStore:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """A writing store seals its staged embeddings when its block ends normally (a scan that
        finished or was stopped by a first Ctrl-C); after an error they stay staged, safe, and
        are sealed by the next session."""
        try:
            if exc_type is None and self._session is not None:
                self.flush()
        finally:
            self.close()

    def _check_schema(self) -> None:
        """Refuse a run directory written by a version of amber-hunter with another schema."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        has_tables = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'scenes'").fetchone()
        if has_tables and version != SCHEMA_VERSION:
            raise RunStoreError(f"{self.run_dir} was written by another version of amber-hunter (schema {version}, "
                                f"this one reads {SCHEMA_VERSION}); rescan the area into a new run directory "
                                "('amber-hunter scan --run NEW_DIR' with the same settings)")

    def _adopt(self, config: RunConfig, force: bool) -> None:
        """Write the config of a new run, or check a resumed run's config against the stored one."""
        from .config import GRID_FIELDS

        stored = self.config if self.config_path.is_file() else None
        changed = [] if stored is None else stored.differences(config)
        #: A forced change of the grid: add_scenes drops the scenes of the old one.
        self._regrid = any(name in GRID_FIELDS for name in changed)
        if changed and not force:
            raise RunStoreError(
                f"{self.run_dir} was started with a different {', '.join(changed)}; rerun with the original "
                "settings to resume, use a new --run directory, or pass --force to go on with the new settings"
            )
        atomic.write_json(self.config_path, config.to_json())
        with self._db:
            if changed:
                self._event("config-changed", message=f"forced new {', '.join(changed)}")
            self._event("start", message="resume" if stored else "new run")
            self._session = self._db.execute("INSERT INTO sessions (started) VALUES (?)", (time.time(),)).lastrowid

    def _event(self, kind: str, scene_id: str | None = None, message: str | None = None) -> None:
        self._db.execute("INSERT INTO events (ts, kind, scene_id, message) VALUES (?, ?, ?, ?)", (time.time(), kind, scene_id, message))

    # --- writing -------------------------------------------------------------------------------

    @property
    def config(self) -> RunConfig:
        """The config the run was started (or last forced) with."""
        try:
            return RunConfig.from_json(json.loads(self.config_path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise RunStoreError(f"{self.config_path} is unreadable ({exc}); start a new run directory") from None

    def add_scenes(self, cells: Iterable[SceneCell]) -> int:
        """Register the scenes of the grid as pending; scenes already known keep their status.

        After a forced change of area, zoom or scene size, the scenes that are not in the new grid
        are dropped in the same transaction: they leave status, pending and export, so no ground
        is counted twice. Their rows stay, marked, for the record. Returns how many were dropped.
        """
        regrid = self._regrid
        with self._guard("register scenes"), self._db:
            if regrid:
                self._db.execute("UPDATE scenes SET in_grid = 0")
            self._db.executemany(
                "INSERT INTO scenes (scene_id, status) VALUES (?, 'pending') ON CONFLICT (scene_id) DO UPDATE SET in_grid = 1",
                ((c.scene_id,) for c in cells),
            )
            dropped = self._db.execute("SELECT COUNT(*) FROM scenes WHERE NOT in_grid").fetchone()[0]
            if regrid:
                self._event("regrid", message=f"{dropped} scenes outside the new grid dropped")
        self._regrid = False
        return dropped

    def retry_failed(self) -> int:
        """Put the scenes that failed (an outage, a rate limit that outlasted the retries) back in
        the queue; scenes without imagery or skipped as unusable stay as they are, since fetching
        them again would give the same answer. Returns how many were requeued."""
        with self._guard("requeue failed scenes"), self._db:
            n = self._db.execute(
                "UPDATE scenes SET status = 'pending', error = NULL, updated_at = ? WHERE status = 'failed' AND in_grid",
                (time.time(),),
            ).rowcount
            if n:
                self._event("retry-failed", message=f"{n} failed scenes requeued")
        return n

    def pending(self) -> Iterator[str]:
        """Scene ids still to do, in registration (grid) order, read a page at a time so memory
        stays flat however large the region is."""
        last = 0
        while True:
            with self._guard("read pending scenes"):
                rows = self._db.execute(
                    "SELECT rowid, scene_id FROM scenes WHERE status = 'pending' AND in_grid AND rowid > ? "
                    "ORDER BY rowid LIMIT ?",
                    (last, _PAGE),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield from (scene_id for _, scene_id in rows)

    def overlay_path(self, scene_id: str) -> Path:
        return self.scenes_dir / f"{_file_stem(scene_id)}.png"

    def shard_path(self, shard: int) -> Path:
        return self.embeddings_dir / f"shard-{shard:06d}.parquet"

    def _stage(self, record: SceneRecord) -> None:
        """Keep a done scene's vectors in run.sqlite, in the scene's transaction, until sealed."""
        vectors = np.ascontiguousarray(record.embeddings, np.float32)
        n, dim = vectors.shape
        labels = record.embedding_labels or tuple(r.label for r in record.regions)
        if len(labels) != n:
            raise ValueError(f"scene {record.scene_id}: {n} embeddings for {len(labels)} labels")
        self._db.execute("INSERT INTO staged (scene_id, embedder, dim, labels, vectors) VALUES (?, ?, ?, ?, ?)",
                         (record.scene_id, record.embedder, dim, np.asarray(labels, np.int32).tobytes(), vectors.tobytes()))

    def record(self, record: SceneRecord) -> None:
        """Store one scene's outcome: its files first, then its rows, label map and staged
        embeddings in one transaction, with the session's scene count and stage times. Seals a
        shard when enough embeddings are staged."""
        started = time.perf_counter()
        r = record.result
        with self._guard(f"save scene {record.scene_id}"):
            if record.overlay is not None:
                write_png(self.overlay_path(record.scene_id), record.overlay)
            with self._db:
                self._db.execute(
                    """INSERT INTO scenes (scene_id, status, error, flagged, n_positive, n_superpixels, max_probability,
                                           positive_area_m2, capture_date, bounds, valid_fraction, model, updated_at, shard)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT (scene_id) DO UPDATE SET
                           status = excluded.status, error = excluded.error, flagged = excluded.flagged,
                           n_positive = excluded.n_positive, n_superpixels = excluded.n_superpixels,
                           max_probability = excluded.max_probability, positive_area_m2 = excluded.positive_area_m2,
                           capture_date = excluded.capture_date, bounds = excluded.bounds,
                           valid_fraction = excluded.valid_fraction, model = excluded.model,
                           updated_at = excluded.updated_at, shard = excluded.shard""",
                    (
                        record.scene_id, record.status, record.error, int(bool(r and r.flagged)),
                        r and r.n_positive, r and r.n_superpixels, r and r.max_probability, r and r.positive_area_m2,
                        record.capture_date and record.capture_date.isoformat(), _bounds_json(record.bounds),
                        record.valid_fraction, record.model, time.time(),
                        None if record.embeddings is None else _STAGED,
                    ),
                )
                self._db.execute("DELETE FROM staged WHERE scene_id = ?", (record.scene_id,))
                if record.embeddings is not None:
                    self._stage(record)
                self._db.execute("DELETE FROM segments WHERE scene_id = ?", (record.scene_id,))
                if record.segmentation is not None:
                    self._db.execute("INSERT INTO segments (scene_id, labels) VALUES (?, ?)",
                                     (record.scene_id, record.segmentation))
                self._db.execute("DELETE FROM regions WHERE scene_id = ?", (record.scene_id,))
                self._db.executemany(
                    "INSERT INTO regions (scene_id, label, probability, positive, area_m2, bbox, polygon, note) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (record.scene_id, g.label, g.probability, int(g.positive), g.area_m2, _bounds_json(g.bbox),
                         None if g.polygon is None else json.dumps(g.polygon), g.note)
                        for g in record.regions
                    ],
                )
                self._event("scene", record.scene_id, record.status)
                t = record.timings or StageTimes()
                now = time.time()
                self._db.execute(
                    "UPDATE sessions SET scenes = scenes + 1, first = COALESCE(first, ?), last = ?, timed = timed + ?, "
                    "fetch = fetch + ?, decode = decode + ?, slic = slic + ?, embed = embed + ?, "
                    "classify = classify + ?, store = store + ? WHERE id = ?",
                    (now, now, int(record.timings is not None), t.fetch, t.decode, t.slic, t.embed, t.classify,
                     t.store + time.perf_counter() - started, self._session),
                )
            n, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(vectors)), 0) FROM staged").fetchone()
        if n >= SHARD_SCENES or size >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        """Seal the staged embeddings into shards: each shard file is written atomically, then one
        transaction points its scenes at it and drops their staged rows. Scenes of different
        embedders (a forced change of model) go to different shards."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        started = time.perf_counter()
        with self._guard("seal an embeddings shard"):
            staged = self._db.execute("SELECT scene_id, embedder, dim, labels, vectors FROM staged ORDER BY rowid").fetchall()
            if not staged:
                return
            groups: dict[tuple[str, int], list] = {}
            for row in staged:
                groups.setdefault((row[1], row[2]), []).append(row)
            shard = self._db.execute("SELECT COALESCE(MAX(shard), 0) FROM shards").fetchone()[0]
            sealed = []
            for (embedder, dim), rows in groups.items():
                shard += 1
                labels = [np.frombuffer(row[3], np.int32) for row in rows]
                vectors = np.concatenate([np.frombuffer(row[4], np.float32) for row in rows])
                n = sum(len(x) for x in labels)
                table = pa.table({
                    "scene_id": pa.array([row[0] for row, x in zip(rows, labels) for _ in range(len(x))], pa.string()),
                    "label": pa.array(np.concatenate(labels), pa.int32()),
                    "embedder": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([embedder])),
                    "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors), dim),
                })
                buf = io.BytesIO()
                pq.write_table(table, buf, row_group_size=_batch_rows(dim), **_PARQUET)
                atomic.write_bytes(self.shard_path(shard), buf.getvalue())
                sealed.append((shard, embedder, dim, [row[0] for row in rows], n, buf.tell()))
            with self._db:
                for shard, embedder, dim, scene_ids, n, size in sealed:
                    self._db.execute("INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?, ?)",
                                     (shard, embedder, dim, len(scene_ids), n, size, time.time()))
                    self._db.executemany("UPDATE scenes SET shard = ? WHERE scene_id = ?", ((shard, i) for i in scene_ids))
                    self._db.executemany("DELETE FROM staged WHERE scene_id = ?", ((i,) for i in scene_ids))
                self._db.execute("UPDATE sessions SET store = store + ? WHERE id = ?",
                                 (time.perf_counter() - started, self._session))

    def note(self, kind: str, message: str) -> None:
        """Record a run-level event (a stop, an interruption) with its time."""
        with self._guard(f"record event {kind}"), self._db:
            self._event(kind, message=message)

    # --- reading -------------------------------------------------------------------------------

    def status(self) -> RunStatus:
        """Counts per status, the latest session's rate and the stage times, from the small tables
        kept by the scene transactions (never a pass over the scene or event rows)."""
        with self._guard("read the run status"):
            counts: dict[str, int] = {}
            flagged = partial = dropped = 0
            for in_grid, status, is_flagged, is_partial, n in self._db.execute("SELECT * FROM scene_counts"):
                if not in_grid:
                    dropped += n
                    continue
                counts[status] = counts.get(status, 0) + n
                flagged += n if status == "done" and is_flagged else 0
                partial += n if status == "done" and is_partial else 0
            # The latest session that processed scenes: a rerun with nothing pending leaves the rate
            # of the session that did the work. Timing from its first to its last scene leaves out
            # the model loading, which would make short runs look slow.
            latest = self._db.execute("SELECT scenes, first, last FROM sessions WHERE scenes > 0 "
                                      "ORDER BY id DESC LIMIT 1").fetchone()
            timed, *seconds = self._db.execute(
                f"SELECT COALESCE(SUM(timed), 0), {', '.join(f'COALESCE(SUM({s}), 0)' for s in STAGES)} FROM sessions"
            ).fetchone()
        n, first, last = latest or (0, None, None)
        return RunStatus(
            total=sum(counts.values()),
            pending=counts.get("pending", 0),
            done=counts.get("done", 0),
            failed=counts.get("failed", 0),
            no_imagery=counts.get("no-imagery", 0),
            skipped=counts.get("skipped", 0),
            flagged=flagged,
            rate=(n - 1) / (last - first) if n >= 2 and last > first else None,
            partial=partial,
            dropped=dropped,
            stage_seconds=StageTimes(*seconds),
            timed_scenes=timed,
        )

    def failure_reasons(self, top: int = 5) -> list[tuple[str, int]]:
        """The commonest reasons scenes failed, most frequent first, with their counts.

        Reasons are grouped with their tile addresses blanked out (``tile z/x/y: HTTP 500``), so a
        night of one outage reads as one line, not thousands.
        """
        import re

        counts: dict[str, int] = {}
        with self._guard("read failure reasons"):
            for (error,) in self._db.execute("SELECT error FROM scenes WHERE status = 'failed' AND in_grid"):
                key = re.sub(r"https?://\S*?(?=:?\s)", "<tile url>", error or "unknown error")
                key = re.sub(r"\b\d+/\d+/\d+\b", "z/x/y", key)
                counts[key] = counts.get(key, 0) + 1
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]

    def scenes(self, *, flagged_only: bool = False) -> Iterator[StoredScene]:
        """Scene rows in grid order; ``flagged_only`` gives the done scenes that were flagged."""
        where = "WHERE in_grid AND status = 'done' AND flagged" if flagged_only else "WHERE in_grid"
        with self._guard("read scenes"):
            rows = self._db.execute(
                "SELECT scene_id, status, error, flagged, n_positive, n_superpixels, max_probability, positive_area_m2, "
                f"capture_date, bounds, valid_fraction, model FROM scenes {where} ORDER BY rowid"
            )
            for row in rows:
                *head, date, bounds, valid_fraction, model = row
                head[3] = bool(head[3])
                yield StoredScene(*head, dt.date.fromisoformat(date) if date else None, _bounds(bounds), valid_fraction, model)

    def regions(self, scene_id: str, *, positive_only: bool = False, outlines: bool = True) -> list[RegionRecord]:
        """The superpixels stored for a scene, by label; ``outlines=False`` leaves their polygons
        out (None), which a rescore does not need and which cost most of the reading."""
        where = " AND positive" if positive_only else ""
        polygon = "polygon" if outlines else "NULL"
        with self._guard(f"read regions of {scene_id}"):
            rows = self._db.execute(
                f"SELECT label, probability, positive, area_m2, bbox, {polygon}, note FROM regions WHERE scene_id = ?{where} "
                "ORDER BY label",
                (scene_id,),
            ).fetchall()
        return [RegionRecord(label, p, bool(pos), area, _bounds(bbox), None if poly is None else json.loads(poly), note)
                for label, p, pos, area, bbox, poly, note in rows]

    def _segments(self, query: str, params: tuple = ()) -> tuple | None:
        """A row of the label-map table; None from a run scanned before it existed (a store
        opened for reading does not create tables)."""
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'segments'").fetchone():
            return None
        return self._db.execute(query, params).fetchone()

    def segmentation(self, scene_id: str) -> np.ndarray | None:
        """The SLIC label map the scan stored for a done scene, or None: a run scanned before label
        maps were stored (then ``run.resegment`` segments the scene again from its tiles)."""
        with self._guard(f"read the label map of {scene_id}"):
            row = self._segments("SELECT labels FROM segments WHERE scene_id = ?", (scene_id,))
        if row is None:
            return None
        from ..model.segment import unpack_labels

        return unpack_labels(row[0])

    def segmentation_bytes(self) -> int:
        """What the stored label maps take in run.sqlite, in bytes (0 for a run without them)."""
        with self._guard("measure the stored label maps"):
            row = self._segments("SELECT COALESCE(SUM(LENGTH(labels)), 0) FROM segments")
        return 0 if row is None else row[0]

    def events(self, kind: str | None = None) -> list[StoredEvent]:
        """The run's events in time order (starts, scenes, stops, regrids…), or those of one kind."""
        where, params = ("WHERE kind = ?", (kind,)) if kind else ("", ())
        with self._guard("read events"):
            rows = self._db.execute(f"SELECT ts, kind, scene_id, message FROM events {where} ORDER BY id", params).fetchall()
        return [StoredEvent(*row) for row in rows]

    # --- model versions, rescoring and feedback --------------------------------------------------

    def _versions_schema(self) -> None:
        """The tables of retraining, made on first use (runs scanned before them simply have none)."""
        with self._guard("prepare the model-version tables"):
            self._db.executescript(_VERSIONS_SCHEMA)

    @property
    def models_dir(self) -> Path:
        return self.run_dir / "models"

    def model_versions(self) -> list[ModelVersion]:
        self._versions_schema()
        with self._guard("read model versions"):
            rows = self._db.execute("SELECT version, path, model_hash, parent, data_hash, changes, created, current "
                                    "FROM models ORDER BY version").fetchall()
        return [ModelVersion(v, self.run_dir / p, h, parent, d, json.loads(c), t, bool(cur))
                for v, p, h, parent, d, c, t, cur in rows]

    def current_version(self) -> ModelVersion | None:
        return next((v for v in self.model_versions() if v.current), None)

    def next_version_dir(self) -> tuple[int, Path]:
        """The number and folder of the next model version. A folder left by a version that was
        never committed (a kill in the middle of a retrain) is reused: it is not in the table."""
        versions = self.model_versions()
        n = max((v.version for v in versions), default=0) + 1
        return n, self.models_dir / f"v{n}"

    def apply_rescore(self, scenes: list[RescoredScene], version: ModelVersion, message: str) -> None:
        """Store a rescore: every scene's new verdict, the model version (added, or chosen again
        by a rollback) as current, and an event, in one transaction; then the config names the
        current model so a resumed scan scores new scenes with it. A kill before the commit leaves
        the run as it was, but for the deleted map pictures of the scenes that change (the map
        draws them again from the tiles); after it, a reopened run finishes the config
        (``_sync_config``)."""
        self._versions_schema()
        with self._guard("store the rescored run"):
            for scene in scenes:  # a missing picture is redrawn by the map; a stale one would mislead
                if scene.stale_picture:
                    self.overlay_path(scene.scene_id).unlink(missing_ok=True)
            with self._db:
                self._db.execute("UPDATE models SET current = 0")
                self._db.execute(
                    "INSERT INTO models (version, path, model_hash, parent, data_hash, changes, created, current) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT (version) DO UPDATE SET current = 1",
                    (version.version, version.path.relative_to(self.run_dir).as_posix(), version.model_hash,
                     version.parent, version.data_hash, json.dumps(version.changes), version.created))
                for scene in scenes:
                    self._db.execute(
                        "UPDATE scenes SET flagged = ?, n_positive = ?, max_probability = ?, positive_area_m2 = ?, "
                        "model = ?, updated_at = ? WHERE scene_id = ?",
                        (int(scene.flagged), scene.n_positive, scene.max_probability, scene.positive_area_m2,
                         version.model_hash, time.time(), scene.scene_id))
                    self._db.executemany(
                        "UPDATE regions SET probability = ?, positive = ?, polygon = COALESCE(?, polygon) "
                        "WHERE scene_id = ? AND label = ?",
                        [(g.probability, int(g.positive), None if g.polygon is None else json.dumps(g.polygon),
                          scene.scene_id, g.label) for g in scene.regions])
                self._event("rescore", message=message)
        self._sync_config()

    def _sync_config(self) -> None:
        """Point config.json at the current model version (after a rescore or rollback)."""
        current = self.current_version()
        config = self.config
        if current is None or (config.model == str(current.path) and config.model_hash == current.model_hash):
            return
        with self._guard("update config.json"):
            atomic.write_json(self.config_path, dataclasses.replace(
                config, model=str(current.path), model_hash=current.model_hash).to_json())

    def add_feedback(self, rows: list[FeedbackRow]) -> None:
        """Record the lines of one imported feedback file, all or none."""
        self._versions_schema()
        now = time.time()
        with self._guard("record feedback"), self._db:
            self._db.executemany(
                "INSERT INTO feedback (file, line, verdict, note, geometry, matched, reason, imported) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.file, r.line, r.verdict, r.note, None if r.geometry is None else json.dumps(r.geometry),
                  json.dumps([list(m) for m in r.matched]), r.reason, now) for r in rows])
            self._event("feedback", message=f"{len(rows)} reports imported")

    def feedback(self) -> list[FeedbackRow]:
        self._versions_schema()
        with self._guard("read feedback"):
            rows = self._db.execute("SELECT file, line, verdict, note, geometry, matched, reason, imported "
                                    "FROM feedback ORDER BY id").fetchall()
        return [FeedbackRow(f, line, v, n, None if g is None else json.loads(g),
                            tuple((s, int(k)) for s, k in json.loads(m)), r, t)
                for f, line, v, n, g, m, r, t in rows]

    def embedders(self) -> dict[str, int]:
        """The embedders of the run's current embeddings, with their widths (empty: none stored)."""
        with self._guard("read the embedders"):
            rows = self._db.execute(
                f"SELECT embedder, dim FROM shards WHERE {_LIVE_SHARDS} UNION SELECT embedder, dim FROM staged").fetchall()
        return dict(rows)

    def embedding_rows(self) -> int:
        """At most how many embeddings :meth:`embedding_batches` yields (rows of shards that a
        scene recorded again left behind are counted here, not yielded there)."""
        with self._guard("count the embeddings"):
            in_shards = self._db.execute(f"SELECT COALESCE(SUM(rows), 0) FROM shards WHERE {_LIVE_SHARDS}").fetchone()[0]
            staged = self._db.execute("SELECT COALESCE(SUM(LENGTH(labels)), 0) / 4 FROM staged").fetchone()[0]
        return in_shards + staged

    def embedding_batches(self, batch_rows: int | None = None) -> Iterator[EmbeddingBatch]:
        """The current embedding of every superpixel, at most ``batch_rows`` at a time (by default
        ``BATCH_BYTES`` of vectors), shard by shard and then the staged ones: memory holds one
        batch, however large the run. Rows of a scene recorded again since its shard was sealed
        are skipped."""
        import pyarrow.parquet as pq

        with self._guard("read the embeddings shards"):
            shards = self._db.execute(f"SELECT shard, embedder, dim FROM shards WHERE {_LIVE_SHARDS} "
                                      "ORDER BY shard").fetchall()
        for shard, embedder, dim in shards:
            path = self.shard_path(shard)
            with self._guard(f"read {path.name}"):
                live = {i for (i,) in self._db.execute("SELECT scene_id FROM scenes WHERE shard = ?", (shard,))}
                if not path.is_file():
                    raise RunStoreError(f"{path} is missing: the embeddings of {len(live)} scenes are gone; put it "
                                        f"back, or rescan into a new run directory")
                for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows or _batch_rows(dim),
                                                               columns=["scene_id", "label", "vector"]):
                    ids = batch.column(0).to_pylist()
                    keep = np.fromiter((i in live for i in ids), bool, len(ids))
                    vectors = batch.column(2).values.to_numpy().reshape(len(ids), -1)
                    labels = batch.column(1).to_numpy()
                    if not keep.all():
                        ids, labels, vectors = [i for i, k in zip(ids, keep) if k], labels[keep], vectors[keep]
                    if ids:
                        yield EmbeddingBatch(ids, labels, vectors, embedder)
        last = ""
        while True:  # staged scenes, one scene at a time (there are at most SHARD_SCENES)
            with self._guard("read the staged embeddings"):
                row = self._db.execute("SELECT scene_id, embedder, dim, labels, vectors FROM staged WHERE scene_id > ? "
                                       "ORDER BY scene_id LIMIT 1", (last,)).fetchone()
            if row is None:
                return
            last, embedder, dim, labels, vectors = row
            labels = np.frombuffer(labels, np.int32)
            if len(labels):
                yield EmbeddingBatch([last] * len(labels), labels, np.frombuffer(vectors, np.float32).reshape(-1, dim),
                                     embedder)

    def embeddings(self):
        """The run's current embeddings as one ``pyarrow.Table`` (scene_id, label, embedder, vector
        as float32), for checks on small runs: a large run is read with :meth:`embedding_batches`."""
        import pyarrow as pa

        columns: dict[str, list] = {"scene_id": [], "label": [], "embedder": [], "vector": []}
        for batch in self.embedding_batches():
            columns["scene_id"] += batch.scene_ids
            columns["label"].append(batch.labels)
            columns["embedder"] += [batch.embedder] * len(batch.labels)
            columns["vector"].append(batch.vectors)
        if not columns["vector"]:
            return pa.table({"scene_id": pa.array([], pa.string()), "label": pa.array([], pa.int32()),
                             "embedder": pa.array([], pa.string()),
                             "vector": pa.array([], pa.list_(pa.float32()))})
        vectors = np.concatenate(columns["vector"])
        return pa.table({"scene_id": pa.array(columns["scene_id"], pa.string()),
                         "label": pa.array(np.concatenate(columns["label"]), pa.int32()),
                         "embedder": pa.array(columns["embedder"], pa.string()),
                         "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])})
