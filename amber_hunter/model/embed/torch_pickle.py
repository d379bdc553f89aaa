"""Read a legacy (pre-1.6, non-zip) PyTorch ``.pth`` state dict into numpy, without torch and
without running the file's code.

A ``.pth`` is a pickle, and unpickling calls whatever functions the file names: a tampered weight
file in a wheel or a cache could run any command. So every pickle in the file goes through
:class:`RestrictedUnpickler`, which resolves only the handful of globals a state dict needs, and
maps them to harmless stand-ins defined here; anything else stops the load before it is called.
Torch itself is never imported (the package does not depend on it).

The legacy layout is five things back to back: a pickled magic number, a pickled protocol
version, a pickled dict of system info (endianness, type sizes), the pickled state dict (tensors
refer to storages by key through ``persistent_load``), a pickled list of storage keys, and then,
for each key in that order, an 8-byte little-endian element count followed by the raw elements.

The result is converted once to an ``.npz`` in the user cache, keyed by the weight file's SHA-256,
so later loads read plain arrays (``allow_pickle=False``) and never unpickle anything.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import atomic
from ...errors import EmbedderError

#: torch.serialization's MAGIC_NUMBER and PROTOCOL_VERSION for the legacy format.
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

#: The torch storage classes a legacy file may name, and the numpy dtype of their elements.
STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


@dataclass(frozen=True)
class StorageType:
    """Stand-in for a ``torch.<X>Storage`` class: just its name and element dtype."""

    name: str
    dtype: np.dtype


@dataclass
class Storage:
    """Stand-in for one storage: its key and size now, its elements once the data section is read."""

    key: str
    type: StorageType
    size: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class TensorRef:
    """What ``_rebuild_tensor_v2`` was asked to build; the storage data comes later in the file."""

    storage: Storage
    view: tuple[int, int] | None  # (offset, size) within the root storage, for storage views
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: records the tensor, builds nothing.

    The extra arguments (``requires_grad``, backward hooks, metadata) do not matter for weights.
    """
    view = None
    if isinstance(storage, tuple):  # a view: (root storage, offset, size)
        storage, *view = storage
        view = tuple(view)
    if not isinstance(storage, Storage):
        raise EmbedderError(f"_rebuild_tensor_v2 got {type(storage).__name__}, not a storage; the weight file is corrupt")
    return TensorRef(storage, view, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


#: (module, name) -> the object the restricted unpickler hands out for it. Nothing else resolves.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    **{("torch", name): StorageType(name, np.dtype(dtype)) for name, dtype in STORAGE_DTYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild a state dict and nothing else.

    ``find_class`` is the only way a pickle reaches a callable, so refusing every global outside
    :data:`ALLOWED_GLOBALS` there means a hostile file stops before any of its code runs.
    """

    def __init__(self, file, source: str = "weight file"):
        super().__init__(file)
        self.source = source
        self.storages: dict[str, Storage] = {}

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise EmbedderError(
                f"{self.source} asks to load {module}.{name}, which a weight file never needs; "
                "refusing to unpickle it (reinstall the weights from a trusted source)"
            ) from None

    def persistent_load(self, pid):
        """Legacy storages: ``('storage', type, key, location, size, view_metadata)``."""
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise EmbedderError(f"{self.source} has an unknown persistent id {str(pid)[:60]!r}; it is not a legacy state dict")
        _, storage_type, key, _location, size, view = pid
        if not isinstance(storage_type, StorageType) or not isinstance(key, str) or not isinstance(size, int):
            raise EmbedderError(f"{self.source} has a malformed storage reference {str(pid)[:60]!r}")
        storage = self.storages.setdefault(key, Storage(key, storage_type, size))
        if view is None:
            return storage
        view_key, offset, view_size = view
        if not (isinstance(offset, int) and isinstance(view_size, int) and 0 <= offset <= offset + view_size <= size):
            raise EmbedderError(f"{self.source} has a storage view {view_key!r} outside its storage")
        return (storage, offset, view_size)


def _unpickle(f, unpickler: RestrictedUnpickler, what: str):
    try:
        return unpickler.load()
    except EmbedderError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged pickle raises any of a dozen types
        raise EmbedderError(
            f"{unpickler.source} is truncated or corrupt ({what}: {type(exc).__name__}); reinstall it"
        ) from None


def read_legacy_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Parse a legacy ``.pth`` state dict into ``{name: array}`` (tensors only, C-contiguous copies).

    Raises :class:`EmbedderError` with one line for a zip-format file, a foreign global, a
    truncated file or a tensor pointing outside its storage.
    """
    path = Path(path)
    source = f"weight file {path}"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EmbedderError(f"cannot read {source}: {exc.strerror}; reinstall it") from None
    if raw[:2] == b"PK":
        raise EmbedderError(f"{source} is a zip-format (torch >= 1.6) file; only the legacy format is supported")
    f = io.BytesIO(raw)

    def unpickler() -> RestrictedUnpickler:
        return RestrictedUnpickler(f, source)

    if _unpickle(f, unpickler(), "magic number") != MAGIC_NUMBER:
        raise EmbedderError(f"{source} is not a legacy torch file (bad magic number); reinstall it")
    if _unpickle(f, unpickler(), "protocol version") != PROTOCOL_VERSION:
        raise EmbedderError(f"{source} has an unsupported torch protocol version; reinstall it")
    sys_info = _unpickle(f, unpickler(), "system info")
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise EmbedderError(f"{source} was not saved on a little-endian machine; it cannot be read here")
    main = unpickler()
    state = _unpickle(f, main, "state dict")
    keys = _unpickle(f, unpickler(), "storage keys")
    if not isinstance(state, dict) or not isinstance(keys, list):
        raise EmbedderError(f"{source} does not hold a state dict; reinstall it")

    for key in keys:
        storage = main.storages.get(key) if isinstance(key, str) else None
        if storage is None:
            raise EmbedderError(f"{source} lists storage {str(key)[:40]!r} that no tensor uses; reinstall it")
        header = f.read(8)
        if len(header) < 8:
            raise EmbedderError(f"{source} is truncated (storage {key} missing); reinstall it")
        (count,) = struct.unpack("<q", header)
        nbytes = count * storage.type.dtype.itemsize
        if count != storage.size or nbytes > len(raw) - f.tell():
            raise EmbedderError(f"{source} is truncated or corrupt (storage {key} of {count} elements); reinstall it")
        storage.data = np.frombuffer(f.read(nbytes), storage.type.dtype)
    missing = [k for k, s in main.storages.items() if s.data is None]
    if missing:
        raise EmbedderError(f"{source} has no data for storage {missing[0]!r}; reinstall it")

    return {name: _materialise(ref, name, source) for name, ref in state.items() if isinstance(ref, TensorRef)}


def _materialise(ref: TensorRef, name: str, source: str) -> np.ndarray:
    """The numpy array a :class:`TensorRef` describes, checked to stay inside its storage."""
    data = ref.storage.data
    if ref.view is not None:
        data = data[ref.view[0] : ref.view[0] + ref.view[1]]
    if len(ref.shape) != len(ref.stride) or min(ref.shape + ref.stride + (ref.offset,), default=0) < 0:
        raise EmbedderError(f"{source}: tensor {name} has a bad shape or stride; reinstall it")
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) if all(ref.shape) else -1
    if last >= len(data):
        raise EmbedderError(f"{source}: tensor {name} points outside its storage; reinstall it")
    item = data.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[ref.offset :], shape=ref.shape, strides=[s * item for s in ref.stride], writeable=False
    )
    return np.array(view, dtype=data.dtype.newbyteorder("="), order="C")  # a copy; 0-d stays 0-d


def cache_dir() -> Path:
    """``$AMBER_HUNTER_CACHE`` or the platform's user cache folder, the same place as the
    embedding cache (``learn.cache.default_cache_dir``, which this layer may not import)."""
    env = os.environ.get("AMBER_HUNTER_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("amber-hunter"))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict(path: str | os.PathLike, sha256: str | None = None) -> dict[str, np.ndarray]:
    """The tensors of legacy ``.pth`` ``path``, through an ``.npz`` cache keyed by its SHA-256.

    ``sha256`` is the digest the caller expects (or a prefix of it, like the 8 hex digits torch hub
    puts in file names); a file that does not match is refused, so a damaged or swapped weight
    file is never converted. A cache folder that cannot be written only costs the parse next time.
    """
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise EmbedderError(f"cannot read weight file {path}: {exc.strerror}; reinstall it") from None
    if sha256 is not None and not digest.startswith(sha256.lower()):
        raise EmbedderError(
            f"weight file {path} has SHA-256 {digest[:16]}..., expected {sha256[:16]}...; reinstall it"
        )
    cached = cache_dir() / "weights" / f"{digest}.npz"
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except Exception:  # noqa: BLE001, S110 - a damaged cache entry is rebuilt below
            pass
    arrays = read_legacy_state_dict(path)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        atomic.write_bytes(cached, buf.getvalue())
    except OSError:
        pass
    return arrays
