"""Small real HTTP servers on 127.0.0.1 for tests: image hosts, internal services that must receive nothing,
redirect chains and slow-drip hosts.

    with LocalServer({"/a.png": reply(png)}) as host:     # any unknown path: 404
        host.url                       # "http://127.0.0.1:<port>"
        host.hits                      # every request received: Hit(method, path, headers)
        host.route("/go", redirect(other.url + "/a.png"))
        host.route("/drip", drip(interval=0.2))
        host.sent["/drip"]             # body bytes a drip handler managed to send

Each server runs in a daemon thread (ThreadingHTTPServer) and records requests BEFORE answering, so a test can
assert that a server saw nothing at all.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

Handler = Callable[[BaseHTTPRequestHandler], None]


@dataclass(frozen=True)
class Hit:
    method: str
    path: str
    headers: dict[str, str]


def reply(body: bytes, status: int = 200, content_type: str = "image/png") -> Handler:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    return handle


def redirect(location: str, status: int = 302) -> Handler:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return handle


def drip(interval: float, limit: int = 10_000, chunked: bool = False) -> Handler:
    """Headers at once, then one byte every `interval` s (at most `limit`), until the client hangs up.
    `chunked`: the bytes are chunk-size digits of a never-ending chunk header (a reader stuck in readline)."""
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        if chunked:
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Content-Length", str(limit))
        h.end_headers()
        h.wfile.flush()
        server: LocalServer = h.server.owner  # type: ignore[attr-defined]
        for _ in range(limit):
            try:
                h.wfile.write(b"1" if chunked else b"\x89")
                h.wfile.flush()
            except OSError:
                return
            server.sent[h.path] += 1
            time.sleep(interval)
    return handle


class LocalServer:
    def __init__(self, routes: dict[str, Handler] | None = None) -> None:
        self.routes: dict[str, Handler] = dict(routes or {})
        self.hits: list[Hit] = []
        self.sent: Counter[str] = Counter()
        owner = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _any(self) -> None:
                owner.hits.append(Hit(self.command, self.path, dict(self.headers.items())))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                handler = owner.routes.get(self.path) or owner.routes.get(self.path.split("?", 1)[0])
                self.close_connection = True
                if handler is None:
                    reply(b"not found", 404, "text/plain")(self)
                else:
                    handler(self)

            do_GET = do_POST = do_HEAD = do_PUT = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["Hit", "LocalServer", "drip", "redirect", "reply"]


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest and benchmark output clean
        pass


@contextlib.contextmanager
def serve_folder(directory: Path) -> Iterator[str]:
    """A plain static file server for `directory` on a free loopback port (the image host of tests and
    benchmarks); yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietFiles, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
