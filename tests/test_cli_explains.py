"""A CLI that explains itself (issue 11, §5): what a user sees, in a terminal and in a log file.

No TensorFlow, CUDA or absl log lines unless ``--verbose``, checked on real processes, because
some of those lines are written by C++ before Python's logging exists. Long commands print plain
progress lines when their output goes to a file. Defaults and help agree with the bundled model
and the scene rule; errors name no Python object and no option that does not exist; a refused
scan leaves no run directory behind; a dead tile server stops a scan at once, with one line.
"""

from __future__ import annotations

import ast
import io
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_dataset
from scan_fixtures import LAYOUT, results
from tile_servers import FAST, Fault, tile_server

from amber_hunter.cli import DEFAULT_EMBEDDER, main
from amber_hunter.cli.progress import Progress
from amber_hunter.errors import ConfigError, RunStoreError, SourceUnavailableError, TileSourceError

CLI = "from amber_hunter.cli import main; main()"
PACKAGE = Path(__file__).resolve().parents[1] / "amber_hunter"
#: What TensorFlow, XLA, CUDA and absl print: glog-style lines ("E0000 00:00:17… cuda_platform.cc"),
#: the absl pre-initialisation notice, and the oneDNN / cuDNN / CPU-feature notices.
NOISE = re.compile(r"^[IWEF]\d{4} |absl|oneDNN|cuDNN|cuFFT|cuBLAS|CUDA|cuda|TensorFlow binary|tensorflow", re.MULTILINE)
#: A progress line as ``Progress.line`` writes it.
PROGRESS = re.compile(r"^amber-hunter (train|evaluate|scan): .+; \d+ (s|min \d\d s|h \d\d min) so far$")
#: A Python object's repr, as Pillow or urllib3 put them in their messages.
OBJECT_REPR = re.compile(r"<[^<>]* (object )?at 0x[0-9a-fA-F]+>")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def one_error_line(result) -> str:
    """The one stderr line of a user error (exit 2, no traceback, nothing else said)."""
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amber-hunter: error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def quiet_env(**extra) -> dict:
    """This process's environment without any say over TensorFlow's logging or our progress lines."""
    drop = {"TF_CPP_MIN_LOG_LEVEL", "AMBER_HUNTER_VERBOSE", "AMBER_HUNTER_PROGRESS_EVERY"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def cli_to_files(args: list, folder: Path, env: dict, timeout: float = 600) -> SimpleNamespace:
    """Run the CLI with stdout and stderr sent to files, as cron or a CI log would."""
    folder.mkdir(parents=True, exist_ok=True)
    out, err = folder / "stdout.txt", folder / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        code = subprocess.run([sys.executable, "-c", CLI, *map(str, args)], stdout=stdout, stderr=stderr,
                              env=env, timeout=timeout, check=False).returncode
    return SimpleNamespace(code=code, stdout=out.read_text(), stderr=err.read_text())


def seconds_so_far(line: str) -> int:
    """The "so far" of a progress line, in seconds."""
    m = re.search(r"; (?:(\d+) h (\d\d) min|(?:(\d+) min )?(\d+) s) so far$", line)
    hours, minutes_h, minutes, seconds = (int(g or 0) for g in m.groups())
    return hours * 3600 + minutes_h * 60 + minutes * 60 + seconds


def refused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- 1 and 2: no TensorFlow lines, progress lines in a log file ---------------------------------


@pytest.fixture(scope="module")
def efflite_train(pick_crops, tmp_path_factory):
    """``train`` of a small efflite0 model (TensorFlow is loaded) with its output sent to files."""
    root = tmp_path_factory.mktemp("efflite")
    data = make_dataset(root / "data", pick_crops("positive", 12, 1), pick_crops("negative", 12, 2))
    env = quiet_env(AMBER_HUNTER_CACHE=str(root / "cache"))
    done = cli_to_files(["train", data, "--embedder", "efflite0", "--out", root / "model", "--progress-every", 0.2],
                        root / "train", env)
    return SimpleNamespace(model=root / "model", **vars(done))


def test_train_to_a_file_prints_progress_lines_and_no_tensorflow_line(efflite_train):
    assert efflite_train.code == 0, efflite_train.stderr
    assert efflite_train.stdout.startswith(f"wrote {efflite_train.model}: efflite0, 24 crops")
    assert not NOISE.search(efflite_train.stderr), efflite_train.stderr
    lines = efflite_train.stderr.splitlines()
    assert lines, "train wrote no progress line to its log in all that time"
    assert all(PROGRESS.match(line) for line in lines), efflite_train.stderr  # progress lines and nothing else
    assert any("fitting the classifier" in line for line in lines), efflite_train.stderr
    # A line every 0.2 s all along, also while TensorFlow loads with its own output silenced (the
    # import holds the GIL in stretches: on a loaded 2-core CI box a gap of a few seconds is normal;
    # no line at all during the import, the bug this guards against, leaves a gap of its whole length).
    times = [seconds_so_far(line) for line in lines]
    assert times[0] <= 3 and max(b - a for a, b in itertools.pairwise(times)) <= 6, times


def test_scan_to_a_file_prints_progress_lines_and_no_tensorflow_line(efflite_train, region, tmp_path):
    assert efflite_train.code == 0, efflite_train.stderr
    run = tmp_path / "run"
    env = quiet_env(AMBER_HUNTER_PROGRESS_EVERY="0.2")  # the option's environment variable
    done = cli_to_files(["scan", "--aoi", region.aoi, "--tiles", region.folder, "--zoom", 18, "--scene-tiles", 2,
                         "--model", efflite_train.model, "--run", run], tmp_path / "scan", env)
    assert done.code == 1, done.stderr  # the region's two bad-tile scenes fail, as they should
    assert f"{len(LAYOUT)} scenes this run" in done.stdout
    assert not NOISE.search(done.stderr), done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("amber-hunter scan: ")]
    assert progress and all(PROGRESS.match(line) for line in progress), done.stderr
    assert any(re.search(rf"scanning \d/{len(LAYOUT)} scenes", line) for line in progress), done.stderr
    assert "\r" not in done.stderr  # no bar redrawn with carriage returns in a log file


def test_detect_with_the_default_model_prints_no_tensorflow_line(scene_path, tmp_path):
    """The bundled default model (vgg16+efflite0+texture) loads TensorFlow: the user sees the verdict only."""
    done = cli_to_files(["detect", scene_path], tmp_path, quiet_env())
    assert done.code == 0, done.stderr
    assert "superpixels positive" in done.stdout
    assert done.stderr == "", done.stderr


def test_verbose_shows_what_is_hidden(efflite_train, scene_path, tmp_path):
    assert efflite_train.code == 0, efflite_train.stderr
    done = cli_to_files(["--verbose", "detect", "--model", efflite_train.model, scene_path], tmp_path, quiet_env())
    assert done.code == 0, done.stderr
    assert NOISE.search(done.stderr), "--verbose should let TensorFlow log; did the test's pattern go stale?"
    assert "--verbose" in run("--help").stdout


class _Stream(io.StringIO):
    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


def test_progress_off_a_terminal_is_a_line_every_n_seconds():
    stream = _Stream(terminal=False)
    with Progress("scan", 0.05, "loading the model", stream=stream) as progress:
        time.sleep(0.2)
        bar = progress.counter("scanning", "scene")(40)
        bar.update()
        bar.update()
        time.sleep(0.2)
        bar.close()
    lines = stream.getvalue().splitlines()
    assert all(PROGRESS.match(line) for line in lines), lines
    assert any(line.startswith("amber-hunter scan: loading the model; ") for line in lines), lines
    counted = [line for line in lines if "scanning 2/40 scenes" in line]
    assert counted and re.search(r"scanning 2/40 scenes, [\d.]+ scenes/s, about \d+ s left; ", counted[-1]), lines
    time.sleep(0.15)
    assert stream.getvalue().splitlines() == lines, "a line came after the command ended"


def test_progress_on_a_terminal_is_a_bar_and_steps_by_name():
    stream = _Stream(terminal=True)
    with Progress("train", 0.05, "reading the crops", stream=stream) as progress:
        embedded = list(progress.items("embedding", "crop", then="fitting the classifier")(["a", "b", "c"]))
        time.sleep(0.15)
    text = stream.getvalue()
    assert embedded == ["a", "b", "c"]
    assert "embedding: 100%" in text and "3/3" in text  # tqdm's bar
    assert "train: fitting the classifier…" in text
    lines = text.replace("\r", "\n").splitlines()
    assert not any(PROGRESS.match(line) for line in lines), "no heartbeat lines on a terminal: the bar says it all"


def test_progress_every_zero_prints_no_line():
    stream = _Stream(terminal=False)
    with Progress("evaluate", 0, "reading the crops", stream=stream) as progress:
        list(progress.items("embedding", "crop", then="scoring")(range(3)))
        time.sleep(0.1)
    assert stream.getvalue() == ""


# --- 3, 4, 5: defaults and help ----------------------------------------------------------------


def _option(command: str, name: str) -> click.Option:
    return next(p for p in main.commands[command].params if p.name == name)


def test_target_precision_default_is_the_bundled_models_operating_point():
    import inspect

    from amber_hunter.learn.workflows import evaluate_protocol, train_model
    from amber_hunter.model.classify import TARGET_PRECISION, bundled_model_path

    bundled = json.loads((bundled_model_path("default") / "model.json").read_text())["target_precision"]
    assert _option("train", "target_precision").default == bundled
    assert _option("evaluate", "target_precision").default == bundled
    assert TARGET_PRECISION == bundled
    for function in (train_model, evaluate_protocol):
        assert inspect.signature(function).parameters["target_precision"].default == bundled
    assert f"[default: {bundled};" in run("train", "--help").stdout


def test_evaluate_help_shows_the_embedder_it_uses(monkeypatch, tmp_path):
    from amber_hunter.learn import workflows

    help_text = " ".join(run("evaluate", "--help").stdout.split())  # click wraps long lines
    assert f"[default: {DEFAULT_EMBEDDER}]" in help_text
    used = []

    def fake(data_dirs, embedder, protocol, **options):
        used.append(embedder.name)
        raise ConfigError("stop here")

    monkeypatch.setattr(workflows, "evaluate_protocol", fake)
    one_error_line(run("evaluate", tmp_path))
    assert used == [DEFAULT_EMBEDDER]


@pytest.mark.parametrize("command", ["detect", "scan"])
def test_min_positive_help_says_more_than_n(command):
    from amber_hunter.model.detect import aggregate

    help_text = " ".join(run(command, "--help").stdout.split())
    assert "--min-positive N" in help_text and "when more than N superpixels are positive" in help_text
    segmentation = SimpleNamespace(regions=[SimpleNamespace(label=i, area_px=10) for i in range(5)])
    n = 2
    exactly_n = aggregate(np.array([0.9, 0.9, 0.1, 0.1, 0.1]), segmentation, 0.5, n)
    more = aggregate(np.array([0.9, 0.9, 0.9, 0.1, 0.1]), segmentation, 0.5, n)
    assert (exactly_n.flagged, more.flagged) == (False, True)  # "more than N", as the help says


# --- 6: errors without object reprs -------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n", b"GIF89a" + bytes(20), b"<html>503</html>"],
                         ids=["empty", "png-signature", "gif-header", "html"])
def test_an_unreadable_scene_is_named_not_its_buffer(content, texture_model, tmp_path):
    scene = tmp_path / "scene.png"
    scene.write_bytes(content)
    first = one_error_line(run("detect", "--model", texture_model, scene))
    assert str(scene) in first and "not a readable image" in first
    assert not OBJECT_REPR.search(first) and " at 0x" not in first, first
    assert one_error_line(run("detect", "--model", texture_model, scene)) == first  # the same words every time


def test_an_unreadable_crop_in_training_is_named_not_its_buffer(tmp_path):
    from test_cli import synthetic_dataset

    data = synthetic_dataset(tmp_path / "data", 3, 4)
    broken = next((data / "positive").iterdir())
    broken.write_bytes(b"not a png at all")
    line = one_error_line(run("train", data, "--embedder", "texture", "--out", tmp_path / "m"))
    assert broken.name in line and "not a readable image" in line
    assert not OBJECT_REPR.search(line) and " at 0x" not in line, line


def test_a_connection_error_is_told_without_the_connection_object(monkeypatch):
    """urllib3 before 2.3 names its connection object in the message requests passes on."""
    import requests
    from tile_servers import TILES

    from amber_hunter.sources import HttpTileSource

    said = ("HTTPConnectionPool(host='tiles.example', port=80): Max retries exceeded with url: /5/17/10.png (Caused "
            "by NewConnectionError('<urllib3.connection.HTTPConnection object at 0x7f3c2a1b4d90>: Failed to establish "
            "a new connection: [Errno 111] Connection refused'))")

    def refuse(self, url, **kwargs):
        raise requests.ConnectionError(said)

    monkeypatch.setattr(requests.Session, "get", refuse)
    source = HttpTileSource("http://tiles.example/{z}/{x}/{y}.png", max_retries=1, **FAST)
    with pytest.raises(TileSourceError) as info:
        source.get(TILES[0])
    message = str(info.value)
    assert "(Caused by NewConnectionError('Failed to establish a new connection: [Errno 111]" in message, message
    assert not OBJECT_REPR.search(message) and " at 0x" not in message, message


def test_a_labels_csv_naming_a_missing_file_says_it_does_not_exist(tmp_path):
    from test_cli import synthetic_dataset

    data = synthetic_dataset(tmp_path / "data", 3, 4)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label,source,note\ndata/positive/gone.png,positive,review,\n")
    line = one_error_line(run("train", data, "--embedder", "texture", "--out", tmp_path / "m", "--labels", csv))
    assert "line 2: 'data/positive/gone.png' does not exist" in line
    assert str((tmp_path / "data" / "positive" / "gone.png").resolve()) in line  # where it was looked for


# --- 7: a refused scan leaves no run directory --------------------------------------------------


def _scan_args(region, model, run, **changes) -> list:
    options = {"--aoi": region.aoi, "--tiles": region.folder, "--zoom": 18, "--scene-tiles": 2, "--model": model,
               "--run": run, **changes}
    return ["scan", *(str(x) for pair in options.items() for x in pair)]


@pytest.mark.parametrize("bad", ["tiles", "aoi", "model", "zoom", "unreachable"])
def test_a_refused_scan_leaves_no_run_directory(bad, region, tiny_model, tmp_path, monkeypatch):
    from amber_hunter.sources import HttpTileSource

    monkeypatch.setattr(HttpTileSource, "_backoff", lambda self, attempt: 0.01)
    run_dir = tmp_path / "run"
    change = {
        "tiles": {"--tiles": tmp_path / "no-such-folder"},
        "aoi": {"--aoi": "26.2,50.6,26.3"},
        "model": {"--model": tmp_path / "no-such-model"},
        "zoom": {"--tiles": region.mbtiles, "--zoom": 17, "--scene-tiles": 1},  # the file has zoom 18 only
        "unreachable": {"--tiles": f"http://127.0.0.1:{refused_port()}/{{z}}/{{x}}/{{y}}.png"},
    }[bad]
    one_error_line(CliRunner().invoke(main, _scan_args(region, tiny_model, run_dir, **change)))
    assert not run_dir.exists()
    corrected = CliRunner().invoke(main, _scan_args(region, tiny_model, run_dir))
    assert corrected.exit_code == 1, corrected.output  # not refused: only the region's two bad-tile scenes fail
    assert f"{len(LAYOUT)} scenes this run" in corrected.stdout


def test_a_scan_stopped_before_its_first_scene_removes_the_run_it_created(region, tiny_model, tmp_path, monkeypatch):
    """Whatever stops it once the run directory exists (a full disk, say), if no scene was recorded."""
    from amber_hunter.run.store import RunStore

    def full(self, cells):
        raise RunStoreError(f"{self.run_dir}: cannot register scenes (database or disk is full); free some space")

    monkeypatch.setattr(RunStore, "add_scenes", full)
    one_error_line(CliRunner().invoke(main, _scan_args(region, tiny_model, tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_a_refused_scan_leaves_an_existing_run_as_it_was(folder_run, region, tiny_model, tmp_path):
    run_dir = shutil.copytree(folder_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (run_dir / "config.json", run_dir / "log.txt")}
    reference = results(run_dir)
    one_error_line(CliRunner().invoke(main, [*_scan_args(region, tiny_model, run_dir, **{"--tiles": tmp_path / "nope"}),
                                             "--force"]))
    assert {p.name: p.read_bytes() for p in (run_dir / "config.json", run_dir / "log.txt")} == before
    assert results(run_dir) == reference


# --- 8: hints name real options -----------------------------------------------------------------


def _cli_options(command: click.Command) -> set[str]:
    found = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("--")}
    for sub in getattr(command, "commands", {}).values():
        found |= _cli_options(sub)
    return found


def test_every_option_the_package_mentions_exists():
    """Messages, hints and help name options; each must be one the CLI has."""
    others = {"--force-reinstall", "--profile"}  # pip's and gdal2tiles's, named in hints
    known = _cli_options(main) | others | {"--help"}  # click adds -h/--help to every command
    named = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value):
                    named.setdefault(option, str(path.relative_to(PACKAGE)))
    unknown = {option: where for option, where in named.items() if option not in known}
    assert not unknown, f"options that do not exist: {unknown}"


def test_the_run_log_hints_at_options_that_exist(region, tiny_model, tmp_path, monkeypatch):
    from amber_hunter.run.scan import scan
    from amber_hunter.sources import HttpTileSource

    monkeypatch.setattr(HttpTileSource, "_backoff", lambda self, attempt: 0.01)
    with tile_server(region.folder, fault=Fault("status", status=500, failures=None)) as server:
        summary = scan(region.config(server.url + "/{z}/{x}/{y}.png", tiny_model), tmp_path / "run")
    assert summary.status.failed == len(LAYOUT)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "still failing after 6 retries (last: HTTP 500" in log
    hinted = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", log))
    assert hinted and hinted <= _cli_options(main), hinted
    assert "max_retries" not in log


# --- 9: a dead tile server stops the run --------------------------------------------------------


def test_a_dead_tile_server_stops_the_scan_at_once_with_one_line(region, tiny_model, tmp_path, monkeypatch):
    from amber_hunter.sources import HttpTileSource

    monkeypatch.setattr(HttpTileSource, "_backoff", lambda self, attempt: 0.01)  # the retry budget, shortened
    url = f"http://127.0.0.1:{refused_port()}/{{z}}/{{x}}/{{y}}.png"
    started = time.monotonic()
    line = one_error_line(CliRunner().invoke(main, _scan_args(region, tiny_model, tmp_path / "run",
                                                              **{"--tiles": url, "--workers": 2})))
    assert time.monotonic() - started < 20
    assert "no answer after 6 retries" in line and "ConnectionError" in line and "host and port" in line, line


def test_a_run_of_tiles_without_an_answer_stops_the_source(tile_dir):
    from tile_servers import TILES

    from amber_hunter.sources import HttpTileSource

    root, written = tile_dir
    with tile_server(root) as server:
        source = HttpTileSource(server.url + "/{z}/{x}/{y}.png", max_retries=1, max_unanswered=3, **FAST)
        assert source.get(TILES[0]).data == written[TILES[0]]
    # The server is gone: two tiles fail on their own, the third in a row stops the run.
    for tile in TILES[1:3]:
        with pytest.raises(TileSourceError) as info:
            source.get(tile)
        assert not isinstance(info.value, SourceUnavailableError)
    with pytest.raises(SourceUnavailableError, match=r"nor for the 2 tiles before it; .*--retry-failed") as first:
        source.get(TILES[3])
    # Fetch threads fail on until the scan stops: every later failure tells the same first run.
    for tile in TILES[1:3]:  # asked again: the server is still gone
        with pytest.raises(SourceUnavailableError) as later:
            source.get(tile)
        assert str(later.value) == str(first.value)


def test_a_server_that_dies_mid_scan_stops_it_after_a_run_of_failures(region, tiny_model, tmp_path, monkeypatch):
    from amber_hunter.run.scan import scan
    from amber_hunter.run.store import RunStore
    from amber_hunter.sources import HttpTileSource
    from amber_hunter.sources.http import MAX_UNANSWERED_TILES

    monkeypatch.setattr(HttpTileSource, "_backoff", lambda self, attempt: 0.01)
    record = RunStore.record
    with tile_server(region.folder) as server:

        def record_then_die(self, scene):
            record(self, scene)
            if scene.status == "done" and not server.stopping.is_set():  # a scene is in: pull the plug
                server.stopping.set()
                server.shutdown()
                server.server_close()

        monkeypatch.setattr(RunStore, "record", record_then_die)
        config = region.config(server.url + "/{z}/{x}/{y}.png", tiny_model, scene_tiles=1)  # 28 one-tile scenes
        with pytest.raises(SourceUnavailableError, match=f"nor for the {MAX_UNANSWERED_TILES - 1} tiles before it"):
            scan(config, tmp_path / "run")
    with RunStore(tmp_path / "run") as store:
        status = store.status()
    assert status.done >= 1 and status.pending > 0  # what was done is kept; the rest waits for a resume
    assert status.failed <= MAX_UNANSWERED_TILES
    assert "stopped after" in (tmp_path / "run" / "log.txt").read_text()
