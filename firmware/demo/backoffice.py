"""The demo's back office side, as processes of their own: a private mosquitto on a free
loopback port (its files in ``<state>/broker``) and the real ``qrgate ingest`` storing into
``<state>/backoffice.db``, each started only once it is ready (the broker listening,
``qrgate ingest`` subscribed) and stopped by the caller's ExitStack; at the end, the wait for
the back office to acknowledge the journal's last row, and the ``qrgate fleet status`` table
after asking the reader for a fresh status.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
import weakref
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from firmware.backoffice.ingest import DEFAULT_GROUP
from firmware.backoffice.mqtt import MqttSettings
from firmware.daemon import Reader
from firmware.demo.broker import HOST, LocalBroker, find_mosquitto
from firmware.demo.prepare import DEVICE, SITE
from firmware.demo.signals import Stopper
from firmware.exceptions import BrokerError, JournalError, QrgateError
from firmware.journal.reader import JournalReader
from firmware.uplink.topics import ALL_EVENTS, Topics, dumps, loads

BROKER_DIR = "broker"
BACKOFFICE_DB = "backoffice.db"
INGEST_LOG = "ingest.log"
# what `qrgate ingest` subscribes to with its default --group: the demo starts the reader
# only once the broker has it (see LocalBroker.logged_subscription)
INGEST_EVENTS_FILTER = f"$share/{DEFAULT_GROUP}/{ALL_EVENTS}"
INSTALL_HINT = (
    "install it with `sudo apt install mosquitto` (`make demo` does that itself when it runs "
    "as root or with password-less sudo)"
)
INGEST_UP_TIMEOUT_S = 20.0
"""How long ``qrgate ingest`` may take to start and subscribe (Python start-up on a Pi)."""
DRAIN_TIMEOUT_S = 10.0
"""At the end, how long to wait for the back office to acknowledge the journal's last row."""
STOP_TIMEOUT_S = 35.0
"""SIGTERM to ``qrgate ingest``, then SIGKILL after this: it finishes the message in hand and
may wait 30 s for its store."""
FLEET_SETTLE_S = 2.0
STATUS_WAIT_S = 5.0
"""How long the reader may take to answer the demo's ``report_status`` command."""


def qrgate_command() -> tuple[list[str], str]:
    """How to run ``qrgate`` from here: the argv prefix, and how to show it to a person.

    The console script beside this Python (the venv's ``qrgate``) when there is one, so what
    the demo runs is literally the command it prints; ``python -m firmware.cli`` otherwise."""
    script = Path(sys.executable).with_name("qrgate")
    if script.is_file() and os.access(script, os.X_OK):
        try:
            shown = str(script.relative_to(Path.cwd()))
        except ValueError:
            shown = str(script)
        return [str(script)], shown
    return [sys.executable, "-m", "firmware.cli"], "qrgate"


def _kill_and_reap(proc: subprocess.Popen[bytes]) -> None:
    # Safety net (weakref.finalize, also at interpreter exit): a demo that dies on an
    # unexpected error must not leave its back office running.
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class IngestProcess:
    """``qrgate ingest --broker ADDRESS --db DB`` in a process (and session) of its own, as a
    back office runs it; its log goes to ``log``. Ctrl-C in the demo's terminal does not reach
    it: :meth:`stop` ends it after the reader, so it stores the reader's last events."""

    def __init__(self, broker: str, db: Path, log: Path) -> None:
        prefix, shown = qrgate_command()
        args = ["ingest", "--broker", broker, "--db", str(db)]
        self.argv = [*prefix, *args]
        self.shown = shlex.join([shown, *args])
        self.log = log
        self._proc: subprocess.Popen[bytes] | None = None
        self._reaper: weakref.finalize[[subprocess.Popen[bytes]], IngestProcess] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def start(self) -> None:
        with self.log.open("wb") as out:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._reaper = weakref.finalize(self, _kill_and_reap, self._proc)

    def stop(self) -> int | None:
        """SIGTERM (it finishes the message in hand and disconnects), SIGKILL after
        ``STOP_TIMEOUT_S``; its exit code, None if it never started. Idempotent."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reaper is not None:
            self._reaper.detach()
            self._reaper = None
        return proc.returncode

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return " | ".join(line.strip() for line in text.splitlines()[-lines:])


def start_broker(
    console: Console, state: Path, mosquitto: str | None, stack: ExitStack
) -> LocalBroker | None:
    """The demo's private mosquitto, running (stopped by ``stack``), or None after one line
    that says why there is none and how to get one.

    ``mosquitto``: the broker executable (None: on PATH or Debian's /usr/sbin/mosquitto); its
    config, data and log go to ``state / BROKER_DIR``; ``console`` gets the line when there is
    no broker."""
    try:
        find_mosquitto(mosquitto)
    except BrokerError:
        what = f"no mosquitto at {mosquitto!r}" if mosquitto else "mosquitto is not installed"
        console.print(
            f"[yellow]no MQTT broker: {escape(what)}, so the reader runs offline and its "
            f"backlog grows; {escape(INSTALL_HINT)}.[/]",
            soft_wrap=True,
            highlight=False,
        )
        return None
    broker = LocalBroker(state / BROKER_DIR, binary=mosquitto)
    try:
        broker.start()
    except BrokerError as e:
        first = str(e).splitlines()[0]
        console.print(
            f"[yellow]no MQTT broker: the demo's mosquitto did not start ({escape(first)}; log "
            f"{broker.log_path}), so the reader runs offline and its backlog grows.[/]",
            soft_wrap=True,
            highlight=False,
        )
        return None
    stack.callback(broker.stop)
    return broker


def start_ingest(
    console: Console, state: Path, broker: LocalBroker, stopper: Stopper, stack: ExitStack
) -> IngestProcess | None:
    """``qrgate ingest`` on ``broker``, subscribed (so no event is published to a shared
    subscription without a member, which mosquitto drops), stopped by ``stack``; None after
    a line saying why not.

    It stores into ``state / BACKOFFICE_DB`` and logs to ``state / INGEST_LOG``; waits at most
    ``INGEST_UP_TIMEOUT_S`` for the subscription, and returns None at once (no line) when
    ``stopper`` has seen a signal meanwhile."""
    ingest = IngestProcess(f"{HOST}:{broker.port}", state / BACKOFFICE_DB, state / INGEST_LOG)
    since = broker.log_size
    ingest.start()
    stack.callback(ingest.stop)
    deadline = time.monotonic() + INGEST_UP_TIMEOUT_S
    while not broker.logged_subscription(INGEST_EVENTS_FILTER, since=since):
        if stopper.interrupted.is_set():
            return None
        problem = None
        if not ingest.running:
            problem = f"exited with code {ingest.returncode}: {ingest.log_tail()}"
        elif time.monotonic() >= deadline:
            problem = f"did not subscribe within {INGEST_UP_TIMEOUT_S:g} s"
        if problem is not None:
            ingest.stop()
            console.print(
                f"[yellow]back office: `{escape(ingest.shown)}` {escape(problem)} (log "
                f"{ingest.log}); the reader still sends to the broker.[/]",
                soft_wrap=True,
                highlight=False,
            )
            return None
        stopper.interrupted.wait(0.02)
    return ingest


def drain(reader: Reader, journal: Path, stopper: Stopper) -> tuple[int, int]:
    """Wait (at most ``DRAIN_TIMEOUT_S``; a further Ctrl-C ends it) until the back office has
    acknowledged the journal's last row to the reader; (acked through, last seq), (0, 0) when
    the journal cannot be read.

    ``reader``: a reader with an uplink; ``journal``: its journal's path; ``stopper``: a
    signal it counts after this call starts ends the wait.

    The last seq is read again on every look: after a Ctrl-C the scan thread may still be
    journaling the frame it had in hand."""
    assert reader.uplink is not None
    signals = stopper.count
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        try:
            newest = JournalReader(journal).tail(1)
        except JournalError:
            return 0, 0
        last = newest[0].seq if newest else 0
        acked = int(reader.uplink.stats()["forwarder"]["acked_through"])
        if acked >= last or stopper.count != signals or time.monotonic() >= deadline:
            return acked, last
        # woken by the uplink's progress (an ack moving); the short bound re-reads the last
        # seq and notices a Ctrl-C
        reader.uplink.wait(functools.partial(_acked_through, last), 0.25)


def print_fleet(console: Console, broker: LocalBroker) -> None:
    """Print to ``console`` the table ``qrgate fleet status`` prints for ``broker``, while the
    broker and the reader still run, after asking the reader for a fresh status; a yellow
    line instead when the broker does not answer."""
    from firmware.backoffice.fleet import collect_status, fleet_table
    from firmware.backoffice.report import local_zone

    settings = MqttSettings(HOST, broker.port)
    # paho logs "Client is not connected" at ERROR when a client's loop stops after its
    # DISCONNECT; harmless, and noise in the middle of the demo's output
    paho_log = logging.getLogger("qrgate.backoffice.paho")
    level = paho_log.level
    paho_log.setLevel(logging.CRITICAL)
    try:
        _ask_status(settings)
        snapshot = collect_status(settings, settle_s=FLEET_SETTLE_S)
    except QrgateError as e:
        console.print(f"[yellow]fleet status: {escape(str(e))}[/]")
        return
    finally:
        paho_log.setLevel(level)
    console.print(fleet_table(snapshot, local_zone()))


def _ask_status(settings: MqttSettings) -> bool:
    """Send the demo reader a ``report_status`` command and wait for its result; True if it
    came. The reader publishes its retained status at connect; without this the fleet table
    would show the backlog and last scan of that moment, not of the end of the demo. The
    reader publishes the fresh status before the result, and the broker keeps that order."""
    topics = Topics(SITE, DEVICE)
    request_id = secrets.token_hex(8)
    client = settings.client(f"qrgate-demo-{request_id}")
    connected, subscribed = threading.Event(), threading.Event()
    results: queue.Queue[bytes] = queue.Queue()
    client.on_connect = lambda _c, _u, _f, rc, _p: connected.set()
    client.on_subscribe = lambda _c, _u, _m, _rcs, _p: subscribed.set()
    client.on_message = lambda _c, _u, msg: results.put(bytes(msg.payload))
    try:
        client.connect(settings.host, settings.port, settings.keepalive_s)
    except OSError:
        return False
    client.loop_start()
    try:
        if not connected.wait(STATUS_WAIT_S):
            return False
        client.subscribe(topics.command_result("report_status"), qos=1)
        if not subscribed.wait(STATUS_WAIT_S):
            return False
        client.publish(topics.command("report_status"), dumps({"request_id": request_id}), qos=1)
        deadline = time.monotonic() + STATUS_WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                answer = loads(results.get(timeout=left))
            except queue.Empty:
                return False
            except QrgateError:
                continue  # not JSON: not our answer
            if answer.get("request_id") == request_id:
                return True
        return False
    finally:
        client.disconnect()
        client.loop_stop()


def _acked_through(seq: int, stats: dict[str, Any]) -> bool:
    return int(stats["forwarder"]["acked_through"]) >= seq
