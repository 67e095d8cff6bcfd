"""The health gate: restart the reader service on the new release and decide whether it works.

The service is reached through a seam, :class:`ServiceSupervisor`: :class:`SystemdSupervisor`
in production (``systemctl restart`` and ``systemctl show``), :class:`SubprocessSupervisor` in
tests and on a bench (the release's real entry point as a child process, with a real
``NOTIFY_SOCKET`` it listens on, as systemd would).

Healthy (:func:`wait_healthy`) means, within a deadline: the daemon sent READY=1 (camera,
GPIO and journal up), it is still running, it sent at least ``min_pings`` WATCHDOG=1 since
READY (the daemon pings only while frames flow and the scan loop turns:
``firmware/supervisor.py``), and, when the reader uses a broker, its STATUS= line says
``MQTT connected`` (``firmware.daemon.describe`` writes ``MQTT <state>``: a contract).

The restart waits for a door-idle moment (:func:`wait_door_idle`): no relay pulse in progress
and no scan in the last few seconds, read from the activity file the daemon keeps
(:class:`ActivityFile`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ota.exceptions import UnhealthyError
from provisioning.files import NotRegularFileError, read_regular

log = logging.getLogger(__name__)

BROKER_CONNECTED = "MQTT connected"
"""What the daemon's STATUS= line holds while its broker link is up (firmware.daemon)."""

ACTIVITY_CAP = 4096
"""Largest activity file read, bytes."""

_NS = 1_000_000_000
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Probe:
    """The service as seen now, since the last :meth:`ServiceSupervisor.restart`.

    ``ready``: READY=1 came; ``status``: the last STATUS= text ("" when none);
    ``watchdog_pings``: WATCHDOG=1 seen after READY; ``running``: the process is alive;
    ``exit_code``: its exit status once it ended (negative: killed by that signal), else
    None; ``restarts``: times the service manager restarted it on its own since then (a
    crash loop: ``Restart=on-failure``)."""

    ready: bool
    status: str
    watchdog_pings: int
    running: bool
    exit_code: int | None
    restarts: int


class ServiceSupervisor(Protocol):
    """The reader service, as the updater restarts and watches it."""

    def restart(self) -> None:
        """Stop the running process (if any) and start the release ``current`` points to
        now; the probe's counts start again from zero. Raises OSError when it cannot."""
        ...

    def probe(self) -> Probe:
        """The service's state now (cheap: called every fraction of a second)."""
        ...


# loaded in the parent: the child between fork and exec only calls it
_LIBC = ctypes.CDLL(None, use_errno=True)


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class SubprocessSupervisor:
    """The service as a child process: the test and bench stand-in for systemd.

    ``command()`` gives the argv to start (called at each restart, so it follows ``current``:
    e.g. ``lambda: [root / "current/bin/qrgate", "run", "--config", cfg]``). ``env``: the
    child's environment (default: this process's) to which ``NOTIFY_SOCKET`` and
    ``WATCHDOG_USEC`` (``watchdog_s``) are added and ``WATCHDOG_PID`` removed. ``notify_dir``:
    where the notification socket is bound (a short path: AF_UNIX allows 107 bytes) and the
    child's output goes (``service.log``, appended). ``stop_timeout_s``: SIGTERM, then SIGKILL
    after this many seconds.

    Like systemd with ``NotifyAccess=main``, only datagrams from the child's pid count
    (SO_PASSCRED), so a late message from the old process cannot make the new one look
    ready. The child runs in its own session and gets SIGKILL when the thread that started
    it ends (PR_SET_PDEATHSIG: a killed updater leaves no stray reader behind); call
    :meth:`restart` from a thread that lives as long as the service should. :meth:`close`
    stops the child and the listener thread; idempotent."""

    def __init__(
        self,
        command: Callable[[], Sequence[str | Path]],
        *,
        notify_dir: Path,
        env: Mapping[str, str] | None = None,
        watchdog_s: float = 2.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.command = command
        self.env = dict(os.environ if env is None else env)
        self.watchdog_s = watchdog_s
        self.stop_timeout_s = stop_timeout_s
        self.notify_path = notify_dir / f"notify-{secrets.token_hex(4)}"
        self.log_path = notify_dir / "service.log"
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._status = ""
        self._pings = 0
        self.messages = 0
        """Datagrams accepted from the child since start (tests wait on it)."""
        self._closed = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._sock.bind(str(self.notify_path))
            self._sock.settimeout(0.1)
        except BaseException:
            self._sock.close()
            raise
        self._thread = threading.Thread(target=self._listen, name="ota-notify", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        creds = socket.CMSG_SPACE(struct.calcsize("iII"))
        while not self._closed.is_set():
            try:
                data, anc, _flags, _addr = self._sock.recvmsg(4096, creds)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = None
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", value[: struct.calcsize("iII")])[0]
            self._handle(pid, data)

    def _handle(self, pid: int | None, data: bytes) -> None:
        with self._lock:
            if self._proc is None or pid != self._proc.pid:
                return
            self.messages += 1
            for line in data.decode(errors="replace").splitlines():
                key, _, value = line.partition("=")
                if key == "READY" and value == "1":
                    self._ready = True
                elif key == "STATUS":
                    self._status = value
                elif key == "WATCHDOG" and value == "1" and self._ready:
                    self._pings += 1

    def restart(self) -> None:
        """Stop the old child (SIGTERM, then SIGKILL after ``stop_timeout_s``) and start
        ``command()``. Raises OSError when the command cannot be started."""
        self._stop_child()
        env = {
            **self.env,
            "NOTIFY_SOCKET": str(self.notify_path),
            "WATCHDOG_USEC": str(int(self.watchdog_s * 1_000_000)),
        }
        env.pop("WATCHDOG_PID", None)
        argv = [str(a) for a in self.command()]
        with self._lock:
            self._ready, self._status, self._pings = False, "", 0
            with self.log_path.open("ab") as out:
                self._proc = subprocess.Popen(
                    argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_set_pdeathsig,  # noqa: PLW1509 - only prctl, async-signal-safe
                )
        log.info("service started: pid %d: %s", self._proc.pid, " ".join(argv))

    def _stop_child(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("service pid %d ignored SIGTERM: killed", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    @property
    def pid(self) -> int | None:
        """The child's pid (None before the first restart)."""
        return None if self._proc is None else self._proc.pid

    def probe(self) -> Probe:
        """See :class:`Probe`; before the first :meth:`restart` nothing runs."""
        with self._lock:
            proc = self._proc
            code = None if proc is None else proc.poll()
            return Probe(
                ready=self._ready,
                status=self._status,
                watchdog_pings=self._pings,
                running=proc is not None and code is None,
                exit_code=code,
                restarts=0,
            )

    def close(self) -> None:
        """Stop the child and the listener; remove the socket. Idempotent."""
        self._stop_child()
        if not self._closed.is_set():
            self._closed.set()
            self._thread.join()
            self._sock.close()
            self.notify_path.unlink(missing_ok=True)


def parse_show(text: str) -> dict[str, str]:
    """``systemctl show`` output (``Key=Value`` lines) as a dict; the value is everything
    after the first ``=``."""
    props: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key] = value
    return props


SHOW_PROPERTIES = (
    "ActiveState",
    "SubState",
    "StatusText",
    "NRestarts",
    "ExecMainStatus",
    "ExecMainCode",
    "InvocationID",
    "WatchdogTimestampMonotonic",
)


class SystemdSupervisor:
    """The reader service under systemd (``Type=notify``, ``WatchdogSec=``).

    :meth:`restart` runs ``systemctl restart --no-block <unit>`` (queued: it returns at once)
    after noting the unit's ``InvocationID``; :meth:`probe` reads ``systemctl show`` and
    reports nothing as ready until the ``InvocationID`` changed (the queued restart happened:
    the old process is not mistaken for the new one). systemd does not count pings; it keeps
    the time of the last one (``WatchdogTimestampMonotonic``), so ``watchdog_pings`` counts the
    distinct values seen by successive probes since READY: probe more often than the pings
    come and it counts them. ``ready``: ``ActiveState=active`` (a notify service becomes
    active on READY=1); ``running``: not ``failed``, ``inactive`` or between automatic
    restarts; ``exit_code``: ``ExecMainStatus`` once it ended (negative for a signal);
    ``restarts``: ``NRestarts`` minus its value at :meth:`restart`.

    ``systemctl``: the command (a path or argv prefix); ``timeout_s``: for each call, seconds.
    Raises OSError when systemctl cannot run or fails."""

    def __init__(
        self,
        unit: str = "qrgate.service",
        *,
        systemctl: Sequence[str] = ("systemctl",),
        timeout_s: float = 30.0,
    ) -> None:
        self.unit = unit
        self.systemctl = list(systemctl)
        self.timeout_s = timeout_s
        self._old_invocation: str | None = None
        self._base_restarts = 0
        self._stamps: set[str] = set()

    def _run(self, *args: str) -> str:
        try:
            proc = subprocess.run(
                [*self.systemctl, *args],
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise OSError(f"systemctl {args[0]} timed out") from e
        if proc.returncode != 0:
            raise OSError(f"systemctl {args[0]} {self.unit}: {proc.stderr.strip()[-200:]}")
        return proc.stdout

    def _show(self) -> dict[str, str]:
        return parse_show(self._run("show", "-p", ",".join(SHOW_PROPERTIES), self.unit))

    def restart(self) -> None:
        """Queue a restart of the unit (see the class docstring). Raises OSError."""
        props = self._show()
        self._old_invocation = props.get("InvocationID", "")
        self._base_restarts = _int(props.get("NRestarts"))
        self._stamps = set()
        self._run("restart", "--no-block", self.unit)

    def probe(self) -> Probe:
        """See the class docstring. Raises OSError when systemctl fails."""
        props = self._show()
        active, sub = props.get("ActiveState", ""), props.get("SubState", "")
        if self._old_invocation is not None and props.get("InvocationID") == self._old_invocation:
            # the queued restart has not happened yet: the process seen is the old one
            return Probe(False, "", 0, True, None, 0)
        running = active not in ("failed", "inactive") and sub not in (
            "dead",
            "failed",
            "auto-restart",
            "exited",
        )
        ready = active == "active" and running
        stamp = props.get("WatchdogTimestampMonotonic", "0")
        if ready and stamp not in ("", "0"):
            self._stamps.add(stamp)
        code = None
        if not running:
            code = _int(props.get("ExecMainStatus"))
            if props.get("ExecMainCode") in ("2", "3"):  # CLD_KILLED, CLD_DUMPED: a signal
                code = -code
        return Probe(
            ready=ready,
            status=props.get("StatusText", ""),
            watchdog_pings=len(self._stamps),
            running=running,
            exit_code=code,
            restarts=max(0, _int(props.get("NRestarts")) - self._base_restarts),
        )


def _int(text: str | None) -> int:
    try:
        return int(text or "0")
    except ValueError:
        return 0


def wait_healthy(
    supervisor: ServiceSupervisor,
    *,
    deadline_s: float,
    min_pings: int = 3,
    need_broker: bool = True,
    poll_s: float = 0.2,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Probe:
    """Watch the just-restarted service until it is healthy (see the module docstring) and
    return that probe; give up after ``deadline_s`` seconds, probing every ``poll_s``.

    Raises UnhealthyError with reason ``exited_at_start`` at once when the process ended or
    the service manager restarted it (detail: exit code and last status); after the deadline
    ``not_ready`` (no READY=1), ``no_frames`` (ready, but fewer than ``min_pings`` pings:
    frames do not flow or the scan loop is stuck), or ``broker_not_connected`` (ready and
    pinging, but the STATUS= line lacks ``MQTT connected``; only with ``need_broker``)."""
    end = monotonic() + deadline_s
    while True:
        p = supervisor.probe()
        if not p.running or p.restarts > 0:
            code = "none" if p.exit_code is None else str(p.exit_code)
            raise UnhealthyError(
                "exited_at_start",
                f"exit code {code}, {p.restarts} restarts; status: {p.status or '-'}",
            )
        broker_ok = not need_broker or BROKER_CONNECTED in p.status
        if p.ready and p.watchdog_pings >= min_pings and broker_ok:
            return p
        if monotonic() >= end:
            if not p.ready:
                raise UnhealthyError("not_ready", f"no READY=1 in {deadline_s:.0f} s")
            if p.watchdog_pings < min_pings:
                raise UnhealthyError(
                    "no_frames",
                    f"{p.watchdog_pings} watchdog pings of {min_pings} in {deadline_s:.0f} s; "
                    f"status: {p.status or '-'}",
                )
            raise UnhealthyError("broker_not_connected", f"status: {p.status or '-'}")
        sleep(poll_s)


class DoorActivity(Protocol):
    """Whether a restart now would disturb someone at the door."""

    def busy(self) -> bool:
        """True while a relay pulse is in progress or a code was scanned recently."""
        ...


class ActivityFile:
    """The door's activity as the daemon records it in a JSON file at ``path``:
    ``{"last_scan_mono_ns": int | null, "relay_until_mono_ns": int | null}``, both
    CLOCK_MONOTONIC nanoseconds (one clock for every process of the machine).

    Busy while ``relay_until_mono_ns`` is in the future or the last scan is less than
    ``quiet_s`` seconds old. A missing file is idle (the daemon is not running, or an older
    release that writes none). An unreadable or damaged file is logged and read as idle: it
    must not hold every update back forever, and a restart at the wrong moment only ends a
    pulse early (the door locks: fail-secure)."""

    def __init__(
        self,
        path: Path,
        *,
        quiet_s: float = 5.0,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.path = path
        self.quiet_ns = int(quiet_s * _NS)
        self._now = monotonic_ns

    def busy(self) -> bool:
        """See the class docstring."""
        try:
            data, _mode = read_regular(self.path, ACTIVITY_CAP)
        except FileNotFoundError:
            return False
        except (OSError, NotRegularFileError) as e:
            log.warning("door activity unreadable (%s): taken as idle", e)
            return False
        try:
            obj = json.loads(data)
            scan, relay = obj["last_scan_mono_ns"], obj["relay_until_mono_ns"]
            for value in (scan, relay):
                if value is not None and type(value) is not int:
                    raise TypeError(f"{value!r} is not an integer or null")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("door activity file %s damaged (%s): taken as idle", self.path, e)
            return False
        now = self._now()
        if relay is not None and relay > now:
            return True
        return scan is not None and now - scan < self.quiet_ns


def wait_door_idle(
    activity: DoorActivity,
    *,
    poll_s: float = 0.5,
    on_busy: Callable[[], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Return once ``activity`` says idle, looking every ``poll_s`` seconds; returns how many
    looks found the door busy (0: idle at once).

    It never gives up: a door busy without pause keeps the update waiting (the running
    release stays, which is always safe); ``on_busy()`` is called once, the first time the
    door is found busy (the updater records the job as waiting for the door)."""
    busy_looks = 0
    while activity.busy():
        if busy_looks == 0 and on_busy is not None:
            on_busy()
        busy_looks += 1
        sleep(poll_s)
    return busy_looks
