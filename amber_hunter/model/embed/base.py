"""The one small interface every embedder meets, and the ways to combine them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from ..segment import Region


@runtime_checkable
class Embedder(Protocol):
    """Turns the superpixels of one image into feature vectors.

    ``name`` and ``version`` key the embedding cache and are checked when a model bundle is
    loaded, so bump ``version`` whenever the features an embedder returns change. ``params`` is
    everything else needed to rebuild it (weights, input size), stored in the bundle.
    """

    name: str
    version: str
    dim: int
    #: "cnn" for dense pretrained activations (the classifier gives them a linear head),
    #: "handmade" for a few dozen engineered features (fed to the trees directly).
    kind: str

    @property
    def params(self) -> dict: ...

    def embed(self, image: np.ndarray, regions: Sequence[Region]) -> np.ndarray:
        """Return ``float32 (len(regions), dim)`` features for ``regions`` of RGB ``uint8`` ``image``."""
        ...


class ConcatEmbedder:
    """Several embedders side by side, e.g. ``vgg16+texture``: CNN features for what things are,
    hand-made ones for the pit shapes and sand colour a CNN pooled over a crop may wash out."""

    def __init__(self, parts: Sequence[Embedder]):
        self.parts = list(parts)
        self.name = "+".join(p.name for p in self.parts)
        self.version = "+".join(p.version for p in self.parts)
        self.dim = sum(p.dim for p in self.parts)
        self.kind = "mixed"

    @property
    def params(self) -> dict:
        return {p.name: p.params for p in self.parts}

    @property
    def random_weights(self) -> bool:
        """True when any part has random weights: its model detects nothing real."""
        return any(getattr(p, "random_weights", False) for p in self.parts)

    def embed(self, image: np.ndarray, regions: Sequence[Region]) -> np.ndarray:
        return np.concatenate([p.embed(image, regions) for p in self.parts], axis=1)


def empty(dim: int) -> np.ndarray:
    """The embedding of no regions."""
    return np.zeros((0, dim), np.float32)


def cnn_blocks(embedder: Embedder) -> list[list[tuple[int, int]]]:
    """The CNN activations of an embedder's output, as one group of column ranges ``[start, stop)``
    per conv block; the classifier fits one linear head per group.

    A CNN part lists its blocks in ``blocks`` (ranges relative to its own output); a part
    without it is one block.
    """
    parts = getattr(embedder, "parts", [embedder])
    groups, start = [], 0
    for p in parts:
        if p.kind == "cnn":
            blocks = getattr(p, "blocks", None) or [[(0, p.dim)]]
            groups += [[(start + a, start + b) for a, b in block] for block in blocks]
        start += p.dim
    return groups
