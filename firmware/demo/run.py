"""``qrgate demo``: the real daemon on an embedded default, with a live terminal view, its MQTT
uplink and the reference back office.

Writes a site key, a badge list (the demo's allowed badge on the allowlist, its revoked badge
on the denylist), a config and, unless another reel or a webcam is given, a generated
camera-like reel into a state folder. Then it starts a private mosquitto on a free loopback
port (:class:`~firmware.demo.broker.LocalBroker`, its files in ``<state>/broker``) and the
real ``qrgate ingest`` as a process of its own, storing into ``<state>/backoffice.db``; runs
the same :func:`build_reader` as ``qrgate run`` on gpiozero mock pins with ``[uplink]``
pointed at that broker; and prints each verdict with the LED, buzzer and relay state, the
uplink's state and backlog, and what the back office stored and acknowledged. Without
mosquitto the reader runs offline and the view shows its backlog growing.

At the end (the reel is over, or Ctrl-C) it waits briefly for the back office to acknowledge
everything, prints a summary and the fleet table, stops the reader, then ``qrgate ingest``,
then mosquitto, and prints the commands that read what was stored.
"""

from __future__ import annotations

import datetime as dt
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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from drivers.exceptions import DriverError
from firmware.backoffice.ingest import DEFAULT_GROUP
from firmware.backoffice.mqtt import MqttSettings
from firmware.backoffice.store import Store, open_store
from firmware.config import Config, load_config
from firmware.daemon import Reader, build_reader
from firmware.demo.broker import HOST, LocalBroker, find_mosquitto, free_port
from firmware.demo.reel import ALLOWED_BADGE, REVOKED_BADGE, write_demo_reel
from firmware.exceptions import BrokerError, JournalError, QrgateError
from firmware.journal.outbox import OutboxReader
from firmware.journal.reader import JournalReader
from firmware.pipeline import ScanReport
from firmware.policy.badges import BadgeList, write_badges
from firmware.policy.subjects import SubjectHasher, load_key
from firmware.uplink.topics import ALL_EVENTS, Topics, dumps, loads

REEL_VERSION = "1"
SITE = "demo"
# A fixed device id instead of the machine's: the demo's broker is private, and a fixed name
# keeps the back office's rows, the fleet table and the printed commands the same every run.
DEVICE = "demo-reader"
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
VIEW_POLL_S = 0.25
"""How often the live view looks at the uplink and the back office; a scan's round trip
(publish, store with fsync, ack) takes a few ms, so one status line per scan is the rule."""
FLEET_SETTLE_S = 2.0
STATUS_WAIT_S = 5.0
"""How long the reader may take to answer the demo's ``report_status`` command."""


def _ensure_key(path: Path) -> bytes:
    if not path.exists():
        path.write_text(secrets.token_hex(32) + "\n")
        path.chmod(0o600)
    return load_key(path)


def _ensure_reel(folder: Path) -> None:
    marker = folder / ".reel-version"
    if marker.exists() and marker.read_text() == REEL_VERSION:
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_demo_reel(folder, width=640, height=480, fps=30)
    marker.write_text(REEL_VERSION)


def prepare(
    state: Path,
    *,
    reel: Path | None,
    camera: str | None,
    fps: float,
    uplink_port: int | None = None,
) -> Path:
    """Write the demo's key, badges, reel and config into ``state``; return the config path.

    ``uplink_port``: the loopback port of the demo's broker for ``[uplink]`` (None: no
    uplink section)."""
    state.mkdir(parents=True, exist_ok=True)
    hasher = SubjectHasher(_ensure_key(state / "site.key"))
    write_badges(
        state / "badges.json",
        BadgeList(
            frozenset({hasher.subject(ALLOWED_BADGE)}),
            frozenset({hasher.subject(REVOKED_BADGE)}),
            {hasher.subject(ALLOWED_BADGE): "alice (demo)"},
            1,
        ),
    )
    if camera:
        cam = f'source = "v4l2"\ndevice = "{camera}"\nfps = {fps}'
    else:
        if reel is None:
            reel = state / "reel"
            _ensure_reel(reel)
        cam = f'source = "replay"\npath = "{reel.resolve()}"\nfps = {fps}'
    uplink = ""
    if uplink_port is not None:
        uplink = f"""
[uplink]
# the demo's private mosquitto; when there is none, nothing listens on this port and the
# journal's backlog grows until a broker is there
enabled = true
host = "{HOST}"
port = {uplink_port}
transport = "tcp"
site = "{SITE}"
"""
    config = state / "qrgate.toml"
    config.write_text(f"""# written by `qrgate demo`
[reader]
door = "demo-door"
direction = "in"
state_dir = "."

[camera]
{cam}

[decoder]
backend = "zxing-cpp"

[policy]
badges = "badges.json"
hmac_key = "site.key"
# shorter than a real door's 5 s so each presentation in the 15 s reel counts
repeat_window_s = 1.5

[gpio]
pin_factory = "mock"
pulse_s = 1.0
{uplink}""")
    return config


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


@dataclass(frozen=True, slots=True)
class UplinkSnapshot:
    """What the live view shows about the uplink. ``link``: "connected" or "offline (why)";
    ``backlog``: journal rows not yet sent (None: unreadable); ``stored``/``ack_seq``: the
    back office's event rows and acknowledged seq for the demo reader (None: no back office
    or nothing stored yet); ``acked_through``: the ack the reader has received; ``sent``:
    events the broker took this run."""

    link: str
    backlog: int | None
    stored: int | None
    ack_seq: int | None
    acked_through: int
    sent: int

    def line(self) -> str:
        text = f"uplink {self.link:<18} backlog {_num(self.backlog)}"
        if self.stored is not None:
            events = "event" if self.stored == 1 else "events"
            text += f"  back office: {self.stored} {events} stored, ack seq {self.ack_seq}"
        return text

    def shown(self) -> tuple[object, ...]:
        """The part a status line shows: a new line only when it changes."""
        return (self.link, self.backlog, self.stored, self.ack_seq)


class UplinkProbe:
    """Reads, for the view: the link state from the reader's uplink, the backlog from the
    journal (its own read-only connection), the stored count and ack seq from the back
    office's store (opened once ``qrgate ingest`` has created it, and only read). One thread at a
    time; a thread that is done with it calls :meth:`close` (SQLite connections are bound to
    the thread that opened them), and the next :meth:`sample` opens them again."""

    def __init__(self, reader_ref: list[Reader], journal: Path, store: Path | None) -> None:
        self._reader_ref = reader_ref
        self._outbox = OutboxReader(journal)
        self._store_path = store
        self._store: Store | None = None

    def sample(self) -> UplinkSnapshot | None:
        """None before the reader exists or when it has no uplink."""
        if not self._reader_ref or self._reader_ref[0].uplink is None:
            return None
        stats: dict[str, Any] = self._reader_ref[0].uplink.stats()
        link = stats["link"]
        state = "connected" if link["state"] == "connected" else f"offline ({link['problem']})"
        if link["state"] != "connected" and link["problem"] is None:
            state = "connecting"
        try:
            backlog: int | None = self._outbox.backlog()
        except JournalError:
            backlog = None  # the journal is not open yet
        stored, ack = self._back_office()
        fwd = stats["forwarder"]
        return UplinkSnapshot(state, backlog, stored, ack, fwd["acked_through"], fwd["events"])

    def _back_office(self) -> tuple[int | None, int | None]:
        if self._store_path is None:
            return None, None
        try:
            if self._store is None:
                self._store = open_store(self._store_path, create=False)
            for d in self._store.devices():
                if d.device == DEVICE:
                    return d.events, d.ack_seq
        except QrgateError:
            pass  # not created yet, or busy: look again at the next poll
        return None, None

    def close(self) -> None:
        self._outbox.close()
        if self._store is not None:
            self._store.close()
            self._store = None


class LiveView:
    """Prints each verdict from a queue on its own thread, so the scan thread never waits on
    the terminal; between verdicts, a status line whenever the uplink or the back office
    changes."""

    def __init__(self, console: Console, reader_ref: list[Reader], probe: UplinkProbe) -> None:
        self.console = console
        self._reader_ref = reader_ref
        self._probe = probe
        self._q: queue.Queue[ScanReport | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="qrgate-demo-view", daemon=True)
        self._t0 = time.monotonic_ns()

    def start(self) -> None:
        self._t0 = time.monotonic_ns()
        self._thread.start()

    def on_scan(self, report: ScanReport) -> None:
        self._q.put(report)

    def close(self) -> None:
        """Print what is queued and stop the thread; idempotent."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join(5)

    def _states(self) -> str:
        fb: Any = self._reader_ref[0].feedback
        relay = "[bold green]UNLOCKED[/]" if fb.relay.is_unlocked else "locked"
        buzzer = "sounding" if fb.beeper is not None and fb.beeper.is_playing else "silent"
        return f"LED {fb.light.color:<5} buzzer {buzzer:<8} relay {relay:<8}"

    def _run(self) -> None:
        shown: tuple[object, ...] | None = None
        next_poll = time.monotonic()
        while True:
            try:
                r = self._q.get(timeout=max(0.0, next_poll - time.monotonic()))
            except queue.Empty:
                next_poll = time.monotonic() + VIEW_POLL_S
                snap = self._probe.sample()
                if snap is not None and snap.shown() != shown:
                    shown = snap.shown()
                    t = (time.monotonic_ns() - self._t0) / 1e9
                    self.console.print(
                        f"[dim]{t:6.2f}s       {escape(snap.line())}[/]",
                        highlight=False,
                        soft_wrap=True,
                    )
                continue
            if r is None:
                # the journal's read-only connection belongs to the thread that opened it;
                # the probe opens a new one when the main thread samples the final state
                self._probe.close()
                return
            self._scan_line(r)

    def _scan_line(self, r: ScanReport) -> None:
        time.sleep(0.005)  # let the background LED/buzzer patterns start before sampling
        d = r.decision
        t = (r.frame.t_ns - self._t0) / 1e9
        verdict = "[bold green]GRANTED[/]" if d.granted else "[bold red]DENIED [/]"
        f2r = (
            f"frame→relay {r.frame_to_relay_ms:5.2f} ms" if r.frame_to_relay_ms is not None else ""
        )
        self.console.print(
            f"{t:6.2f}s #{r.frame.seq:<4} {verdict} {d.reason!s:<14} {len(d.codes)} code"
            f"{'s' if len(d.codes) > 1 else ' '}  {self._states()}  "
            f"decode {r.decode_ms:4.2f} ms  {f2r}".rstrip(),
            highlight=False,
            soft_wrap=True,
        )


class _Stopper:
    """SIGINT, SIGTERM and SIGHUP (the terminal closing) ask for a clean stop: the reader's
    stop event once it exists, and ``interrupted`` for the waits before and after it runs.
    The previous handlers come back with :meth:`restore`."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.interrupted = threading.Event()
        self.count = 0
        self.reader: Reader | None = None
        self._old = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.interrupted.set()
        if self.reader is not None:
            self.reader.stop_event.set()

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _start_broker(
    console: Console, state: Path, mosquitto: str | None, stack: ExitStack
) -> LocalBroker | None:
    """The demo's private mosquitto, running (stopped by ``stack``), or None after one line
    that says why there is none and how to get one."""
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


def _start_ingest(
    console: Console, state: Path, broker: LocalBroker, stopper: _Stopper, stack: ExitStack
) -> IngestProcess | None:
    """``qrgate ingest`` on ``broker``, subscribed (so no event is published to a shared
    subscription without a member, which mosquitto drops), stopped by ``stack``; None after
    a line saying why not."""
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


def _drain(reader: Reader, journal: Path, stopper: _Stopper) -> tuple[int, int]:
    """Wait (at most ``DRAIN_TIMEOUT_S``; a further Ctrl-C ends it) until the back office has
    acknowledged the journal's last row to the reader; (acked through, last seq).

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
        time.sleep(0.05)


def _fleet(console: Console, broker: LocalBroker) -> None:
    """The table ``qrgate fleet status`` prints, while the broker and the reader still run,
    after asking the reader for a fresh status."""
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


def run_demo(
    state: Path,
    *,
    reel: Path | None = None,
    camera: str | None = None,
    fps: float = 30.0,
    mosquitto: str | None = None,
) -> int:
    """Run the demo; returns the process exit code. ``mosquitto``: the broker executable
    (None: on PATH or Debian's /usr/sbin/mosquitto; a path that is not there runs the demo
    without a broker)."""
    console = Console()
    started = dt.date.today()
    with ExitStack() as stack:
        stopper = _Stopper()
        stack.callback(stopper.restore)
        try:
            state.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            console.print(f"[red]qrgate demo: cannot create {state}: {escape(str(e))}[/]")
            return 2
        broker = _start_broker(console, state, mosquitto, stack)
        ingest = _start_ingest(console, state, broker, stopper, stack) if broker else None
        if stopper.interrupted.is_set():
            return 0
        # Without a broker the uplink still runs, pointed at a port nothing listens on: the
        # view then shows what a reader does when its broker is away (backlog grows).
        port = broker.port if broker is not None else free_port()
        try:
            config = load_config(
                prepare(state, reel=reel, camera=camera, fps=fps, uplink_port=port)
            )
            ref: list[Reader] = []
            probe = UplinkProbe(
                ref, config.journal_path, state / BACKOFFICE_DB if ingest is not None else None
            )
            view = LiveView(console, ref, probe)
            reader = build_reader(config, listeners=[view.on_scan], device_id=DEVICE)
        except QrgateError as e:
            console.print(f"[red]qrgate demo: {escape(str(e))}[/]")
            return 2
        # Undone in reverse: the view prints what is still queued, the probe lets go of the
        # journal (so the journal's own close is the last one and folds its WAL back in), then
        # the reader stops.
        stack.callback(reader.stop)
        stack.callback(probe.close)
        stack.callback(view.close)
        ref.append(reader)
        stopper.reader = reader
        if stopper.interrupted.is_set():
            reader.stop_event.set()
        _header(
            console,
            config=config,
            state=state,
            reel=reel,
            camera=camera,
            fps=fps,
            broker=broker,
            ingest=ingest,
        )
        view.start()
        try:
            reader.start()
        except (QrgateError, DriverError) as e:
            # a webcam that is not there, a journal it cannot open: one line, not a traceback
            console.print(f"[red]qrgate demo: cannot start: {escape(str(e))}[/]")
            return 3
        while not reader.wait(0.5):
            pass
        drained = None
        if broker is not None and ingest is not None and reader.uplink is not None:
            drained = _drain(reader, config.journal_path, stopper)
        view.close()
        final = probe.sample()
        _summary(console, reader, final, broker)
        if drained is not None and drained[0] < drained[1]:
            console.print(
                f"[yellow]the back office has acknowledged seq {drained[0]} of "
                f"{drained[1]} so far; the rest goes out on the next run.[/]",
                highlight=False,
            )
        if broker is not None:
            console.print(
                f"fleet status (what `qrgate fleet status --broker {HOST}:{broker.port}` "
                "shows while the demo's broker runs):",
                soft_wrap=True,
                highlight=False,
            )
            _fleet(console, broker)
        exit_code = reader.exit_code
    # the ExitStack stopped the reader (offline status, DISCONNECT), then qrgate ingest,
    # then mosquitto
    _closing(
        console,
        config=config,
        state=state,
        started=started,
        broker=broker,
        ingest=ingest,
        final=final,
    )
    return exit_code


def _header(
    console: Console,
    *,
    config: Config,
    state: Path,
    reel: Path | None,
    camera: str | None,
    fps: float,
    broker: LocalBroker | None,
    ingest: IngestProcess | None,
) -> None:
    source = camera or (reel or state / "reel")
    console.print(
        f"[bold]qrgate demo[/]: door {config.reader.door!r}, camera "
        f"{config.camera.source} ({source}) at {fps:g} fps, decoder "
        f"{config.decoder.backend}, gpiozero mock pins, journal {_rel(config.journal_path)}",
        soft_wrap=True,
        highlight=False,
    )
    if broker is not None:
        console.print(
            f"broker: a private mosquitto on {broker.url} (files in {state / BROKER_DIR}); "
            f"uplink: site {SITE!r}, device {DEVICE!r}",
            soft_wrap=True,
            highlight=False,
        )
    if ingest is not None:
        console.print(
            f"back office: {escape(ingest.shown)}  (log {ingest.log})",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        "[dim]badges: the demo's allowed badge is on the allowlist, its revoked "
        "badge on the denylist; anything else is unknown. Ctrl-C stops.[/]",
        soft_wrap=True,
    )


def _summary(
    console: Console, reader: Reader, final: UplinkSnapshot | None, broker: LocalBroker | None
) -> None:
    s = reader.summary()
    table = Table(title="summary", show_header=False)
    rows: list[tuple[str, object]] = [
        ("frames", s["frames"]),
        ("decoded frames", s["decoded_frames"]),
        ("idle frames skipped", s["skipped_idle"]),
        ("frames dropped (stale)", s["dropped"]),
        ("codes decoded", s["decodes"]),
        ("scans decided", s["decisions"]),
        ("granted", s["granted"]),
        ("denied", s["denied"]),
        ("repeats suppressed", s["suppressed_repeats"]),
        ("frame→relay p50", _ms(s["frame_to_relay_ms_p50"])),
        ("frame→relay p99", _ms(s["frame_to_relay_ms_p99"])),
        ("decode p50", _ms(s["decode_ms_p50"])),
    ]
    if final is not None:
        rows += [
            ("uplink", f"{final.link}" + (f" to {broker.url}" if broker is not None else "")),
            ("events sent this run", final.sent),
            ("backlog (unsent rows)", _num(final.backlog)),
        ]
        if final.stored is not None:
            rows += [
                ("back office: events stored", final.stored),
                ("back office: ack seq", final.ack_seq),
                ("reader: acked through seq", final.acked_through),
            ]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)


def _closing(
    console: Console,
    *,
    config: Config,
    state: Path,
    started: dt.date,
    broker: LocalBroker | None,
    ingest: IngestProcess | None,
    final: UplinkSnapshot | None,
) -> None:
    prefix = qrgate_command()[1]
    if broker is not None:
        console.print(
            "[dim]stopped the reader (offline status sent), then qrgate ingest, then mosquitto.[/]",
            highlight=False,
        )
    if ingest is not None and ingest.returncode not in (0, None):
        console.print(
            f"[yellow]qrgate ingest exited with code {ingest.returncode} (log {ingest.log})[/]",
            soft_wrap=True,
            highlight=False,
        )
    journal = _rel(config.journal_path)
    console.print(
        f"journal: {journal}  (try: {prefix} journal tail --db {journal})",
        highlight=False,
        soft_wrap=True,
    )
    if ingest is not None:
        db = state / BACKOFFICE_DB
        console.print(
            f"report:  {prefix} report --db {db} --since {started.isoformat()} --by hour",
            highlight=False,
            soft_wrap=True,
        )
    if broker is not None:
        console.print(
            f"fleet:   {prefix} fleet status --broker {HOST}:{broker.port}  (answers only while "
            "a broker runs: the demo's has stopped; the table above is what it showed)",
            highlight=False,
            soft_wrap=True,
        )
    elif final is not None:
        console.print(
            f"[yellow]backlog: {_num(final.backlog)} rows wait in {journal} for a broker; "
            "once mosquitto is installed (`sudo apt install mosquitto`) the next `make demo` "
            "sends them to the back office.[/]",
            soft_wrap=True,
            highlight=False,
        )


def _rel(path: Path) -> Path:
    """``path`` relative to the working directory when it is below it: shorter, and what a
    person types in the printed commands from the same place."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def _num(v: int | None) -> str:
    return "-" if v is None else str(v)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} ms"
