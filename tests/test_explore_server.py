"""The explore data and server without a browser: projections and their cache, out-of-fold
confusion cells from the grouped protocol, explanations, the JSON and picture endpoints,
path-traversal attempts, a busy port, labelling through the API, and the CLI."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from amber_hunter.errors import ConfigError, ModelBundleError, RunStoreError
from amber_hunter.explore.data import load_dataset_points, load_run_points, plain_words
from amber_hunter.explore.projection import ArrayCache, cached_projection, classifier_view, project
from amber_hunter.explore.server import NO_CNN, ExploreApp, make_server, start_in_thread
from amber_hunter.learn.labels import LabelStore
from amber_hunter.learn.suggest import DEFAULT_STRATEGY


@pytest.fixture(scope="module")
def explore_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("explore-cache")


@pytest.fixture(scope="module")
def points(small_data, explore_cache):
    return load_dataset_points([small_data], "fast", method="pca", cache_dir=explore_cache)


@pytest.fixture
def app_url(points, tmp_path):
    store = LabelStore(tmp_path / "labels.sqlite")
    server, url = start_in_thread(ExploreApp(points, store))
    yield url, store
    server.shutdown()
    server.server_close()
    store.close()


def get(url: str, path: str) -> tuple[int, bytes]:
    """A raw GET: the path is sent exactly as given (no client-side normalisation of ``..``)."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def post(url: str, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    host, port = url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data.startswith(b"{") else {"raw": data.decode()}
    finally:
        conn.close()


# --- projection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["umap", "pca", "tsne"])
def test_projections_are_finite_and_deterministic(method):
    rng = np.random.default_rng(1)
    data = np.concatenate([rng.normal(0, 1, (40, 10)), rng.normal(6, 1, (40, 10))]).astype(np.float32)
    a, b = project(data, method, seed=0), project(data, method, seed=0)
    assert a.shape == (80, 2) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-4)
    # The two blobs stay apart: every point is nearer its own blob's centre.
    centres = [a[:40].mean(axis=0), a[40:].mean(axis=0)]
    own = np.linalg.norm(a[:40] - centres[0], axis=1) < np.linalg.norm(a[:40] - centres[1], axis=1)
    assert own.mean() > 0.9


def test_umap_does_not_import_tensorflow():
    code = ("import sys, numpy as np; from amber_hunter.explore.projection import project;"
            "project(np.random.default_rng(0).normal(size=(30, 5)).astype('float32'), 'umap');"
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_projection_cache_is_keyed_by_embedder_model_and_data(tmp_path):
    view = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    cache = ArrayCache(tmp_path)
    xy, hit = cached_projection(view, "pca", cache, embedder="texture:1", model="m1", data="d1")
    assert not hit
    again, hit = cached_projection(view, "pca", cache, embedder="texture:1", model="m1", data="d1")
    assert hit and np.array_equal(xy, again)
    for change in ({"model": "m2"}, {"data": "d2"}, {"embedder": "vgg16:1"}):
        _, hit = cached_projection(view, "pca", cache, **{"embedder": "texture:1", "model": "m1", "data": "d1", **change})
        assert not hit, change
    with pytest.raises(ConfigError, match="unknown projection"):
        project(view, "mds")


def test_classifier_view_is_standardised(points):
    view, what = classifier_view(points.features, points.bundle)
    assert np.allclose(view.mean(axis=0), 0, atol=1e-4)
    assert "texture" in what and "standardised" in what


# --- dataset points -----------------------------------------------------------------------------


def test_dataset_points_carry_out_of_fold_cells_from_the_grouped_protocol(points, small_data, explore_cache):
    from amber_hunter.learn.workflows import evaluate_protocol

    report = evaluate_protocol([small_data], "texture", "grouped", target_precision=points.bundle.metadata.target_precision,
                               cache_dir=explore_cache)
    (tn, fp), (fn, tp) = report.metrics.confusion
    counts = {c: points.cell.count(c) for c in ("TP", "FP", "FN", "TN")}
    assert counts == {"TP": tp, "FP": fp, "FN": fn, "TN": tn}
    by_file = {p.file: p.probability for p in report.predictions}
    probs = [by_file[rel] for _, rel in points.files]
    np.testing.assert_allclose(points.probability, probs, rtol=1e-5)
    for cell, truth, pred in zip(points.cell, points.truth, points.predicted):
        assert cell == ("T" if truth == pred else "F") + ("P" if pred else "N")
    # The second load reads the cached out-of-fold predictions and projection.
    again = load_dataset_points([small_data], "fast", method="pca", cache_dir=explore_cache)
    assert again.timings["oof_s"] < 1.0 and np.array_equal(again.xy, points.xy)


def test_neighbours_and_explanations(points):
    near = points.neighbours(0, 5)
    d = ((points.view - points.view[0]) ** 2).sum(axis=1)
    assert 0 not in near and len(near) == 5
    assert sorted(d[near]) == list(d[near]) and d[near].max() <= np.sort(d)[6]
    reasons = points.explain(0, 4)
    assert len(reasons) == 4
    assert all(r["words"] and r["direction"] in ("towards mining", "away from mining") for r in reasons)
    contributions = [abs(r["contribution"]) for r in reasons]
    assert contributions == sorted(contributions, reverse=True)
    assert plain_words("round_pit_count_s2.4") == "number of round dark pits about 3 m across"
    assert plain_words("sand_frac") == "area of bright bare sand"


# --- endpoints ----------------------------------------------------------------------------------


def test_page_plot_point_and_pictures(app_url, points):
    url, _ = app_url
    status, page = get(url, "/")
    assert status == 200 and b"/static/bokeh/bokeh.min.js" in page
    assert get(url, "/static/bokeh/bokeh.min.js")[0] == 200
    status, body = get(url, "/api/plot")
    item = json.loads(body)
    assert status == 200 and item["target_id"] == "plot"
    status, body = get(url, "/api/point/3")
    info = json.loads(body)
    assert status == 200 and len(info["neighbours"]) == 8 and info["reasons"]
    assert "out-of-fold probability" in info["probability_text"]
    for path in ("/thumb/3.png", "/context/3.png"):
        status, png = get(url, path)
        assert status == 200 and png.startswith(b"\x89PNG")
    status, body = get(url, "/api/neighbours/3?k=20")
    assert json.loads(body)["neighbours"] == points.neighbours(3, 20)
    for bad in ("/thumb/99999.png", "/api/point/99999", "/nothing", "/static/bokeh/other.js"):
        assert get(url, bad)[0] == 404, bad


def test_gradcam_endpoint_for_a_cnn_model_and_a_texture_one(app_url, points, positive_crop):
    """The side panel's heatmap: a CNN model's Grad-CAM over the crop, with its note; a texture
    model has no CNN, and the endpoint says so instead."""
    import dataclasses

    from amber_hunter.images import decode_rgb, read_rgb
    from amber_hunter.model.classify import bundled_model_path, load_bundle

    url, _ = app_url
    status, body = get(url, "/gradcam/3.png")
    assert status == 404 and b"no CNN" in body
    assert json.loads(get(url, "/api/gradcam/3")[1]) == {"available": False, "note": NO_CNN}
    cnn_points = dataclasses.replace(points, files=[(0, positive_crop.name)], roots=[positive_crop.parent],
                                     bundle=load_bundle(bundled_model_path("default")))
    server, cnn_url = start_in_thread(ExploreApp(cnn_points))
    try:
        status, body = get(cnn_url, "/api/gradcam/0")  # builds the CNNs, then the heatmap (seconds)
        info = json.loads(body)
        status_png, png = get(cnn_url, "/gradcam/0.png")
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200 and info["available"] is True and "block" in info["note"]
    assert status_png == 200 and png.startswith(b"\x89PNG")
    picture, crop = decode_rgb(png), read_rgb(positive_crop)
    assert picture.shape[2] == 3 and max(picture.shape[:2]) <= 320
    assert abs(picture.shape[0] / picture.shape[1] - crop.shape[0] / crop.shape[1]) < 0.05
    assert not np.array_equal(picture, decode_rgb(cnn_points.thumbnail(0, max(picture.shape[:2])))), "no heat drawn"


def test_file_endpoint_refuses_every_way_out(app_url, points, tmp_path):
    url, _ = app_url
    root, rel = points.files[0]
    good = f"/file/{root}/{rel}"
    status, body = get(url, good)
    assert status == 200 and body == points.file(0).read_bytes()
    outside = tmp_path / "secret.png"
    outside.write_bytes(points.file(0).read_bytes())
    link = points.roots[root] / "negative" / "link-out.png"
    link.symlink_to(outside)
    try:
        attempts = [
            f"/file/{root}/../../../../../../etc/passwd",
            f"/file/{root}/positive/../../secret.png",
            f"/file/{root}/{outside}",  # absolute: /file/0//tmp/...
            f"/file/{root}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
            f"/file/{root}/%2E%2E%2F%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
            f"/file/{root}/%252e%252e/%252e%252e/etc/passwd",
            f"/file/{root}/negative/link-out.png",  # a symlink out of the folder
            f"/file/{root}/negative/%00.png",
            f"/file/{root}/../" + rel,
            f"/file/99/{rel}",
            f"/file/-1/{rel}",
            f"/file/{root}/",
        ]
        for path in attempts:
            assert get(url, path)[0] == 404, path
    finally:
        link.unlink()


def test_labelling_through_the_api_writes_the_store(app_url, points):
    url, store = app_url
    status, body = post(url, "/api/label", {"indices": [2, 5], "label": "not mining", "note": "a quarry"})
    assert status == 200 and [r["i"] for r in body["labelled"]] == [2, 5]
    rows = store.latest()
    assert {rows[points.keys[i].key].label for i in (2, 5)} == {0}
    assert rows[points.keys[2].key].note == "a quarry" and rows[points.keys[2].key].source == "explore"
    plot = json.loads(get(url, "/api/plot")[1])
    assert "not mining" in json.dumps(plot)
    assert post(url, "/api/label", {"indices": [2], "label": "maybe"})[0] == 400
    assert post(url, "/api/label", {"indices": [10**6], "label": "mining"})[0] == 400
    assert post(url, "/api/label", {"indices": [2], "label": "mining"}, {"Origin": "http://evil.example"})[0] == 403
    assert len(store.history()) == 2


def _raw(url: str, method: str, path: str, headers: dict, body: bytes = b"") -> tuple[int, bytes]:
    host, port = url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders(body or None)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_foreign_host_header_and_malformed_bodies_are_refused(app_url):
    """DNS rebinding: a page of another site whose name resolves to 127.0.0.1 sends its own
    name as Host, and must read nothing; label bodies of the wrong shape are a 400, not a 500."""
    url, store = app_url
    port = url.rstrip("/").rsplit(":", 1)[1]
    assert _raw(url, "GET", "/api/point/1", {"Host": f"attacker.example:{port}"})[0] == 403
    assert _raw(url, "GET", "/api/point/1", {"Host": f"localhost:{port}"})[0] == 200
    own = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json"}
    for body in (b"[1, 2]", b'{"indices": [true], "label": "mining"}', b'{"indices": [1], "label": ["mining"]}',
                 b'{"indices": [1], "label": "mining", "note": 5}'):
        status, _ = _raw(url, "POST", "/api/label", {**own, "Content-Length": str(len(body))}, body)
        assert status == 400, body
    assert _raw(url, "POST", "/api/label", {**own, "Host": f"attacker.example:{port}", "Content-Length": "2"}, b"{}")[0] == 403
    assert store.history() == []


def test_suggest_picks_unlabelled_points_only(app_url, points):
    url, _ = app_url
    status, body = get(url, "/api/suggest?n=5")
    first = json.loads(body)["suggested"]
    assert status == 200 and len(first) == 5 == len(set(first))
    assert json.loads(get(url, "/api/suggest?n=5")[1])["suggested"] == first  # seeded
    # suggest's default strategy, the measured one
    assert json.loads(get(url, f"/api/suggest?n=5&strategy={DEFAULT_STRATEGY}")[1])["suggested"] == first
    assert json.loads(get(url, "/api/suggest?n=5&strategy=margin")[1])["suggested"] != first
    post(url, "/api/label", {"indices": first[:2], "label": "mining"})
    again = json.loads(get(url, f"/api/suggest?n={len(points)}")[1])["suggested"]
    assert len(again) == len(points) - 2 and not set(first[:2]) & set(again)
    assert get(url, "/api/suggest?n=0")[0] == 400 and get(url, "/api/suggest?n=5&strategy=best")[0] == 400


def test_a_busy_port_moves_to_the_next_free_one(points):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        server, note = make_server(ExploreApp(points), "127.0.0.1", port)
        try:
            assert server.server_address[1] != port
            assert note == f"port {port} is in use; using {server.server_address[1]} instead"
        finally:
            server.server_close()
    finally:
        blocker.close()


# --- runs ---------------------------------------------------------------------------------------


def test_run_points_and_bad_runs(folder_run, tmp_path, texture_model):
    points = load_run_points(folder_run, method="pca")
    assert points.kind == "run" and len(points) > 20
    assert np.isfinite(points.probability).all() and points.flagged.any()
    flagged = int(np.flatnonzero(points.flagged & (points.probability >= points.threshold))[0])
    png = points.context(flagged)
    from amber_hunter.images import decode_rgb

    context = decode_rgb(png)
    assert (np.abs(context.astype(int) - (255, 255, 0)).sum(axis=2) < 60).sum() > 20, "no outline in the context"
    with pytest.raises(RunStoreError, match="not a run directory"):
        load_run_points(tmp_path)
    with pytest.raises(ModelBundleError, match="vgg16"):
        from amber_hunter.model.classify import bundled_model_path

        load_run_points(folder_run, bundled_model_path("default"), method="pca")


def test_a_pruned_tile_cache_is_said_and_nothing_is_refetched(region, tiny_model, tmp_path):
    """A run over HTTP shows its pictures from its tile cache; once the cache is pruned, the
    panel says so (404 with the reason), and the tile server sees no new request."""
    import shutil

    from tile_servers import tile_server

    from amber_hunter.run.scan import scan

    cache = tmp_path / "tile-cache"
    with tile_server(region.folder) as server:
        scan(region.config(server.url + "/{z}/{x}/{y}.png", tiny_model, tile_cache=str(cache)), tmp_path / "run")
        fetched = len(server.requests)
        points = load_run_points(tmp_path / "run", method="pca")
        server_app, url = start_in_thread(ExploreApp(points))
        try:
            assert get(url, "/context/0.png")[0] == 200  # from the cache
            shutil.rmtree(cache)
            last = len(points) - 1  # another scene: the first one is kept in memory
            assert points.scene[last] != points.scene[0]
            status, body = get(url, f"/context/{last}.png")
            assert status == 404 and b"no longer holds this scene's tiles" in body, body
            assert b"not fetched again" in body
        finally:
            server_app.shutdown()
            server_app.server_close()
        assert len(server.requests) == fetched, "exploring fetched tiles"


def test_run_superpixel_labels_export_as_crops_named_the_study_way(folder_run, tmp_path):
    from amber_hunter.cli.explore import labels
    from amber_hunter.images import decode_rgb
    from amber_hunter.learn.dataset import parse_name, read_labels_csv
    from amber_hunter.learn.labels import SuperpixelKey
    from amber_hunter.run.store import RunStore

    points = load_run_points(folder_run, method="pca")
    picks = [0, len(points) - 1]
    with LabelStore(tmp_path / "labels.sqlite") as store:
        for i, label in zip(picks, (1, 0)):
            store.add(points.keys[i], label, note=f"point {i}")
        store.add(SuperpixelKey.of(tmp_path / "gone", "18/1/2/4", 3), 1)
    out = tmp_path / "export" / "labels.csv"
    result = CliRunner().invoke(labels, ["export", str(tmp_path / "labels.sqlite"), "--out", str(out),
                                         "--crops", str(tmp_path / "export" / "crops")])
    assert result.exit_code == 0, result.output
    assert "cut 2 run superpixels" in result.stdout and "wrote" in result.stdout
    assert "gone is gone" in result.stderr and "1 labels on run superpixels left out" in result.stdout
    rows = read_labels_csv(out)
    assert [r[1] for r in rows] == [1, 0]
    with RunStore(folder_run) as run_store:
        scenes = {s.scene_id: s for s in run_store.scenes()}
    for (path, _, *rest), i in zip(rows, picks):
        name = parse_name(path)
        bounds = scenes[points.scene[i]].bounds
        assert name is not None and name.segment == points.segments[i]
        assert abs(name.lat - (bounds.north + bounds.south) / 2) < 1e-6
        assert abs(name.lon - (bounds.east + bounds.west) / 2) < 1e-6
        assert np.array_equal(decode_rgb(Path(path).read_bytes()), points.crop(i)[0])


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_static_page(small_data, explore_cache, tmp_path):
    from amber_hunter.cli.explore import explore

    out = tmp_path / "explore.html"
    result = CliRunner().invoke(explore, [str(small_data), "--model", "fast", "--projection", "pca", "--static", str(out),
                                          "--labels", str(tmp_path / "l.sqlite"), "--cache-dir", str(explore_cache)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "data:image/jpeg;base64," in page and "/static/bokeh" not in page and "http://" not in page.split("<style>")[1]


def test_cli_one_line_errors(tmp_path):
    from amber_hunter.cli.explore import explore

    result = CliRunner().invoke(explore, [str(tmp_path / "missing"), "--static", str(tmp_path / "x.html")])
    assert result.exit_code == 2 and "amber-hunter: error:" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_cli_serves_and_stops_on_ctrl_c(small_data, explore_cache, tmp_path, inherited):
    """Ctrl-C stops the server even when it was started with SIGINT ignored (a background job
    of a non-interactive shell, or a parent that ignores it): then Python installs no handler."""
    # Ignoring SIGINT before the CLI starts is what an inherited SIG_IGN amounts to.
    prelude = "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); " if inherited == "ignored" else ""
    env = {**os.environ, "AMBER_HUNTER_LABELS": str(tmp_path / "labels.sqlite")}
    # stderr goes to a file, not a pipe nobody reads while the server runs: a full pipe would
    # block the process and look like a server that ignores Ctrl-C.
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", prelude + "from amber_hunter.cli.explore import explore; explore()", str(small_data), "--model",
             "fast", "--projection", "pca", "--port", "0", "--no-browser", "--cache-dir", str(explore_cache)],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    try:
        line = ""
        deadline = time.monotonic() + 240
        while "http://" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, errors.read_text()
        url = "http://" + line.split("http://")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        assert get(url, "/")[0] == 200
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit 30 s after Ctrl-C; stderr so far: {errors.read_text()[-2000:]}") from None
        err = errors.read_text()
        assert proc.returncode == 0 and "stopped" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_clusters_kmeans_and_hdbscan():
    from amber_hunter.cli.explore import explore
    from amber_hunter.explore.data import CLUSTER_METHODS, clusters

    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(0, 0.1, (100, 5)), rng.normal(5, 0.1, (100, 5)), rng.uniform(-60, 60, (5, 5))])
    kmeans = clusters(blobs, "kmeans")
    assert len(set(kmeans[:100])) == 1 and len(set(kmeans[100:200])) == 1 and kmeans[0] != kmeans[100]
    dense = clusters(blobs, "hdbscan")
    assert len(set(dense[:100])) == 1 and len(set(dense[100:200])) == 1 and dense[0] != dense[100]
    assert dense[0] >= 0 and (dense[200:] == -1).sum() >= 3  # scattered points stay unclustered
    with pytest.raises(ConfigError, match="unknown cluster method 'dbscan'"):
        clusters(blobs, "dbscan")
    option = next(p for p in explore.params if p.name == "cluster_method")
    assert tuple(option.type.choices) == CLUSTER_METHODS


def test_notebook_scatter_is_the_same_projection_coloured_by_confusion(points):
    from bokeh.embed import json_item

    from amber_hunter.explore.data import CELL_COLOURS
    from amber_hunter.explore.notebook import scatter

    fig = scatter(points=points)
    source = fig.select_one({"name": "points"})
    assert list(source.data["x"]) == list(points.xy[:, 0].astype(float))
    assert list(source.data["color"]) == [CELL_COLOURS[c] for c in points.cell]
    assert all(t.startswith("data:image/jpeg;base64,") for t in source.data["thumb"])
    assert json_item(fig)  # serialisable for output_notebook
