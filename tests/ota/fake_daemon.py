"""A stand-in reader daemon for the OTA tests, run as a script: it speaks the sd_notify
protocol over ``NOTIFY_SOCKET`` as ``qrgate run`` does (READY=1, STATUS=, WATCHDOG=1 every
quarter of ``WATCHDOG_USEC``, STOPPING=1 on SIGTERM).

``fake_daemon.py MODE [ARG]``; MODE:

- ``good``: ready, pinging, ``MQTT connected`` in its status line;
- ``crash``: exits with code 3 at start;
- ``never_ready``: starts, never sends READY=1;
- ``no_pings``: ready, no watchdog pings (frames do not flow);
- ``no_broker``: ready and pinging, but ``MQTT connecting``;
- ``wait_file``: sends ``STATUS=hello`` once the file ARG exists, nothing else;
- ``stubborn``: like ``good`` but ignores SIGTERM (only SIGKILL ends it).

It also writes its version (the ``QRGATE_FAKE_VERSION`` variable, else ``?``) and pid to the
file named by ``QRGATE_FAKE_RUNNING`` when set, so a test sees which release runs.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path


def main() -> int:
    mode = sys.argv[1]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    addr = os.environ["NOTIFY_SOCKET"]
    stop = threading.Event()
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def send(message: str) -> None:
        sock.sendto(message.encode(), addr)

    running = os.environ.get("QRGATE_FAKE_RUNNING")
    if running:
        version = os.environ.get("QRGATE_FAKE_VERSION", "?")
        Path(running).write_text(f"{version} {os.getpid()}\n")
    if mode == "crash":
        send("STATUS=starting")
        return 3
    if mode == "wait_file":
        flag = Path(sys.argv[2])
        while not flag.exists() and not stop.wait(0.01):
            pass
        send("STATUS=hello")
        stop.wait()
        return 0
    send("STATUS=starting")
    if mode == "never_ready":
        stop.wait()
        return 0
    broker = "connecting" if mode == "no_broker" else "connected"
    send(f"READY=1\nSTATUS=door test-door: camera ok; 0 scans; MQTT {broker}")
    interval = int(os.environ["WATCHDOG_USEC"]) / 4e6
    while not stop.wait(interval):
        if mode != "no_pings":
            send("WATCHDOG=1")
    send("STOPPING=1\nSTATUS=stopping: door locked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
