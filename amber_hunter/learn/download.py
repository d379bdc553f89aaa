"""Download the Texty labelled crops and example scenes onto a user's machine, verified by sha256.

Outside the project's workplace there is no ``../shared/datasets``, so ``amber-hunter data fetch
texty`` fetches the files from their public source, github.com/texty/amber-methodology (folder
``model/datasets``), into the user data folder where :func:`amber_hunter.learn.data.find_texty_dataset`
looks last. A bundled manifest pins every file's path, size and sha256 as the project trained on
them, so a user gets exactly that data or a clear error, never a silently different dataset.

Downloads are resumable and crash-safe: each file streams into ``<name>.part``, is checked, and
only then renamed into place, so a dropped connection or a kill leaves whole verified files or
nothing; running the command again skips every file already present with the right checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import requests

from ..errors import DatasetError, plain
from ..sources import TRANSIENT_ERRORS
from .data import TEXTY, user_data_dir

#: Raw files of the upstream repository's dataset folder; manifest ``url_path``s are relative to it.
DEFAULT_BASE_URL = "https://raw.githubusercontent.com/texty/amber-methodology/master/model/datasets/"
#: The committed manifest of the shared copy of the dataset (see :func:`build_manifest`).
MANIFEST_PATH = Path(__file__).with_name("texty_manifest.json")
#: Folders of the dataset that are fetched: the labelled crops and the six whole example scenes.
DATASET_FOLDERS = ("positive", "negative", "example")
_CHUNK = 1 << 16


@dataclass(frozen=True)
class ManifestEntry:
    """One file: where it goes under the destination, where it lives under the base URL, and
    the size and sha256 it must have."""

    path: str
    url_path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """The files of a dataset and where they come from."""

    source: str
    files: tuple[ManifestEntry, ...]


class _Transient(Exception):
    """A failed attempt that a retry may cure (dropped connection, timeout, 429, 5xx)."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so large files never sit in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(
    folder: str | os.PathLike,
    folders: Iterable[str] = DATASET_FOLDERS,
    source: str = "github.com/texty/amber-methodology, folder model/datasets",
) -> Manifest:
    """Describe the files of a local copy of the dataset, sorted by path.

    Upstream keeps the same ``positive/``, ``negative/``, ``example/`` layout under
    ``model/datasets``, so each ``url_path`` equals its ``path``; the field exists so a file
    that moves upstream can be remapped in the manifest without moving it on users' disks.
    """
    root = Path(folder)
    entries = []
    for name in folders:
        if not (root / name).is_dir():
            raise DatasetError(f"{root} has no {name}/ folder; point to the texty-amber dataset folder")
        for file in sorted((root / name).iterdir()):
            if file.is_file() and not file.name.startswith("."):
                rel = file.relative_to(root).as_posix()
                entries.append(ManifestEntry(rel, rel, sha256_file(file), file.stat().st_size))
    return Manifest(source, tuple(sorted(entries, key=lambda e: e.path)))


def write_manifest(manifest: Manifest, path: str | os.PathLike = MANIFEST_PATH) -> None:
    """Write a manifest as JSON, one file per line, so a regenerated manifest diffs readably."""
    from .. import atomic

    lines = ",\n".join("    " + json.dumps(asdict(entry)) for entry in manifest.files)
    text = f'{{\n  "source": {json.dumps(manifest.source)},\n  "files": [\n{lines}\n  ]\n}}\n'
    atomic.write_bytes(path, text.encode())


def load_manifest(path: str | os.PathLike = MANIFEST_PATH) -> Manifest:
    """Read a manifest, refusing any entry whose path could land outside the destination."""
    try:
        obj = json.loads(Path(path).read_text())
        manifest = Manifest(obj["source"], tuple(ManifestEntry(**entry) for entry in obj["files"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: not a readable dataset manifest ({exc}); reinstall amber-hunter") from None
    for entry in manifest.files:
        _check_relative(entry.path, path)
        _check_relative(entry.url_path, path)
    return manifest


def _check_relative(rel: str, where: str | os.PathLike) -> None:
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or ".." in parts or "\\" in rel:
        raise DatasetError(f"{where}: entry path {rel!r} is not a plain relative path; reinstall amber-hunter")


def fetch_texty(
    dest: str | os.PathLike | None = None,
    base_url: str = DEFAULT_BASE_URL,
    progress: bool | None = None,
    manifest: Manifest | None = None,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: tuple[float, float] = (10.0, 60.0),
) -> Path:
    """Download the dataset into ``dest`` (default: the user data folder's ``texty-amber``).

    Files already present with the right sha256 are skipped, so an interrupted fetch resumes by
    running it again. Connection errors, timeouts, truncated bodies, 429 and 5xx are retried up to
    ``retries`` times, waiting ``backoff``, then twice as long each time. A file whose content differs
    from the manifest is a :class:`DatasetError` and is not kept. ``progress`` shows tqdm bars
    for files and bytes on stderr: True always, False never, None when stderr is a terminal.
    Returns the destination folder.
    """
    from tqdm import tqdm

    from ..sources import user_agent

    manifest = manifest if manifest is not None else load_manifest()
    dest = Path(dest) if dest is not None else user_data_dir() / TEXTY
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create {dest} ({exc.strerror}); pass a writable --dest") from None
    todo = [entry for entry in manifest.files if not _present(dest / entry.path, entry)]
    disable = None if progress is None else not progress
    files_bar = tqdm(total=len(manifest.files), initial=len(manifest.files) - len(todo), desc="files",
                     unit="file", disable=disable, position=0)
    bytes_bar = tqdm(total=sum(e.size for e in todo), desc="bytes", unit="B", unit_scale=True,
                     unit_divisor=1024, disable=disable, position=1)
    with requests.Session() as session, files_bar, bytes_bar:
        session.headers["User-Agent"] = user_agent()
        for entry in todo:
            url = base_url.rstrip("/") + "/" + urllib.parse.quote(entry.url_path)
            _download(session, url, dest / entry.path, entry, retries, backoff, timeout, bytes_bar)
            files_bar.update(1)
    return dest


def _present(path: Path, entry: ManifestEntry) -> bool:
    """Whether ``path`` already holds the entry's content (size first: cheap and usually enough
    to spot a different file, then the checksum)."""
    try:
        return path.stat().st_size == entry.size and sha256_file(path) == entry.sha256
    except FileNotFoundError:
        return False


def _download(
    session: requests.Session,
    url: str,
    path: Path,
    entry: ManifestEntry,
    retries: int,
    backoff: float,
    timeout: tuple[float, float],
    bytes_bar,
) -> None:
    """Fetch one file through ``<path>.part`` with retries; rename it into place only once verified.

    A file already at ``path`` failed its check, so it goes first: whatever happens next, ``path``
    never holds content that differs from the manifest.
    """
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            digest, received = _stream(session, url, part, timeout, bytes_bar)
        except _Transient as exc:
            last = str(exc)
            continue
        except TRANSIENT_ERRORS as exc:
            last = f"{type(exc).__name__}: {plain(str(exc))}"
            continue
        if digest != entry.sha256:
            part.unlink(missing_ok=True)
            raise DatasetError(
                f"{entry.path}: downloaded {received} bytes with sha256 {digest[:12]}…, expected {entry.size} "
                f"bytes with {entry.sha256[:12]}… from {url}; the upstream data may have changed, so the file "
                "was not kept (update amber-hunter, or report it)"
            )
        os.replace(part, path)
        return
    raise DatasetError(
        f"{entry.path}: download from {url} still failing after {retries} retries (last: {last}); "
        "check your connection and run the fetch again, finished files are kept"
    )


def _stream(
    session: requests.Session, url: str, part: Path, timeout: tuple[float, float], bytes_bar
) -> tuple[str, int]:
    """One attempt: stream the body into ``part``, fsync it, and return its sha256 and size.

    Raises :class:`_Transient` for answers worth retrying. On any failure ``part`` is removed,
    and the bytes already counted on the progress bar are taken back.
    """
    digest, received = hashlib.sha256(), 0
    try:
        with session.get(url, stream=True, timeout=timeout) as response:
            status = response.status_code
            if status == 429 or status >= 500:
                raise _Transient(f"HTTP {status} {response.reason}")
            if status != 200:
                raise DatasetError(
                    f"{url}: HTTP {status} {response.reason}; the upstream data may have moved, "
                    "update amber-hunter or pass another base URL"
                )
            with open(part, "wb") as f:
                for chunk in response.iter_content(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bytes_bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        part.unlink(missing_ok=True)
        bytes_bar.update(-received)
        raise
    return digest.hexdigest(), received
