"""Embedding cache: Parquet shards keyed by image content hash and embedder identity.

Embedding is the slow step (seconds per crop for the CNNs on a CPU). Retraining after a relabel,
trying another threshold or another evaluation protocol must never pay it again for an unchanged
image, and a moved or renamed file is still the same image, hence content hashes, not paths.
Shards are append-only and written atomically, so a killed run keeps every finished shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import atomic
from ..model.embed.base import Embedder

#: New vectors are flushed to a shard this often, bounding what a kill can lose.
SHARD_SIZE = 64


def default_cache_dir() -> Path:
    """``$AMBER_HUNTER_CACHE`` or the platform's user cache folder."""
    env = os.environ.get("AMBER_HUNTER_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("amber-hunter"))


def file_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex, 32 chars are plenty to key a cache)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:32]


def embedder_key(embedder: Embedder) -> str:
    """Identity of an embedder's output: name, version and parameters."""
    return f"{embedder.name}:{embedder.version}:{json.dumps(embedder.params, sort_keys=True)}"


class EmbeddingCache:
    """All cached vectors of one embedder, loaded into memory on open (a few MB per thousand crops)."""

    def __init__(self, root: str | Path, embedder: Embedder):
        key = embedder_key(embedder)
        self.dir = Path(root) / "embeddings" / hashlib.sha256(key.encode()).hexdigest()[:16]
        self.key = key
        self._vectors: dict[str, np.ndarray] = {}
        self._pending: dict[str, np.ndarray] = {}
        if self.dir.is_dir():
            for shard in sorted(self.dir.glob("*.parquet")):
                table = pq.read_table(shard)
                for h, v in zip(
                    table.column("hash").to_pylist(), table.column("vector").to_numpy(zero_copy_only=False)
                ):
                    self._vectors[h] = np.asarray(v, np.float32)

    def __contains__(self, digest: str) -> bool:
        return digest in self._vectors or digest in self._pending

    def get(self, digest: str) -> np.ndarray:
        return self._pending[digest] if digest in self._pending else self._vectors[digest]

    def put(self, digest: str, vector: np.ndarray) -> None:
        self._pending[digest] = np.asarray(vector, np.float32)
        if len(self._pending) >= SHARD_SIZE:
            self.flush()

    def flush(self) -> None:
        """Write pending vectors as one new shard."""
        if not self._pending:
            return
        if not self.dir.is_dir():  # the key is written with the first shard, not again with every one
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic.write_json(self.dir / "embedder.json", {"key": self.key})
        table = pa.table(
            {
                "hash": list(self._pending),
                "vector": pa.array([v.tolist() for v in self._pending.values()], pa.list_(pa.float32())),
            }
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic.write_bytes(self.dir / f"{uuid.uuid4().hex}.parquet", sink.getvalue().to_pybytes())
        self._vectors.update(self._pending)
        self._pending.clear()


def embed_files(
    paths: Sequence[Path],
    embedder: Embedder,
    cache_root: str | Path | None = None,
    progress: Callable[[Sequence], Sequence] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Embed each crop file whole, through the cache; return ``(vectors, content hashes)``.

    ``progress`` wraps the list of files still to embed (e.g. ``tqdm``), even an empty one: the
    wrapper learns that way that embedding is over, and can say what comes next.
    """
    from ..images import read_rgb
    from ..model.segment import whole_image_region

    cache = EmbeddingCache(cache_root if cache_root is not None else default_cache_dir(), embedder)
    digests = [file_hash(p) for p in paths]
    todo = [(p, d) for p, d in zip(paths, digests) if d not in cache]
    try:
        for p, d in progress(todo) if progress else todo:
            image = read_rgb(p)
            cache.put(d, embedder.embed(image, [whole_image_region(image)])[0])
    finally:
        cache.flush()
    vectors = np.stack([cache.get(d) for d in digests]) if digests else np.zeros((0, embedder.dim), np.float32)
    return vectors, digests
