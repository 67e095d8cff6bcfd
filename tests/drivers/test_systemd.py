"""ServiceNotifier against a real AF_UNIX datagram socket named by NOTIFY_SOCKET (what systemd
listens on), through the real systemd.daemon.notify."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.systemd import ServiceNotifier, one_line


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[socket.socket, Path]]:
    # a short folder: an AF_UNIX path is limited to 107 bytes, pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="qrgate-notify-") as d:
        path = Path(d) / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        try:
            yield sock, path
        finally:
            sock.close()


def _recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_reach_the_socket(notify_socket: tuple[socket.socket, Path]) -> None:
    sock, _ = notify_socket
    n = ServiceNotifier.from_env()
    assert n.enabled
    n.ready("reading: camera picamera2 640x480, relay locked")
    assert _recv(sock) == "READY=1\nSTATUS=reading: camera picamera2 640x480, relay locked"
    n.watchdog()
    assert _recv(sock) == "WATCHDOG=1"
    n.status("camera re-opened")
    assert _recv(sock) == "STATUS=camera re-opened"
    n.extend_timeout(7.5)
    assert _recv(sock) == "EXTEND_TIMEOUT_USEC=7500000"
    n.reloading()
    assert _recv(sock) == "RELOADING=1\nSTATUS=reloading"
    n.stopping("stopping: SIGTERM")
    assert _recv(sock) == "STOPPING=1\nSTATUS=stopping: SIGTERM"
    assert (n.sent, n.failures) == (6, 0)
    # sd_notify was asked to keep the variable: later messages still find the socket
    assert os.environ["NOTIFY_SOCKET"] == str(notify_socket[1])


def test_status_is_one_line(notify_socket: tuple[socket.socket, Path]) -> None:
    sock, _ = notify_socket
    n = ServiceNotifier.from_env()
    # a newline would smuggle a second assignment (READY=1 here) into the message
    n.status("camera: bad frame\nREADY=1\x1b[2J\tend")
    assert _recv(sock) == "STATUS=camera: bad frame READY=1 [2J end"
    assert one_line("x" * 300) == "x" * 199 + "…"


def test_watchdog_interval_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "2000000"}
    assert ServiceNotifier.from_env(env).watchdog_interval_s == 2.0
    env["WATCHDOG_PID"] = str(os.getpid())
    assert ServiceNotifier.from_env(env).watchdog_interval_s == 2.0
    # the watchdog belongs to another process (e.g. a wrapper that started this one)
    env["WATCHDOG_PID"] = str(os.getpid() + 1)
    assert ServiceNotifier.from_env(env).watchdog_interval_s is None
    assert ServiceNotifier.from_env(env, pid=os.getpid() + 1).watchdog_interval_s == 2.0
    assert ServiceNotifier.from_env({"NOTIFY_SOCKET": "/x"}).watchdog_interval_s is None
    for bad in ("0", "-5", "soon"):
        assert (
            ServiceNotifier.from_env(
                {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": bad}
            ).watchdog_interval_s
            is None
        )
    # no socket, no watchdog: nobody would receive the pings
    assert ServiceNotifier.from_env({"WATCHDOG_USEC": "2000000"}).watchdog_interval_s is None


def test_disabled_without_notify_socket(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = ServiceNotifier.from_env()
    assert not n.enabled and n.watchdog_interval_s is None
    with caplog.at_level(logging.DEBUG, logger="drivers.systemd"):
        n.ready("up")
        n.watchdog()
        n.stopping()
    assert (n.sent, n.failures) == (0, 0)
    assert caplog.records == []


def test_socket_gone_is_logged_once(
    notify_socket: tuple[socket.socket, Path], caplog: pytest.LogCaptureFixture
) -> None:
    sock, path = notify_socket
    n = ServiceNotifier.from_env()
    n.ready("up")
    assert _recv(sock) == "READY=1\nSTATUS=up"
    sock.close()
    path.unlink()
    with caplog.at_level(logging.WARNING, logger="drivers.systemd"):
        n.watchdog()
        n.watchdog()
        n.stopping()
    assert (n.sent, n.failures) == (1, 3)
    assert len(caplog.records) == 1
    assert "cannot notify systemd (FileNotFoundError" in caplog.records[0].getMessage()


def test_sender_errors_never_raise(caplog: pytest.LogCaptureFixture) -> None:
    def broken(message: str) -> object:
        raise RuntimeError("libsystemd gone")

    n = ServiceNotifier(enabled=True, watchdog_interval_s=10.0, notify=broken)
    with caplog.at_level(logging.WARNING, logger="drivers.systemd"):
        n.watchdog()
    assert (n.sent, n.failures) == (0, 1)
    assert "RuntimeError: libsystemd gone" in caplog.text
