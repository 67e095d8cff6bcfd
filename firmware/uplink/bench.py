"""Uplink figures for the benchmark (``make bench``): how fast the uplink drains a backlog next
to bare paho-mqtt on the same payloads, how much memory a real daemon takes while it drains a
small or a huge backlog, and how soon events flow again after the broker comes back.

Everything runs against a real mosquitto on loopback (:class:`firmware.demo.broker.LocalBroker`)
and real journals on disk; the caller provides the broker and a temporary folder.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from PIL import Image

from firmware import __version__
from firmware.demo.broker import LocalBroker
from firmware.exceptions import JournalError
from firmware.journal.bench import sample_event
from firmware.journal.events import StoredEvent
from firmware.journal.ids import uuid7
from firmware.journal.outbox import OutboxReader
from firmware.journal.store import EVENT_COLUMNS, Journal, row_params
from firmware.uplink.forwarder import DEFAULT_BATCH, DEFAULT_WINDOW, READ_AHEAD
from firmware.uplink.identity import client_id
from firmware.uplink.link import STABLE_S, LinkSettings
from firmware.uplink.service import Uplink, UplinkOptions
from firmware.uplink.status import Identity, ReaderState
from firmware.uplink.topics import Topics, dumps, event_json

SITE = "bench"
DEVICE = "bench-reader"
BACKLOG_BOOT_ID = "bench-backlog"
REPO = Path(__file__).resolve().parents[2]

_INSERT = (
    f"INSERT INTO events ({', '.join(EVENT_COLUMNS[:-2])}) "
    f"VALUES ({', '.join('?' * (len(EVENT_COLUMNS) - 2))})"
)


class BenchError(RuntimeError):
    """A benchmark run could not finish (a timeout, a daemon that exited, a refused publish)."""


# --- the backlog ----------------------------------------------------------------------------


def build_backlog(path: Path, n: int, *, chunk: int = 20_000) -> None:
    """Create a journal at ``path`` holding ``n`` unsent scan events (seq 1..n).

    The file is made by :class:`Journal` (schema, WAL mode, sidecars), then filled with bulk
    INSERTs of the journal's own rows (:func:`row_params` of :func:`sample_event` events, a
    UUIDv7 event id each), ``chunk`` rows per transaction, and checkpointed: a journal the
    daemon opens as it is, built about ten times faster than by appends (1,000,000 rows in
    about 25 s here instead of 80). Raises FileExistsError when ``path`` exists, ValueError
    when ``n`` < 0, JournalError when the journal cannot be created.
    """
    path = Path(path)
    if n < 0:
        raise ValueError("n must be >= 0")
    if path.exists():
        raise FileExistsError(path)
    with Journal(path, boot_id=BACKLOG_BOOT_ID):
        pass
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")  # a throwaway file: nothing to protect
        for lo in range(1, n + 1, chunk):
            rows = [
                row_params(StoredEvent(seq, uuid7(), BACKLOG_BOOT_ID, sample_event(seq)))
                for seq in range(lo, min(lo + chunk, n + 1))
            ]
            conn.execute("BEGIN")
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


# --- draining: the uplink and bare paho -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DrainResult:
    """One drain: ``events`` delivered in ``messages`` QoS 1 messages in ``seconds`` (wall
    time from the start of the connection to the last PUBACK, and for the uplink to the last
    row marked published); ``max_in_flight``: the most messages awaiting PUBACK at once."""

    events: int
    messages: int
    seconds: float
    max_in_flight: int

    @property
    def rate(self) -> float:
        """Events per second."""
        return self.events / self.seconds if self.seconds > 0 else float("nan")


def bench_uplink(
    journal: Journal,
    host: str,
    port: int,
    *,
    window: int = DEFAULT_WINDOW,
    batch: int = DEFAULT_BATCH,
    device: str = DEVICE,
) -> Uplink:
    """An :class:`Uplink` for ``journal`` wired as the daemon wires it (link settings as
    :func:`firmware.daemon.link_settings` makes them from a default ``[uplink]``: keepalive
    60 s, reconnect 0.5-60 s, paho in-flight limit ``window`` + 32), without telemetry or
    commands. Not started. ``journal`` must be open."""
    link = LinkSettings(host=host, port=port, client_id=client_id(device), max_inflight=window + 32)
    ident = Identity(device=device, site=SITE, door="bench", version=__version__, boot_id="bench")
    return Uplink(
        link=link,
        ident=ident,
        journal=journal,
        outbox=OutboxReader(journal.path),
        state=ReaderState(door="bench", clock_synced=lambda: True),
        options=UplinkOptions(window=window, batch=batch),
    )


def drain_uplink(
    journal_path: Path,
    host: str,
    port: int,
    *,
    window: int = DEFAULT_WINDOW,
    batch: int = DEFAULT_BATCH,
    timeout_s: float = 600.0,
) -> DrainResult:
    """Drain the unsent rows of the journal at ``journal_path`` through the real uplink
    (outbox reads, JSON, forwarder window and batching, our MQTT link, PUBACKs, rows marked
    published) to the broker at ``host``:``port``.

    Timed from :meth:`Uplink.start` until every row that was unsent is marked published in the
    journal. No back office is subscribed (nothing acknowledges; the broker drops what nobody
    subscribed to, as for :func:`drain_paho`). Raises BenchError when that takes longer than
    ``timeout_s`` seconds, JournalError when the journal cannot be opened.
    """
    with Journal(Path(journal_path), boot_id="bench-drain") as journal:
        check = OutboxReader(journal.path)
        try:
            n = check.backlog()
            uplink = bench_uplink(journal, host, port, window=window, batch=batch)
            t0 = time.perf_counter()
            uplink.start()
            try:
                if not uplink.wait(lambda s: s["forwarder"]["events"] >= n, timeout_s):
                    raise BenchError(f"uplink drained {uplink.stats()} of {n} in {timeout_s} s")
                end = time.monotonic() + 60.0
                while check.unsent_after(0, 1):  # PUBACKed: now wait for the marks
                    journal.flush(1.0)
                    if time.monotonic() > end:
                        raise BenchError("rows PUBACKed but not marked published within 60 s")
                seconds = time.perf_counter() - t0
                fwd = uplink.forwarder.stats()
            finally:
                uplink.stop()
        finally:
            check.close()
    return DrainResult(n, fwd.messages, seconds, fwd.max_in_flight)


def outbox_payloads(
    journal_path: Path, batch: int, *, device: str = DEVICE, page: int = READ_AHEAD
) -> Iterator[bytes]:
    """The unsent rows of the journal at ``journal_path`` as ``events`` payloads, lazily:
    ``batch`` events per message (the last one may hold fewer), the same JSON the forwarder
    sends, rows read ``page`` at a time (the forwarder's read-ahead) on a read-only
    connection. ``list()`` it to build every payload beforehand. Raises JournalError when the
    journal cannot be read."""
    reader = OutboxReader(Path(journal_path))
    try:
        after = 0
        events: list[dict[str, Any]] = []
        while True:
            rows = reader.unsent_after(after, page)
            if rows:
                after = rows[-1].seq
            for r in rows:
                events.append(event_json(r))
                if len(events) == batch:
                    yield dumps({"device": device, "events": events})
                    events = []
            if not rows:
                if events:
                    yield dumps({"device": device, "events": events})
                return
    finally:
        reader.close()


def drain_paho(
    payloads: Iterable[bytes],
    host: str,
    port: int,
    *,
    events: int,
    window: int = DEFAULT_WINDOW,
    topic: str | None = None,
    timeout_s: float = 600.0,
) -> DrainResult:
    """Publish ``payloads`` with a bare paho-mqtt client: QoS 1, at most ``window`` messages
    awaiting PUBACK (a semaphore released by ``on_publish``), paho's own network thread
    (``loop_start``), MQTT 3.1.1, clean session.

    The baseline for :func:`drain_uplink`. A list is the transport alone; the generator of
    :func:`outbox_payloads` adds what any uplink must do per message (read the rows, make the
    JSON) but none of the forwarder's bookkeeping, the uplink's threads or the rows marked
    published. ``events``: how many events the payloads carry (for the rate). ``topic``:
    default the bench reader's ``events`` topic. Timed from ``connect()`` to the last
    PUBACK. Raises BenchError on a timeout or a publish paho or the broker refused.
    """
    topic = topic or Topics(SITE, DEVICE).events
    slots = threading.Semaphore(window)
    lock = threading.Lock()
    state = {"sent": 0, "acked": 0, "refused": 0, "in_flight": 0, "max": 0}
    all_sent = False
    done = threading.Event()
    connected = threading.Event()

    def on_publish(_c: mqtt.Client, _u: object, _mid: int, rc: object, _p: object) -> None:
        with lock:
            state["acked"] += 1
            state["in_flight"] -= 1
            if getattr(rc, "is_failure", False):
                state["refused"] += 1
            if all_sent and state["acked"] == state["sent"]:
                done.set()
        slots.release()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id="qrgate-bench-paho",
        clean_session=True,
        protocol=mqtt.MQTTv311,
    )
    client.max_inflight_messages_set(window)
    client.on_publish = on_publish
    client.on_connect = lambda *_: connected.set()
    t0 = time.perf_counter()
    client.connect(host, port, keepalive=60)
    client.loop_start()
    try:
        if not connected.wait(timeout_s):
            raise BenchError(f"paho did not connect to {host}:{port}")
        end = time.monotonic() + timeout_s
        for p in payloads:
            if not slots.acquire(timeout=max(0.0, end - time.monotonic())):
                raise BenchError(f"paho: no PUBACKs for {timeout_s} s")
            with lock:
                state["sent"] += 1
                state["in_flight"] += 1
                state["max"] = max(state["max"], state["in_flight"])
            info = client.publish(topic, p, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise BenchError(f"paho refused a publish: {mqtt.error_string(info.rc)}")
        with lock:
            all_sent = True
            if state["acked"] == state["sent"]:
                done.set()
        if not done.wait(max(0.0, end - time.monotonic())):
            raise BenchError(f"paho: {state['acked']} of {state['sent']} PUBACKs in {timeout_s} s")
        seconds = time.perf_counter() - t0
    finally:
        client.disconnect()
        client.loop_stop()
    if state["refused"]:
        raise BenchError(f"the broker refused {state['refused']} messages")
    return DrainResult(events, state["sent"], seconds, state["max"])


# --- the daemon's memory while it drains ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RssResult:
    """A ``qrgate run`` daemon draining a backlog. ``backlog``: unsent rows at start;
    ``left``: unsent rows when the measurement ended (0: drained). ``hwm_kb``: its peak
    resident set (VmHWM, kB: start-up included, no sample missed). ``drain_peak_kb``: the
    largest VmRSS sampled (every 0.1 s) from the first row marked published to the end.
    ``end_kb``: VmRSS at the end. ``samples``: VmRSS samples taken. ``seconds``: from the
    daemon's start to the end. ``build_s``: seconds building the backlog."""

    backlog: int
    left: int
    hwm_kb: int
    drain_peak_kb: int
    end_kb: int
    samples: int
    seconds: float
    build_s: float


def proc_memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of process ``pid`` in kB, from /proc/PID/status. Raises OSError when
    the process is gone, ValueError when the fields are missing (a kernel thread)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def write_daemon_config(folder: Path, host: str, port: int, *, max_rows: int) -> Path:
    """A ``qrgate.toml`` in ``folder`` for a daemon with a journal in ``folder/state``, a
    replay camera looping one small still frame at 2 fps (idle: nothing to decide), mock
    pins, the journal's row cap at ``max_rows`` (and 4 GiB) and the uplink on to
    ``host``:``port`` with default settings."""
    reel = folder / "reel"
    reel.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(reel / "still.png")
    config = folder / "qrgate.toml"
    config.write_text(f"""
[reader]
state_dir = "{folder / "state"}"
[camera]
source = "replay"
path = "{reel}"
fps = 2
loop = true
[gpio]
pin_factory = "mock"
[journal]
max_rows = {max_rows}
max_mb = 4096
[uplink]
enabled = true
host = "{host}"
port = {port}
site = "{SITE}"
""")
    return config


def daemon_rss(
    folder: Path, host: str, port: int, *, backlog: int, max_s: float = 600.0
) -> RssResult:
    """Run a real ``qrgate run`` daemon (a subprocess) with ``backlog`` unsent rows in its
    journal and the broker at ``host``:``port`` reachable, until it has drained them all or
    ``max_s`` seconds have passed; sample its memory meanwhile.

    ``folder``: an empty temporary folder (the journal, the config, the daemon's log
    ``daemon.log``). The journal's row cap is set to twice the backlog (at least 1,000,000)
    so the cap never drops rows: what is measured is the backlog, not the cap. The daemon is
    stopped with SIGTERM at the end. Raises BenchError when it exits by itself.
    """
    folder = Path(folder)
    (folder / "state").mkdir(parents=True)
    t0 = time.perf_counter()
    journal_path = folder / "state" / "journal.db"
    build_backlog(journal_path, backlog)
    build_s = time.perf_counter() - t0
    config = write_daemon_config(folder, host, port, max_rows=max(1_000_000, 2 * backlog))
    check = OutboxReader(journal_path)
    with (folder / "daemon.log").open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "firmware.cli", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    start = time.monotonic()
    samples, drain_peak, rss, hwm = 0, 0, 0, 0
    draining = False
    next_check = start
    try:
        while time.monotonic() - start < max_s:
            if proc.poll() is not None:
                raise BenchError(f"daemon exited with {proc.returncode}: {_tail(folder)}")
            rss, hwm = proc_memory_kb(proc.pid)
            samples += 1
            if draining:
                drain_peak = max(drain_peak, rss)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.5
                with contextlib.suppress(JournalError):  # the daemon may be moving it
                    first = check.unsent_after(0, 1)
                    if not draining and (not first or first[0].seq > 1):
                        draining = True
                        drain_peak = max(drain_peak, rss)
                    if not first:
                        break
            time.sleep(0.1)
        seconds = time.monotonic() - start
        rss, hwm = proc_memory_kb(proc.pid)
        drain_peak = max(drain_peak, rss) if draining else drain_peak
        left = check.backlog()
    finally:
        check.close()
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return RssResult(backlog, left, hwm, drain_peak, rss, samples, seconds, build_s)


def _tail(folder: Path) -> str:
    try:
        return "".join((folder / "daemon.log").read_text(errors="replace").splitlines(True)[-15:])
    except OSError:
        return "(no log)"


# --- events again after a broker outage -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutageTrial:
    """One broker outage. ``down_s``: from SIGKILL to the broker accepting TCP connections
    again. ``to_puback_s``: from that moment to the first PUBACK of an event. ``attempts``:
    connection attempts the link made from the kill to that PUBACK (the reconnect included)."""

    down_s: float
    to_puback_s: float
    attempts: int


def outage_recovery(
    folder: Path,
    broker: LocalBroker,
    *,
    outage_s: float = 3.0,
    trials: int = 3,
    events_per_s: float = 20.0,
    stable_s: float = STABLE_S + 0.5,
    timeout_s: float = 60.0,
) -> list[OutageTrial]:
    """Kill the running ``broker`` (SIGKILL) under a running uplink ``trials`` times and
    measure how soon events flow again once it is back.

    An uplink with default settings (:func:`bench_uplink`) forwards a journal in ``folder``
    (created; must not hold one) while a thread appends a scan event every 1/``events_per_s``
    seconds. Each trial waits until the connection has been up ``stable_s`` seconds (by
    default past ``STABLE_S``, so the reconnect schedule starts from scratch as it does after
    a long-lived connection in the field), kills the broker, starts it again on the same port
    ``outage_s`` seconds after the kill, notes when it accepts TCP connections (probed every
    millisecond) and then the first PUBACK of an event (the forwarder's event count, polled
    every millisecond). Raises BenchError when events do not flow within ``timeout_s``
    seconds, BrokerError when the broker does not come back.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[OutageTrial] = []
    stop = threading.Event()
    with Journal(folder / "journal.db", boot_id="bench-outage") as journal:
        uplink = bench_uplink(journal, broker.host, broker.port)

        def append() -> None:
            i = 0
            while not stop.wait(1.0 / events_per_s):
                journal.append(sample_event(i))
                uplink.notify()
                i += 1

        feeder = threading.Thread(target=append, name="bench-feeder", daemon=True)
        uplink.start()
        feeder.start()
        try:
            for _ in range(trials):
                link = uplink.link
                if not link.wait(lambda s: s.state == "connected", timeout_s):
                    raise BenchError(f"uplink not connected: {link.stats()}")
                if not uplink.wait(lambda s: s["forwarder"]["events"] > 0, timeout_s):
                    raise BenchError("no events flowing before the outage")
                connects = link.stats().connects
                time.sleep(stable_s)
                if link.stats().connects != connects:
                    raise BenchError("the connection dropped by itself before the outage")
                attempts = link.stats().attempts
                t_kill = time.monotonic()
                broker.kill()
                time.sleep(max(0.0, t_kill + outage_s - time.monotonic()))
                base = uplink.forwarder.stats().events  # the last connection's PUBACKs are in
                accepted: list[float] = []
                probe = threading.Thread(
                    target=_probe, args=(broker.host, broker.port, accepted, timeout_s)
                )
                probe.start()
                broker.start()
                probe.join()
                if not accepted:
                    raise BenchError("the broker did not accept connections again")
                end = time.monotonic() + timeout_s
                while uplink.forwarder.stats().events <= base:
                    if time.monotonic() > end:
                        raise BenchError(f"no event PUBACK {timeout_s} s after the outage")
                    time.sleep(0.001)
                t_ack = time.monotonic()
                out.append(
                    OutageTrial(
                        accepted[0] - t_kill, t_ack - accepted[0], link.stats().attempts - attempts
                    )
                )
        finally:
            stop.set()
            feeder.join()
            uplink.stop()
    return out


def _probe(host: str, port: int, accepted: list[float], timeout_s: float) -> None:
    """Try to connect every millisecond; append the time of the first success."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                accepted.append(time.monotonic())
                return
        except OSError:
            time.sleep(0.001)
