"""Talking to systemd as a ``Type=notify`` service: READY=1, STATUS=, WATCHDOG=1, STOPPING=1.

Messages go through ``systemd.daemon.notify`` (systemd-python's wrapper of ``sd_notify(3)``),
which sends one datagram to the AF_UNIX socket named by ``NOTIFY_SOCKET`` in the process
environment. Outside systemd that variable is unset and every call is a no-op. This module only
says *how* to tell systemd; the daemon's supervisor decides *when* (READY=1 once camera, GPIO
and journal are up; WATCHDOG=1 only while the scan loop makes progress).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"

STATUS_MAX = 200
"""Characters of a STATUS= text kept: systemctl status shows one short line."""

Notify = Callable[[str], object]
"""Sends one notification message (``"READY=1\\nSTATUS=..."``); raises OSError on failure."""


def _sd_notify(message: str) -> object:
    # imported here: `import drivers.systemd` stays cheap and the daemon's start pays for
    # libsystemd only when it notifies
    daemon: Any = importlib.import_module("systemd.daemon")
    # unset_environment=False: the variables stay for a later message (and for child tools)
    return daemon.notify(message, unset_environment=False)


def one_line(text: str, limit: int = STATUS_MAX) -> str:
    """``text`` as one printable line of at most ``limit`` characters: newlines would start a
    new ``KEY=value`` assignment in the notify protocol, so every control character becomes a
    space; runs of blanks shrink to one."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    line = " ".join(cleaned.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class ServiceNotifier:
    """Notifications to the service manager.

    ``enabled``: ``NOTIFY_SOCKET`` was set (otherwise every method does nothing).
    ``watchdog_interval_s``: the service's ``WatchdogSec`` in seconds, or None when systemd
    expects no watchdog pings from this process. ``notify``: the sender (default
    ``systemd.daemon.notify``, which reads ``NOTIFY_SOCKET`` from the process environment).

    The methods return nothing and never raise: a failed send (the socket went away, systemd
    restarting) is logged once, as a warning, and counted in ``failures``; ``sent`` counts the
    messages that went out. Thread-safe.
    """

    def __init__(
        self,
        *,
        enabled: bool,
        watchdog_interval_s: float | None = None,
        notify: Notify = _sd_notify,
    ) -> None:
        self.enabled = enabled
        self.watchdog_interval_s = watchdog_interval_s if enabled else None
        self._notify = notify
        self._lock = threading.Lock()
        self.failures = 0
        self.sent = 0

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] = os.environ,
        *,
        pid: int | None = None,
        notify: Notify = _sd_notify,
    ) -> ServiceNotifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from ``environ``.

        ``WATCHDOG_USEC``: microseconds (``2000000`` → 2.0 s); ignored when ``WATCHDOG_PID`` is
        set to another process than ``pid`` (default: this one), or when not a positive
        integer (logged). ``environ`` should be the process environment: the default sender
        reads the socket path from there.
        """
        enabled = bool(environ.get(NOTIFY_SOCKET))
        return cls(
            enabled=enabled,
            watchdog_interval_s=_watchdog_interval(environ, os.getpid() if pid is None else pid),
            notify=notify,
        )

    def ready(self, status: str) -> None:
        """Tell systemd the service is up (READY=1) with a STATUS= line for people."""
        self._send(f"READY=1\nSTATUS={one_line(status)}")

    def status(self, text: str) -> None:
        """Update the STATUS= line ``systemctl status`` shows."""
        self._send(f"STATUS={one_line(text)}")

    def watchdog(self) -> None:
        """One keep-alive ping (WATCHDOG=1). Call it at least every half ``watchdog_interval_s``
        and only while the work it vouches for progresses."""
        self._send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more before systemd's start (or stop) timeout gives up
        (EXTEND_TIMEOUT_USEC=): for a start that waits on a busy camera. Values below one
        microsecond are sent as 1 us."""
        usec = max(1, round(seconds * 1_000_000))
        self._send(f"EXTEND_TIMEOUT_USEC={usec}")

    def stopping(self, status: str = "stopping") -> None:
        """Tell systemd the service is shutting down (STOPPING=1) and why."""
        self._send(f"STOPPING=1\nSTATUS={one_line(status)}")

    def reloading(self, status: str = "reloading") -> None:
        """Tell systemd the service reloads its configuration (RELOADING=1); send ``ready``
        when done."""
        self._send(f"RELOADING=1\nSTATUS={one_line(status)}")

    def _send(self, message: str) -> bool:
        """True when the message went out; False when disabled or the send failed (counted in
        ``failures``)."""
        if not self.enabled:
            return False
        try:
            ok = bool(self._notify(message))
        except Exception as exc:  # OSError mostly; never let a notification stop the reader
            ok = False
            error: str | None = f"{type(exc).__name__}: {exc}"
        else:
            error = None if ok else "NOTIFY_SOCKET is not set in the process environment"
        with self._lock:
            if ok:
                self.sent += 1
                return True
            self.failures += 1
            first = self.failures == 1
        if first:
            log.warning(
                "cannot notify systemd (%s); the reader goes on, but without notifications "
                "systemd may take it for hung and restart it (further failures not logged)",
                error,
            )
        return False

    def __repr__(self) -> str:
        return (
            f"<ServiceNotifier enabled={self.enabled} watchdog_s={self.watchdog_interval_s} "
            f"sent={self.sent} failures={self.failures}>"
        )


def _watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    raw = environ.get(WATCHDOG_USEC)
    if not raw:
        return None
    owner = environ.get(WATCHDOG_PID)
    if owner:
        try:
            if int(owner) != pid:
                return None  # the watchdog is another process's (we were started by it)
        except ValueError:
            log.warning("ignoring the systemd watchdog: WATCHDOG_PID=%r is not a pid", owner)
            return None
    try:
        usec = int(raw)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("ignoring the systemd watchdog: WATCHDOG_USEC=%r is not a positive number", raw)
        return None
    return usec / 1_000_000
