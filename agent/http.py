"""The agent's HTTP server: ``/metrics``, ``/healthz``, ``/`` (status page) and ``/preview.mjpg``.

A stdlib ``ThreadingHTTPServer`` in a daemon thread (one thread per request, so a long MJPEG
stream never blocks a Prometheus scrape), bounded: at most ``http.max_connections`` connections
are served at once (more are answered 503 and closed at once, counted in
``fod_http_connections_refused_total``), and a connection idle for ``http.request_timeout_s`` (no
request sent, or a preview client that stopped reading) is closed, so idle clients cannot exhaust
the process's file descriptors. It binds 127.0.0.1 unless ``http.host`` says otherwise. With
``http.token_env`` set, every endpoint but ``/healthz`` needs the token (``Authorization: Bearer``,
``?token=``, or the ``fod_token`` cookie that a valid ``?token=`` sets for the status page's
preview images). A stdlib server rather than a library: it adds no dependency on the Jetson
image, and the bounds above are all that the issue asked of a library. It only reads state the
pipeline keeps up to date:

* ``/metrics``: the Prometheus registry the pipeline and the MQTT link update at each event;
* ``/healthz``: JSON from the agent's health callback; 200 when the model is loaded and every
  camera produced a frame recently, else 503;
* ``/``: a small HTML page with the health JSON, links and the preview of each camera;
* ``/preview.mjpg?camera=NAME``: ``multipart/x-mixed-replace`` JPEG stream of the heatmap overlay
  (rendered only while someone watches, at ``http.preview_fps``).
"""

from __future__ import annotations

import errno
import hmac
import html
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from agent.config import HttpConfig
from agent.errors import HttpError
from agent.redact import redact_any

log = logging.getLogger(__name__)

HealthFn = Callable[[], tuple[bool, dict[str, Any]]]
_BOUNDARY = "fodframe"
_COOKIE = "fod_token"


class _BoundedServer(ThreadingHTTPServer):
    """A threading server that serves at most ``max_connections`` connections at once."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        max_connections: int,
        on_refused: Callable[[], None],
    ) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self._on_refused = on_refused
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._on_refused()
            try:
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class PreviewHub:
    """The newest preview JPEG of each camera, and how many clients watch it (thread-safe)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frames: dict[str, tuple[int, bytes]] = {}
        self._watchers: dict[str, int] = {}
        self.closed = False

    def watching(self, camera: str) -> bool:
        """True while at least one client streams ``camera``'s preview."""
        return self._watchers.get(camera, 0) > 0

    def publish(self, camera: str, jpeg: bytes) -> None:
        """Store a new preview frame of ``camera`` and wake its streams."""
        with self._cond:
            version = self._frames.get(camera, (0, b""))[0] + 1
            self._frames[camera] = (version, jpeg)
            self._cond.notify_all()

    def next_frame(self, camera: str, after: int, timeout_s: float) -> tuple[int, bytes] | None:
        """Wait for a frame of ``camera`` newer than version ``after``.

        Returns:
            ``(version, jpeg)``, or None on timeout or when the hub is closed.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self.closed:
                current = self._frames.get(camera)
                if current is not None and current[0] > after:
                    return current
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
        return None

    def add_watcher(self, camera: str, delta: int) -> None:
        """Count a client starting (+1) or stopping (-1) a stream."""
        with self._cond:
            self._watchers[camera] = max(0, self._watchers.get(camera, 0) + delta)

    def close(self) -> None:
        """End every stream."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class AgentHttpServer:
    """HTTP endpoints of the agent, served from a daemon thread.

    Args:
        config: ``[http]`` settings (``port`` 0 means the server is not started).
        registry: the Prometheus registry to expose.
        health: returns ``(healthy, details)``.
        cameras: camera names (for the status page and the preview default).
        preview: the hub the pipeline fills with overlay frames.
    """

    def __init__(
        self,
        config: HttpConfig,
        *,
        registry: CollectorRegistry,
        health: HealthFn,
        cameras: list[str],
        preview: PreviewHub,
    ) -> None:
        self.config = config
        self.registry = registry
        self.health: HealthFn = lambda: _redacted(health)
        self.cameras = cameras
        self.preview = preview
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.token = self._read_token(config)
        self._m_refused = Counter(
            "fod_http_connections_refused_total",
            "HTTP connections refused because http.max_connections were open",
            registry=registry,
        )

    @staticmethod
    def _read_token(config: HttpConfig) -> str | None:
        if config.token_env is None:
            return None
        value = os.environ.get(config.token_env, "")
        if len(value) < 16:
            raise HttpError(
                f"http.token_env names {config.token_env}, which is "
                f"{'unset' if not value else 'shorter than 16 characters'}; "
                "export a long random token (openssl rand -hex 32) or remove http.token_env"
            )
        return value

    def authorized(self, headers: Any, query: dict[str, list[str]]) -> tuple[bool, bool]:
        """Whether a request carries the token; second value: it came as ``?token=`` (set the cookie)."""
        if self.token is None:
            return True, False
        given = [v[len("Bearer ") :] for v in [headers.get("Authorization", "")] if v.startswith("Bearer ")]
        given += [c.split("=", 1)[1] for c in headers.get("Cookie", "").split("; ") if c.startswith(f"{_COOKIE}=")]
        from_query = query.get("token", [])
        for candidate in (*given, *from_query):
            if hmac.compare_digest(candidate.encode(), self.token.encode()):
                return True, candidate in from_query
        return False, False

    @property
    def port(self) -> int:
        """The port actually bound (0 when not running)."""
        return int(self._server.server_address[1]) if self._server is not None else 0

    def start(self) -> None:
        """Bind and serve in a background thread; nothing happens when ``http.port`` is 0.

        Raises:
            HttpError: the port is in use or the address cannot be bound (names ``http.port`` /
                ``http.host`` and the fix).
        """
        if self.config.port == 0:
            log.info("HTTP server disabled (http.port = 0)")
            return
        handler = _make_handler(self)
        try:
            server = _BoundedServer(
                (self.config.host, self.config.port),
                handler,
                max_connections=self.config.max_connections,
                on_refused=self._m_refused.inc,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise HttpError(
                    f"http.port {self.config.port} on {self.config.host} is already in use "
                    "(another fod-agent or service?); choose a free port with http.port in config.toml "
                    "or --http-port, or disable the "
                    "HTTP server with --http-port 0"
                ) from exc
            raise HttpError(
                f"cannot listen on http.host {self.config.host!r} port {self.config.port}: {exc}; "
                "check http.host (0.0.0.0 = all interfaces, 127.0.0.1 = local only)"
            ) from exc
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True
        )
        self._thread.start()
        log.info(
            "HTTP on http://%s:%d/ (/metrics, /healthz, /preview.mjpg)%s",
            self.config.host,
            self.port,
            "" if self.token is not None else " without a token",
        )
        if self.token is None and self.config.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "HTTP listens on %s without a token: anyone on the network sees the camera preview; "
                "set http.token_env (docs/deployment.md, Security)",
                self.config.host,
            )

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        self.preview.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None


def _redacted(health: HealthFn) -> tuple[bool, dict[str, Any]]:
    healthy, details = health()
    return healthy, redact_any(details)


def _make_handler(app: AgentHttpServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fod-agent"
        timeout = app.config.request_timeout_s  # idle connections and stalled readers are closed
        _set_cookie = False

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http %s - " + format, self.address_string(), *args)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            try:
                ok, from_query = app.authorized(self.headers, parse_qs(url.query))
                if not ok and url.path != "/healthz":
                    self._send(401, "text/plain", b"token required: Authorization: Bearer <token> or ?token=<token>\n")
                    return
                self._set_cookie = from_query
                if url.path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(app.registry))
                elif url.path == "/healthz":
                    healthy, details = app.health()
                    body = json.dumps({"healthy": healthy, **details}, indent=2).encode()
                    self._send(200 if healthy else 503, "application/json", body)
                elif url.path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", _status_page(app).encode())
                elif url.path == "/preview.mjpg":
                    camera = parse_qs(url.query).get("camera", [app.cameras[0] if app.cameras else ""])[0]
                    if camera not in app.cameras:
                        self._send(404, "text/plain", f"unknown camera {camera!r}; known: {app.cameras}\n".encode())
                    else:
                        self._stream(camera)
                else:
                    self._send(404, "text/plain", b"not found; try /, /metrics, /healthz, /preview.mjpg\n")
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                pass

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self._cookie()
            self.end_headers()
            self.wfile.write(body)

        def _cookie(self) -> None:
            if self._set_cookie and app.token is not None:
                self.send_header("Set-Cookie", f"{_COOKIE}={app.token}; HttpOnly; SameSite=Strict; Path=/")

        def _stream(self, camera: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={_BOUNDARY}")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            app.preview.add_watcher(camera, +1)
            version = 0
            try:
                while not app.preview.closed:
                    got = app.preview.next_frame(camera, version, timeout_s=1.0)
                    if got is None:
                        continue
                    version, jpeg = got
                    self.wfile.write(
                        f"--{_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
                    )
                    self.wfile.write(jpeg)
                    self.wfile.write(b"\r\n")
                    self.wfile.flush()
            finally:
                app.preview.add_watcher(camera, -1)

    return Handler


#: the status page polls ``/healthz`` this often (ms) and redraws every camera and ROI from that one reply
STATUS_REFRESH_MS = 500

_STATUS_CSS = """
body{font-family:system-ui,sans-serif;margin:1em;background:#fafafa;color:#222}
h1{font-size:1.4em;margin:.2em 0} .ok{color:#1a7f37} .ng{color:#c01818} .warn{color:#9a6700}
.cam{display:inline-block;vertical-align:top;margin:.5em 1em .5em 0;padding:.6em;background:#fff;
 border:1px solid #ddd;border-radius:6px}
.cam img{display:block;background:#333} table{border-collapse:collapse;margin-top:.4em}
td,th{padding:.15em .6em;text-align:left;border-bottom:1px solid #eee;font-variant-numeric:tabular-nums}
.verdict{font-weight:bold;font-size:1.3em} .badge{padding:.05em .5em;border-radius:4px;color:#fff}
.badge.ok{background:#1a7f37;color:#fff} .badge.ng{background:#c01818;color:#fff}
.bar{position:relative;width:12em;height:.8em;background:#eee;border-radius:3px}
.bar span{position:absolute;left:0;top:0;bottom:0;border-radius:3px}
.bar i{position:absolute;left:50%;top:-2px;bottom:-2px;border-left:2px solid #222}
#alarms li{font-family:monospace} small{color:#666}
"""

_STATUS_JS = """
const REFRESH_MS = %(refresh)d;
function esc(v){return String(v).replace(/[&<>"']/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));}
function num(v,d){return (typeof v==='number'&&isFinite(v))?v.toPrecision(d||4):'-';}
function roiRow(cam,roi,last,thr,tally){
  const v=last.verdict||'-', a=last.alarm||'-', n=last.normalized_score;
  const w=(typeof n==='number')?Math.max(0,Math.min(1,n))*100:0;
  const t=tally||{};
  return `<tr data-roi="${esc(roi)}"><td>${esc(roi)}</td>`+
   `<td class="verdict ${v==='NG'?'ng':'ok'}">${esc(v)}</td>`+
   `<td>${num(last.score)} / ${num(thr)}<div class="bar"><span style="width:${w}%%;background:${v==='NG'?'#c01818':'#1a7f37'}"></span><i></i></div></td>`+
   `<td><span class="badge ${a==='NG'?'ng':'ok'}">${esc(a)}</span></td>`+
   `<td>${t.frames??'-'} / ${t.ng_frames??'-'} / ${t.alarms??'-'}${t.held?` <small>(${t.held} held by debounce)</small>`:''}</td>`+
   `<td><small>${esc(last.source_frame??'')}</small></td></tr>`;
}
function render(h){
  document.getElementById('health').className=h.healthy?'ok':'ng';
  document.getElementById('health').textContent=h.healthy?'healthy':'unhealthy';
  document.getElementById('meta').textContent=`${h.agent_id||''} · model ${h.model||'-'} · backend ${h.backend||'-'} · MQTT ${h.mqtt_connected?'connected':'not connected'}${h.paused?' · PAUSED':''}`;
  for(const [cam,c] of Object.entries(h.cameras||{})){
    const box=document.querySelector(`.cam[data-camera="${CSS.escape(cam)}"]`); if(!box) continue;
    box.querySelector('.state').innerHTML=`<span class="${c.healthy?'ok':'ng'}">${esc(c.state)}</span> · ${num(c.fps,3)} frames/s · dropped ${c.frames_dropped} · last frame ${num(c.last_frame_age_s,2)} s ago${c.error?` · <span class="ng">${esc(c.error)}</span>`:''}`;
    const rois=Object.keys(Object.assign({},c.thresholds||{},c.last||{}));
    box.querySelector('tbody').innerHTML=rois.map(r=>roiRow(cam,r,(c.last||{})[r]||{},(c.thresholds||{})[r],(c.tally||{})[r])).join('');
  }
  const al=h.recent_alarms||[];
  document.getElementById('alarms').innerHTML=al.length?al.map(a=>`<li><span class="${a.state==='NG'?'ng':'ok'}">${esc(a.previous)} → ${esc(a.state)}</span> ${esc(a.ts)} ${esc(a.camera)}/${esc(a.roi)} score ${num(a.score)} (threshold ${num(a.threshold)}) frame ${esc(a.source_frame??'')}</li>`).join(''):'<li><small>none yet</small></li>';
  const notes=Object.entries(h.notes||{});
  document.getElementById('notes').innerHTML=notes.map(([k,v])=>`<li><b>${esc(k)}</b>: ${esc(v)}</li>`).join('');
  document.getElementById('updated').textContent=new Date().toLocaleTimeString();
}
async function tick(){
  try{ const r=await fetch('/healthz',{cache:'no-store'}); render(await r.json()); }
  catch(e){ document.getElementById('health').className='warn'; document.getElementById('health').textContent='no reply'; }
  setTimeout(tick,REFRESH_MS);
}
tick();
"""  # noqa: E501 - JavaScript kept on long lines


def _status_page(app: AgentHttpServer) -> str:
    """The status page: per camera the live preview, its frames/s and, per ROI, the run's tally.

    Per ROI: verdict, score against threshold, alarm state, frames / NG verdicts / alarms; below,
    the recent alarm transitions.

    The page polls ``/healthz`` every :data:`STATUS_REFRESH_MS` ms and redraws everything from that
    one reply, so verdict, score, alarm and frames/s always belong together; the image beside them is
    the live MJPEG preview.
    """
    cams = "".join(
        f"<div class='cam' data-camera='{html.escape(c, quote=True)}'><h2>{html.escape(c)}</h2>"
        f'<img src="/preview.mjpg?camera={html.escape(c, quote=True)}" width="{app.config.preview_width_px}" '
        f'alt="live preview of {html.escape(c, quote=True)}">'
        "<div class='state'>waiting for the first frame</div>"
        "<table><thead><tr><th>ROI</th><th>verdict</th><th>score / threshold</th><th>alarm</th>"
        "<th>frames / NG / alarms</th><th>frame</th></tr></thead><tbody></tbody></table></div>"
        for c in app.cameras
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>fod-agent</title>"
        f"<style>{_STATUS_CSS}</style></head><body>"
        "<h1>fod-agent <span id='health'>…</span></h1>"
        "<p><small><span id='meta'></span> · <a href='/metrics'>/metrics</a> · <a href='/healthz'>/healthz</a>"
        " · updated <span id='updated'>-</span></small></p>"
        f"{cams}<ul id='notes'></ul><h2>Recent alarms</h2><ul id='alarms'><li><small>none yet</small></li></ul>"
        f"<script>{_STATUS_JS % {'refresh': STATUS_REFRESH_MS}}</script></body></html>"
    )
