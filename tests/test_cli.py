"""The ``amber-hunter`` command through click's CliRunner: the happy paths write what they promise,
and every bad input is one line on stderr, exit code 2, no traceback and no half-written output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
from bundle_damage import edit_model_json, truncate_xgb_json
from click.testing import CliRunner
from PIL import Image

from amber_hunter.cli import main
from amber_hunter.images import read_rgb, write_png

PREFIX = "amber-hunter: error: "
EVAL_KEYS = {"precision", "recall", "f1", "f2", "roc_auc", "pr_auc", "confusion"}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def describe(result) -> str:
    tb = (
        "".join(traceback.format_exception(*result.exc_info))
        if result.exc_info and result.exc_info[0] is not SystemExit
        else ""
    )
    return f"exit {result.exit_code}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}\n{tb}"


def assert_ok(result):
    assert result.exit_code == 0, describe(result)
    assert "Traceback" not in result.output


def assert_user_error(result, *outputs, fragment: str | None = None):
    """Exit 2, one line starting with the prefix, no traceback, and none of ``outputs`` exists
    (nor any temporary file beside them)."""
    assert result.exit_code == 2, describe(result)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, describe(result)
    assert lines[0].startswith(PREFIX), describe(result)
    assert result.stdout == "", describe(result)
    if fragment is not None:
        assert fragment in lines[0], describe(result)
    for out in map(Path, outputs):
        assert not out.exists(), f"{out} was left behind"
        if out.parent.is_dir():
            leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
            assert not leftovers, f"temporary files left beside {out}: {leftovers}"


def synthetic_dataset(root: Path, n_pos: int, n_neg: int, *, study_names: bool = True, seed: int = 0) -> Path:
    """Small random crops: enough to reach the code under test, fast to embed."""
    rng = np.random.default_rng(seed)
    for sub, n, lat in (("positive", n_pos, 50.0), ("negative", n_neg, 51.0)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"{lat + i / 100:.2f}_25.{i}_11_Oct_2014_GMT_super_{i}.png" if study_names else f"{sub}_{i}.png"
            write_png(root / sub / name, rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    return root


@pytest.fixture
def out(tmp_path) -> Path:
    """A folder for outputs that does not exist yet."""
    return tmp_path / "out"


# --- help and version ---------------------------------------------------------------------------


def test_help_does_not_import_tensorflow(tmp_path):
    code = (
        "import sys, json\n"
        "import amber_hunter.cli as cli\n"
        "codes = []\n"
        "for argv in (['--help'], ['train', '--help'], ['evaluate', '--help'], ['detect', '--help'], ['--version']):\n"
        "    try:\n"
        "        codes.append(cli.main(argv, standalone_mode=False))\n"
        "    except SystemExit as exc:\n"
        "        codes.append(exc.code)\n"
        "print(json.dumps({'heavy': sorted(m for m in ('tensorflow', 'keras', 'xgboost', 'sklearn', 'skimage') if m in sys.modules),"
        " 'codes': codes}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "tensorflow" not in report["heavy"], report
    assert report["heavy"] == [], f"--help must stay instant, but imported {report['heavy']}"
    assert report["codes"] == [0, 0, 0, 0, 0], report
    assert "Usage:" in done.stdout and "train" in done.stdout and "--embedder" in done.stdout


def test_public_api_matches_the_lazy_import_table():
    import amber_hunter

    assert set(amber_hunter.__all__) == set(amber_hunter._EXPORTS) | {"__version__"}
    assert all(getattr(amber_hunter, name) is not None for name in amber_hunter.__all__)


def test_suite_is_offline():
    import socket

    with pytest.raises(AssertionError, match="network connection"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)


def test_version_and_help_in_process():
    from amber_hunter import __version__

    result = run("--version")
    assert_ok(result)
    assert __version__ in result.stdout
    assert_ok(run("-h"))


# --- train --------------------------------------------------------------------------------------


def test_train_texture_writes_a_bundle(small_data, shared_cache, texture_model, out):
    from amber_hunter.model.classify import load_bundle

    result = run("train", small_data, "--embedder", "texture", "--out", out / "m", "--cache-dir", shared_cache)
    assert_ok(result)
    assert result.stdout.startswith(f"wrote {out / 'm'}: texture, 65 crops, threshold ")
    assert sorted(p.name for p in (out / "m").iterdir()) == ["model.json", "xgb.json"]
    assert [p.name for p in out.iterdir()] == ["m"]
    bundle = load_bundle(out / "m")
    assert bundle.metadata.embedder == "texture"
    # Same data, same seed: the same model as the library call in the session fixture.
    library = load_bundle(texture_model)
    assert bundle.metadata.threshold == library.metadata.threshold
    assert bundle.metadata.training["data_hash"] == library.metadata.training["data_hash"]
    x = np.random.default_rng(0).normal(size=(7, library.metadata.dim)).astype(np.float32)
    np.testing.assert_array_equal(bundle.predict_proba(x), library.predict_proba(x))


# --- evaluate -----------------------------------------------------------------------------------


def check_report(path: Path, protocol: str) -> dict:
    report = json.loads(path.read_text())
    assert EVAL_KEYS <= set(report), sorted(report)
    assert report["protocol"] == protocol and report["embedder"] == "texture"
    for key in ("precision", "recall", "f1", "f2", "roc_auc", "pr_auc"):
        assert 0.0 <= report[key] <= 1.0, (key, report[key])
    (tn, fp), (fn, tp) = report["confusion"]
    assert tn + fp + fn + tp == report["n"] and fn + tp == report["n_positive"]
    plot = path.with_suffix(".pr.png")
    assert plot.is_file(), "the PR curve belongs next to the JSON"
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    return report


def test_evaluate_grouped_writes_json_and_pr_curve(small_data, shared_cache, out):
    result = run(
        "evaluate",
        small_data,
        "--embedder",
        "texture",
        "--protocol",
        "grouped",
        "--folds",
        3,
        "--json",
        out / "grouped.json",
        "--cache-dir",
        shared_cache,
    )
    assert_ok(result)
    report = check_report(out / "grouped.json", "grouped")
    assert report["n"] == 65 and report["n_positive"] == 25
    assert len(report["folds"]) == 3 and report["axis"] is None
    assert f"PR curve: {out / 'grouped.pr.png'}" in result.stdout
    assert report["roc_auc"] > 0.5  # texture features carry signal on real crops


def test_evaluate_spatial_on_study_named_files(small_data, shared_cache, out):
    result = run(
        "evaluate",
        small_data,
        "--embedder",
        "texture",
        "--protocol",
        "spatial",
        "--folds",
        3,
        "--axis",
        "lat",
        "--json",
        out / "spatial.json",
        "--cache-dir",
        shared_cache,
    )
    assert_ok(result)
    report = check_report(out / "spatial.json", "spatial")
    assert report["axis"] == "lat" and len(report["folds"]) == 3 and report["n"] == 65
    assert result.stdout.startswith("spatial (lat) texture:")


def test_evaluate_seed_split(small_data, shared_cache, out):
    result = run(
        "evaluate",
        small_data,
        "--embedder",
        "texture",
        "--protocol",
        "seed-split",
        "--json",
        out / "seed.json",
        "--cache-dir",
        shared_cache,
    )
    assert_ok(result)
    report = check_report(out / "seed.json", "seed-split")
    assert (report["n"], report["n_positive"]) == (20, 8)  # ceil(0.3 * 40) + ceil(0.3 * 25)
    assert len(report["folds"]) == 1


def test_evaluate_external_model(other_data, texture_model, out, monkeypatch, tmp_path):
    cache = tmp_path / "env-cache"
    monkeypatch.setenv("AMBER_HUNTER_CACHE", str(cache))
    result = run("evaluate", other_data, "--model", texture_model, "--json", out / "external.json")
    assert_ok(result)
    report = check_report(out / "external.json", "external")
    assert (report["n"], report["n_positive"]) == (24, 12)
    assert report["folds"] == []
    assert list(cache.rglob("*.parquet")), "embeddings go to $AMBER_HUNTER_CACHE by default"


def test_evaluate_external_applies_a_labels_csv(other_data, texture_model, tmp_path, out):
    """A labels CSV flips one crop and adds one from outside the folders; the report counts both."""
    extra = tmp_path / "reports" / "extra.png"
    write_png(extra, np.random.default_rng(5).integers(0, 256, (30, 30, 3), dtype=np.uint8))
    flipped = min((other_data / "positive").iterdir())
    csv = tmp_path / "labels.csv"
    csv.write_text(f"path,label,source,note\n{flipped},negative,review,road\nreports/extra.png,positive,reader,\n")
    result = run("evaluate", other_data, "--model", texture_model, "--labels", csv, "--json", out / "r.json")
    assert_ok(result)
    report = json.loads((out / "r.json").read_text())
    assert (report["n"], report["n_positive"]) == (25, 12)


# --- detect -------------------------------------------------------------------------------------


def test_detect_writes_json_and_overlay(texture_model, scene_path, out):
    result = run(
        "detect",
        "--model",
        texture_model,
        scene_path,
        "--json",
        out / "scene.json",
        "--overlay",
        out / "scene.png",
        "--m-per-px",
        0.38,
    )
    assert_ok(result)
    report = json.loads((out / "scene.json").read_text())
    assert isinstance(report["flagged"], bool)
    assert isinstance(report["n_positive"], int) and isinstance(report["n_superpixels"], int)
    assert 15 <= report["n_superpixels"] <= 45
    assert len(report["probabilities"]) == report["n_superpixels"]
    assert all(0.0 <= p <= 1.0 for p in report["probabilities"])
    assert report["n_positive"] == sum(p >= report["threshold"] for p in report["probabilities"])
    assert report["flagged"] == (report["n_positive"] > report["min_positive"])
    assert report["scene"] == str(scene_path)
    scene = read_rgb(scene_path)
    with Image.open(out / "scene.png") as im:
        assert im.format == "PNG" and im.size == (scene.shape[1], scene.shape[0]) and im.mode == "RGB"
    assert ("FLAGGED" if report["flagged"] else "clean") in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["scene.json", "scene.png"]


@pytest.fixture(scope="module")
def half_scene(data_root, tmp_path_factory):
    """A real example scene at half size (faster, still ~15 superpixels' worth of structure)."""
    with Image.open(data_root / "example" / "negative1.png") as im:
        rgb = im.convert("RGB").reduce(2)
    path = tmp_path_factory.mktemp("scenes") / "half.png"
    rgb.save(path)
    return path


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16"])
def test_detect_converts_odd_scene_formats(mode, half_scene, texture_model, tmp_path, out):
    rgb = Image.open(half_scene)
    if mode == "RGBA":
        image = rgb.copy()
        alpha = np.full(rgb.size[::-1], 255, np.uint8)
        alpha[:40, :40] = 0
        image.putalpha(Image.fromarray(alpha))
    elif mode == "L":
        image = rgb.convert("L")
    else:
        image = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)
    scene = tmp_path / f"scene-{mode.replace(';', '')}.png"
    image.save(scene)
    assert Image.open(scene).mode == mode
    result = run("detect", "--model", texture_model, scene, "--json", out / "r.json", "--overlay", out / "o.png")
    assert_ok(result)
    report = json.loads((out / "r.json").read_text())
    assert report["n_superpixels"] > 0 and len(report["probabilities"]) == report["n_superpixels"]
    with Image.open(out / "o.png") as im:
        assert im.size == rgb.size
    if mode == "RGBA":  # alpha is dropped: the same answer as the RGB file
        plain = run("detect", "--model", texture_model, half_scene, "--json", out / "rgb.json")
        assert_ok(plain)
        assert json.loads((out / "rgb.json").read_text())["probabilities"] == report["probabilities"]


# --- bad input: detect --------------------------------------------------------------------------


@pytest.fixture
def bad_scene(tmp_path, data_root, fixture_file):
    def make(kind: str) -> Path:
        if kind == "truncated":
            data = (data_root / "example" / "positive3.png").read_bytes()
            path = tmp_path / "truncated.png"
            path.write_bytes(data[: len(data) // 2])
        elif kind == "text":
            path = tmp_path / "notes.png"
            path.write_text("not an image, just text\n")
        elif kind == "committed-text":
            path = fixture_file("not_an_image.png")
        elif kind == "missing":
            path = tmp_path / "missing.png"
        elif kind == "directory":
            path = tmp_path / "a-folder"
            path.mkdir()
        elif kind == "4x4":
            path = fixture_file("tiny4x4.png")
        else:
            raise ValueError(kind)
        return path

    return make


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("truncated", "not a readable image"),
        ("text", "not a readable image"),
        ("committed-text", "not a readable image"),
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("4x4", "too small for 30 superpixels"),
    ],
)
def test_detect_bad_scene(kind, fragment, bad_scene, texture_model, out):
    result = run(
        "detect", "--model", texture_model, bad_scene(kind), "--json", out / "r.json", "--overlay", out / "o.png"
    )
    assert_user_error(result, out / "r.json", out / "o.png", fragment=fragment)


def damage_bundle(kind: str, bundle: Path) -> None:
    if kind == "missing":
        shutil.rmtree(bundle)
    elif kind == "garbage-model-json":
        (bundle / "model.json").write_text("\x00\x01 this is not json")
    elif kind == "garbage-xgb-json":
        (bundle / "xgb.json").write_text("{ definitely not a booster")
    elif kind == "truncated-xgb-json":
        truncate_xgb_json(bundle)
    elif kind == "other-embedder-version":
        edit_model_json(bundle, embedder_version="0")
    elif kind == "other-embedder":
        edit_model_json(bundle, embedder="vgg16", embedder_version="1", dim=2560)
    elif kind == "unknown-embedder":
        edit_model_json(bundle, embedder="sift")
    elif kind == "random-weights":
        edit_model_json(bundle, random_weights=True)
    elif kind == "bad-embedder-params":
        edit_model_json(bundle, embedder_params={"sigma": 2})
    elif kind == "bad-slic":
        edit_model_json(bundle, slic={"n_segments": 30, "smoothness": 1})
    else:
        raise ValueError(kind)


BAD_BUNDLES = [
    ("missing", "does not exist"),
    ("garbage-model-json", "corrupt"),
    ("garbage-xgb-json", "xgb.json is not a readable XGBoost model"),
    ("truncated-xgb-json", "xgb.json is not a readable XGBoost model"),
    ("other-embedder-version", "texture v0"),
    ("other-embedder", "booster has"),
    ("unknown-embedder", "unknown embedder 'sift'"),
    ("random-weights", "--allow-random"),
    ("bad-embedder-params", None),
    ("bad-slic", None),
]


@pytest.mark.parametrize("kind, fragment", BAD_BUNDLES, ids=[k for k, _ in BAD_BUNDLES])
def test_detect_bad_model_bundle(kind, fragment, texture_model, scene_path, tmp_path, out):
    bundle = tmp_path / "bundle"
    shutil.copytree(texture_model, bundle)
    damage_bundle(kind, bundle)
    result = run("detect", "--model", bundle, scene_path, "--json", out / "r.json", "--overlay", out / "o.png")
    assert_user_error(result, out / "r.json", out / "o.png", fragment=fragment)


def test_detect_unwritable_outputs_leave_nothing_half_written(texture_model, half_scene, tmp_path):
    """--json or --overlay naming an existing folder is a user error, and when the overlay cannot
    be written the JSON must not be left behind on its own."""
    folder = tmp_path / "taken"
    folder.mkdir()
    result = run("detect", "--model", texture_model, half_scene, "--json", tmp_path / "r.json", "--overlay", folder)
    assert_user_error(result, tmp_path / "r.json")
    result = run("detect", "--model", texture_model, half_scene, "--json", folder)
    assert_user_error(result)
    assert list(folder.iterdir()) == []


# --- bad input: train ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("no-such-folder", "does not exist"),
        ("no-positive", "positive is missing"),
        ("no-negative", "negative is missing"),
        ("empty-positive", "holds no images"),
        ("empty-negative", "holds no images"),
        ("single-class", "only negative samples"),
        ("csv-unknown-path", "'data/positive/not-there.png' does not exist"),
        ("csv-unknown-label", "unknown label 'perhaps'"),
        ("csv-missing", "does not exist"),
        ("unknown-embedder", "unknown embedder 'sift'"),
        ("resnet-weights-file-missing", "--resnet-weights"),
    ],
)
def test_train_bad_input(kind, fragment, tmp_path, out):
    data = synthetic_dataset(tmp_path / "data", 3, 4)
    args = ["train", data, "--embedder", "texture", "--out", out / "model"]
    if kind == "no-such-folder":
        args[1] = tmp_path / "nowhere"
    elif kind.startswith("no-"):
        shutil.rmtree(data / kind[3:])
    elif kind.startswith("empty-"):
        for f in (data / kind[6:]).iterdir():
            f.unlink()
    elif kind == "single-class":
        rows = "".join(f"data/positive/{p.name},0,,\n" for p in (data / "positive").iterdir())
        (tmp_path / "labels.csv").write_text("path,label,source,note\n" + rows)
        args += ["--labels", tmp_path / "labels.csv"]
    elif kind == "csv-unknown-path":
        (tmp_path / "labels.csv").write_text("path,label\ndata/positive/not-there.png,1\n")
        args += ["--labels", tmp_path / "labels.csv"]
    elif kind == "csv-unknown-label":
        name = next((data / "negative").iterdir()).name
        (tmp_path / "labels.csv").write_text(f"path,label\ndata/negative/{name},perhaps\n")
        args += ["--labels", tmp_path / "labels.csv"]
    elif kind == "csv-missing":
        args += ["--labels", tmp_path / "nope.csv"]
    elif kind == "unknown-embedder":
        args[3] = "sift"
    elif kind == "resnet-weights-file-missing":
        args[3] = "resnet50"
        args += ["--resnet-weights", tmp_path / "weights.h5"]
    result = run(*args)
    assert_user_error(result, out / "model", fragment=fragment)
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("n", [1, 2])
def test_train_too_few_crops_per_class(n, tmp_path, out):
    """A dataset too small for the inner cross-validation is a user error, not a traceback."""
    data = synthetic_dataset(tmp_path / "data", n, n)
    result = run("train", data, "--embedder", "texture", "--out", out / "model")
    assert_user_error(result, out / "model")


# --- bad input: evaluate ------------------------------------------------------------------------


def test_evaluate_spatial_needs_study_names(tmp_path, out):
    data = synthetic_dataset(tmp_path / "data", 4, 4, study_names=False)
    result = run(
        "evaluate", data, "--embedder", "texture", "--protocol", "spatial", "--folds", 2, "--json", out / "r.json"
    )
    assert_user_error(result, out / "r.json", out / "r.pr.png", fragment="--protocol grouped")


@pytest.mark.parametrize(
    "protocol, folds, fragment", [("spatial", 30, "use fewer --folds"), ("grouped", 50, "use fewer --folds")]
)
def test_evaluate_more_folds_than_scenes(protocol, folds, fragment, small_data, shared_cache, out):
    result = run(
        "evaluate", small_data, "--embedder", "texture", "--protocol", protocol, "--folds", folds,
        "--json", out / "r.json", "--cache-dir", shared_cache,
    )  # fmt: skip
    assert_user_error(result, out / "r.json", out / "r.pr.png", fragment=fragment)


@pytest.mark.parametrize(
    "kind, fragment", [("with-embedder", "no --embedder"), ("two-folders", "exactly one DATA_DIR")]
)
def test_evaluate_model_option_conflicts(kind, fragment, other_data, texture_model, out):
    extra = ["--embedder", "texture"] if kind == "with-embedder" else [other_data]
    result = run("evaluate", other_data, *extra, "--model", texture_model, "--json", out / "r.json")
    assert_user_error(result, out / "r.json", out / "r.pr.png", fragment=fragment)


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("missing", "does not exist"),
        ("garbage-model-json", "corrupt"),
        ("garbage-xgb-json", "not a readable XGBoost model"),
        ("other-embedder-version", "texture v0"),
    ],
)
def test_evaluate_bad_model_bundle(kind, fragment, other_data, texture_model, tmp_path, out):
    bundle = tmp_path / "bundle"
    shutil.copytree(texture_model, bundle)
    damage_bundle(kind, bundle)
    result = run("evaluate", other_data, "--model", bundle, "--json", out / "r.json")
    assert_user_error(result, out / "r.json", out / "r.pr.png", fragment=fragment)


def test_evaluate_labels_csv_with_unknown_path(other_data, texture_model, tmp_path, out):
    (tmp_path / "labels.csv").write_text("path,label\nnowhere/crop.png,1\n")
    result = run(
        "evaluate", other_data, "--model", texture_model, "--labels", tmp_path / "labels.csv", "--json", out / "r.json"
    )
    assert_user_error(result, out / "r.json", out / "r.pr.png", fragment="'nowhere/crop.png' does not exist")
