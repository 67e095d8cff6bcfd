"""A real AF_UNIX datagram socket standing in for systemd's notification socket."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class NotifySocket:
    """Binds ``path`` and collects every datagram (sd_notify messages) with its arrival time
    (``time.monotonic()``), on a thread. Use as NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-socket", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self.changed:
                self.messages.append((time.monotonic(), fields))
                self.changed.notify_all()

    def times(self, key: str, value: str | None = None) -> list[float]:
        """Arrival times of the messages carrying ``key`` (with ``value`` if given)."""
        with self.changed:
            return [t for t, f in self.messages if key in f and (value is None or f[key] == value)]

    def statuses(self) -> list[str]:
        with self.changed:
            return [f["STATUS"] for _, f in self.messages if "STATUS" in f]

    def wait_for(self, key: str, value: str | None = None, timeout_s: float = 30.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: bool(self.times_unlocked(key, value)), timeout_s)

    def times_unlocked(self, key: str, value: str | None) -> list[float]:
        return [t for t, f in self.messages if key in f and (value is None or f[key] == value)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
