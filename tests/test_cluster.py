"""Scans on a real dask.distributed cluster: a ``dask scheduler`` and ``dask worker`` processes on
127.0.0.1, started as subprocesses and killed in teardown whatever happens.

The cluster's records must equal, field by field and array by array, what the local loop makes of
the same scenes with the same model (the bundled ``fast`` texture model: no TensorFlow, well under
a second a scene). Workers run without a nanny, so killing a worker's pid really loses that
worker, as a machine that goes down would.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytest
from scan_fixtures import EXPECTED
from tile_servers import Fault, tile_server

from amber_hunter.errors import ClusterError, ConfigError, SourceUnavailableError
from amber_hunter.model.classify import resolve_model
from amber_hunter.run.cluster import CONNECT_TIMEOUT, cluster_records, open_cluster, process_scene, worker_setup
from amber_hunter.run.scan import analyse
from amber_hunter.run.scenes import cell_from_id, load_scene
from amber_hunter.run.store import SceneRecord

#: The bundled ``fast`` model with full-size SLIC (set by ``_full_size_fast``): at the bundle's
#: half-size SLIC it finds no pit at all in the test region's 512 px scenes, and the comparison
#: must cover flagged scenes (outlines, overlay pictures) too.
MODEL = "fast"
#: It finds at most two pits there: flag at one.
MIN_POSITIVE = 0


@pytest.fixture(scope="module", autouse=True)
def _full_size_fast(tmp_path_factory):
    global MODEL
    folder = shutil.copytree(resolve_model("fast"), tmp_path_factory.mktemp("fast") / "model")
    meta = json.loads((folder / "model.json").read_text())
    meta["slic"]["scale"] = 1
    (folder / "model.json").write_text(json.dumps(meta))
    MODEL = str(folder)
    yield
    MODEL = "fast"
#: Wall-clock times differ between any two runs of the same scene.
UNCOMPARED = {"timings"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        assert proc.poll() is None, f"the scheduler exited: {log.read_text()}"
        assert time.monotonic() < deadline, f"the scheduler did not listen within {seconds} s: {log.read_text()}"
        time.sleep(0.1)


def _wait_until(condition, message: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def _busy_worker(client) -> str:
    """The address of a worker amid a scene (or with one queued)."""
    deadline = time.monotonic() + 10
    while not (busy := [worker for worker, keys in client.processing().items() if keys]):
        assert time.monotonic() < deadline, "no worker has a scene to do"
        time.sleep(0.02)
    return busy[0]


@dataclass
class DaskCluster:
    address: str
    client: object
    #: The ``dask worker`` processes, each one worker (no nanny), by pid.
    workers: dict[int, subprocess.Popen]


@contextlib.contextmanager
def dask_cluster(root: Path, n_workers: int = 2, allowed_failures: int | None = None):
    """A scheduler and ``n_workers`` single-threaded workers on 127.0.0.1, and a client of them."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "AMBER_HUNTER_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    if allowed_failures is not None:
        env["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = str(allowed_failures)
    logs = [root / f"{name}.log" for name in ["scheduler", *(f"worker{i}" for i in range(n_workers))]]
    # Without a dashboard each process still serves health checks over HTTP: on loopback, any free port.
    http = ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"]
    commands = [[sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), *http]]
    commands += [[sys.executable, "-m", "dask", "worker", address, "--host", "127.0.0.1", "--nworkers", "1",
                  "--nthreads", "1", "--no-nanny", *http]] * n_workers
    procs: list[subprocess.Popen] = []
    try:
        for command, log in zip(commands, logs):
            with log.open("wb") as out:
                procs.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env))
            if len(procs) == 1:
                _wait_for_port(port, procs[0], log)
        with open_cluster(address) as client:
            try:
                client.wait_for_workers(n_workers, timeout=120)
            except TimeoutError:
                pytest.fail("the workers did not join: " + " | ".join(log.read_text() for log in logs))
            yield DaskCluster(address, client, {p.pid: p for p in procs[1:]})
    finally:
        for proc in reversed(procs):
            proc.kill()
            proc.wait(timeout=30)


def assert_same(got: SceneRecord, want: SceneRecord) -> None:
    """Every field equal, arrays by value and dtype."""
    for f in fields(want):
        if f.name in UNCOMPARED:
            continue
        a, b = getattr(got, f.name), getattr(want, f.name)
        if isinstance(b, np.ndarray):
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype, (want.scene_id, f.name)
            np.testing.assert_array_equal(a, b, err_msg=f"{want.scene_id} {f.name}")
        else:
            assert a == b, (want.scene_id, f.name)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with dask_cluster(tmp_path_factory.mktemp("dask")) as running:
        yield running


@pytest.fixture(scope="module")
def local(region) -> dict[str, SceneRecord]:
    """Each scene of the test region as the local loop records it: the reference."""
    from amber_hunter.model.detect import Detector
    from amber_hunter.sources import open_source

    config = _config(region, region.folder)
    detector = Detector.load(MODEL, min_positive=MIN_POSITIVE)
    with open_source(config.tiles) as source:
        return {sid: analyse(load_scene(cell_from_id(sid), source), detector, config.model_hash) for sid in region.ids}


def _config(region, tiles, model=None, **options):
    return region.config(tiles, model or MODEL, min_positive=MIN_POSITIVE, **options)


def _collect(records) -> dict[str, SceneRecord]:
    out: dict[str, SceneRecord] = {}
    for record in records:
        assert record.scene_id not in out, f"scene {record.scene_id} came back twice"
        out[record.scene_id] = record
    return out


# --- results ----------------------------------------------------------------------------------


def test_a_cluster_scan_equals_the_local_one(cluster, region, local):
    from distributed import get_task_stream

    held = []  # the scenes the driver has on the cluster each time it is given a record
    with get_task_stream(client=cluster.client) as stream:
        records = cluster_records(cluster.client, region.ids, _config(region, region.folder), tile_cache=None,
                                  in_flight=3)
        got = _collect(record for record in records if not held.append(len(cluster.client.futures)))
    assert got.keys() == local.keys()
    for scene_id, record in local.items():
        assert_same(got[scene_id], record)
    assert {region.ids[sid]: r.status for sid, r in got.items()} == EXPECTED
    assert any(r.result.flagged for r in got.values() if r.status == "done")
    assert {task["worker"] for task in stream.data} == set(cluster.client.nthreads())  # both workers took scenes
    # At most in_flight scenes submitted, plus the one just yielded: the client forgets a released
    # future on its event loop, a moment later. Then none is left behind.
    assert max(held) <= 3 + 1
    _wait_until(lambda: not cluster.client.futures, "the driver still holds results")


def test_closing_the_records_early_cancels_the_scenes_in_flight(cluster, region):
    records = cluster_records(cluster.client, region.ids, _config(region, region.folder), tile_cache=None,
                              in_flight=3)
    next(records)
    assert cluster.client.futures
    records.close()  # what an interrupted scan does
    _wait_until(lambda: not cluster.client.futures and not any(cluster.client.processing().values()),
                "the cancelled scenes are still on the cluster")


def test_a_cluster_run_equals_a_local_run_and_resumes_on_the_cluster(cluster, region, tmp_path):
    """Through ``scan``: the driver writes the same run directory as a local scan, and a rerun
    sends only the scenes still to do (here the failed ones, with --retry-failed) to the cluster."""
    from distributed import get_task_stream
    from scan_fixtures import results

    from amber_hunter.run.scan import scan

    scan(_config(region, region.folder), tmp_path / "local")
    config = _config(region, region.folder, cluster=cluster.address)
    first = scan(config, tmp_path / "cluster")
    with get_task_stream(client=cluster.client) as stream:
        again = scan(config, tmp_path / "cluster", retry_failed=True)
    n_failed = list(EXPECTED.values()).count("failed")
    assert (first.processed, again.processed, len(stream.data)) == (len(region.ids), n_failed, n_failed)
    assert results(tmp_path / "cluster") == results(tmp_path / "local")


def test_a_task_carries_settings_not_the_model_and_a_worker_loads_it_once(region, local, monkeypatch):
    from amber_hunter.model.detect import Detector
    from amber_hunter.run import cluster as module

    monkeypatch.setattr(module, "_loaded", {})  # as a fresh worker process starts
    loads = []
    real = Detector.load.__func__
    monkeypatch.setattr(Detector, "load", classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k)))
    setup = worker_setup(_config(region, region.folder), tile_cache=None)
    assert len(pickle.dumps(setup)) < 4096  # the fast bundle alone is hundreds of kB
    for scene_id in list(region.ids)[:3]:
        assert_same(process_scene(scene_id, setup), local[scene_id])
    assert len(loads) == 1


# --- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("allowed_failures", [None, 0], ids=["rescheduled", "no-retries"])
def test_a_worker_killed_mid_run_loses_nothing_and_counts_nothing_twice(allowed_failures, region, local, tmp_path):
    """With dask's default, the scenes of a killed worker are redone on the other one; with
    ``allowed-failures`` 0 they come back as failed scenes that say why, and the run completes."""
    # Each tile is answered after 0.15 s, so a scene takes about a second and the kill lands mid-scene.
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(tile_server(region.folder, fault=Fault("slow", failures=None, delay=0.15)))
        running = stack.enter_context(dask_cluster(tmp_path, allowed_failures=allowed_failures))
        config = _config(region, server.url + "/{z}/{x}/{y}.png")
        records = cluster_records(running.client, region.ids, config, tile_cache=tmp_path / "tiles", in_flight=4)
        stack.enter_context(contextlib.closing(records))
        pids = running.client.run(os.getpid)
        got = _collect([next(records)])
        victim = _busy_worker(running.client)
        worker = running.workers[pids[victim]]  # only ever a worker this test started
        worker.kill()
        got |= _collect(records)
        assert worker.wait(timeout=10) == -signal.SIGKILL
    assert list((tmp_path / "tiles" / "18").iterdir())  # the workers filled the tile cache they were given
    assert got.keys() == local.keys()
    failed = {sid for sid, r in got.items() if r.error and "worker scanning it died" in r.error}
    if allowed_failures is None:
        assert not failed
    else:
        assert failed  # the scene in flight on the killed worker, and any queued there
        assert all(got[sid].status == "failed" and "died, 1 time in a row" in got[sid].error for sid in failed)
    for scene_id, record in local.items():
        if scene_id not in failed:
            assert_same(got[scene_id], record)


def test_a_refused_api_key_on_a_worker_stops_the_run(cluster, region, tmp_path):
    with tile_server(region.folder, fault=Fault("status", status=401, failures=None)) as server:
        config = _config(region, server.url + "/{z}/{x}/{y}.png")
        with pytest.raises(SourceUnavailableError, match="401"):
            list(cluster_records(cluster.client, region.ids, config, tile_cache=tmp_path / "tiles", in_flight=2))
        hits = sum(server.hits.values())
    assert hits < 4 * len(region.ids)  # stopped, not carried on through the region


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_a_worker_without_the_runs_model_stops_the_run_naming_itself(damage, cluster, region, tmp_path):
    model = shutil.copytree(resolve_model(MODEL), tmp_path / "model")
    config = _config(region, region.folder, model)
    if damage == "changed":  # another bundle at the same path on a worker machine
        (model / "model.json").write_text((model / "model.json").read_text() + "\n")
        match = "has hash .* copy the run's model bundle"
    else:
        shutil.rmtree(model)
        match = "does not exist"
    with pytest.raises(ClusterError, match=rf"^worker tcp://127\.0\.0\.1:\d+: .*{match}") as caught:
        list(cluster_records(cluster.client, region.ids, config, tile_cache=None, in_flight=2))
    assert "\n" not in str(caught.value)


def test_an_unreachable_scheduler_is_one_clear_line_within_the_timeout():
    assert CONNECT_TIMEOUT <= 10
    address = f"tcp://127.0.0.1:{_free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ClusterError) as caught, open_cluster(address):
        pass
    assert time.monotonic() - started < 15  # a guard only: the contract is CONNECT_TIMEOUT
    message = str(caught.value)
    assert address in message and "dask scheduler" in message and "\n" not in message


@pytest.mark.parametrize("address", ["local:0", "local:65", "local:two", "tcp://127.0.0.1", "127.0.0.1:8786",
                                     "tcp://127.0.0.1:0", "udp://127.0.0.1:8786", "tcp://host name:8786"])
def test_a_malformed_cluster_address_is_refused_at_once(address):
    started = time.monotonic()
    with pytest.raises(ConfigError, match="--cluster") as caught, open_cluster(address):
        pass
    assert time.monotonic() - started < 1 and "\n" not in str(caught.value)


def test_a_local_cluster_scans_and_stops_with_the_block(region, local):
    scene_id = next(sid for sid, name in region.ids.items() if name == "positive1")
    with open_cluster("local:1") as client:
        assert list(client.nthreads().values()) == [1]
        got = _collect(cluster_records(client, [scene_id], _config(region, region.folder), tile_cache=None))
    assert client.status == "closed"
    assert_same(got[scene_id], local[scene_id])
