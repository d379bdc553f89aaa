"""The on-disk tile cache, so an interrupted or repeated run never downloads a tile twice.

A cache may be given a size limit. A region of 450,000 scenes is ~7 million tiles, so the cache
cannot walk its folders to find its size or its oldest tiles: a small SQLite index beside the
tiles (``index.sqlite``) keeps each tile's size on disk and when it was last used, and the total.

What the index promises, and what is approximate:

- The total is exact for the index's rows (triggers keep it in the same transaction as the rows).
  A new tile is entered in the index right after its files are written (so pruning never deletes
  a tile still being written): a kill in between leaves that one tile uncounted until it is read
  again. Sizes are counted in whole 4 KiB blocks, every file at least one block: the limit is on
  the disk the cache takes, the index itself (~50 bytes a tile) aside.
- Last use is batched: cache hits are written to the index every ``_BATCH`` hits or
  ``_BATCH_SECONDS`` seconds (and on close). A kill loses those last refreshes, and another
  process does not see a hit until then, so recency is approximate to a few seconds.
- Several processes may share one cache (a scan's fetch threads, dask workers): SQLite's WAL
  and busy timeout serialise the index, tile files are written atomically, and pruning re-reads
  the total under the write lock, so two processes never prune the same bytes twice. A hit racing
  a prune in another process may re-enter a row whose files were just deleted: counted until it
  is pruned again, never the other way round. SQLite's WAL needs its processes on one machine:
  dask workers on several machines writing one cache folder over a network filesystem would
  risk the index (never the tiles); give such a cluster a cache folder per machine.
- A missing or damaged index is rebuilt from a walk of the folders, once, with a log line; the
  walk takes each tile's last use from its files' modification times.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mercantile

from .. import atomic
from ..errors import ConfigError, SourceUnavailableError, TileSourceError
from .base import MISSING, TileResult, TileSource

log = logging.getLogger(__name__)

#: The index's file name in the cache folder (tile folders are zoom numbers, so it never clashes).
INDEX_NAME = "index.sqlite"
#: Pruning frees down to this fraction of the limit, so it runs once per ~10 % of the limit, not
#: after every new tile.
PRUNE_TO = 0.9
#: Cache hits kept in memory before their last use is written: one commit per hit would cost
#: more than the hit itself.
_BATCH = 256
_BATCH_SECONDS = 5.0
#: Tiles deleted per index transaction while pruning: other processes get the lock in between.
_PRUNE_CHUNK = 500
_BLOCK = 4096
#: How long a process waits for another one's index transaction before giving up on it.
_BUSY_SECONDS = 60.0
_XY_BITS = 24  # x and y are below 2**24 up to zoom 24, the deepest zoom a scan accepts
_XY_MASK = (1 << _XY_BITS) - 1

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS tiles (key INTEGER PRIMARY KEY, bytes INTEGER NOT NULL, used REAL NOT NULL);
CREATE INDEX IF NOT EXISTS tiles_by_use ON tiles (used);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('bytes', 0);
CREATE TRIGGER IF NOT EXISTS tiles_added AFTER INSERT ON tiles
    BEGIN UPDATE meta SET value = value + NEW.bytes WHERE name = 'bytes'; END;
CREATE TRIGGER IF NOT EXISTS tiles_resized AFTER UPDATE OF bytes ON tiles
    BEGIN UPDATE meta SET value = value - OLD.bytes + NEW.bytes WHERE name = 'bytes'; END;
CREATE TRIGGER IF NOT EXISTS tiles_removed AFTER DELETE ON tiles
    BEGIN UPDATE meta SET value = value - OLD.bytes WHERE name = 'bytes'; END;
COMMIT;
"""
_UPSERT = ("INSERT INTO tiles (key, bytes, used) VALUES (?, ?, ?) "
           "ON CONFLICT (key) DO UPDATE SET bytes = excluded.bytes, used = max(used, excluded.used)")


def disk_bytes(*sizes: int) -> int:
    """What files of these sizes take on disk: whole 4 KiB blocks, at least one a file (an empty
    ``.missing`` marker still costs an inode and a directory entry)."""
    return sum(max(1, -(-size // _BLOCK)) * _BLOCK for size in sizes)


def _key(tile: mercantile.Tile) -> int:
    return (tile.z << 2 * _XY_BITS) | (tile.x << _XY_BITS) | tile.y


def _tile(key: int) -> mercantile.Tile:
    return mercantile.Tile((key >> _XY_BITS) & _XY_MASK, key & _XY_MASK, key >> 2 * _XY_BITS)


def _error_name(exc: sqlite3.Error) -> str:
    """SQLite's name for an error; Python 3.10 has no ``sqlite_errorname``, so its message and
    class stand in there (SQLITE_CORRUPT and SQLITE_NOTADB are the only plain DatabaseErrors)."""
    name = getattr(exc, "sqlite_errorname", None)
    if name:
        return name
    if "locked" in str(exc) or "busy" in str(exc):
        return "SQLITE_BUSY"
    return "SQLITE_CORRUPT" if type(exc) is sqlite3.DatabaseError else ""


def _is_busy(exc: sqlite3.Error) -> bool:
    return _error_name(exc) in ("SQLITE_BUSY", "SQLITE_LOCKED")


def _is_damaged(exc: sqlite3.Error) -> bool:
    return _error_name(exc) in ("SQLITE_CORRUPT", "SQLITE_NOTADB")


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, taking the write lock at once so a read-then-write never deadlocks."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _numbered(folder: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """The sub-folders of ``folder`` named by a number (zooms, columns), with that number."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.isdigit() and str(int(entry.name)) == entry.name and entry.is_dir(follow_symlinks=False):
                yield int(entry.name), entry.path


class _TileIndex:
    """The cache's index: size on disk and last use of each tile, and their total.

    Opened lazily, at the first write or batch of hits, so reading a cache (a rescore, say) that
    has no index yet creates nothing before it has something to record. Thread-safe: one
    connection, used under one lock.
    """

    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir
        self.path = cache_dir / INDEX_NAME
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[int, float]] = {}
        self._flushed_at = time.monotonic()
        self._pruning = threading.Lock()

    def note(self, tile: mercantile.Tile, nbytes: int, *, now: bool = False) -> int | None:
        """Record that ``tile`` (``nbytes`` on disk) was used just now; with ``now`` (a new tile,
        just written) in the index before returning. Returns the cache's total bytes when
        the index was written, else None."""
        with self._lock:
            self._pending[_key(tile)] = (nbytes, time.time())
            due = len(self._pending) >= _BATCH or time.monotonic() - self._flushed_at >= _BATCH_SECONDS
            return self._flush() if now or due else None

    def ready(self) -> None:
        """Open the index before the first tile is written, so a new cache has no tile to walk."""
        with self._lock:
            if self._db is None:
                try:
                    self._connect()
                except sqlite3.Error as exc:
                    self._recover(exc)

    def prune(self, limit: int) -> None:
        """Delete least recently used tiles until the cache is within ``PRUNE_TO`` of ``limit``.

        In chunks, each its own transaction, so other processes' tiles are not held up while a
        large cache is cut down; the total is re-read under the write lock every chunk, so two
        processes pruning at once stop together at the target.
        """
        target, removed, freed = int(limit * PRUNE_TO), 0, 0
        with self._pruning:  # another thread of this process pruning: wait, then find little or nothing to do
            while True:
                with self._lock:
                    try:
                        chunk = self._prune_chunk(target)
                    except sqlite3.Error as exc:
                        self._recover(exc)  # the next new tile past the limit prunes again
                        break
                if not chunk:
                    break
                removed, freed = removed + chunk[0], freed + chunk[1]
        if removed:
            log.info("tile cache %s: pruned %d least recently used tiles (%.1f MB) to stay under its %.2f GB limit",
                     self.cache_dir, removed, freed / 2**20, limit / 2**30)

    def close(self) -> None:
        with self._lock:
            try:
                self._flush()
            finally:
                if self._db is not None:
                    self._db.close()
                    self._db = None

    # --- under self._lock ---------------------------------------------------------------------

    def _flush(self) -> int | None:
        if not self._pending and self._db is None:  # nothing to say: do not create an index to say it
            return None
        try:
            return self._write_pending()
        except sqlite3.Error as exc:
            self._recover(exc)
            if _is_busy(exc):
                return None
        try:  # once more, into the rebuilt index
            return self._write_pending()
        except sqlite3.Error as exc:
            self._recover(exc)
            return None

    def _recover(self, exc: sqlite3.Error) -> None:
        """Deal with an index error: a busy index is left for later (pending last uses are kept),
        a damaged one is rebuilt, and anything else (a full disk, a read-only folder) is said."""
        if _is_busy(exc):
            log.debug("tile cache %s: index busy (%s); tried again later", self.cache_dir, exc)
            return
        if _is_damaged(exc):
            self._rebuild(f"is damaged ({exc})")
            return
        self._pending.clear()
        raise SourceUnavailableError(
            f"{self.path}: cannot write the tile cache's index ({exc}); free disk space or fix the folder's "
            "permissions (a deleted index is rebuilt from the cached tiles)"
        ) from None

    def _write_pending(self) -> int:
        db = self._connect()
        with _transaction(db):
            db.executemany(_UPSERT, [(key, nbytes, used) for key, (nbytes, used) in self._pending.items()])
            total = db.execute("SELECT value FROM meta WHERE name = 'bytes'").fetchone()[0]
        self._pending.clear()
        self._flushed_at = time.monotonic()
        return total

    def _prune_chunk(self, target: int) -> tuple[int, int] | None:
        """Delete up to ``_PRUNE_CHUNK`` of the least recently used tiles while the total is above
        ``target``: (tiles, bytes) deleted, or None when there is nothing (left) to do. This
        process's pending last uses go in first, so its own recent reads are not pruned."""
        db = self._connect()
        doomed, freed = [], 0
        with _transaction(db):
            db.executemany(_UPSERT, [(key, nbytes, used) for key, (nbytes, used) in self._pending.items()])
            total = db.execute("SELECT value FROM meta WHERE name = 'bytes'").fetchone()[0]
            if total > target:
                for key, nbytes in db.execute("SELECT key, bytes FROM tiles ORDER BY used LIMIT ?", (_PRUNE_CHUNK,)):
                    if total - freed <= target:
                        break
                    doomed.append((key,))
                    freed += nbytes
            for (key,) in doomed:  # inside the transaction: a kill before COMMIT leaves rows, not files
                self._unlink(_tile(key))
            db.executemany("DELETE FROM tiles WHERE key = ?", doomed)
        self._pending.clear()
        return (len(doomed), freed) if doomed else None

    def _unlink(self, tile: mercantile.Tile) -> None:
        """Delete a tile's files, the tile before its date, as a tile is written after its date."""
        base = os.path.join(self.cache_dir, str(tile.z), str(tile.x), str(tile.y))  # not pathlib: 3x faster here
        for path in (base, f"{base}.date", f"{base}.missing"):
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError):
                pass

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SourceUnavailableError(f"{self.cache_dir}: cannot write the tile cache ({exc.strerror or exc}); "
                                             "fix the folder's permissions or give another tile cache folder") from None
            self._db = self._open()
        return self._db

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=_BUSY_SECONDS, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: a killed process loses nothing committed
            db.executescript(_SCHEMA)
            if db.execute("SELECT 1 FROM meta WHERE name = 'walked'").fetchone() is None:
                self._walk(db)
        except BaseException:
            db.close()
            raise
        return db

    def _rebuild(self, why: str) -> None:
        """Replace a damaged index by a new one, filled from the tile files."""
        log.warning("tile cache %s: its index %s %s; rebuilding it from the cached files", self.cache_dir, self.path, why)
        if self._db is not None:
            self._db.close()
            self._db = None
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{self.path}{suffix}").unlink()
        try:
            self._connect()
        except sqlite3.Error as exc:
            raise SourceUnavailableError(f"{self.path}: cannot rebuild the tile cache's index ({exc}); "
                                         "free disk space or fix the folder's permissions") from None

    def _walk(self, db: sqlite3.Connection) -> None:
        """Enter the tiles already on disk (a cache older than its index, or a rebuilt index), one
        column at a time, so memory stays small; a tile another process has meanwhile entered
        keeps its row."""
        count = 0
        for z, z_path in _numbered(self.cache_dir):
            if z > _XY_BITS:
                continue  # not a zoom: a stranger's folder
            for x, x_path in _numbered(z_path):
                found: dict[int, tuple[int, float]] = {}
                with contextlib.suppress(FileNotFoundError), os.scandir(x_path) as entries:
                    for entry in entries:
                        y, _, suffix = entry.name.partition(".")
                        if not y.isdigit() or int(y) >> z or x >> z or suffix not in ("", "date", "missing"):
                            continue  # an atomic write's temporary file, or a stranger
                        with contextlib.suppress(FileNotFoundError):
                            stat = entry.stat(follow_symlinks=False)
                            key = _key(mercantile.Tile(x, int(y), z))
                            nbytes, used = found.get(key, (0, 0.0))
                            found[key] = (nbytes + disk_bytes(stat.st_size), max(used, stat.st_mtime))
                with _transaction(db):
                    db.executemany("INSERT OR IGNORE INTO tiles (key, bytes, used) VALUES (?, ?, ?)",
                                   [(key, nbytes, used) for key, (nbytes, used) in found.items()])
                count += len(found)
        with _transaction(db):
            db.execute("INSERT OR REPLACE INTO meta VALUES ('walked', ?)", (count,))
        if count:
            log.warning("tile cache %s: indexed %d cached tiles found on its disk (a one-off walk)", self.cache_dir, count)


class CachedTileSource(TileSource):
    """Any source behind an on-disk cache at ``{cache_dir}/{z}/{x}/{y}``.

    Tiles are written atomically, so a killed run leaves whole tiles or none, and "missing" is
    remembered with an empty ``{y}.missing`` marker so gaps are not asked for again. The cache
    has no notion of which source filled it: give each source its own ``cache_dir``.

    With ``max_bytes``, the least recently used tiles (their ``.date`` and ``.missing`` files
    with them) are deleted when a new tile takes the cache past the limit, down to 90 % of it.
    Reading a tile counts as a use, so the tiles a later explore or rescore reads stay longest;
    those commands read the cache only, and say which scene lost its tiles. Every cache keeps its
    index, limited or not, so a limit set on a later run starts from the right total.
    """

    def __init__(self, source: TileSource, cache_dir: str | os.PathLike, *, max_bytes: int | None = None):
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise ConfigError(f"max_bytes={max_bytes!r}: a tile cache limit is a positive whole number of bytes; "
                              "give e.g. --tile-cache-max-gb 50")
        self.source = source
        self.cache_dir = Path(cache_dir)
        self.max_bytes = max_bytes
        self._index = _TileIndex(self.cache_dir)
        self._index_warned = False

    @property
    def tile_size(self) -> int | None:
        return self.source.tile_size

    def describe(self) -> str:
        limit = "" if self.max_bytes is None else f" (at most {self.max_bytes / 2**30:.2f} GB)"
        return f"{self.source.describe()} cached in {self.cache_dir}{limit}"

    def check_zoom(self, zoom: int) -> None:
        self.source.check_zoom(zoom)

    def cancel(self) -> None:
        self.source.cancel()

    def close(self) -> None:
        try:
            self._index.close()
        except SourceUnavailableError as exc:  # last uses lost at worst: nothing to stop for
            log.warning("tile cache: %s", exc)
        finally:
            self.source.close()

    @staticmethod
    def _cached_date(path: Path) -> tuple[dt.date | None, int]:
        """The capture date cached beside a tile, or None, and the bytes its file takes on disk.

        The date only annotates detections, so a damaged ``.date`` file (a hand edit, a disk
        error) means "unknown", never a failed tile; it is removed so the warning comes once.
        """
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return None, 0
        except OSError as exc:
            text, error = b"", exc
        else:
            try:
                return dt.date.fromisoformat(text.decode().strip()), disk_bytes(len(text))
            except ValueError as exc:  # UnicodeDecodeError is a ValueError
                error = exc
        log.warning("tile cache: %s is unreadable (%s); its capture date is taken as unknown", path, error)
        with contextlib.suppress(OSError):
            path.unlink()
        return None, 0

    def get(self, tile: mercantile.Tile) -> TileResult:
        column = self.cache_dir / str(tile.z) / str(tile.x)
        data_path = column / str(tile.y)
        date_path = column / f"{tile.y}.date"
        missing_path = column / f"{tile.y}.missing"
        try:
            data = data_path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # not cached (NotADirectory: caught on writing)
            if missing_path.exists():
                self._used(tile, disk_bytes(0))
                return MISSING
        except OSError as exc:
            raise TileSourceError(
                f"{data_path}: cannot read the cached tile ({exc.strerror or exc}); delete it so it is fetched again"
            ) from None
        else:
            date, date_bytes = self._cached_date(date_path)
            self._used(tile, disk_bytes(len(data)) + date_bytes)
            return TileResult("ok", data, date)
        result = self.source.get(tile)
        date = result.capture_date.isoformat().encode() if result.capture_date and result.status != "missing" else None
        if result.status == "missing":
            nbytes = disk_bytes(0)
        else:
            nbytes = disk_bytes(len(result.data)) + (disk_bytes(len(date)) if date else 0)
        try:
            column.mkdir(parents=True, exist_ok=True)
            self._index.ready()
            if result.status == "missing":
                atomic.write_bytes(missing_path, b"")
            else:
                if date:  # written first: a tile on disk always has its date beside it
                    atomic.write_bytes(date_path, date)
                atomic.write_bytes(data_path, result.data)
        except OSError as exc:  # a full disk or a read-only folder fails every later tile the same way
            raise SourceUnavailableError(
                f"{self.cache_dir}: cannot write the tile cache ({exc.strerror or exc}); "
                "free disk space, fix the folder's permissions or give another tile cache folder"
            ) from None
        self._prune_past(self._index.note(tile, nbytes, now=True))
        return result

    def _used(self, tile: mercantile.Tile, nbytes: int) -> None:
        """A cache hit refreshes the tile's last use. The index may not be writable (a cache on a
        read-only disk, read by a rescore): the tiles are still served, with one warning."""
        try:
            self._prune_past(self._index.note(tile, nbytes))
        except SourceUnavailableError as exc:
            if not self._index_warned:
                self._index_warned = True
                log.warning("tile cache: %s; tiles are still read, but their last use is not recorded", exc)

    def _prune_past(self, total: int | None) -> None:
        if self.max_bytes is not None and total is not None and total > self.max_bytes:
            self._index.prune(self.max_bytes)
