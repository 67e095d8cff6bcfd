"""A static file server for a TUF repository folder on loopback, as a real web server would
serve it (GET, 404, ``Range: bytes=N-`` → 206), plus the faults the fetch tests need: drop
the connection part-way through a target, or stop answering requests for a path."""

from __future__ import annotations

import http.server
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType


@dataclass
class Faults:
    """What the server does wrong. ``requests`` records (path, Range start or None)."""

    drop_targets_after: int | None = None  # bytes sent before the connection is cut
    drops_left: int = 0  # how many target requests are cut
    requests: list[tuple[str, int | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.0: one response per connection, so a cut connection is just a return
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        faults = self.server.faults
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(m[1]) if m else None
        path = self.path.split("?", 1)[0]
        with faults.lock:
            faults.requests.append((path, start))
            drop = faults.drop_targets_after if path.startswith("/targets/") else None
            if drop is not None and faults.drops_left > 0:
                faults.drops_left -= 1
            else:
                drop = None
        file = (self.server.root / path.lstrip("/")).resolve()
        if not file.is_relative_to(self.server.root) or not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        if start is not None and start < len(data):
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if drop is None else body[:drop])


class _Server(http.server.ThreadingHTTPServer):
    # handler threads are joined on close: a test leaves none behind
    daemon_threads = False

    def __init__(self, root: Path, faults: Faults) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root.resolve()
        self.faults = faults


class RepoServer:
    """Serves ``root`` at :attr:`url` until closed (a context manager; the serving thread
    is joined on exit)."""

    def __init__(self, root: Path) -> None:
        self.faults = Faults()
        self._server = _Server(root, self.faults)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        # a short poll so close() does not wait half a second for serve_forever to notice
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="repo-server", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> RepoServer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
