"""``amber-hunter explore`` in real headless Chromium (Debian's chromium + chromium-driver, through
Selenium): on the shared dataset, on a run, and the ``--static`` page without a server.

The app is started on 127.0.0.1 on a free port, in this process, and stopped by the fixture.
Chromium's console and its network requests are read from its logs: no error may be logged and
no request may leave 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from amber_hunter.explore.data import load_dataset_points, load_run_points
from amber_hunter.explore.server import ExploreApp, start_in_thread, write_static
from amber_hunter.learn.labels import LabelStore

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1300,950")
TIMEOUT_S = 60.0

pytestmark = [
    pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                       reason="Debian packages chromium and chromium-driver are needed"),
    pytest.mark.slow,
]
selenium = pytest.importorskip("selenium")

#: Finds elements through Bokeh's shadow roots (its tooltips and toolbar live in them).
DEEP_QUERY_JS = """
window.deepQueryAll = function (selector, root) {
  const out = [];
  (function walk(node) {
    if (!node) return;
    if (node.querySelectorAll) out.push(...node.querySelectorAll(selector));
    const all = node.querySelectorAll ? node.querySelectorAll('*') : [];
    for (const el of all) if (el.shadowRoot) walk(el.shadowRoot);
  })(root || document);
  return out;
};
window.pointOnScreen = function (i) {
  const pv = Object.values(Bokeh.index)[0];
  const rv = [...pv.renderer_views.values()].find(r => r.model.name === 'dots');
  const k = Array.from(amber.doc.get_model_by_name('filter').indices).indexOf(i);
  const box = pv.el.getBoundingClientRect();
  return [box.left + rv.glyph.sx[k], box.top + rv.glyph.sy[k]];
};
window.renderedPoints = function () {
  const pv = Object.values(Bokeh.index)[0];
  const rv = [...pv.renderer_views.values()].find(r => r.model.name === 'dots');
  return {n: rv.glyph.sx.length, finite: Array.from(rv.glyph.sx).filter(Number.isFinite).length,
          webgl: rv.glyph.glglyph != null};
};
"""
#: The point whose nearest on-screen neighbour is farthest away (hover and click hit only it),
#: among points inside the plot frame.
ISOLATED_JS = """
const pv = Object.values(Bokeh.index)[0];
const rv = [...pv.renderer_views.values()].find(r => r.model.name === 'dots');
const sx = rv.glyph.sx, sy = rv.glyph.sy, f = pv.frame.bbox;
let best = -1, bestD = -1;
for (let i = 0; i < sx.length; i++) {
  if (sx[i] < f.left + 15 || sx[i] > f.right - 15 || sy[i] < f.top + 15 || sy[i] > f.bottom - 15) continue;
  let d = Infinity;
  for (let j = 0; j < sx.length; j++) if (j !== i) d = Math.min(d, Math.hypot(sx[i] - sx[j], sy[i] - sy[j]));
  if (d > bestD) { bestD = d; best = i; }
}
return [best, bestD];
"""


class Browser:
    """A Selenium-driven headless Chromium with its console and network logs."""

    def __init__(self, download_dir: Path):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager is never run: both paths are given
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={download_dir}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        self.driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        self.driver.set_page_load_timeout(TIMEOUT_S)
        self.driver.set_script_timeout(TIMEOUT_S)
        self.console: list[dict] = []
        self.requests: list[str] = []

    def open(self, url: str) -> None:
        self.driver.get(url)
        self.wait("return !!(window.amber && window.amber.ready)", "the page never got ready")
        self.driver.execute_script(DEEP_QUERY_JS)

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, script: str, message: str, timeout: float = TIMEOUT_S, *args):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(script, *args)
            if value:
                return value
            time.sleep(0.1)
        self.collect()
        raise AssertionError(f"{message}; console: {self.console[-5:]}")

    def pointer(self, x: float, y: float, *, click: bool = False, drag_to: tuple | None = None) -> None:
        from selenium.webdriver.common.actions.action_builder import ActionBuilder

        actions = ActionBuilder(self.driver, duration=50)
        actions.pointer_action.move_to_location(int(x), int(y))
        if click:
            actions.pointer_action.click()
        if drag_to:
            actions.pointer_action.pointer_down()
            for t in (0.25, 0.5, 0.75, 1.0):
                actions.pointer_action.move_to_location(int(x + t * (drag_to[0] - x)), int(y + t * (drag_to[1] - y)))
            actions.pointer_action.pointer_up()
        actions.perform()

    def collect(self) -> None:
        self.console += self.driver.get_log("browser")
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"]["url"])

    def errors(self) -> list[dict]:
        self.collect()
        return [e for e in self.console if e["level"] == "SEVERE"]

    def screenshot(self, path: Path) -> None:
        self.driver.save_screenshot(str(path))

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "profile")
    try:
        yield b
    finally:
        b.quit()


@pytest.fixture(scope="module")
def shared_points(data_root, tmp_path_factory):
    """All of the shared dataset with the bundled texture model, UMAP (the default)."""
    return load_dataset_points([data_root], "fast", cache_dir=tmp_path_factory.mktemp("explore-cache"))


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(points, store):
        server, url = start_in_thread(ExploreApp(points, store))
        servers.append(server)
        return url

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _hover_shows_thumbnail(browser: Browser, i: int) -> str:
    x, y = browser.js("return pointOnScreen(arguments[0])", i)
    browser.pointer(x, y)
    return browser.wait("""const imgs = deepQueryAll('img.amber-thumb').filter(im => im.complete && im.naturalWidth > 0
                                          && im.getBoundingClientRect().width > 0);
                           return imgs.length ? imgs[0].getAttribute('src') : null;""",
                        "hovering a point showed no thumbnail")


def _only_local(requests: list[str], url: str) -> list[str]:
    """Requests that went anywhere but the app: every http(s)/ws(s) request must go to ``url``;
    chrome:, data: and blob: URLs never leave the browser."""
    return [r for r in requests if r.split(":", 1)[0] in ("http", "https", "ws", "wss", "ftp") and not r.startswith(url)]


def test_dataset_view_hover_click_label_box_select_reload(shared_points, data_root, browser, serve, tmp_path):
    store = LabelStore(tmp_path / "labels.sqlite")
    url = serve(shared_points, store)
    n = len(shared_points)
    assert n == len(list((data_root / "positive").glob("*.png"))) + len(list((data_root / "negative").glob("*.png")))
    browser.open(url)

    # every point is in the data source, and every one is drawn, through WebGL
    assert browser.js("return amber.source.data.x.length") == n
    rendered = browser.js("return renderedPoints()")
    assert rendered == {"n": n, "finite": n, "webgl": True}
    legend = browser.js("return document.getElementById('legend').textContent")
    for cell in ("TP", "FP", "FN", "TN"):
        assert f"{cell}: {shared_points.cell.count(cell)}" in legend

    # hover: the thumbnail of the point under the pointer
    i, gap = browser.js(ISOLATED_JS)
    assert gap > 8, "no isolated point to hover"
    assert _hover_shows_thumbnail(browser, i) == f"/thumb/{i}.png"

    # click: the side panel with this point's neighbours as thumbnails
    x, y = browser.js("return pointOnScreen(arguments[0])", i)
    browser.pointer(x, y, click=True)
    browser.wait("return amber.panelReady === arguments[0]", "clicking a point opened no panel", TIMEOUT_S, i)
    neighbours = browser.wait("""const ims = [...document.querySelectorAll('#p-neighbours img')];
        return ims.length === 8 && ims.every(im => im.complete && im.naturalWidth > 0) ? ims.map(im => +im.dataset.i) : null""",
                              "the panel shows no neighbour thumbnails")
    assert neighbours == shared_points.neighbours(i, 8)
    assert browser.wait("const im = document.getElementById('p-context'); return im.complete && im.naturalWidth > 0",
                        "no context picture")
    assert "out-of-fold probability" in browser.js("return document.getElementById('p-prob').textContent")
    assert browser.js("return document.querySelectorAll('#p-reasons li').length") == 5
    browser.wait("return amber.gradcamReady === arguments[0]", "the Grad-CAM box never answered", TIMEOUT_S, i)
    assert "no CNN" in browser.js("return document.getElementById('p-gradcam-msg').textContent")  # a texture model

    # "not mining", with a note: one row in the store, for this crop
    note = "a sand quarry <img src=x onerror=window.pwned=1>"  # notes are shown as text, never run
    browser.js("document.getElementById('note').value = arguments[0]; document.getElementById('b-not').click()", note)
    browser.wait("return document.getElementById('status').textContent.startsWith('labelled 1')", "no label written")
    rows = store.history()
    key = shared_points.keys[i]
    assert [(r.key, r.label, r.previous, r.source, r.note, r.path) for r in rows] == [
        (key.key, 0, None, "explore", note, f"{shared_points.files[i][1]}")]
    browser.js("amber.openPanel(arguments[0])", i)
    history = browser.wait("const li = document.querySelectorAll('#p-history li'); return li.length ? "
                           "[li[0].textContent, li[0].children.length] : null", "no history in the panel")
    assert history[0].endswith(note) and history[1] == 0 and browser.js("return window.pwned") is None

    # box selection: several points labelled at once
    tool = browser.js("""const r = deepQueryAll('.bk-tool-icon-box-select')[0].getBoundingClientRect();
                         return [r.left + r.width / 2, r.top + r.height / 2];""")
    browser.pointer(*tool, click=True)  # the toolbar's box-select button, as a user clicks it
    x0, y0, box = browser.js("""const pv = Object.values(Bokeh.index)[0], f = pv.frame.bbox;
        const b = pv.el.getBoundingClientRect(), n = amber.source.data.x.length;
        const xy = [...Array(n).keys()].map(k => pointOnScreen(k));
        for (let c = 0; c < n; c++) {  // a 80 px box well inside the plot that holds 3 to 30 points
          const [x, y] = xy[c];
          if (x - 45 < b.left + f.left || x + 45 > b.left + f.right || y - 45 < b.top + f.top || y + 45 > b.top + f.bottom) continue;
          const inside = xy.map(([px, py], k) => Math.abs(px - x) < 40 && Math.abs(py - y) < 40 ? k : -1).filter(k => k >= 0);
          if (inside.length >= 3 && inside.length <= 30) return [x, y, inside];
        }
        return [0, 0, []];""")
    assert len(box) >= 2
    browser.pointer(x0 - 40, y0 - 40, drag_to=(x0 + 40, y0 + 40))
    selected = browser.wait("const s = amber.source.selected.indices; return s.length > 1 ? Array.from(s) : null",
                            "the box selection selected nothing")
    assert sorted(selected) == sorted(box)
    browser.js("document.getElementById('sel-mining').click()")
    browser.wait(f"return document.getElementById('status').textContent.startsWith('labelled {len(box)}')",
                 "the selection was not labelled")
    latest = store.latest()
    assert all(latest[shared_points.keys[k].key].label == 1 for k in box)

    # reload: the labels come back from the store
    browser.open(url)
    labels = browser.js("return [amber.source.data.label, amber.source.data.origin]")
    for k in box:
        assert (labels[0][k], labels[1][k]) == ("mining", "label store")
    if i not in box:
        assert (labels[0][i], labels[1][i]) == ("not mining", "label store")
    browser.js("const s = document.getElementById('colour'); s.value = 'label'; s.dispatchEvent(new Event('change'))")
    assert "mining:" in browser.js("return document.getElementById('legend').textContent")

    assert browser.errors() == []
    assert any(r.startswith(url + "thumb/") for r in browser.requests), "the request log is empty; it proves nothing"
    assert _only_local(browser.requests, url) == []
    store.close()


def test_run_view_colours_by_probability_and_outlines_a_flagged_superpixel(folder_run, browser, serve, tmp_path):
    points = load_run_points(folder_run)
    store = LabelStore(tmp_path / "labels.sqlite")
    url = serve(points, store)
    browser.open(url)
    assert browser.js("return document.getElementById('colour').value") == "prob"
    data = browser.js("return [amber.source.data.color, amber.source.data.c_prob, amber.source.data.prob]")
    assert data[0] == data[1] and len(set(data[0])) > 3
    assert browser.js("return renderedPoints().n") == len(points)
    flagged = [int(j) for j in np.flatnonzero(points.flagged & (points.probability >= points.threshold))]
    assert flagged
    j = flagged[0]
    browser.js("amber.openPanel(arguments[0])", j)
    browser.wait("const im = document.getElementById('p-context'); return im.complete && im.naturalWidth > 0",
                 "the flagged superpixel's context picture did not load")
    pixels = np.asarray(browser.js("""const im = document.getElementById('p-context');
        const c = document.createElement('canvas'); c.width = im.naturalWidth; c.height = im.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(im, 0, 0);
        return Array.from(g.getImageData(0, 0, c.width, c.height).data);"""), np.int32).reshape(-1, 4)
    yellow = (np.abs(pixels[:, :3] - (255, 255, 0)).sum(axis=1) < 60).sum()
    assert yellow > 20, "the context picture shows no outline"
    assert "flagged" in browser.js("return document.getElementById('p-prob').textContent")
    # the cluster list: every group with sample thumbnails; "select" selects the whole group
    groups = browser.js("return [...document.querySelectorAll('#clusters .cluster')].map(d => +d.dataset.cluster)")
    assert sorted(groups) == sorted(set(points.cluster.tolist()))
    browser.wait("""return [...document.querySelectorAll('#clusters img')].every(im => im.complete && im.naturalWidth > 0)""",
                 "the cluster list's thumbnails did not load")
    first = groups[0]
    browser.js("document.querySelector('#clusters .cluster .c-select').click()")
    selected = browser.wait("const s = amber.source.selected.indices; return s.length ? Array.from(s) : null",
                            "selecting a cluster selected nothing")
    assert sorted(selected) == [int(k) for k in np.flatnonzero(points.cluster == first)]
    assert "selected" in browser.js("return document.getElementById('selcount').textContent")
    browser.screenshot(tmp_path / "run.png")
    assert browser.errors() == []
    assert _only_local(browser.requests, url) == []
    store.close()


def test_static_page_works_without_a_server(shared_points, browser, tmp_path):
    out = write_static(shared_points, tmp_path / "explore.html")
    browser.open(out.as_uri())
    n = len(shared_points)
    assert browser.js("return amber.source.data.x.length") == n
    assert browser.js("return renderedPoints()") == {"n": n, "finite": n, "webgl": True}
    i, gap = browser.js(ISOLATED_JS)
    assert gap > 8
    assert _hover_shows_thumbnail(browser, i).startswith("data:image/jpeg;base64,")
    x, y = browser.js("return pointOnScreen(arguments[0])", i)
    browser.pointer(x, y, click=True)
    browser.wait("return amber.panelReady === arguments[0]", "no panel on the static page", TIMEOUT_S, i)
    assert browser.js("return document.querySelectorAll('#p-neighbours img').length") == 8
    assert browser.js("return document.getElementById('b-not').checkVisibility()") is False  # read-only
    assert browser.errors() == []
    assert [r for r in browser.requests if r.split(":", 1)[0] in ("http", "https", "ws", "wss", "ftp")] == []
