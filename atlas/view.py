"""Serve a run folder (what `atlas compose` wrote) to a browser, on 127.0.0.1 only."""

from __future__ import annotations

import functools
import http.server
import logging
import threading
from pathlib import Path

from atlas import AtlasError

log = logging.getLogger(__name__)
HOST = "127.0.0.1"  # never exposed beyond this machine


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """A static file handler that logs through `logging` at debug level instead of stderr per request."""

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def make_server(run_dir: str | Path, port: int = 8000) -> http.server.ThreadingHTTPServer:
    """An HTTP server of `run_dir` on 127.0.0.1:`port` (0: any free port); the caller runs serve_forever."""
    run_dir = Path(run_dir)
    if not (run_dir / "index.html").is_file():
        store = run_dir / "store.h5" if (run_dir / "store.h5").is_file() else "STORE.h5"
        raise AtlasError(f"{run_dir} has no index.html (run `atlas compose {store} --out {run_dir}` first)")
    handler = functools.partial(_QuietHandler, directory=str(run_dir))
    try:
        return http.server.ThreadingHTTPServer((HOST, port), handler)
    except OSError as err:
        raise AtlasError(f"cannot listen on {HOST}:{port}: {err.strerror} (choose another --port)") from err


def url_of(server: http.server.ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    assert isinstance(host, str)  # an IPv4 socket's address: its host is a str, never bytes
    return f"http://{host}:{port}/"


def serve_in_thread(run_dir: str | Path, port: int = 0) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Start serving in a daemon thread; return the server (call .shutdown() to stop) and its URL."""
    server = make_server(run_dir, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, url_of(server)


def serve(run_dir: str | Path, port: int = 8000) -> None:
    """Serve `run_dir` until interrupted, after printing its URL."""
    with make_server(run_dir, port) as server:
        print(f"atlas viewer of {Path(run_dir).resolve()} at {url_of(server)} (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", flush=True)
