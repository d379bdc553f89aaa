"""The compiled CNN runtime: precision and engine choice (TFLite or tf.function), the converted
models' cache, batch buckets, and parity with the eager fp32 Keras model on real crops and on the
example scenes with the bundled default model.

Parity is what lets features from any runtime (compiled fp32, bf16 on a CPU that has it) be mixed
with fp32-trained bundles and fp32 cached training embeddings: the precision is not in the cache
key. The bundled default model (vgg16 + efflite0 + texture) is built once for the module; the
runtime under test for the scenes is the one ``auto`` picks on this machine, so
``AMBER_HUNTER_PRECISION=bf16`` runs the scene checks in bf16.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from amber_hunter.errors import EmbedderError
from amber_hunter.images import read_rgb
from amber_hunter.learn.cache import embedder_key
from amber_hunter.model.classify import bundled_model_path, load_bundle
from amber_hunter.model.detect import Detector, aggregate
from amber_hunter.model.embed import cnn
from amber_hunter.model.embed.cnn import (
    COMPILED_CACHE_ENV,
    ENGINE_ENV,
    PRECISION_ENV,
    ResNet50Embedder,
    Vgg16Embedder,
    batch_buckets,
    cpu_precision,
    resolve_runtime,
    tflite_forward,
    tflite_model,
)
from amber_hunter.model.embed.efflite0 import EffLite0Embedder
from amber_hunter.model.segment import resize_nearest

#: The issue's bar: every crop's features (each conv block's columns) within this cosine of fp32.
MIN_COSINE = 0.999
#: Largest change of a superpixel's probability on the example scenes, per runtime precision.
MAX_DP = {"fp32": 1e-3, "bf16": 0.02}
#: Two example scenes of each class (the six cost ~13 s each with the default model).
SCENES = {"positive1": True, "positive3": True, "negative1": False, "negative2": False}


def cosines(a: np.ndarray, b: np.ndarray, blocks) -> np.ndarray:
    """Cosine similarity of each row of ``a`` and ``b`` over each block's columns: (rows, blocks).
    Per block, because the classifier gives each block its own linear head."""
    out = []
    for block in blocks:
        cols = np.concatenate([np.arange(start, stop) for start, stop in block])
        x, y = a[:, cols].astype(np.float64), b[:, cols].astype(np.float64)
        out.append((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)))
    return np.stack(out, axis=1)


def eager(part, crops: np.ndarray) -> np.ndarray:
    """The reference: the fp32 Keras model called eagerly, as ``embed`` did before the runtime."""
    return np.concatenate(
        [np.asarray(part.model(part._preprocess(crops[i : i + 16]), training=False)) for i in range(0, len(crops), 16)]
    )


# --- choosing the runtime (no CNN built) ----------------------------------------------------------


@pytest.fixture
def fake_cpuinfo(tmp_path, monkeypatch):
    """``fake_cpuinfo(flags)``: make /proc/cpuinfo say ``flags``; the cached choice is reset around."""

    def make(flags: str):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        monkeypatch.setattr(cnn, "CPUINFO", path)
        cpu_precision.cache_clear()

    yield make
    cpu_precision.cache_clear()


def test_auto_precision_is_bf16_only_with_native_bf16_and_says_fp32_once(fake_cpuinfo, caplog):
    caplog.set_level(logging.INFO, logger=cnn.__name__)
    fake_cpuinfo("fpu sse avx2 avx512f avx512_bf16 fma")
    assert cpu_precision() == "bf16"
    fake_cpuinfo("fpu sse avx2 amx_tile amx_bf16 fma")
    assert cpu_precision() == "bf16"
    assert not caplog.records
    fake_cpuinfo("fpu sse avx2 avx512f avx512_vnni fma")  # AVX-512 without bf16: emulated, slower
    assert cpu_precision() == "fp32"
    assert cpu_precision() == "fp32"
    assert [r.getMessage() for r in caplog.records] == [
        "this CPU has no bf16 (neither amx_bf16 nor avx512_bf16): using fp32"
    ]


def test_no_cpuinfo_means_fp32(tmp_path, monkeypatch):
    monkeypatch.setattr(cnn, "CPUINFO", tmp_path / "missing")
    cpu_precision.cache_clear()
    try:
        assert cpu_precision() == "fp32"
    finally:
        cpu_precision.cache_clear()


def test_precision_argument_wins_over_the_environment_and_both_are_checked(fake_cpuinfo, monkeypatch):
    fake_cpuinfo("avx2")
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert resolve_runtime().precision == "fp32"
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    assert resolve_runtime().precision == "bf16"
    assert resolve_runtime("fp32").precision == "fp32"
    assert resolve_runtime("auto").precision == "fp32"
    monkeypatch.setenv(PRECISION_ENV, "fp64")
    with pytest.raises(EmbedderError, match=f"{PRECISION_ENV} 'fp64' is not one of auto, fp32, bf16"):
        resolve_runtime()
    with pytest.raises(EmbedderError, match="vgg16 precision 'half' is not one of auto, fp32, bf16"):
        Vgg16Embedder(precision="half")


def test_fp32_on_a_cpu_runs_in_tflite_unless_tf_is_asked_for(fake_cpuinfo, monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    monkeypatch.delenv(ENGINE_ENV, raising=False)
    fake_cpuinfo("avx2")
    assert resolve_runtime().engine == "tflite"
    assert resolve_runtime(engine="tf").engine == "tf"
    assert resolve_runtime("bf16").engine == "tf"  # TFLite's XNNPACK runs fp32 here; bf16 is TF's
    monkeypatch.setenv(ENGINE_ENV, "tf")
    assert resolve_runtime().engine == "tf"
    assert resolve_runtime(engine="auto").engine == "tflite"  # the argument wins
    monkeypatch.setenv(ENGINE_ENV, "onnx")
    with pytest.raises(EmbedderError, match=f"{ENGINE_ENV} 'onnx' is not one of auto, tf; use auto"):
        resolve_runtime()
    with pytest.raises(EmbedderError, match="efflite0 engine 'lite' is not one of auto, tf"):
        EffLite0Embedder().with_precision("fp32", "lite")


def tiny_keras(pooling: str = "avg"):
    """A two-layer Keras model with seeded weights: converting it takes a second, not Lite0's twelve."""
    keras = cnn._import_keras()
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed=0))(inputs)
    pool = keras.layers.GlobalAveragePooling2D() if pooling == "avg" else keras.layers.GlobalMaxPooling2D()
    return keras.Model(inputs, pool(x))


def test_the_converted_model_is_cached_by_its_weights_and_a_bad_entry_is_redone(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(COMPILED_CACHE_ENV, str(tmp_path))
    model = tiny_keras()
    blob = tflite_model(model, "tiny")
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # neither "Saved artifact at ..." nor the converter's C++ log
    (entry,) = tmp_path.glob("tiny-*.tflite")
    assert entry.read_bytes() == blob
    batch = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(tflite_forward(blob, 2, 16)(batch), model(batch).numpy(), rtol=1e-5, atol=1e-6)

    import tensorflow as tf

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache holds the model")

    with monkeypatch.context() as m:
        m.setattr(tf.lite.TFLiteConverter, "from_keras_model", no_conversion)
        assert tflite_model(model, "tiny") == blob
    entry.write_bytes(b"not a flatbuffer")
    again = tflite_model(model, "tiny")
    assert again[4:8] == b"TFL3" and entry.read_bytes() == again
    entry.write_bytes(again[: len(again) // 2])  # cut short: the header is still there
    assert tflite_model(model, "tiny") == again and entry.read_bytes() == again
    # The same weights under another head or another embedder's params are other entries.
    tflite_model(tiny_keras("max"), "tiny")
    tflite_model(model, "tiny", identity="pooling avgmax")
    model.layers[1].kernel.assign(model.layers[1].kernel * 2)  # other weights
    tflite_model(model, "tiny")
    assert len(list(tmp_path.glob("tiny-*.tflite"))) == 4


def test_an_unwritable_cache_converts_once_per_embedder(tmp_path, monkeypatch, crops):
    """A cache folder that cannot be made (here: below a file) costs one conversion per embedder,
    shared by its batch shapes, not one per shape."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(COMPILED_CACHE_ENV, str(blocker / "compiled"))
    import tensorflow as tf

    real, calls = tf.lite.TFLiteConverter.from_keras_model, []

    def counted(model):
        calls.append(model)
        return real(model)

    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_keras_model", counted)
    small = np.stack([resize_nearest(c, 32) for c in crops[:3]])
    embedder = ResNet50Embedder(input_size=32, weights="random", precision="fp32")
    embedder.run(small)  # bucket 4
    embedder.run(small[:1])  # bucket 1
    assert embedder.runtime.engine == "tflite" and len(calls) == 1


def test_threads_sharing_an_embedder_get_their_own_features(crops):
    """A dask worker runs several tasks in threads with one model: the interpreters must not mix
    batches up."""
    from concurrent.futures import ThreadPoolExecutor

    small = np.stack([resize_nearest(c, 32) for c in crops])
    embedder = ResNet50Embedder(input_size=32, weights="random", precision="fp32")
    serial = [embedder.run(small[i : i + 2]) for i in range(0, 10, 2)]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            together = list(pool.map(embedder.run, [small[i : i + 2] for i in range(0, 10, 2)]))
            for a, b in zip(together, serial):
                np.testing.assert_array_equal(a, b)


def test_a_flatbuffer_tflite_refuses_names_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(COMPILED_CACHE_ENV, str(tmp_path))
    message = f"(?s)TFLite cannot load the converted CNN .*; delete {re.escape(str(tmp_path))} or set {ENGINE_ENV}=tf"
    with pytest.raises(EmbedderError, match=message):
        tflite_forward(b"1234TFL3" + bytes(64), 1, 16)


def test_precision_is_not_part_of_the_cache_key_nor_the_bundle_params():
    """fp32-trained bundles and fp32 cached training embeddings stay valid under any runtime."""
    for make in (Vgg16Embedder, EffLite0Embedder, lambda **k: ResNet50Embedder(weights="random", **k)):
        fp32, bf16 = make(precision="fp32"), make(precision="bf16")
        assert fp32.params == bf16.params == make().params
        assert embedder_key(fp32) == embedder_key(bf16)
    assert "precision" not in Vgg16Embedder().params


def test_batch_buckets():
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(1) == [1]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]


# --- parity on real crops -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector():
    """The bundled default model (vgg16 + efflite0 + texture), both CNNs built once for the module."""
    return Detector(load_bundle(bundled_model_path("default")))


@pytest.fixture(scope="module")
def crops(pick_crops):
    """Ten real crops, five of each class, of various sizes, resized to 224 as ``embed`` does."""
    files = pick_crops("positive", 5, 3) + pick_crops("negative", 5, 5)
    return np.stack([resize_nearest(read_rgb(f), 224) for f in files])


def cnn_part(detector, name: str):
    return next(p for p in detector.embedder.parts if p.name == name)


@pytest.mark.parametrize("engine", ["auto", "tf"])  # auto: TFLite on this CPU
@pytest.mark.parametrize("name", ["vgg16", "efflite0"])
def test_compiled_fp32_matches_eager_keras(detector, crops, name, engine):
    part = cnn_part(detector, name).with_precision("fp32", engine)
    assert part.runtime.engine == ("tflite" if engine == "auto" else "tf")
    reference = eager(part, crops)
    fast = part.run(crops[:7])  # 7 crops: a padded batch (bucket 8)
    assert fast.dtype == np.float32 and fast.shape == (7, part.dim)
    np.testing.assert_allclose(fast, reference[:7], rtol=1e-4, atol=1e-4)
    assert cosines(fast, reference[:7], part.blocks).min() >= MIN_COSINE


def test_bf16_keeps_cosine_to_fp32_on_real_crops_for_vgg16(detector, crops):
    """bf16 (forced here: this CPU may only emulate it) against the eager fp32 model, same weights."""
    part = cnn_part(detector, "vgg16")
    picked = crops[[0, 1, 2, 5, 6, 7]]  # emulated bf16 VGG16 is slow
    bf16 = part.with_precision("bf16")
    fast = bf16.run(picked)
    assert bf16.runtime.precision == "bf16" and fast.dtype == np.float32
    similarity = cosines(fast, eager(part, picked), part.blocks)
    assert similarity.min() >= MIN_COSINE, similarity.min(axis=0)


def test_auto_uses_bf16_only_for_networks_that_keep_parity(fake_cpuinfo, monkeypatch):
    """On a bf16 CPU, vgg16 and resnet50 run in bf16; efflite0 stays fp32 (its head tap falls to
    cosine ~0.994 in bf16, see ``EffLite0Embedder.REDUCED_PRECISION``)."""
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    fake_cpuinfo("avx2 avx512f avx512_bf16")
    assert Vgg16Embedder().runtime.precision == "bf16"
    assert ResNet50Embedder(weights="random").runtime.precision == "bf16"
    assert EffLite0Embedder().runtime.precision == "fp32"
    assert EffLite0Embedder(precision="bf16").runtime.precision == "bf16"  # forced: for measuring


def test_batches_and_scenes_give_the_same_features(detector, crops, monkeypatch):
    """One crop per pass, a full batch plus a padded one, and several scenes at once agree."""
    part = cnn_part(detector, "efflite0").with_precision("fp32")
    together = part.run(crops)  # 16-crop batches: one padded batch of 10 (bucket 16)
    monkeypatch.setattr(cnn, "BATCH_SIZE", 4)  # batches 4 + 4 + 2
    np.testing.assert_allclose(part.run(crops), together, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(cnn, "BATCH_SIZE", 1)
    np.testing.assert_allclose(part.run(crops[:3]), together[:3], rtol=1e-4, atol=1e-4)
    from amber_hunter.model.segment import whole_image_region

    images = [crops[0], crops[5], crops[9]]
    scenes = [(images[0], [whole_image_region(images[0])]), (images[1], []), (images[2], [whole_image_region(images[2])] * 2)]
    many = part.embed_many(scenes)
    assert [m.shape for m in many] == [(1, part.dim), (0, part.dim), (2, part.dim)]
    np.testing.assert_allclose(np.concatenate(many), together[[0, 9, 9]], rtol=1e-4, atol=1e-4)


def test_resnet50_random_weights_compiled_matches_eager(crops):
    """The study's embedder (random weights, small input to stay cheap) in fp32 and bf16."""
    small = np.stack([resize_nearest(c, 32) for c in crops[:4]])
    fp32 = ResNet50Embedder(input_size=32, weights="random", precision="fp32")
    reference = eager(fp32, small)
    np.testing.assert_allclose(fp32.run(small), reference, rtol=1e-4, atol=1e-4)
    assert fp32.runtime.engine == "tflite"
    np.testing.assert_allclose(fp32.with_precision("fp32", "tf").run(small), reference, rtol=1e-4, atol=1e-4)
    bf16 = fp32.with_precision("bf16")
    assert cosines(bf16.run(small), reference, [[(0, fp32.dim)]]).min() >= MIN_COSINE


# --- the example scenes ----------------------------------------------------------------------------


@pytest.mark.parametrize("scene", list(SCENES))
def test_default_model_flags_the_example_scenes_as_eager_fp32_does(detector, data_root, scene):
    """The compiled runtime ``auto`` picks gives the same flag as the eager fp32 features, and the
    expected one, with every superpixel's probability within :data:`MAX_DP`."""
    path = data_root / "example" / f"{scene}.png"
    if not path.is_file():
        pytest.skip(f"example scene {path} not found")
    image = read_rgb(path)
    fast = detector.run(image)
    columns, start = [], 0
    for part in detector.embedder.parts:
        stop = start + part.dim
        if part.kind == "cnn":
            crops = np.stack([resize_nearest(r.crop(image), part.input_size) for r in fast.segmentation.regions])
            columns.append(eager(part, crops))
        else:
            columns.append(fast.features[:, start:stop])  # hand-made: no CNN runtime involved
        start = stop
    bundle = detector.bundle
    probabilities = bundle.predict_proba(np.concatenate(columns, axis=1))
    reference = aggregate(probabilities, fast.segmentation, bundle.metadata.threshold, detector.min_positive)
    assert fast.result.flagged == reference.flagged == SCENES[scene]
    dp = np.abs(np.array(fast.result.probabilities) - np.array(reference.probabilities)).max()
    precisions = {p.runtime.precision for p in detector.embedder.parts if p.kind == "cnn"}
    assert dp <= max(MAX_DP[p] for p in precisions), (scene, dp)
    print(f"{scene}: {sorted(precisions)} max |dp| = {dp:.2e}")
