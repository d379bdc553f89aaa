"""A scan on several cores: worker processes for decoding, SLIC and texture, the CNN batched across
scenes in the main process, one writer. The results must be exactly those of a one-process scan."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scan_fixtures
from scan_fixtures import SIZE, ZOOM, results
from tile_servers import Fault, tile_server

from amber_hunter.errors import ConfigError
from amber_hunter.run.scan import scan
from amber_hunter.run.store import STAGES, RunStore

CLI = "from amber_hunter.cli import main; main()"


def test_two_worker_processes_give_the_results_of_one(folder_run, region, tiny_model, tmp_path):
    run = tmp_path / "run"
    summary = scan(region.config(region.folder, tiny_model, workers=2), run)
    assert summary.processed == len(region.ids)
    assert results(run) == results(folder_run)


def test_every_scene_is_timed_by_stage(folder_run):
    """``status`` says where the time went: every scene that was looked at is timed, and the
    stages that ran for the done scenes took time."""
    with RunStore(folder_run) as store:
        status = store.status()
    assert status.timed_scenes == status.total - status.pending
    t = status.stage_seconds
    assert [name for name in STAGES if getattr(t, name) <= 0] == []


@pytest.fixture(scope="module")
def cnn_model(small_data, tmp_path_factory) -> Path:
    """An efflite0+texture bundle (a real CNN part, the cheapest one) trained on the small data."""
    from amber_hunter.learn.cache import embed_files
    from amber_hunter.learn.dataset import load_dataset
    from amber_hunter.model.classify import Classifier, ModelBundle, ModelMetadata, fit_booster, save_bundle
    from amber_hunter.model.embed import get_embedder

    dataset = load_dataset([small_data])
    embedder = get_embedder("efflite0+texture")
    features, _ = embed_files(dataset.paths, embedder, tmp_path_factory.mktemp("cnn-cache"))
    booster = fit_booster(features, dataset.labels, params={"n_estimators": 30})
    metadata = ModelMetadata(embedder=embedder.name, embedder_version=embedder.version, embedder_params=embedder.params,
                             dim=embedder.dim, threshold=0.5, target_precision=0.95)
    return save_bundle(ModelBundle(metadata, Classifier(booster, [], embedder.dim)), tmp_path_factory.mktemp("cnn") / "model")


def test_cnn_batched_across_scenes_in_the_main_process_matches_one_process(region, cnn_model, tmp_path):
    """The CNN path: scenes prepared in two worker processes, embedded here several at a time,
    give the same verdicts, probabilities and stored embeddings as a scan in one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    scan(region.config(region.folder, cnn_model, workers=1), one)
    scan(region.config(region.folder, cnn_model, workers=2), two)
    assert results(two) == results(one)
    first, second = _vectors(one), _vectors(two)
    assert first.keys() == second.keys() and len(first) > 0
    assert all(np.array_equal(first[k], second[k]) for k in first)


def _vectors(run: Path) -> dict[tuple[str, int], np.ndarray]:
    with RunStore(run) as store:
        return {(i, int(g)): v for batch in store.embedding_batches()
                for i, g, v in zip(batch.scene_ids, batch.labels, batch.vectors)}


def _children(pid: int) -> set[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry.name))
    return out


def _fork_servers(scan: int) -> set[int]:
    """The multiprocessing fork servers the scan started (from /proc; a zombie's cmdline reads
    empty, so only live ones are found)."""
    servers = set()
    for pid in _children(scan):
        with contextlib.suppress(OSError):
            if b"multiprocessing.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
                servers.add(pid)
    return servers


def _workers(scan: int) -> set[int]:
    """The scan's worker processes: the children of its fork server."""
    return {worker for server in _fork_servers(scan) for worker in _children(server)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_forked_worker_runs_in_the_scans_environment_of_now(tiny_model, monkeypatch):
    """Workers fork from a server that lives as long as this process and keeps the environment it
    started with; each worker must still see the scan's of now, as a spawned one would."""
    from concurrent.futures import ProcessPoolExecutor

    from amber_hunter.run import workers

    workers.start_server()  # started here, or by an earlier test, before the change below
    monkeypatch.setenv("AMBER_HUNTER_PROBE", "set after the fork server started")
    initargs = (os.getpid(), dict(os.environ), str(tiny_model), 3, False, {})
    with ProcessPoolExecutor(1, mp_context=workers.context(), initializer=workers._start, initargs=initargs) as pool:
        assert pool.submit(os.getenv, "AMBER_HUNTER_PROBE").result(timeout=60) == "set after the fork server started"


def test_a_scan_killed_with_minus_9_leaves_no_worker_behind(region, tiny_model, tmp_path):
    run = tmp_path / "run"
    with tile_server(region.folder, fault=Fault("slow", failures=None, delay=0.3)) as server:
        args = ["scan", "--aoi", region.aoi, "--tiles", server.url + "/{z}/{x}/{y}.png", "--run", str(run),
                "--zoom", str(ZOOM), "--scene-tiles", str(SIZE), "--model", str(tiny_model), "--workers", "2"]
        proc = subprocess.Popen([sys.executable, "-c", CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        workers: set[int] = set()
        while len(workers) < 2:  # the two workers (and multiprocessing's resource tracker) are up
            assert proc.poll() is None and time.monotonic() < deadline, "the scan never started its workers"
            workers = _workers(proc.pid)
            time.sleep(0.1)
        left = workers | _fork_servers(proc.pid)
        proc.send_signal(signal.SIGKILL)
        # Not reaped yet: the killed scan stays a zombie, as under a parent still reading its pipes,
        # and its workers and fork server must go all the same.
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in left) and time.monotonic() < deadline:
            time.sleep(0.2)
        still = [p for p in left if _alive(p)]
        proc.wait(timeout=30)
    assert len(left) == 3 and still == []


def test_more_workers_than_memory_allows_is_refused_with_the_count_that_fits(region, tiny_model, tmp_path, monkeypatch):
    from amber_hunter.run import workers

    monkeypatch.setattr(workers, "available_mb", lambda: 1200.0)
    with pytest.raises(ConfigError, match=r"^--workers 8 needs about 3\.9 GB, but only 1\.2 GB is available; "
                                          r"use --workers 2 or fewer$"):
        scan(region.config(region.folder, tiny_model, workers=8), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_bad_worker_count_is_one_line_and_exit_2(region, tiny_model, tmp_path, value):
    result = subprocess.run([sys.executable, "-c", CLI, "scan", "--aoi", region.aoi, "--tiles", str(region.folder),
                             "--run", str(tmp_path / "run"), "--model", str(tiny_model), "--workers", value],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"amber-hunter: error: workers={value} must be a whole number from 1 to 64; use e.g. --workers 2"]
    assert not (tmp_path / "run").exists()


def test_a_failing_cnn_batch_fails_only_the_scene_at_fault():
    """finish_batch retries a failed batch scene by scene, so one bad scene does not fail the others."""
    from amber_hunter.run.scan import Outcome, finish_batch

    class Scene:  # what finish_batch and conclude read of a scene
        def __init__(self, name):
            self.scene_id, self.status, self.reason, self.capture_date, self.valid_fraction = name, "ok", None, None, 1.0
            self.bounds = None

    class Prepared:
        def __init__(self, bad):
            self.bad, self.regions = bad, [1, 2]

    class Detector:
        def features(self, prepared):
            if any(p.bad for p in prepared):
                raise ValueError("an odd crop")
            return [np.zeros((2, 3), np.float32) for _ in prepared]

    outcomes = [Outcome(scene=Scene(f"s{i}"), prepared=Prepared(i == 1)) for i in range(3)]
    import amber_hunter.run.scan as scan_module

    concluded = []
    original = scan_module.conclude
    try:
        scan_module.conclude = lambda scene, prepared, features, detector, model, timings: concluded.append(scene.scene_id) or scene.scene_id
        records = finish_batch(outcomes, Detector(), None)
    finally:
        scan_module.conclude = original
    assert records[0] == "s0" and records[2] == "s2"
    assert records[1].status == "failed" and records[1].error == "ValueError: an odd crop"


def test_status_prints_the_seconds_per_scene_of_each_stage(folder_run):
    result = subprocess.run([sys.executable, "-c", CLI, "status", str(folder_run)], capture_output=True, text=True,
                            timeout=60, check=True)
    line = result.stdout.splitlines()[1]
    assert line.startswith(f"seconds per scene ({len(scan_fixtures.LAYOUT)} timed scenes): fetch ")
    assert [part.split()[0] for part in line.split(": ", 1)[1].split("  ")] == list(STAGES)


def test_scan_accepts_a_random_weight_model_only_with_allow_random(region, tiny_model, tmp_path):
    """Benchmarks scan with random-weight ResNet50 bundles (equal FLOPs to the study's loop);
    anyone else gets the detect command's refusal, and no run directory."""
    import dataclasses

    from amber_hunter.model.classify import load_bundle, save_bundle

    bundle = load_bundle(tiny_model)
    random = save_bundle(dataclasses.replace(bundle, metadata=dataclasses.replace(bundle.metadata, random_weights=True)),
                         tmp_path / "random")
    args = ["scan", "--aoi", region.aoi, "--tiles", str(region.folder), "--zoom", str(ZOOM), "--scene-tiles", str(SIZE),
            "--model", str(random), "--workers", "1"]
    refused = subprocess.run([sys.executable, "-c", CLI, *args, "--run", str(tmp_path / "no")], capture_output=True,
                             text=True, timeout=120, check=False)
    assert refused.returncode == 2 and "pass --allow-random for tests" in refused.stderr
    assert not (tmp_path / "no").exists()
    allowed = subprocess.run([sys.executable, "-c", CLI, *args, "--run", str(tmp_path / "yes"), "--allow-random"],
                             capture_output=True, text=True, timeout=120, check=False)
    assert allowed.returncode == 1, allowed.stderr  # the region's two bad-tile scenes fail, as they should
    assert f"{len(scan_fixtures.LAYOUT)} scenes this run" in allowed.stdout


def test_the_default_worker_count_fits_the_cores_and_the_memory(monkeypatch):
    """A plain scan must run on a 128-core node and on a laptop short of memory: the default is
    capped where a count the user gives would be refused."""
    from amber_hunter.run import workers

    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(128)))
    monkeypatch.setattr(workers, "available_mb", lambda: 1e9)
    assert workers.default_workers() == 64
    monkeypatch.setattr(workers, "available_mb", lambda: 1200.0)
    assert workers.default_workers() == 2
    monkeypatch.setattr(workers, "available_mb", lambda: 100.0)
    assert workers.default_workers() == 1


def test_ctrl_c_to_the_process_group_stops_a_multi_worker_scan_cleanly(folder_run, region, tiny_model, tmp_path):
    """A terminal's Ctrl-C reaches the scan and its workers alike: the workers ignore it, the scan
    stores what it holds and stops (exit 130, resumable), and no worker is left behind."""
    run = tmp_path / "run"
    with tile_server(region.folder, fault=Fault("slow", failures=None, delay=0.3)) as server:
        args = ["scan", "--aoi", region.aoi, "--tiles", server.url + "/{z}/{x}/{y}.png", "--run", str(run),
                "--zoom", str(ZOOM), "--scene-tiles", str(SIZE), "--model", str(tiny_model), "--workers", "2"]
        proc = subprocess.Popen([sys.executable, "-c", CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        deadline = time.monotonic() + 120
        workers: set[int] = set()
        while len(workers) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the scan never started its workers"
            workers = _workers(proc.pid)
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # at once: a worker may still be starting
        _, err = proc.communicate(timeout=120)
        rerun = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, timeout=180, check=False)
    assert proc.returncode == 130, err.decode()
    assert "worker process died" not in err.decode()
    assert [p for p in workers if _alive(p)] == []
    assert rerun.returncode == 1, rerun.stderr.decode()  # resumed to the end; the two bad-tile scenes fail
    assert results(run) == results(folder_run)
