"""Serve a built dashboard on localhost with the standard library's threading HTTP server.

Bound to 127.0.0.1 by default (the dashboard is a local viewer, not a public web site); ``port=0`` asks the
OS for a free port. The site is static files, so any other web server works as well.
"""
from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from saeforge.errors import SaeforgeError


class _Handler(SimpleHTTPRequestHandler):
    """Static files, no directory listings' noise in the log, and no stale data after a rebuild."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript; charset=utf-8",
                      ".css": "text/css; charset=utf-8", ".html": "text/html; charset=utf-8"}

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's name
        pass


def make_server(directory: str | Path, port: int = 0, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """A server for ``directory`` (not started). Raises if it holds no built dashboard or the port is taken."""
    directory = Path(directory)
    if not (directory / "index.html").is_file() or not (directory / "data" / "index.js").is_file():
        raise SaeforgeError(f"{directory} holds no built dashboard (index.html + data/index.js); "
                            "run `saeforge dashboard build` first")
    handler = functools.partial(_Handler, directory=str(directory.resolve()))
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise SaeforgeError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or 0 for a free one") from None


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def start_background(directory: str | Path, port: int = 0, host: str = "127.0.0.1") -> tuple[ThreadingHTTPServer, str]:
    """Serve from a daemon thread; returns ``(server, url)``. Stop with ``server.shutdown(); server.server_close()``."""
    server = make_server(directory, port, host)
    threading.Thread(target=server.serve_forever, daemon=True, name="saeforge-dashboard").start()
    return server, url_of(server)


def serve(directory: str | Path, port: int = 0, host: str = "127.0.0.1", announce=print) -> None:
    """Serve until interrupted, announcing the URL first."""
    server = make_server(directory, port, host)
    announce(f"serving {directory} at {url_of(server)}  (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
