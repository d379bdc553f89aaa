"""map.html in a real headless Chromium: it loads offline without console errors, draws the
detections, and clicking one opens the scene's overlay picture.

A string check of the HTML cannot tell whether Leaflet actually runs without its CDN assets, so
the page is opened from a file:// URL in Debian's ``chromium`` and inspected over the DevTools
protocol (a websocket on 127.0.0.1; the port is the one Chromium reports in DevToolsActivePort).
Chromium runs in its own process group, which is always killed, and the test keeps its own
deadline.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import websocket

from amber_hunter.export.writers import export

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_S = 60.0
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--window-size=1200,900", "--remote-debugging-port=0")

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is absent (Debian package 'chromium')")

#: The centre of the first detection that is not hidden under a control, in CSS pixels.
CLICK_TARGET_JS = """(() => {
    for (const path of document.querySelectorAll('path.leaflet-interactive')) {
        const r = path.getBoundingClientRect();
        const x = r.left + r.width / 2, y = r.top + r.height / 2;
        const hit = document.elementFromPoint(x, y);
        if (hit && hit.classList.contains('leaflet-interactive')) return [x, y];
    }
    return null;
})()"""
#: Resolves to the natural width of the popup's picture once it is decoded (0 after 10 s without).
POPUP_IMAGE_JS = """new Promise(resolve => {
    const start = Date.now();
    (function poll() {
        const img = document.querySelector('.leaflet-popup-content img');
        if (img && img.complete && img.naturalWidth > 0) resolve(img.naturalWidth);
        else if (Date.now() - start > 10000) resolve(0);
        else setTimeout(poll, 50);
    })();
})"""


class DevTools:
    """A minimal DevTools-protocol client for one page, bounded by the test's deadline.

    Commands wait for their own answer; every event that arrives meanwhile is kept in ``events``.
    """

    def __init__(self, browser_url: str, deadline: float):
        self.deadline = deadline
        self.events: list[dict] = []
        self._ids = itertools.count(1)
        self._session = None  # browser-level commands first, then everything goes to the page
        self._ws = websocket.create_connection(browser_url, timeout=self._left(), suppress_origin=True)
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"Chromium did not finish within {TIMEOUT_S:.0f} s")
        return left

    def _receive(self) -> dict:
        self._ws.settimeout(self._left())
        return json.loads(self._ws.recv())

    def send(self, method: str, **params) -> dict:
        message_id = next(self._ids)
        message = {"id": message_id, "method": method, "params": params}
        if self._session:
            message["sessionId"] = self._session
        self._ws.send(json.dumps(message))
        while True:
            message = self._receive()
            if message.get("id") == message_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]
            self.events.append(message)

    def wait_for(self, method: str) -> dict:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._receive())
        return next(e for e in self.events if e.get("method") == method)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def close(self) -> None:
        self._ws.close()

    def errors(self) -> list[str]:
        """Console errors, logged errors (failed loads among them) and uncaught exceptions."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(f"exception: {details.get('exception', {}).get('description', details['text'])}")
        return found

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]


def _browser_url(profile: Path, proc: subprocess.Popen, deadline: float) -> str:
    """The browser's websocket address, from the DevToolsActivePort file Chromium writes on start."""
    port_file = profile / "DevToolsActivePort"
    while True:
        lines = port_file.read_text().split() if port_file.is_file() else []
        if len(lines) == 2:
            return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        assert proc.poll() is None, f"Chromium exited with code {proc.returncode} before opening DevTools"
        assert time.monotonic() < deadline, f"Chromium opened no DevTools port within {TIMEOUT_S:.0f} s"
        time.sleep(0.05)


def test_map_loads_offline_shows_detections_and_opens_a_popup(folder_run, tmp_path):
    paths, summary = export(folder_run, tmp_path / "out", basemap="none")
    detections = len(json.loads(paths.detections.read_text())["features"])
    assert summary.scenes_flagged > 0
    deadline = time.monotonic() + TIMEOUT_S
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        page = DevTools(_browser_url(profile, proc, deadline), deadline)
        try:
            for domain in ("Runtime", "Log", "Page", "Network"):
                page.send(f"{domain}.enable")
            page.send("Page.navigate", url=paths.map.as_uri())
            page.wait_for("Page.loadEventFired")
            assert page.evaluate("document.querySelectorAll('path.leaflet-interactive').length") == detections
            layers = page.evaluate("document.querySelector('.leaflet-control-layers').textContent")
            assert "flagged scenes" in layers and "positive superpixels" in layers
            x, y = page.evaluate(CLICK_TARGET_JS)
            for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
                page.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
            assert page.evaluate(POPUP_IMAGE_JS) > 0, "clicking a detection opened no popup with a picture"
            screenshot = base64.b64decode(page.send("Page.captureScreenshot", format="png")["data"])
            errors, requests = page.errors(), page.requests()
        finally:
            page.close()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    (tmp_path / "map.png").write_bytes(screenshot)
    assert screenshot.startswith(b"\x89PNG\r\n\x1a\n") and len(screenshot) > 10_000
    assert errors == []
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []
