"""The models shipped in the package: every name ``--model`` accepts is a folder that loads, the
training script writes exactly those, and the balanced model (efflite0+texture, the CPU-speed
choice) flags exactly the positive example scenes, as the training script requires of it."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest

from amber_hunter.images import read_rgb
from amber_hunter.model.classify import BUNDLED_MODELS, bundled_model_path, load_bundle
from amber_hunter.model.detect import Detector

TRAINING = Path(__file__).resolve().parent.parent / "training" / "train_default_model.py"


@functools.cache
def training_bundles() -> dict:
    """``BUNDLES`` of the training script, which is not a module of the package."""
    spec = importlib.util.spec_from_file_location("train_default_model", TRAINING)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BUNDLES


def test_every_bundled_name_is_a_shipped_folder_the_training_script_writes():
    shipped = sorted(p.name for p in bundled_model_path().parent.iterdir() if (p / "model.json").is_file())
    assert sorted(BUNDLED_MODELS) == shipped == sorted(training_bundles())
    for name, (embedder, scale) in training_bundles().items():
        bundle = load_bundle(bundled_model_path(name))
        assert (bundle.metadata.embedder, bundle.slic_params().scale) == (embedder, scale)


def test_the_balanced_model_flags_exactly_the_positive_example_scenes(data_root):
    scenes = sorted((data_root / "example").glob("*.png"))
    if len(scenes) != 6:
        pytest.skip(f"the six example scenes are not in {data_root / 'example'}")
    detector = Detector.load(bundled_model_path("balanced"))
    flags = {s.stem: detector.detect(read_rgb(s))[0].flagged for s in scenes}
    assert flags == {s.stem: s.stem.startswith("positive") for s in scenes}
