"""The local explore server: the page, BokehJS, JSON endpoints, pictures on demand, labelling.

A standard-library threading HTTP server on 127.0.0.1 (another ``--host`` only when asked).
Endpoints:

- ``GET /``: the page; ``GET /static/bokeh/<file>``: BokehJS from the installed bokeh package;
- ``GET /api/plot``: the Bokeh figure (with the label store's current labels);
- ``GET /api/suggest?n=N&strategy=S``: unlabelled points worth labelling next (``learn.suggest``);
- ``GET /api/point/<i>``, ``/api/neighbours/<i>?k=K``, ``/api/gradcam/<i>`` (is there a heatmap,
  and its note): about points;
- ``GET /thumb/<i>.png``, ``/context/<i>.png``, ``/gradcam/<i>.png``: pictures, made on demand and
  kept in memory (Grad-CAM: 404 with the reason for a model without CNN heads);
- ``GET /file/<root>/<path>``: an image file inside a dataset or run folder, and nothing else:
  ``..``, absolute paths, encoded dots and symlinks out of the folder all get 404;
- ``POST /api/label``: ``{"indices": [...], "label": "mining"|"not mining", "note": ...}``.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import mimetypes
import re
import threading
import traceback
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import ConfigError, SceneUnavailableError
from ..learn.dataset import IMAGE_SUFFIXES
from ..learn.labels import LabelStore
from .data import Points
from .page import BOKEH_JS, columns, figure_item, render

log = logging.getLogger(__name__)
#: Ports tried after a busy one before giving up.
PORT_TRIES = 20
LABEL_VALUES = {"mining": 1, "not mining": 0}
NO_CNN = "no heatmap: this model has no CNN; the reasons above are its whole story"


class ExploreApp:
    """What the server serves: the points, their pictures and the label store."""

    def __init__(self, points: Points, store: LabelStore | None = None):
        self.points = points
        self.store = store
        self._pictures: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._built = None

    # --- content -------------------------------------------------------------------------------

    def page(self) -> bytes:
        scripts = "".join(f'<script src="/static/bokeh/{name}"></script>' for name in BOKEH_JS)
        return render(self.points, scripts=scripts, boot={}, static=False).encode()

    def labels(self) -> tuple[list[str], list[str]]:
        return self.points.current_labels(self.store)

    def plot(self) -> dict:
        labels, origins = self.labels()
        thumbs = [f"/thumb/{i}.png" for i in range(len(self.points))]
        return figure_item(self.points, columns(self.points, labels, origins, thumbs))

    def point(self, i: int) -> dict:
        p = self.points
        prob = float(p.probability[i])
        model_p = p.model_probability(i)
        if p.kind == "dataset":
            text = (f"out-of-fold probability {prob:.3f} (grouped protocol; predicted "
                    f"{'mining' if p.predicted[i] else 'not mining'}, {p.cell[i]}); the model itself: {model_p:.3f}, "
                    f"threshold {p.threshold:.3f}")
        else:
            text = f"probability {prob:.3f} (threshold {p.threshold:.3f}; scene {'flagged' if p.flagged[i] else 'not flagged'})"
        history = []
        if self.store is not None:
            for row in self.store.history(p.keys[i]):
                history.append({"when": dt.datetime.fromtimestamp(row.created).isoformat(timespec="seconds"),
                                "label": "mining" if row.label else "not mining", "source": row.source,
                                "note": row.note})
        return {"i": i, "name": p.name[i], "scene": p.scene[i], "probability": prob, "model_probability": model_p,
                "probability_text": text, "cell": p.cell[i], "neighbours": p.neighbours(i, 8),
                "reasons": p.explain(i, 5), "history": history}

    def picture(self, kind: str, i: int):
        """A picture made on demand and kept (the last 4096): ``thumb`` and ``context`` PNG bytes,
        or ``gradcam``: ``(PNG bytes, note)``, or None for a model without CNN heads."""
        key = (kind, i)
        with self._lock:
            if key in self._pictures:
                self._pictures.move_to_end(key)
                return self._pictures[key]
        if kind == "gradcam":
            data = self.points.gradcam(i, self._embedder())
        else:
            data = self.points.thumbnail(i) if kind == "thumb" else self.points.context(i)
        with self._lock:
            self._pictures[key] = data
            while len(self._pictures) > 4096:
                self._pictures.popitem(last=False)
        return data

    def suggest(self, n: int, strategy: str | None = None) -> list[int]:
        """The ``n`` unlabelled points most worth labelling next (``learn.suggest``, by its default
        strategy unless one is named): on a run, superpixels nobody has labelled; on a dataset,
        crops the label store has no label for."""
        from ..learn.suggest import DEFAULT_STRATEGY, suggest

        labels, origins = self.labels()
        pool = [i for i, (text, origin) in enumerate(zip(labels, origins)) if origin != "label store"
                and (self.points.kind == "dataset" or text == "unlabelled")]
        if not pool:
            return []
        picks = suggest(self.points.bundle, self.points.features[pool], n, strategy or DEFAULT_STRATEGY)
        return [pool[p.index] for p in picks]

    def _embedder(self):
        """The model's embedder, built once (loading CNN weights takes seconds) and only when a
        Grad-CAM picture is first asked for; Keras models are not built twice at once."""
        if not self.points.bundle.classifier.heads:
            return None
        with self._build_lock:
            if self._built is None:
                self._built = self.points.bundle.build_embedder()
            return self._built

    def label(self, indices: list[int], value: str, note: str | None) -> list[dict]:
        if self.store is None:
            raise ConfigError("no label store is open")
        if value not in LABEL_VALUES:
            raise ConfigError(f"unknown label {value!r}; use 'mining' or 'not mining'")
        rows = self.store.add_many([(self.points.keys[i], LABEL_VALUES[value]) for i in indices], source="explore",
                                   note=note)
        return [{"i": i, "label": value, "id": r.id, "previous": r.previous} for i, r in zip(indices, rows)]

    def safe_file(self, root: str, rel: str) -> Path | None:
        """The image file ``rel`` inside root folder number ``root``, or None: nothing outside the
        folder (after following symlinks), and image files only."""
        if not root.isdigit() or int(root) >= len(self.points.roots):
            return None
        base = self.points.roots[int(root)].resolve()
        try:
            candidate = (base / rel).resolve()
        except (OSError, ValueError):  # a NUL byte, a symlink loop
            return None
        if not candidate.is_relative_to(base) or candidate.suffix.lower() not in IMAGE_SUFFIXES:
            return None
        return candidate if candidate.is_file() else None


def _handler(app: ExploreApp):
    bokeh_dir = _bokeh_js_dir()

    class Handler(BaseHTTPRequestHandler):
        server_version = "amber-hunter-explore"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: the terminal shows the URL, not every thumbnail
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, body: bytes, ctype: str, cache: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj, status: int = 200) -> None:
            self._send(status, json.dumps(obj, allow_nan=False).encode(), "application/json")

        def _not_found(self, message: str = "not found") -> None:
            self._send(404, message.encode(), "text/plain; charset=utf-8")

        def _index(self, text: str) -> int | None:
            i = int(text) if text.isdigit() else -1
            return i if 0 <= i < len(app.points) else None

        def do_HEAD(self):
            self.do_GET()

        def _foreign_host(self) -> bool:
            """A request whose Host is not this server's own name: a page on another site whose
            name was made to resolve to 127.0.0.1 (DNS rebinding) must not read crops or labels."""
            host, port = self.server.server_address[:2]
            own = {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]", host)}
            if self.server.any_host:
                return False
            if self.headers.get("Host") not in own:
                self._send(403, b"unknown Host header; open the URL the app printed", "text/plain")
                return True
            return False

        def do_GET(self):
            if self._foreign_host():
                return
            try:
                self._get()
            except SceneUnavailableError as exc:
                self._not_found(str(exc))
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception:  # noqa: BLE001 - one bad request never stops the app
                log.error("explore: %s failed:\n%s", self.path, traceback.format_exc())
                self._send(500, b"internal error; see the terminal", "text/plain")

        def _get(self):
            url = urlsplit(self.path)
            path = url.path
            if path in ("/", "/index.html"):
                return self._send(200, app.page(), "text/html; charset=utf-8")
            if path == "/favicon.ico":
                return self._send(204, b"", "image/x-icon")
            if m := re.fullmatch(r"/static/bokeh/([\w.-]+\.js)", path):
                if m[1] not in BOKEH_JS:
                    return self._not_found()
                return self._send(200, (bokeh_dir / m[1]).read_bytes(), "text/javascript", cache=True)
            if path == "/api/plot":
                return self._json(app.plot())
            if m := re.fullmatch(r"/api/point/(\d+)", path):
                i = self._index(m[1])
                return self._json(app.point(i)) if i is not None else self._not_found()
            if path == "/api/suggest":
                query = parse_qs(url.query)
                n, strategy = query.get("n", ["20"])[0], query.get("strategy", [None])[0]
                if not n.isdigit() or not 0 < int(n) <= 500:
                    return self._json({"error": "n must be 1 to 500"}, 400)
                try:
                    return self._json({"suggested": app.suggest(int(n), strategy)})
                except ConfigError as exc:
                    return self._json({"error": str(exc)}, 400)
            if m := re.fullmatch(r"/api/neighbours/(\d+)", path):
                i = self._index(m[1])
                k = parse_qs(url.query).get("k", ["20"])[0]
                if i is None or not k.isdigit():
                    return self._not_found()
                return self._json({"i": i, "neighbours": app.points.neighbours(i, min(int(k), 500))})
            if m := re.fullmatch(r"/(thumb|context)/(\d+)\.png", path):
                i = self._index(m[2])
                if i is None:
                    return self._not_found()
                return self._send(200, app.picture(m[1], i), "image/png", cache=True)
            if m := re.fullmatch(r"/gradcam/(\d+)\.png", path):
                i = self._index(m[1])
                if i is None:
                    return self._not_found()
                cam = app.picture("gradcam", i)
                if cam is None:
                    return self._not_found(NO_CNN)
                return self._send(200, cam[0], "image/png", cache=True)
            if m := re.fullmatch(r"/api/gradcam/(\d+)", path):
                i = self._index(m[1])
                if i is None:
                    return self._not_found()
                cam = app.picture("gradcam", i)
                return self._json({"available": cam is not None, "note": NO_CNN if cam is None else cam[1]})
            if m := re.fullmatch(r"/file/([^/]*)/(.*)", path, re.DOTALL):
                file = app.safe_file(unquote(m[1]), unquote(m[2]))
                if file is None:
                    return self._not_found()
                ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                return self._send(200, file.read_bytes(), ctype)
            return self._not_found()

        def do_POST(self):
            if self._foreign_host():
                return
            try:
                if urlsplit(self.path).path != "/api/label":
                    return self._not_found()
                origin = self.headers.get("Origin")
                if origin is not None and urlsplit(origin).netloc != self.headers.get("Host"):
                    return self._send(403, b"cross-origin requests are refused", "text/plain")
                length = int(self.headers.get("Content-Length") or 0)
                if length < 0 or length > 10_000_000:
                    return self._send(413, b"body length must be 0 to 10 MB", "text/plain")
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    return self._json({"error": "the body must be a JSON object"}, 400)
                indices, note = body.get("indices"), body.get("note")
                if not isinstance(indices, list) or not indices or not all(
                        type(i) is int and 0 <= i < len(app.points) for i in indices):
                    return self._json({"error": "indices must be a non-empty list of point numbers"}, 400)
                if note is not None and not isinstance(note, str):
                    return self._json({"error": "note must be text"}, 400)
                if not isinstance(body.get("label"), str):
                    return self._json({"error": "label must be 'mining' or 'not mining'"}, 400)
                rows = app.label(sorted(set(indices)), body.get("label"), note)
                return self._json({"labelled": rows})
            except (ConfigError, ValueError) as exc:
                return self._json({"error": str(exc)}, 400)
            except Exception:  # noqa: BLE001
                log.error("explore: POST %s failed:\n%s", self.path, traceback.format_exc())
                return self._send(500, b"internal error; see the terminal", "text/plain")

    return Handler


def _bokeh_js_dir() -> Path:
    from bokeh.util.paths import bokehjs_path

    return Path(bokehjs_path()) / "js"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False  # a busy port must be seen as busy
    #: Listening on all interfaces (``--host 0.0.0.0``): any Host header is the user's choice.
    any_host = False


def make_server(app: ExploreApp, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Bind the app's server; a busy ``port`` moves on to the next free one (up to
    ``PORT_TRIES``). Returns the server and a note saying so (empty when the port was free)."""
    handler = _handler(app)
    note = ""
    for attempt in range(PORT_TRIES if port else 1):
        try:
            server = _Server((host, port + attempt if port else 0), handler)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ConfigError(f"cannot listen on {host}:{port + attempt} ({exc.strerror or exc})") from None
            continue
        if attempt:
            note = f"port {port} is in use; using {port + attempt} instead"
        server.any_host = host not in ("127.0.0.1", "localhost", "::1")
        return server, note
    raise ConfigError(f"ports {port}-{port + PORT_TRIES - 1} on {host} are all in use; choose another with --port")


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def start_in_thread(app: ExploreApp, host: str = "127.0.0.1", port: int = 0):
    """Serve in a background thread (tests, notebooks); returns ``(server, url)``. Stop it with
    ``server.shutdown(); server.server_close()``."""
    server, _ = make_server(app, host, port)
    threading.Thread(target=server.serve_forever, name="amber-explore", daemon=True).start()
    return server, url_of(server)


def write_static(points: Points, out: str | Path, store: LabelStore | None = None) -> Path:
    """A self-contained, read-only page: BokehJS inlined, thumbnails as data URIs, neighbours
    and reasons precomputed. Works offline, without a server."""
    from bokeh.resources import Resources

    from .. import atomic
    from .page import data_uri, static_extras

    labels, origins = points.current_labels(store)
    thumbs = []
    for i in range(len(points)):
        try:
            thumbs.append(data_uri(points.thumbnail(i, 80, "JPEG"), "image/jpeg"))
        except SceneUnavailableError:
            thumbs.append("")
    item = figure_item(points, columns(points, labels, origins, thumbs))
    scripts = Resources(mode="inline", components=["bokeh", "bokeh-gl"]).render_js()
    page = render(points, scripts=scripts, boot={"item": item, "extras": static_extras(points)}, static=True)
    out = Path(out)
    atomic.write_bytes(out, page.encode())
    return out
