"""A loopback HTTP MJPEG stream for tests: real sockets, frames that can stop while the socket stays open."""

from __future__ import annotations

import http.server
import socketserver
import threading
import time
from types import TracebackType

import cv2
import numpy as np


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    block_on_close = False


class MjpegServer:
    """``multipart/x-mixed-replace`` JPEG frames on ``http://127.0.0.1:<port>/stream.mjpg``.

    Args:
        stall_after: the first connection sends this many frames, then keeps the socket open and
            silent (a stalled camera); later connections stream normally. None = never stall.
        period_s: time between frames, s.
    """

    def __init__(self, *, stall_after: int | None = None, period_s: float = 0.03) -> None:
        self.stall_after = stall_after
        self.period_s = period_s
        self.connections = 0
        self.closing = threading.Event()
        self._lock = threading.Lock()
        jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), 100, np.uint8))[1].tobytes()
        part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg) + jpeg + b"\r\n"
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with owner._lock:
                    owner.connections += 1
                    first = owner.connections == 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                sent = 0
                while not owner.closing.is_set():
                    if first and owner.stall_after is not None and sent >= owner.stall_after:
                        owner.closing.wait(0.1)  # silent, socket open
                        continue
                    try:
                        self.wfile.write(part)
                        self.wfile.flush()
                    except OSError:
                        return
                    sent += 1
                    time.sleep(owner.period_s)

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/stream.mjpg"
        self._thread = threading.Thread(target=self._server.serve_forever, name="mjpeg-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close every connection (a blocked reader then returns)."""
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> MjpegServer:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
