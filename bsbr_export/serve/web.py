"""Serve an export's web page (`--format web`) on 127.0.0.1, cross-origin isolated.

The page is plain files; any static host serves it. This one adds what makes wasm
multi-threaded: `Cross-Origin-Opener-Policy: same-origin` and
`Cross-Origin-Embedder-Policy: require-corp` (SharedArrayBuffer needs both), and the
MIME types browsers insist on for ES modules and wasm. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import functools
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bsbr_export.errors import UserError
from bsbr_export.serve.serve import check_port

ISOLATION = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class PageHandler(SimpleHTTPRequestHandler):
    """Static files, with the isolation headers (unless `isolated` is False), quietly."""

    isolated = True
    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".mjs": "text/javascript",
        ".js": "text/javascript",
        ".wasm": "application/wasm",
        ".json": "application/json",
    }

    def end_headers(self) -> None:
        if self.isolated:
            for name, value in ISOLATION.items():
                self.send_header(name, value)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:
        pass


def web_dir(path: str | os.PathLike) -> Path:
    """The page's directory: an export's `web/`, or that directory itself."""
    path = Path(path)
    page = path / "web" if (path / "web" / "index.html").is_file() else path
    if not (page / "index.html").is_file():
        raise UserError(f"{path} has no web page (index.html): export with --format web")
    return page


def page_server(path: str | os.PathLike, port: int = 8080, isolated: bool = True) -> ThreadingHTTPServer:
    """An HTTP server of the page in `path` on 127.0.0.1:`port` (0: a free one), not yet serving."""
    handler = type("Handler", (PageHandler,), {"isolated": isolated})
    port = check_port(port, "--port")
    return ThreadingHTTPServer(("127.0.0.1", port), functools.partial(handler, directory=str(web_dir(path))))


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Serve `server` from a daemon thread (tests, tools); `server.shutdown()` stops it."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread
