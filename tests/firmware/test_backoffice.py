"""The reference back office against a real mosquitto (LocalBroker) and a real PostgreSQL
(a throwaway cluster started here): ingest (idempotent store, contiguous retained acks, gaps,
gap records, malformed input, redelivery after a failed store, two workers sharing one
subscription and one store), the report's numbers, CSV and PNG, and the fleet status table.
"""

from __future__ import annotations

import datetime as dt
import glob
import io
import json
import logging
import os
import pwd
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion
from PIL import Image

from firmware.backoffice import report as rep
from firmware.backoffice.fleet import COLUMNS, collect_status, fleet_rows
from firmware.backoffice.ingest import IngestWorker
from firmware.backoffice.mqtt import MqttSettings
from firmware.backoffice.records import EventBatch, GapRecord, parse_events, parse_status
from firmware.backoffice.store import (
    Store,
    StoreResult,
    holes,
    merge_ranges,
    open_store,
)
from firmware.cli import main as cli_main
from firmware.demo.broker import LocalBroker, find_mosquitto, free_port, make_test_pki
from firmware.exceptions import BadMessageError, BrokerError, StoreError
from firmware.journal.events import NewEvent, StoredEvent
from firmware.journal.store import Journal
from firmware.uplink.topics import Topics, dumps, event_json
from ota.job import Event, EventKind, Job, JobState, advance
from ota.jobs import OtaTopics, StatePayload

WAIT_S = 20.0  # upper bound for one loopback exchange; never an expected duration
SITE = "hq"
UTC = dt.UTC
PG_HINT = "apt-get install -y postgresql"


# -- fixtures: broker, PostgreSQL cluster, stores ------------------------------------------


def _need(what: str, problem: str | None) -> None:
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI: {problem}")
    pytest.skip(problem)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    try:
        find_mosquitto()
    except BrokerError as e:
        _need("mosquitto", str(e))
    with LocalBroker(tmp_path / "broker", persistence=False) as b:
        yield b


@pytest.fixture
def settings(broker: LocalBroker) -> MqttSettings:
    return MqttSettings(broker.host, broker.port)


class PgCluster:
    """A PostgreSQL cluster of its own in a temporary folder, on a free loopback port, run as
    user ``postgres`` when the tests run as root (initdb refuses root)."""

    def __init__(self) -> None:
        found = sorted(
            glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3])
        )
        self.bindir = Path(found[-1]).parent
        self.folder = Path(tempfile.mkdtemp(prefix="qrgate-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.started = False

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [*self.as_user, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            log = self.folder / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}{tail}")

    def start(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "qrgate",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        )
        # Throwaway data: no fsync; the socket in our folder, TCP on loopback only.
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self.started = True
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )

    def stop(self) -> None:
        if self.started and (self.data / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
            self.started = False
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql://qrgate@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def _pg_problem() -> str | None:
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return f"PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): {PG_HINT}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return f"no 'postgres' user to run initdb as (running as root): {PG_HINT}"
        if shutil.which("runuser") is None:
            return "runuser is missing (util-linux); needed to run initdb as postgres"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install 'psycopg[binary]'"
    return None


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    _need("PostgreSQL", _pg_problem())
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store location of each kind (file path or PostgreSQL URL)."""
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    cluster: PgCluster = request.getfixturevalue("pg")
    return cluster.new_database()


@pytest.fixture
def stores() -> Iterator[Callable[[str], Store]]:
    """Opens stores and closes every one at the end."""
    opened: list[Store] = []

    def open_(url: str) -> Store:
        s = open_store(url)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for t in leaked:
        t.join(WAIT_S)
    assert [t.name for t in leaked if t.is_alive()] == []


# -- a reader and an ack watcher, as MQTT clients ------------------------------------------


def event(
    device: str,
    seq: int,
    *,
    door: str = "front",
    direction: str = "in",
    decision: str | None = "granted",
    wall_ns: int | None = None,
    kind: str = "scan",
) -> dict[str, Any]:
    """A journal row as the reader's uplink sends it (firmware.uplink.topics.event_json)."""
    new = NewEvent(
        kind=kind, wall_ns=wall_ns if wall_ns is not None else 1_741_000_000_000_000_000 + seq,
        clock_synced=True, mono_ns=seq * 1_000_000, door=door, direction=direction,
        decision=decision, reason="allowed" if decision == "granted" else "not_listed",
        credential_kind="badge", subject="5e" * 16,
        codes=({"kind": "badge", "length": 12, "backend": "zxing-cpp"},),
        decode_ms=2.5, verdict_ms=0.1, frame_to_relay_ms=41.0, detail={"note": "Cửa chính"},
    )  # fmt: skip
    return event_json(StoredEvent(seq, f"ev-{device}-{seq:06d}", "boot-1", new))


def gap(from_seq: int, to_seq: int, count: int | None = None) -> dict[str, Any]:
    """A gap record as firmware.uplink.topics.gap_json sends it (seq = to_seq)."""
    return {
        "kind": "gap",
        "seq": to_seq,
        "from_seq": from_seq,
        "to_seq": to_seq,
        "count": to_seq - from_seq + 1 if count is None else count,
        "reason": "cap_rows",
        "wall_ns": 1_741_000_000_000_000_000,
    }


class Reader:
    """A paho client publishing like a reader: QoS 1, each publish waits for its PUBACK.
    ``started`` holds every seq whose publish began, for the ack checks."""

    def __init__(self, broker: LocalBroker, name: str = "reader") -> None:
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4()}", protocol=mqtt.MQTTv5
        )
        self.connected = threading.Event()
        self.paho.on_connect = lambda _c, _u, _f, rc, _p: self.connected.set()
        self.paho.connect(broker.host, broker.port)
        self.paho.loop_start()
        assert self.connected.wait(WAIT_S)
        self.lock = threading.Lock()
        self.started: dict[str, set[int]] = {}

    def prefix(self, device: str) -> int:
        """The highest seq N such that the publish of every seq 1..N has begun."""
        with self.lock:
            seen = self.started.get(device, set())
            n = 0
            while n + 1 in seen:
                n += 1
            return n

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.paho.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT_S)
        assert info.is_published()

    def send(self, device: str, items: list[dict[str, Any]], site: str = SITE) -> None:
        with self.lock:
            covered = self.started.setdefault(device, set())
            for item in items:
                lo = item.get("from_seq", item["seq"])
                covered.update(range(lo, item["seq"] + 1))
        self.publish(Topics(site, device).events, dumps({"device": device, "events": items}))

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


class AckWatcher:
    """Subscribed to every ``events/ack``; keeps each device's acks and the reader's prefix
    at the moment each ack arrived."""

    def __init__(self, broker: LocalBroker, reader: Reader | None = None) -> None:
        self.reader = reader
        self.acks: dict[str, list[tuple[int, int]]] = {}  # device -> [(ack, prefix then)]
        self.retained: dict[str, bool] = {}
        self.changed = threading.Condition()
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"acks-{uuid.uuid4()}", protocol=mqtt.MQTTv5
        )
        subscribed = threading.Event()
        self.paho.on_subscribe = lambda *_a: subscribed.set()
        self.paho.on_message = self._on_message
        self.paho.on_connect = lambda c, *_a: c.subscribe("qrgate/v1/+/+/events/ack", qos=1)
        self.paho.connect(broker.host, broker.port)
        self.paho.loop_start()
        assert subscribed.wait(WAIT_S)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        device = msg.topic.split("/")[3]
        seq = json.loads(msg.payload)["seq"]
        prefix = self.reader.prefix(device) if self.reader else -1
        with self.changed:
            self.acks.setdefault(device, []).append((seq, prefix))
            self.retained[device] = bool(msg.retain)
            self.changed.notify_all()

    def last(self, device: str) -> int | None:
        with self.changed:
            got = self.acks.get(device)
            return got[-1][0] if got else None

    def wait_for(self, device: str, seq: int) -> None:
        with self.changed:
            ok = self.changed.wait_for(lambda: self.last_locked(device) == seq, WAIT_S)
        assert ok, f"ack of {device} is {self.last(device)}, not {seq}, after {WAIT_S} s"

    def last_locked(self, device: str) -> int | None:
        got = self.acks.get(device)
        return got[-1][0] if got else None

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
def reader(broker: LocalBroker) -> Iterator[Reader]:
    r = Reader(broker)
    yield r
    r.close()


@pytest.fixture
def watcher(broker: LocalBroker, reader: Reader) -> Iterator[AckWatcher]:
    w = AckWatcher(broker, reader)
    yield w
    w.close()


def retained_ack(broker: LocalBroker, device: str, site: str = SITE) -> tuple[int, bool]:
    """(seq, retain flag) of the ack a new subscriber gets for ``device``."""
    got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"late-{uuid.uuid4()}", protocol=mqtt.MQTTv5
    )
    c.on_message = lambda _c, _u, m: got.put(m)
    c.on_connect = lambda cl, *_a: cl.subscribe(Topics(site, device).events_ack, qos=1)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        msg = got.get(timeout=WAIT_S)
    finally:
        c.disconnect()
        c.loop_stop()
    return json.loads(msg.payload)["seq"], bool(msg.retain)


@pytest.fixture
def workers(settings: MqttSettings) -> Iterator[Callable[..., IngestWorker]]:
    """Starts ingest workers (subscribed before returning) and stops them all at the end."""
    started: list[IngestWorker] = []

    def start(store: Store, **kwargs: Any) -> IngestWorker:
        kwargs.setdefault("client_id", f"ingest-{len(started)}-{uuid.uuid4().hex[:6]}")
        w = IngestWorker(store, settings, **kwargs)
        started.append(w)
        w.start()
        assert w.wait_subscribed(WAIT_S)
        return w

    yield start
    for w in started:
        w.stop()


@dataclass(frozen=True)
class Rig:
    """A broker with a reader, an ack watcher, and starters for stores and ingest workers."""

    broker: LocalBroker
    reader: Reader
    watcher: AckWatcher
    workers: Callable[..., IngestWorker]
    stores: Callable[[str], Store]


@pytest.fixture
def rig(
    broker: LocalBroker,
    reader: Reader,
    watcher: AckWatcher,
    workers: Callable[..., IngestWorker],
    stores: Callable[[str], Store],
) -> Rig:
    return Rig(broker, reader, watcher, workers, stores)


# -- the store's pure parts ----------------------------------------------------------------


def test_merge_ranges_and_holes() -> None:
    assert merge_ranges([(5, 6), (1, 2), (3, 3), (9, 9), (6, 8)]) == [(1, 3), (5, 9)]
    assert merge_ranges([(1, 10), (2, 3)]) == [(1, 10)]
    assert holes([(3, 4), (7, 9)]) == [(1, 2), (5, 6)]
    assert holes([(1, 4), (5, 9)]) == []
    assert holes([]) == []


# -- ingest ----------------------------------------------------------------------------------


def test_idempotent_store_contiguous_retained_ack(rig: Rig, db_url: str) -> None:
    broker, reader, watcher = rig.broker, rig.reader, rig.watcher
    workers, stores = rig.workers, rig.stores
    store = stores(db_url)
    worker = workers(store)
    reader.send("r1", [event("r1", s) for s in (1, 2, 3)])
    watcher.wait_for("r1", 3)
    reader.send("r1", [event("r1", s) for s in (2, 3)])  # a re-send after a lost ack
    reader.send("r1", [event("r1", 5)])  # out of order: 4 is late
    assert worker.wait_handled(3, WAIT_S)
    assert store.ack_state("r1") == (SITE, 3)
    reader.send("r1", [event("r1", 4)])
    watcher.wait_for("r1", 5)
    reader.send("r1", [event("r1", s) for s in (1, 2, 3, 4, 5, 5)])  # 5 twice in one message
    assert worker.wait_handled(5, WAIT_S)

    assert store.seqs("r1") == [1, 2, 3, 4, 5]
    stats = worker.stats()
    assert (stats.events_stored, stats.duplicates, stats.malformed) == (5, 8, 0)
    assert retained_ack(broker, "r1") == (5, True)
    # every ack ever published covered only seqs the reader had already sent
    assert all(ack <= prefix for ack, prefix in watcher.acks["r1"])
    assert [ack for ack, _ in watcher.acks["r1"]][-1] == 5
    (device,) = store.devices()
    assert (
        device.device,
        device.site,
        device.ack_seq,
        device.ack_sent,
        device.max_seq,
        device.events,
    ) == ("r1", SITE, 5, 5, 5, 5)
    assert store.missing() == []


def test_gap_detected_then_filled(
    reader: Reader, watcher: AckWatcher, workers: Callable[..., IngestWorker],
    stores: Callable[[str], Store], tmp_path: Path,
) -> None:  # fmt: skip
    store = stores(str(tmp_path / "store.db"))
    worker = workers(store)
    reader.send("r1", [event("r1", 1), event("r1", 2)])
    watcher.wait_for("r1", 2)
    reader.send("r1", [event("r1", 4)])
    reader.send("r1", [event("r1", 6), event("r1", 7)])
    assert worker.wait_handled(3, WAIT_S)
    holes_now = store.missing("r1")
    assert [(m.from_seq, m.to_seq) for m in holes_now] == [(3, 3), (5, 5)]
    assert store.ack_state("r1") == (SITE, 2)

    reader.send("r1", [event("r1", 5)])
    assert worker.wait_handled(4, WAIT_S)
    # the remaining hole keeps the time it was first seen
    assert store.missing("r1") == [holes_now[0]]
    assert watcher.last("r1") == 2

    reader.send("r1", [event("r1", 3)])
    watcher.wait_for("r1", 7)
    assert store.missing("r1") == []
    assert store.seqs("r1") == [1, 2, 3, 4, 5, 6, 7]
    stats = worker.stats()
    assert (stats.gaps_opened, stats.gaps_filled) == (2, 2)


def test_gap_records_cover_their_ranges(rig: Rig, db_url: str) -> None:
    broker, reader, watcher = rig.broker, rig.reader, rig.watcher
    workers, stores = rig.workers, rig.stores
    store = stores(db_url)
    worker = workers(store)
    # the reader dropped 3..6 (cap) and says so ahead of the rows after them
    reader.send("r1", [event("r1", 1), event("r1", 2), gap(3, 6), event("r1", 7)])
    watcher.wait_for("r1", 7)
    reader.send("r1", [gap(3, 6)])  # the same gap record again
    reader.send("r1", [event("r1", 8)])
    watcher.wait_for("r1", 8)
    assert store.reader_gaps("r1") == [
        GapRecord(seq=6, from_seq=3, to_seq=6, count=4, reason="cap_rows",
                  wall_ns=1_741_000_000_000_000_000)]  # fmt: skip
    assert store.seqs("r1") == [1, 2, 7, 8]

    # a gap record arriving after the rows above it closes the hole they opened
    reader.send("r2", [event("r2", s) for s in (10, 11, 12)])
    assert worker.wait_handled(4, WAIT_S)
    assert [(m.from_seq, m.to_seq) for m in store.missing("r2")] == [(1, 9)]
    reader.send("r2", [gap(1, 4, count=3), gap(5, 9)])  # seq 2 was never used: count 3
    watcher.wait_for("r2", 12)
    assert store.missing() == []
    # a gap overlapping stored rows changes nothing but is kept
    reader.send("r2", [gap(11, 13)])
    watcher.wait_for("r2", 13)
    assert store.ack_state("r2") == (SITE, 13)
    assert [(g.from_seq, g.to_seq, g.count) for g in store.reader_gaps("r2")] == [
        (1, 4, 3), (5, 9, 5), (11, 13, 3)]  # fmt: skip
    assert worker.stats().gap_records == 4
    assert retained_ack(broker, "r2") == (13, True)


def test_malformed_messages_are_logged_and_skipped(
    rig: Rig, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    reader, watcher = rig.reader, rig.watcher
    workers, stores = rig.workers, rig.stores
    store = stores(db_url)
    worker = workers(store)
    topic = Topics(SITE, "r1").events
    good = event("r1", 1)
    whole = [
        b"\xff\xfe\x00",  # not UTF-8
        b"{not json",
        b"[1, 2]",
        dumps({"device": "someone-else", "events": [good]}),
        dumps({"device": "r1", "events": []}),
        dumps({"device": "r1", "events": "1,2,3"}),
        dumps({"device": "r1", "events": [{**good, "seq": "1"}, {**good, "seq": 0}]}),
        b'{"device": "r1", "events": [' + b" " * (256 * 1024) + b"]}",  # over the size limit
    ]
    for payload in whole:
        reader.publish(topic, payload)
    reader.publish(Topics(SITE, "r1").status, dumps({"device": "r1", "online": "yes"}))
    # inside a good envelope only the bad items go
    reader.send("r1", [
        good,
        {**event("r1", 2), "seq": True},
        {**event("r1", 3), "wall_ns": 1.5e18},
        {**event("r1", 4), "door": "front\x00"},  # PostgreSQL text cannot hold NUL
        {**event("r1", 5), "seq": 2**70},
        {**event("r1", 6), "event_id": ""},
    ])  # fmt: skip
    reader.send("r1", [event("r1", 2)])
    watcher.wait_for("r1", 2)
    assert worker.wait_handled(len(whole) + 3, WAIT_S)

    stats = worker.stats()
    assert (stats.malformed, stats.rejected_items, stats.events_stored) == (len(whole) + 1, 5, 2)
    assert store.seqs("r1") == [1, 2]
    assert store.statuses() == []
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(skipped) == len(whole) + 1 + 5
    assert any("not UTF-8" in m for m in skipped)
    assert any("'door' contains a NUL" in m for m in skipped)
    assert any("over the 262144 limit" in m for m in skipped)


def test_status_stored_birth_then_will(
    reader: Reader, workers: Callable[..., IngestWorker], stores: Callable[[str], Store],
    db_url: str,
) -> None:  # fmt: skip
    store = stores(db_url)
    worker = workers(store)
    birth = {
        "online": True,
        "device": "r1",
        "site": SITE,
        "door": "front",
        "version": "0.4.0",
        "boot_id": "b-1",
        "backlog": 3,
        "clock_synced": True,
        "camera": "ok",
        "last_scan_wall_ns": 1_741_000_000_000_000_000,
        "wall_ns": 1_741_000_100_000_000_000,
    }
    reader.publish(Topics(SITE, "r1").status, dumps(birth), retain=True)
    assert worker.wait_handled(1, WAIT_S)
    (row,) = store.statuses()
    assert (row.device, row.site, row.online, row.door, row.version, row.boot_id, row.backlog,
            row.clock_synced, row.last_scan_wall_ns, row.wall_ns) == (
        "r1", SITE, True, "front", "0.4.0", "b-1", 3, True, 1_741_000_000_000_000_000,
        1_741_000_100_000_000_000)  # fmt: skip
    assert json.loads(row.payload_json)["camera"] == "ok"
    will = {"online": False, "device": "r1", "site": SITE, "door": "front", "boot_id": "b-1"}
    reader.publish(Topics(SITE, "r1").status, dumps(will), retain=True)
    assert worker.wait_handled(2, WAIT_S)
    (row,) = store.statuses()
    # the will flips online and keeps what the birth said
    assert (row.online, row.version, row.backlog, row.clock_synced) == (False, "0.4.0", 3, True)
    assert json.loads(row.payload_json) == will


class FailingStore:
    """A store whose writes fail as if the database were down."""

    kind = "broken"

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.attempts = threading.Semaphore(0)

    def store_events(self, batch: EventBatch, received_ns: int) -> StoreResult:
        self.attempts.release()
        raise StoreError("database is down (test)")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_message_not_stored_is_delivered_again(
    reader: Reader, watcher: AckWatcher, workers: Callable[..., IngestWorker],
    stores: Callable[[str], Store], tmp_path: Path,
) -> None:  # fmt: skip
    store = stores(str(tmp_path / "store.db"))
    failing = FailingStore(store)
    first = workers(failing, client_id="ingest-a")
    reader.send("r1", [event("r1", 1)])
    assert failing.attempts.acquire(timeout=WAIT_S)
    assert failing.attempts.acquire(timeout=WAIT_S)  # retried, not skipped
    first.stop()  # the store never came back: nothing stored, nothing acknowledged
    assert store.seqs("r1") == []
    assert watcher.last("r1") is None
    assert first.stats().messages == 0

    second = workers(store, client_id="ingest-a")  # the same session
    watcher.wait_for("r1", 1)
    assert store.seqs("r1") == [1]
    assert second.stats().events_stored == 1


def test_worker_publishes_acks_left_unsent(rig: Rig, tmp_path: Path) -> None:
    store = rig.stores(str(tmp_path / "store.db"))
    # a worker stored these and stopped before it could publish the ack
    events = dumps({"device": "r1", "events": [event("r1", s) for s in (1, 2, 3)]})
    store.store_events(parse_events(SITE, "r1", events), 1)
    assert store.unsent_acks() == ["r1"]
    rig.workers(store)
    rig.watcher.wait_for("r1", 3)
    assert wait_until(lambda: store.unsent_acks() == [])


def test_two_workers_with_one_client_id_are_reported(
    rig: Rig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """mosquitto 2.0 closes the older connection without saying why; the workers then take
    the session from each other at every reconnect, which the log must name."""
    hint = "probably another client uses client id 'same-id'"
    rig.workers(rig.stores(str(tmp_path / "a.db")), client_id="same-id")
    rig.workers(rig.stores(str(tmp_path / "b.db")), client_id="same-id")
    assert wait_until(lambda: any(hint in r.getMessage() for r in caplog.records))


def wait_until(predicate: Callable[[], bool]) -> bool:
    """Poll ``predicate`` until it holds or WAIT_S passes (for state spread over two
    workers, which have no common event to wait on)."""
    deadline = threading.Event()
    for _ in range(int(WAIT_S / 0.02)):
        if predicate():
            return True
        deadline.wait(0.02)
    return predicate()


def plan_batches(device: str, n: int, held: int, rng: random.Random) -> list[list[dict[str, Any]]]:
    """Seqs 1..n but ``held`` in batches of 1-4, about one batch in seven sent twice."""
    seqs = [s for s in range(1, n + 1) if s != held]
    batches: list[list[dict[str, Any]]] = []
    i = 0
    while i < len(seqs):
        size = rng.randint(1, 4)
        batch = [event(device, s, door=f"door-{device}") for s in seqs[i : i + size]]
        batches.append(batch)
        if rng.random() < 0.15:
            batches.append(batch)  # at least once: a re-send
        i += size
    return batches


def test_two_workers_share_one_subscription_and_one_store(rig: Rig, db_url: str) -> None:
    broker, reader, watcher = rig.broker, rig.reader, rig.watcher
    workers, stores = rig.workers, rig.stores
    n = 240
    store_a, store_b = stores(db_url), stores(db_url)
    a = workers(store_a, group="pair")
    b = workers(store_b, group="pair")
    rng = random.Random(7)
    devices = ["r0", "r1", "r2"]
    held = {d: n // 2 + i for i, d in enumerate(devices)}
    plans = {d: plan_batches(d, n, held[d], rng) for d in devices}
    sent = sum(len(p) for p in plans.values())
    errors: list[BaseException] = []

    def run(device: str) -> None:
        try:
            for batch in plans[device]:
                reader.send(device, batch)
        except BaseException as e:  # surfaced below; a thread must not die silently
            errors.append(e)

    threads = [threading.Thread(target=run, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 3)
    assert errors == []
    assert wait_until(lambda: a.stats().messages + b.stats().messages == sent)
    assert a.stats().event_messages > 0 and b.stats().event_messages > 0  # the load is shared
    for d in devices:
        # everything above the held-back seq is stored, and no ack passes the hole
        watcher.wait_for(d, held[d] - 1)
        assert store_a.ack_state(d) == (SITE, held[d] - 1)
        assert [(m.from_seq, m.to_seq) for m in store_b.missing(d)] == [(held[d], held[d])]
        assert max(ack for ack, _ in watcher.acks[d]) == held[d] - 1
        assert retained_ack(broker, d) == (held[d] - 1, True)

    for d in devices:
        reader.send(d, [event(d, held[d], door=f"door-{d}")])
    for d in devices:
        watcher.wait_for(d, n)
        assert store_a.seqs(d) == list(range(1, n + 1))  # every event exactly once
        assert retained_ack(broker, d) == (n, True)
        # no ack ever covered a seq before the reader had sent it
        assert all(ack <= prefix for ack, prefix in watcher.acks[d])
    assert sum(w.stats().events_stored for w in (a, b)) == 3 * n
    assert sum(w.stats().duplicates for w in (a, b)) == sum(
        len(batch) for p in plans.values() for batch in p
    ) - 3 * (n - 1)
    assert [(d.device, d.ack_seq, d.events) for d in store_b.devices()] == [
        (d, n, n) for d in devices]  # fmt: skip
    assert store_b.missing() == []


def test_concurrent_writers_compute_ack_from_the_store(
    stores: Callable[[str], Store], db_url: str,
) -> None:  # fmt: skip
    """Two connections store one device's events at once, in shuffled order: the last
    commit must see the other's rows (an ack from worker memory would stop short)."""
    n = 200
    seqs = list(range(1, n + 1))
    random.Random(3).shuffle(seqs)
    shares = [seqs[0::2], seqs[1::2]]
    pair = [stores(db_url), stores(db_url)]
    results: list[list[StoreResult]] = [[], []]
    errors: list[BaseException] = []
    gate = threading.Barrier(2)

    def run(i: int) -> None:
        try:
            gate.wait(WAIT_S)
            for s in shares[i]:
                batch = parse_events(
                    SITE, "r1", dumps({"device": "r1", "events": [event("r1", s)]})
                )
                results[i].append(pair[i].store_events(batch, 1))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 3)
    assert errors == []
    assert pair[0].ack_state("r1") == (SITE, n)
    assert max(r.ack_seq for rs in results for r in rs) == n
    assert pair[1].seqs("r1") == list(range(1, n + 1))
    assert pair[1].missing() == []


class Process:
    """A ``qrgate`` subprocess whose stderr lines a thread collects."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "firmware.cli", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)  # fmt: skip
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self._thread = threading.Thread(target=self._read)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    def wait_for(self, text: str) -> None:
        with self.changed:
            ok = self.changed.wait_for(
                lambda: any(text in line for line in self.lines) or self.proc.poll() is not None,
                WAIT_S)  # fmt: skip
            assert ok and any(text in line for line in self.lines), "".join(self.lines)

    def finish(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(WAIT_S)
        self._thread.join(WAIT_S)
        return code


def test_ingest_command_end_to_end(
    broker: LocalBroker, reader: Reader, watcher: AckWatcher, tmp_path: Path,
) -> None:  # fmt: skip
    db = tmp_path / "cli.db"
    worker = Process(
        "ingest",
        "--broker",
        f"{broker.host}:{broker.port}",
        "--db",
        str(db),
        "--group",
        "cli",
        "--client-id",
        "cli-worker",
    )
    try:
        # a shared subscription nobody holds yet drops what is published to it
        worker.wait_for("subscribed to $share/cli/qrgate/v1/+/+/events")
        reader.send("r9", [event("r9", 1), event("r9", 2)])
        watcher.wait_for("r9", 2)
    finally:
        code = worker.finish()
    assert code == 0, "".join(worker.lines)
    assert any("ingest stopped" in line for line in worker.lines)
    store = open_store(db, create=False)
    try:
        assert store.seqs("r9") == [1, 2]
    finally:
        store.close()


def test_store_errors() -> None:
    with pytest.raises(StoreError, match="no store at"):
        open_store("/nonexistent/qrgate.db", create=False)
    with pytest.raises(StoreError, match="cannot connect"):
        open_store(f"postgresql://nobody@127.0.0.1:{free_port()}/none")
    with pytest.raises(BadMessageError, match="no usable item"):
        parse_events(SITE, "r1", dumps({"device": "r1", "events": [{"kind": "scan"}]}))


# -- report ----------------------------------------------------------------------------------


def at(text: str) -> int:
    """ns since the epoch of a UTC ISO time."""
    when = dt.datetime.fromisoformat(text).replace(tzinfo=UTC)
    return int(when.timestamp()) * 10**9


# (device, seq, door, direction, decision, UTC time, kind)
DATA = [
    ("r1", 1, "front", "in", "granted", "2025-03-03T08:05:00", "scan"),
    ("r1", 2, "front", "in", "granted", "2025-03-03T08:10:00", "scan"),
    ("r1", 3, "front", "in", "denied", "2025-03-03T08:20:00", "scan"),
    ("r1", 4, "front", "in", None, "2025-03-03T08:00:00", "incident"),
    ("r1", 5, "front", "in", "granted", "2025-03-03T09:00:00", "scan"),
    ("r1", 6, "front", "in", "granted", "2025-03-04T07:59:59", "scan"),
    ("r1", 7, "front", "in", "granted", "2025-03-05T00:00:00", "scan"),  # after --until
    ("r2", 1, "back", "out", "granted", "2025-03-03T08:30:00", "scan"),
    ("r2", 2, "back", "out", "granted", "2025-03-03T17:45:00", "scan"),
    ("r2", 3, "back", "out", "denied", "2025-03-03T17:50:00", "scan"),
    ("r2", 4, "back", "out", "denied", "2025-03-02T23:59:59", "scan"),  # before --since (UTC)
    ("r3", 1, "lobby", "both", "granted", "2025-03-03T08:15:00", "scan"),
    ("r3", 2, "lobby", "both", "denied", "2025-03-03T08:16:00", "scan"),
]


def load_data(store: Store) -> None:
    for device, seq, door, direction, decision, when, kind in DATA:
        payload = dumps({"device": device, "events": [event(
            device, seq, door=door, direction=direction, decision=decision, wall_ns=at(when),
            kind=kind)]})  # fmt: skip
        store.store_events(parse_events(SITE, device, payload), 1)


def rows(report: rep.Report) -> list[tuple[str, str, int, int, int, int]]:
    return [(r.period, r.door, r.entries, r.exits, r.granted, r.denied) for r in report.rows]


def test_report_numbers_per_hour_and_day(stores: Callable[[str], Store], db_url: str) -> None:
    store = stores(db_url)
    load_data(store)
    since = dt.datetime(2025, 3, 3, tzinfo=UTC)
    until = dt.datetime(2025, 3, 5, tzinfo=UTC)

    hourly = rep.build_report(store, since, until, "hour", UTC)
    assert rows(hourly) == [
        ("2025-03-03T08:00+00:00", "back", 0, 1, 1, 0),
        ("2025-03-03T08:00+00:00", "front", 2, 0, 2, 1),
        ("2025-03-03T08:00+00:00", "lobby", 1, 0, 1, 1),
        ("2025-03-03T09:00+00:00", "front", 1, 0, 1, 0),
        ("2025-03-03T17:00+00:00", "back", 0, 1, 1, 1),
        ("2025-03-04T07:00+00:00", "front", 1, 0, 1, 0),
    ]
    assert len(hourly.periods) == 48 and hourly.periods[0] == "2025-03-03T00:00+00:00"
    assert hourly.totals() == (5, 2, 7, 3)

    daily = rep.build_report(store, since, until, "day", UTC)
    assert rows(daily) == [
        ("2025-03-03", "back", 0, 2, 2, 1),
        ("2025-03-03", "front", 3, 0, 3, 1),
        ("2025-03-03", "lobby", 1, 0, 1, 1),
        ("2025-03-04", "front", 1, 0, 1, 0),
    ]
    assert daily.periods == ("2025-03-03", "2025-03-04")

    # in Ho Chi Minh City (UTC+7) 17:45 UTC is 00:45 the next day, 23:59:59 UTC on the 2nd
    # is the 3rd already, and 00:00 UTC on the 5th is past the local --until
    hcm = rep.zone("Asia/Ho_Chi_Minh")
    local = rep.build_report(
        store, rep.parse_when("2025-03-03", hcm), rep.parse_when("2025-03-05", hcm), "day", hcm
    )
    assert rows(local) == [
        ("2025-03-03", "back", 0, 1, 1, 1),
        ("2025-03-03", "front", 3, 0, 3, 1),
        ("2025-03-03", "lobby", 1, 0, 1, 1),
        ("2025-03-04", "back", 0, 1, 1, 1),
        ("2025-03-04", "front", 1, 0, 1, 0),
    ]


def test_report_says_per_reader_whether_every_scan_is_in(
    stores: Callable[[str], Store], db_url: str
) -> None:
    store = stores(db_url)
    load_data(store)
    # r3 dropped seqs 3-5 on its size cap (said by a gap record), then 6-7 never arrived
    gap = {"kind": "gap", "seq": 5, "from_seq": 3, "to_seq": 5, "count": 3, "reason": "cap_rows"}
    later = event("r3", 8, door="lobby", direction="both", decision="granted")
    for item in (gap, later):
        store.store_events(parse_events(SITE, "r3", dumps({"device": "r3", "events": [item]})), 2)
    since = dt.datetime(2025, 3, 3, tzinfo=UTC)
    readers = rep.build_report(store, since, since + dt.timedelta(days=2), "day", UTC).readers
    assert [(r.device, r.events, r.ack_seq, r.max_seq, r.missing, r.dropped) for r in readers] == [
        ("r1", 7, 7, 7, 0, {}),
        ("r2", 4, 4, 4, 0, {}),
        ("r3", 3, 5, 8, 2, {"cap_rows": 3}),
    ]


def test_report_csv_png_and_command(tmp_path: Path, stores: Callable[[str], Store]) -> None:
    db = tmp_path / "report.db"
    load_data(stores(str(db)))
    csv_path, png_path = tmp_path / "out.csv", tmp_path / "out.png"
    result = CliRunner().invoke(cli_main, [
        "report", "--db", str(db), "--since", "2025-03-03", "--until", "2025-03-05",
        "--by", "day", "--tz", "UTC", "--csv", str(csv_path), "--png", str(png_path),
    ], env={"COLUMNS": "160"})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert csv_path.read_text() == (
        "period,site,door,entries,exits,granted,denied\n"
        "2025-03-03,hq,back,0,2,2,1\n"
        "2025-03-03,hq,front,3,0,3,1\n"
        "2025-03-03,hq,lobby,1,0,1,1\n"
        "2025-03-04,hq,front,1,0,1,0\n"
    )
    table_lines = [line.split() for line in result.output.splitlines()]
    assert ["│", "2025-03-03", "│", "hq", "│", "front", "│", "3", "│", "0", "│", "3", "│", "1",
            "│"] in table_lines  # fmt: skip
    assert ["│", "total", "│", "│", "│", "5", "│", "2", "│", "7", "│", "3", "│"] in table_lines
    assert "Readers: is every scan in?" in result.output
    r1 = next(line for line in table_lines if "r1" in line)
    assert r1[:15] == [
        "│",
        "hq",
        "│",
        "r1",
        "│",
        "7",
        "│",
        "7",
        "│",
        "7",
        "│",
        "0",
        "│",
        "none",
        "│",
    ]
    data = png_path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100

    hourly_png = tmp_path / "hourly.png"
    since, until = dt.datetime(2025, 3, 3, tzinfo=UTC), dt.datetime(2025, 3, 4, tzinfo=UTC)
    rep.write_png(rep.build_report(stores(str(db)), since, until, "hour", UTC), hourly_png)
    assert hourly_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    missing = CliRunner().invoke(
        cli_main, ["report", "--db", str(tmp_path / "none.db"), "--since", "2025-03-03"]
    )
    assert missing.exit_code == 3 and "no store at" in missing.output
    journal = tmp_path / "journal.db"  # a reader's journal given by mistake
    with Journal(journal, boot_id="b"):
        pass
    wrong = CliRunner().invoke(cli_main, ["report", "--db", str(journal), "--since", "2025-03-03"])
    assert wrong.exit_code == 3 and "is a reader's journal" in wrong.output
    bad = CliRunner().invoke(cli_main, ["report", "--db", str(db), "--since", "March"])
    assert bad.exit_code == 2 and "no ISO date" in bad.output


# -- fleet status ------------------------------------------------------------------------------


def test_fleet_status_table(
    broker: LocalBroker, reader: Reader, settings: MqttSettings, caplog: pytest.LogCaptureFixture
) -> None:
    births: list[dict[str, Any]] = [
        {"online": True, "device": "r1", "site": "hq", "door": "front", "version": "0.4.0",
         "boot_id": "b1", "backlog": 0, "clock_synced": True, "camera": "ok",
         "last_scan_wall_ns": at("2025-03-03T08:05:00"), "wall_ns": at("2025-03-03T09:00:00")},
        {"online": True, "device": "r2", "site": "hq", "door": "back", "version": "0.3.9",
         "boot_id": "b2", "backlog": 17, "clock_synced": False, "camera": "ok",
         "last_scan_wall_ns": None, "wall_ns": at("2025-03-03T09:00:00")},
        {"online": True, "device": "r3", "site": "annex", "door": "gate", "version": "0.4.0",
         "boot_id": "b3", "backlog": 2, "clock_synced": True, "camera": "ok",
         "last_scan_wall_ns": at("2025-03-02T18:00:00"), "wall_ns": at("2025-03-03T09:00:00")},
    ]  # fmt: skip
    for b in births:
        reader.publish(Topics(b["site"], b["device"]).status, dumps(b), retain=True)
    # r3 went away: its last will replaced the birth
    will = {"online": False, "device": "r3", "site": "annex", "door": "gate", "boot_id": "b3"}
    reader.publish(Topics("annex", "r3").status, dumps(will), retain=True)
    reader.publish(Topics("hq", "r4").status, b'{"device": "r4", "online": 1}', retain=True)
    # r2's updater rolled back its last job
    rolled = advance(
        Job("rollout-7", "0.3.9", "0.4.0", JobState.PENDING_COMMIT, "switched", step=4),
        Event(EventKind.ROLLBACK, "exited_at_start"),
    )
    state = StatePayload.from_job(
        rolled, site="hq", device="r2", current_version="0.3.9", wall_ns=1
    )
    reader.publish(OtaTopics("hq", "r2").state, state.to_bytes(), retain=True)

    with caplog.at_level(logging.DEBUG):
        snapshots = [collect_status(settings, settle_s=WAIT_S) for _ in range(5)]
    # its own clean disconnect is no error (paho's loop thread used to log one after it)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    snapshot = snapshots[-1]
    assert snapshot.complete
    assert fleet_rows(snapshot, UTC) == [
        ("r3", "annex", "gate", "-", "no", "-", "-", "-", "-"),
        ("r2", "hq", "back", "0.3.9", "yes", "17", "no", "-",
         "ROLLED_BACK exited_at_start 0.3.9→0.4.0"),
        ("r1", "hq", "front", "0.4.0", "yes", "0", "yes", "2025-03-03 08:05:00", "-"),
    ]  # fmt: skip
    assert snapshot.malformed == ("qrgate/v1/hq/r4/status: 'online' must be true or false, "
                                  "found 1",)  # fmt: skip

    result = CliRunner().invoke(cli_main, [
        "fleet", "status", "--broker", f"{broker.host}:{broker.port}", "--tz", "UTC",
    ], env={"COLUMNS": "160"})  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.output.splitlines()]
    header = [c for name in COLUMNS for c in name.split()]
    assert any(all(word in line for word in header) for line in lines)
    assert ["│", "r1", "│", "hq", "│", "front", "│", "0.4.0", "│", "yes", "│", "0", "│", "yes",
            "│", "2025-03-03", "08:05:00", "│", "-", "│"] in lines  # fmt: skip
    assert "3 readers, 2 online" in result.output

    down = CliRunner().invoke(cli_main, ["fleet", "status", "--broker", f"127.0.0.1:{free_port()}"])
    assert down.exit_code == 3 and "cannot reach broker" in down.output


def test_fleet_status_over_tls(tmp_path: Path) -> None:
    try:
        find_mosquitto()
    except BrokerError as e:
        _need("mosquitto", str(e))
    pki = make_test_pki(tmp_path / "pki", clients=("backoffice",))
    assert pki.client_cert is not None and pki.client_key is not None
    folder = tmp_path / "tls-broker"
    with LocalBroker(folder, tls=pki, require_certificate=True, persistence=False) as b:
        reader = MqttSettings(b.host, b.port, tls=True, ca_file=pki.ca_cert,
                              cert_file=pki.client_cert, key_file=pki.client_key)  # fmt: skip
        client = reader.client("tls-reader")
        connected = threading.Event()
        client.on_connect = lambda *_a: connected.set()
        client.connect(b.host, b.port)
        client.loop_start()
        try:
            assert connected.wait(WAIT_S)
            birth = {"online": True, "device": "t1", "site": "hq", "door": "gate"}
            info = client.publish(Topics("hq", "t1").status, dumps(birth), qos=1, retain=True)
            info.wait_for_publish(WAIT_S)
            assert info.is_published()
        finally:
            client.disconnect()
            client.loop_stop()
        args = ["fleet", "status", "--broker", f"{b.host}:{b.port}", "--cafile", str(pki.ca_cert),
                "--certfile", str(pki.client_cert), "--keyfile", str(pki.client_key)]  # fmt: skip
        result = CliRunner().invoke(cli_main, args, env={"COLUMNS": "160"})
        assert result.exit_code == 0, result.output
        assert "1 readers, 1 online" in result.output and "gate" in result.output
        refused = CliRunner().invoke(cli_main, args[:-4])  # TLS but no client certificate
        assert refused.exit_code == 3, refused.output


def test_broker_option_parsing() -> None:
    assert MqttSettings.parse("broker.example") == MqttSettings("broker.example", 1883)
    assert MqttSettings.parse("b:1999").port == 1999
    s = MqttSettings.parse("mqtts://b.example")
    assert (s.host, s.port, s.tls) == ("b.example", 8883, True)
    assert MqttSettings.parse("[::1]:1884") == MqttSettings("::1", 1884)
    assert MqttSettings.parse("b", tls=True).port == 8883
    with pytest.raises(ValueError, match="1-65535"):
        MqttSettings.parse("b:0")
    with pytest.raises(ValueError, match="scheme"):
        MqttSettings.parse("http://b")


def test_records_follow_the_contract() -> None:
    batch = parse_events(SITE, "r1", dumps({"device": "r1", "events": [gap(2, 5), event("r1", 6)]}))
    assert batch.gaps == (GapRecord(5, 2, 5, 4, "cap_rows", 1_741_000_000_000_000_000),)
    (e,) = batch.events
    assert (e.seq, e.event_id, e.door, e.direction, e.decision, e.decode_ms) == (
        6, "ev-r1-000006", "front", "in", "granted", 2.5)  # fmt: skip
    assert json.loads(e.detail_json) == {"note": "Cửa chính"}
    will = parse_status(SITE, "r1", dumps({"online": False, "device": "r1", "site": SITE}))
    assert (will.online, will.version, will.backlog) == (False, None, None)
    with pytest.raises(BadMessageError, match="site 'annex' is not the topic's 'hq'"):
        parse_status(SITE, "r1", dumps({"online": True, "device": "r1", "site": "annex"}))
    with pytest.raises(BadMessageError, match="'backlog' -1 is outside"):
        parse_status(SITE, "r1", dumps({"online": True, "device": "r1", "backlog": -1}))
