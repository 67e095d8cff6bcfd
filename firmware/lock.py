"""One daemon per reader: an exclusive flock on a file in the state folder.

Taken before any GPIO line or camera is touched, so a second daemon, or a maintenance command
that would drive the relay, exits before it can fight the running one. The kernel drops the
lock when the holder dies, even by kill -9, so a crash never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from firmware.exceptions import InstanceLockedError


class InstanceLock:
    """``acquire()`` or raise InstanceLockedError naming the holder's pid; ``release()``
    idempotent. The file holds the holder's pid for people and error messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def holder(self) -> int | None:
        """The pid written by the current holder, if readable."""
        try:
            return int(self.path.read_text().strip() or "0") or None
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        """Take the lock without waiting. Raises InstanceLockedError when it is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.holder()
            raise InstanceLockedError(
                f"another qrgate daemon (pid {pid or 'unknown'}) holds {self.path}: "
                "stop it first; giving up"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays: deleting it would race a starting daemon)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
