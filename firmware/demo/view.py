"""What ``qrgate demo`` shows in the terminal: a header saying what runs where; while the
reader runs, one line per verdict with the LED, buzzer and relay state, and a status line
whenever the uplink's state, the journal's backlog or what the back office stored changes
(read by :class:`UplinkProbe`, printed by :class:`LiveView` on a thread of its own); at the
end, the summary table and the closing lines with the commands that read what was stored.
"""

from __future__ import annotations

import datetime as dt
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from firmware.backoffice.store import Store, open_store
from firmware.config import Config
from firmware.daemon import Reader
from firmware.demo.backoffice import BACKOFFICE_DB, BROKER_DIR, IngestProcess, qrgate_command
from firmware.demo.broker import HOST, LocalBroker
from firmware.demo.prepare import DEVICE, SITE
from firmware.exceptions import JournalError, QrgateError
from firmware.journal.outbox import OutboxReader
from firmware.pipeline import ScanReport

VIEW_POLL_S = 0.25
"""How often the live view looks at the uplink and the back office; a scan's round trip
(publish, store with fsync, ack) takes a few ms, so one status line per scan is the rule."""


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
            f"{t:6.2f}s #{r.frame.seq:<4} {verdict} {d.reason!s:<14} {d.kind or '-':<13} "
            f"{len(d.codes)} code"
            f"{'s' if len(d.codes) > 1 else ' '}  {self._states()}  "
            f"decode {r.decode_ms:4.2f} ms  {f2r}".rstrip(),
            highlight=False,
            soft_wrap=True,
        )


def print_header(
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
    """The lines before the first verdict: the door, camera source (``camera``, else ``reel``,
    else the generated reel in ``state``), ``fps``, decoder and journal from ``config``; then
    the broker and ``qrgate ingest`` when they run (None: not shown)."""
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
        "badge on the denylist; anything else is unknown. Passes: signed by the demo's "
        "issuer key (issuer.key, trusted in trust.json) for this door; an ID card is a "
        f"check-in ({config.reader.mode} mode). Ctrl-C stops.[/]",
        soft_wrap=True,
    )


def print_summary(
    console: Console, reader: Reader, final: UplinkSnapshot | None, broker: LocalBroker | None
) -> None:
    """The summary table: ``reader``'s counts and latencies, then, when ``final`` (the last
    :meth:`UplinkProbe.sample`) is not None, the uplink (to ``broker``'s URL when there is one),
    its backlog and what the back office stored and acknowledged."""
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


def print_closing(
    console: Console,
    *,
    config: Config,
    state: Path,
    started: dt.date,
    broker: LocalBroker | None,
    ingest: IngestProcess | None,
    final: UplinkSnapshot | None,
) -> None:
    """The lines after everything stopped: the stop order (with a broker), ``ingest``'s exit
    code when it failed, and the commands that read the journal (``config``), the back office's
    report (``state``'s database, since the day ``started``) and the fleet; without a broker,
    the backlog from ``final`` that waits for one."""
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
