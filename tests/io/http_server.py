"""A real HTTP server on 127.0.0.1 (a thread) serving a folder, with basic auth and byte ranges."""

from __future__ import annotations

import base64
import http.server
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _handler(root: Path, user: str, password: str, seen: list[str]) -> type:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _authorised(self) -> bool:
            seen.append(self.headers.get("Authorization", ""))
            if self.headers.get("Authorization") == f"Basic {token}":
                return True
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="test"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False

        def _file(self) -> Path | None:
            path = (root / self.path.split("?", 1)[0].lstrip("/")).resolve()
            if root.resolve() not in path.parents or not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            return path

        def do_HEAD(self) -> None:
            if self._authorised() and (path := self._file()) is not None:
                self.send_response(200)
                self.send_header("Content-Length", str(path.stat().st_size))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

        def do_GET(self) -> None:
            if not self._authorised() or (path := self._file()) is None:
                return
            data = path.read_bytes()
            rng = self.headers.get("Range", "")
            if rng.startswith("bytes="):
                first, _, last = rng[6:].partition("-")
                start = int(first) if first else max(len(data) - int(last), 0)
                stop = min(int(last) + 1, len(data)) if first and last else len(data)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
                data = data[start:stop]
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self.wfile.write(data)

    return Handler


@contextmanager
def http_folder(root: Path, user: str, password: str) -> Iterator[tuple[int, list[str]]]:
    """Serve ``root`` on a free 127.0.0.1 port to ``user:password`` only; yields the port and
    the Authorization headers received."""
    seen: list[str] = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             _handler(Path(os.fspath(root)), user, password, seen))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1]), seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
