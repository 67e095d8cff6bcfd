"""Tools for the person at a reader: ``qrgate camera check``, ``qrgate selftest``,
``qrgate relay off``. Each is a click command the CLI imports only when it is named.

The tools that touch the camera or GPIO take the daemon's instance lock first (field case
C12): while the reader service runs they refuse before opening any device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager

import click

from firmware.config import Config
from firmware.exceptions import InstanceLockedError
from firmware.lock import InstanceLock

SERVICE_RUNNING = "the reader service is running: stop it first with `sudo systemctl stop qrgate`"
"""What a tool says when the daemon holds the instance lock."""


@contextmanager
def maintenance_lock(config: Config, tool: str) -> Iterator[InstanceLock]:
    """Hold the instance lock (``reader.state_dir``/qrgate.lock) for the body.

    ``tool``: the command's name, for the messages. When the daemon (or another tool) holds
    it, or the state folder cannot be written, prints one line to stderr and exits 1 (raises
    ``SystemExit(1)``) before the caller touches any device.
    """
    lock = InstanceLock(config.reader.state_dir / "qrgate.lock")
    try:
        lock.acquire()
    except InstanceLockedError:
        click.echo(f"qrgate {tool}: {SERVICE_RUNNING}", err=True)
        raise SystemExit(1) from None
    except OSError as e:
        click.echo(
            f"qrgate {tool}: cannot take the instance lock {lock.path}: "
            f"{e.strerror or e}; run it as the qrgate user or with sudo",
            err=True,
        )
        raise SystemExit(1) from None
    if os.geteuid() == 0:
        # `sudo qrgate selftest` before the service's first start would leave a root-owned
        # lock file the daemon (user qrgate) cannot open: hand it to the state folder's owner
        with contextlib.suppress(OSError):
            st = lock.path.parent.stat()
            os.chown(lock.path, st.st_uid, st.st_gid)
    try:
        yield lock
    finally:
        lock.release()
