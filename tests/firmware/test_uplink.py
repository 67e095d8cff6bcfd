"""The MQTT uplink against a real mosquitto (LocalBroker), killed for real, with paho clients as
the back office: C15 (broker absent at boot), C16 (outage, and the daemon killed during it),
C17 (slow command, short keepalive), C18 (bad messages, a dead network thread), TLS and
password refusals, the last will, session take-overs, refused publishes, Home Assistant
discovery and the commands.

Time is scaled down for CI and the structure kept: C16 kills the broker for about 5 s instead
of 30 s, keepalives are 2-5 s instead of 30-60 s, and the reconnect backoff is capped at 1 s
instead of 60 s (the cap itself is a unit test).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from drivers.frames import Frame, FrameSource, GrayImage
from drivers.pins import make_pin_factory
from firmware.config import Config, load_config
from firmware.daemon import Reader, build_reader
from firmware.decoding.corpus import load_gray
from firmware.demo.broker import LocalBroker, TlsFiles, make_test_pki
from firmware.journal.events import NewEvent
from firmware.journal.reader import JournalReader
from firmware.journal.store import Journal
from firmware.pipeline import ScanReport
from firmware.policy.badges import BadgeList, write_badges
from firmware.uplink.identity import device_id
from firmware.uplink.topics import ALL_EVENTS, ALL_STATUS, PREFIX, Topics, parse_topic
from tests.firmware.daemons import Daemon, write_codes
from tests.firmware.readers import HASHER, write_reader_config
from tests.shared import case_file

WAIT_S = 30.0  # a generous bound for anything on loopback; never an expected duration
SITE = "lab"
DEVICE = "door-a"
HELD = b"DOOR1:7f3a9c21e4b8"  # the code in B06.png


# every test here: a broker at hand, and nothing left running after it
pytestmark = pytest.mark.usefixtures("no_leaks", "need_mosquitto")


# --- the back office ------------------------------------------------------------------------


class BackOffice:
    """The reference back office in miniature: a paho client with a persistent session that
    stores events by id, acknowledges the highest contiguous seq per device (retained, as the
    contract says), and keeps statuses, command results and everything else it sees."""

    def __init__(
        self,
        broker: LocalBroker,
        *,
        client_id: str = "backoffice",
        tls: ssl.SSLContext | None = None,
        ack: bool = True,
    ) -> None:
        self.cond = threading.Condition()
        self.events: dict[str, dict[str, Any]] = {}
        self.arrivals: list[tuple[str, Any]] = []  # ("event", seq) / ("result", request_id)
        self.covered: dict[str, set[int]] = {}  # device -> seqs stored or covered by a gap
        self.acked: dict[str, int] = {}
        self.duplicates = 0
        self.statuses: list[dict[str, Any]] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.latest: dict[str, bytes] = {}  # topic -> last payload (retained or not)
        self.ack = ack
        self.subscribed = threading.Event()
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        if tls is not None:
            c.tls_set_context(tls)
        c.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]  # floats work
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = lambda *_: self.subscribed.set()
        self.paho = c
        c.connect(broker.host, broker.port, keepalive=10)
        c.loop_start()
        assert self.subscribed.wait(WAIT_S), "back office did not subscribe"

    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        c.subscribe(
            [
                (ALL_EVENTS, 1),
                (ALL_STATUS, 1),
                (f"{PREFIX}/+/+/cmd/+/result", 1),
                (f"{PREFIX}/+/+/last_verdict", 1),
                (f"{PREFIX}/+/+/telemetry", 0),
                ("homeassistant/#", 1),
            ]
        )

    def _on_message(self, c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        parsed = parse_topic(msg.topic)
        with self.cond:
            self.latest[msg.topic] = bytes(msg.payload)
            if parsed is not None:
                site, device, rest = parsed
                doc = json.loads(msg.payload)
                if rest == "events":
                    self._store(c, site, device, doc["events"])
                elif rest == "status":
                    self.statuses.append(doc)
                elif rest.endswith("/result"):
                    self.results[doc["request_id"]] = doc
                    self.arrivals.append(("result", doc["request_id"]))
            self.cond.notify_all()

    def _store(self, c: mqtt.Client, site: str, device: str, events: list[dict[str, Any]]) -> None:
        covered = self.covered.setdefault(device, set())
        for e in events:
            if e["kind"] == "gap":
                covered.update(range(e["from_seq"], e["to_seq"] + 1))
                continue
            if e["event_id"] in self.events:
                self.duplicates += 1
            self.events[e["event_id"]] = e
            covered.add(e["seq"])
            self.arrivals.append(("event", e["seq"]))
        acked = start = self.acked.get(device, 0)
        while acked + 1 in covered:
            acked += 1
        if acked != start:
            self.acked[device] = acked
            if self.ack:
                c.publish(Topics(site, device).events_ack, json.dumps({"seq": acked}), 1, True)

    def wait(self, predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout_s)

    def command(self, device: str, name: str, request_id: str, args: Any = None) -> None:
        payload = json.dumps({"request_id": request_id, "args": args or {}}).encode()
        self.raw(Topics(SITE, device).command(name), payload)

    def raw(self, topic: str, payload: bytes) -> None:
        self.paho.publish(topic, payload, qos=1).wait_for_publish(WAIT_S)

    def result(self, request_id: str, timeout_s: float = WAIT_S) -> dict[str, Any]:
        assert self.wait(lambda: request_id in self.results, timeout_s), f"no result {request_id}"
        return self.results[request_id]

    def online(self, device: str) -> bool | None:
        payload = self.latest.get(Topics(SITE, device).status)
        return None if payload is None else bool(json.loads(payload)["online"])

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


def back_office(stack: ExitStack, broker: LocalBroker, **kw: Any) -> BackOffice:
    bo = BackOffice(broker, **kw)
    stack.callback(bo.close)
    return bo


def prepare_session(broker: LocalBroker) -> None:
    """Give the back office its persistent session while the broker is up, so messages
    published while it is away are queued for it."""
    broker.start()
    BackOffice(broker).close()
    broker.stop()


# --- readers in this process ------------------------------------------------------------------


def event(i: int) -> NewEvent:
    return NewEvent(
        kind="scan",
        wall_ns=time.time_ns(),
        clock_synced=False,
        mono_ns=time.monotonic_ns(),
        door="test-door",
        direction="in",
        decision="granted",
        reason="granted",
        detail={"n": i},
    )


class FeedSource(FrameSource):
    """A camera the test drives, at 20 frames/s: the images the test pushed, else a blank
    frame."""

    name = "feed"

    def __init__(self) -> None:
        self._q: queue.Queue[GrayImage] = queue.Queue()
        self._blank = np.full((480, 640), 200, np.uint8)
        self._seq = 0
        self._next = time.monotonic()
        self._closed = threading.Event()

    def push(self, image: GrayImage, frames: int = 3, gap: int = 12) -> None:
        """Show ``image`` for ``frames`` frames, then nothing for ``gap`` frames (longer than
        the repeat window, so the next push is a new presentation)."""
        for _ in range(frames):
            self._q.put(image)
        for _ in range(gap):
            self._q.put(self._blank)

    def open(self) -> None:
        self._closed.clear()

    def read(self, timeout_s: float = 5.0) -> Frame | None:
        self._next = max(self._next + 0.05, time.monotonic())
        self._closed.wait(max(0.0, self._next - time.monotonic()))  # the frame interval
        try:
            image = self._q.get_nowait()
        except queue.Empty:
            image = self._blank
        self._seq += 1
        return Frame(image, time.monotonic_ns(), self._seq, "feed")

    def close(self) -> None:
        self._closed.set()


def uplink_toml(
    port: int,
    *,
    host: str = "127.0.0.1",
    keepalive_s: int = 5,
    reconnect: tuple[float, float] = (0.1, 1.0),
    extra: str = "",
) -> str:
    """``[uplink]`` for a test: time scaled down (keepalive 5 s, reconnect backoff from 0.1 s
    up to 1 s) unless told otherwise."""
    return f"""
[uplink]
enabled = true
host = "{host}"
port = {port}
site = "{SITE}"
keepalive_s = {keepalive_s}
reconnect_min_s = {reconnect[0]}
reconnect_max_s = {reconnect[1]}
connect_timeout_s = 5
{extra}
"""


def reader_config(
    folder: Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    reconnect: tuple[float, float] = (0.1, 1.0),
    extra: str = "",
) -> Config:
    folder.mkdir(parents=True, exist_ok=True)
    return load_config(
        write_reader_config(
            folder,
            allow=[HELD],
            repeat_window_s=0.5,
            extra=uplink_toml(port, host=host, reconnect=reconnect, extra=extra),
        )
    )


class Running:
    """A started reader with its feed camera and a queue of its scan reports."""

    def __init__(
        self, config: Config, device: str = DEVICE, source: FeedSource | None = None
    ) -> None:
        self.source = source if source is not None else FeedSource()
        self.reports: queue.Queue[ScanReport] = queue.Queue()
        self.reader: Reader = build_reader(
            config,
            pin_factory=make_pin_factory("mock"),
            source=self.source,
            listeners=[self.reports.put],
            clock_synced=lambda: False,
            device_id=device,
        )
        self.reader.start()
        assert self.reader.uplink is not None

    @property
    def uplink(self) -> Any:
        assert self.reader.uplink is not None
        return self.reader.uplink

    @property
    def link(self) -> Any:
        return self.uplink.link

    def ready(self, connects: int = 1) -> None:
        """Wait until connection number ``connects`` is up and its subscriptions confirmed."""
        assert self.uplink.wait(
            lambda s: s["subscribed"] and s["link"]["connects"] == connects, WAIT_S
        ), self.uplink.stats()

    def scan(self, image: GrayImage) -> ScanReport:
        """Show ``image`` to the camera until it is decided."""
        self.source.push(image)
        return self.reports.get(timeout=WAIT_S)

    def append(self, i: int) -> int:
        """Journal a scan event directly (as the scan thread would) and wake the uplink."""
        seq = self.reader.journal.append(event(i)).seq
        self.uplink.notify()
        return seq

    def stop(self) -> None:
        self.reader.stop()


def running(stack: ExitStack, config: Config, device: str = DEVICE) -> Running:
    r = Running(config, device)
    stack.callback(r.stop)
    return r


def journal_ids(config: Config, kind: str | None = None) -> dict[str, int]:
    rows = JournalReader(config.journal_path).tail(1_000_000)
    return {s.event_id: s.seq for s in rows if kind is None or s.event.kind == kind}


def journal_flags(config: Config) -> dict[int, tuple[bool, bool]]:
    return {s.seq: (s.published, s.acked) for s in JournalReader(config.journal_path).tail(10**6)}


@pytest.fixture(scope="module")
def held() -> GrayImage:
    return load_gray(case_file("B06.png"))


def records(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.WARNING) -> int:
    return sum(1 for r in caplog.records if r.levelno >= level and text in r.getMessage())


# --- C15: broker absent at boot -------------------------------------------------------------


def test_c15_no_dns_at_boot_then_the_name_resolves(
    tmp_path: Path,
    stack: ExitStack,
    held: GrayImage,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    real = socket.getaddrinfo
    resolves = threading.Event()

    def getaddrinfo(host: Any, *args: Any, **kw: Any) -> Any:
        # broker.invalid fails in the real resolver until "DNS" knows it
        if host == "broker.invalid" and resolves.is_set():
            host = "127.0.0.1"
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    cfg = reader_config(tmp_path / "r", broker.port, host="broker.invalid")
    r = running(stack, cfg)
    # the reader decides and journals while the broker's name does not resolve
    assert [r.scan(held).decision.granted for _ in range(3)] == [True, True, True]
    assert r.link.wait(lambda s: s.failures >= 5, WAIT_S)
    st = r.link.stats()
    assert (st.problem, st.connects, st.state in ("waiting", "connecting")) == ("dns", 0, True)
    assert "cannot resolve broker host 'broker.invalid'" in (st.last_failure or "")
    assert records(caplog, "cannot resolve broker host") == 1  # once, not once per attempt
    # the reconnect ceiling grows with the outage's age, up to the (test) cap
    assert r.link.wait(lambda s: s.backoff_ceiling_s == 1.0, WAIT_S)
    scans = journal_ids(cfg, "scan")
    assert len(scans) == 3

    before = r.link.stats().attempts
    resolves.set()
    r.ready()
    assert r.link.stats().attempts <= before + 1  # the first attempt after DNS came back
    assert bo.wait(lambda: set(scans) <= set(bo.events))
    assert bo.online(DEVICE) is True


def test_c15_port_closed_then_broker_starts(
    tmp_path: Path, stack: ExitStack, held: GrayImage
) -> None:
    broker = LocalBroker(tmp_path / "b")
    stack.callback(broker.stop)
    prepare_session(broker)
    cfg = reader_config(tmp_path / "r", broker.port)
    r = running(stack, cfg)
    assert r.scan(held).decision.granted
    assert r.link.wait(lambda s: s.failures >= 3, WAIT_S)
    assert r.link.stats().problem == "refused"
    assert r.scan(held).decision.granted

    broker.start()
    before = r.link.stats().attempts
    r.ready()
    assert r.link.stats().attempts <= before + 1
    bo = back_office(stack, broker)  # its session queued what came before it reconnected
    scans = journal_ids(cfg, "scan")
    assert len(scans) == 2
    assert bo.wait(lambda: set(scans) <= set(bo.events))
    assert r.uplink.wait(lambda s: s["forwarder"]["acked_through"] >= max(scans.values()), WAIT_S)
    assert r.reader.journal.flush()
    assert set(journal_flags(cfg).values()) == {(True, True)}


def test_c15_port_closed_for_60_s_with_the_field_backoff(
    tmp_path: Path, stack: ExitStack, held: GrayImage
) -> None:
    broker = LocalBroker(tmp_path / "b")
    stack.callback(broker.stop)
    # the field's reconnect settings (0.5 s up to 60 s), not the tests' scaled-down ones
    cfg = reader_config(tmp_path / "r", broker.port, reconnect=(0.5, 60.0))
    r = running(stack, cfg)
    assert r.scan(held).decision.granted
    # about the field case's 60 s with the port closed: the backoff ceiling grows with the
    # outage (half of it) while the door goes on working
    assert r.link.wait(lambda s: s.backoff_ceiling_s >= 25.0, 90.0), r.link.stats()
    st = r.link.stats()
    assert st.problem == "refused" and st.connects == 0
    # exponential in effect: each wait at most half the outage so far, so few attempts
    assert 6 <= st.attempts <= 60, st.attempts
    ceiling = st.backoff_ceiling_s
    assert r.scan(held).decision.granted
    broker.start()
    # "connects within one backoff period after the broker appears"
    assert r.link.wait(lambda s: s.connects == 1, ceiling + 10.0)
    assert r.scan(held).decision.granted


# --- C16: broker outage --------------------------------------------------------------------------


def test_c16_outage_loses_nothing_and_publishes_only_on_puback(
    tmp_path: Path, stack: ExitStack
) -> None:
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    cfg = reader_config(tmp_path / "r", broker.port, extra="resend_after_s = 5")
    r = running(stack, cfg)
    r.ready()
    start = time.monotonic()
    frozen: list[int] = []
    for i in range(1000):
        if i == 100:
            # SIGSTOP: the broker takes our packets into its socket buffer but answers
            # nothing, so what goes out now is sent, yet not acknowledged
            os.kill(broker.pid or 0, signal.SIGSTOP)
        if i == 120:
            assert r.uplink.wait(lambda s: s["forwarder"]["in_flight"] >= 20, WAIT_S)
            assert r.reader.journal.flush()
            flags = journal_flags(cfg)
            assert [flags[s][0] for s in frozen] == [False] * 20
            os.kill(broker.pid or 0, signal.SIGCONT)
        if i == 200:
            broker.kill()
        if i == 800:  # the field case's 30 s outage at 20 scans/s
            broker.start()
        seq = r.append(i)
        if 100 <= i < 120:
            frozen.append(seq)
        time.sleep(max(0.0, start + (i + 1) / 20 - time.monotonic()))  # pacing: 20 scans/s
    ids = journal_ids(cfg)
    assert len(ids) == 1000
    assert bo.wait(lambda: set(ids) <= set(bo.events), 60.0)
    assert {bo.events[i]["seq"] for i in ids} == set(ids.values())
    assert r.link.stats().connects == 2  # one reconnect, no flapping
    assert r.uplink.wait(lambda s: s["forwarder"]["acked_through"] == max(ids.values()), WAIT_S)
    assert r.uplink.wait(lambda s: s["forwarder"]["in_flight"] == 0, WAIT_S)
    assert r.reader.journal.flush()
    assert set(journal_flags(cfg).values()) == {(True, True)}
    assert r.uplink.stats()["forwarder"]["max_in_flight"] <= 64
    bo.command(DEVICE, "report_status", "after-outage")  # subscriptions were renewed
    result = bo.result("after-outage")
    assert result["ok"] and result["result"]["backlog"] == 0


def daemon_config(
    folder: Path,
    reel: Path,
    port: int,
    allow: list[bytes],
    *,
    keepalive_s: int = 5,
    extra: str = "",
) -> Path:
    f = write_reader_config(
        folder,
        allow=allow,
        reel=reel,
        fps=20,
        repeat_window_s=3600,
        extra=uplink_toml(port, keepalive_s=keepalive_s, extra=extra),
    )
    f.write_text(f.read_text().replace("fps = 20", "fps = 20\nloop = true"))
    return f


def test_c16_daemon_killed_during_the_outage(tmp_path: Path, stack: ExitStack) -> None:
    payloads = [f"QRG-C16:{i:04d}".encode() for i in range(1000)]
    reel_a = write_codes(tmp_path / "reel-a", payloads[:300])
    reel_b = write_codes(tmp_path / "reel-b", payloads[300:])
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    conf = tmp_path / "r"
    conf.mkdir()
    cfg_a = daemon_config(conf, reel_a, broker.port, payloads, extra="resend_after_s = 5")
    cfg_b = conf / "qrgate-b.toml"
    cfg_b.write_text(cfg_a.read_text().replace(str(reel_a), str(reel_b)))
    device = device_id()  # the daemon's own id (this machine's)

    a = Daemon(cfg_a)
    stack.callback(a.kill)
    assert a.wait_for(r"scan seq=200 ", 60), a.tail()
    broker.kill()
    assert a.wait_for(r"scan seq=300 ", 60), a.tail()
    a.kill()  # SIGKILL while the broker is down: its unsent rows are only in the journal
    b = Daemon(cfg_b)
    stack.callback(b.kill)
    assert b.wait_for(r"scan seq=30[1-9] ", 60), b.tail()
    broker.start()
    assert b.wait_for(r"scan seq=1000 ", 90), b.tail()
    config = load_config(cfg_a)
    scans = journal_ids(config, "scan")
    assert len(scans) == 1000
    assert bo.wait(lambda: set(scans) <= set(bo.events), 60.0), len(set(scans) - set(bo.events))
    assert sorted(bo.events[i]["seq"] for i in scans) == sorted(scans.values())
    bo.command(device, "report_status", "after-restart")
    assert bo.result("after-restart")["ok"]
    b.proc.send_signal(signal.SIGTERM)
    assert b.finish() == 0
    assert bo.wait(lambda: bo.online(device) is False)  # the clean stop's offline status


# --- C17: slow command, short keepalive ------------------------------------------------------


def test_c17_slow_command_does_not_stall_keepalive_or_events(
    tmp_path: Path, stack: ExitStack
) -> None:
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    cfg = reader_config(tmp_path / "r", broker.port)  # keepalive_s = 5
    r = running(stack, cfg)
    r.ready()
    lanes = r.uplink.lanes
    real = lanes.handlers["reload_config"]
    started = threading.Event()

    def slow_reload(cmd: Any) -> Any:
        started.set()
        threading.Event().wait(10.0)  # the slow part: a credential list that takes 10 s
        return real(cmd)

    lanes.handlers["reload_config"] = slow_reload
    bo.command(DEVICE, "reload_config", "slow-1")
    assert started.wait(WAIT_S)
    during: list[int] = []
    t0 = time.monotonic()
    while "slow-1" not in bo.results and time.monotonic() - t0 < WAIT_S:
        during.append(r.append(len(during)))
        time.sleep(0.05)  # pacing: 20 scans/s while the command runs
    result = bo.result("slow-1")
    assert result["ok"] and result["result"]["version"] == 1
    with bo.cond:
        before_result = {seq for kind, seq in bo.arrivals[: bo.arrivals.index(("result", "slow-1"))]
                         if kind == "event"}  # fmt: skip
    assert len(during) >= 150  # about 10 s of scans
    # events kept flowing while the command ran: nearly all of them arrived before its result
    assert len(set(during) & before_result) >= len(during) - 5
    assert r.link.stats().connects == 1  # never dropped
    assert "exceeded timeout" not in broker.log_path.read_text()


# --- C18: bad messages, a dead network thread ------------------------------------------------


def test_c18_bad_messages_are_rejected_and_the_link_lives(
    tmp_path: Path, stack: ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    cfg = reader_config(tmp_path / "r", broker.port)
    r = running(stack, cfg)
    r.ready()
    topic = Topics(SITE, DEVICE).command("unlock")
    for payload in (b"{not json", b"\xff\xfe", b"x" * (1 << 20)):
        bo.raw(topic, payload)
    bo.command(DEVICE, "unlock", "good-1")
    result = bo.result("good-1")
    assert result["ok"], result
    assert r.reader.feedback.relay.pulse_count == 1
    rejected = [m.getMessage() for m in caplog.records if "rejected a message" in m.getMessage()]
    assert len(rejected) == 3
    assert "not JSON" in rejected[0] and "not UTF-8 (byte 0)" in rejected[1]
    assert "1048576 bytes, over the 262144 limit" in rejected[2]
    assert r.uplink.stats()["bad_messages"] == 3
    assert r.link.stats().connects == 1  # the connection lived through it
    kinds = [(s.event.kind, s.event.reason) for s in JournalReader(cfg.journal_path).tail(5)]
    assert kinds == [("command", "remote_unlock")]


class Die(BaseException):
    """Not an Exception: nothing but the thread's last line of defence catches it."""


@pytest.mark.parametrize("protocol", ["5"])
def test_c18_exception_in_a_paho_callback_and_a_dead_network_thread(
    tmp_path: Path, stack: ExitStack, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    cfg = reader_config(tmp_path / "r", broker.port, extra=f'protocol = "{protocol}"')
    r = running(stack, cfg)
    r.ready()

    def boom(*_: Any) -> None:
        raise RuntimeError("boom in on_message")

    r.link.client.on_message = boom  # paho would silently lose its thread to this
    bo.command(DEVICE, "report_status", "lost-1")
    assert r.link.wait(lambda s: s.loop_failures == 1, WAIT_S)
    r.ready(2)
    bo.command(DEVICE, "report_status", "after-1")
    assert bo.result("after-1")["ok"]

    def die(*_: Any) -> None:
        raise Die

    r.link.client.on_message = die  # this one ends the network thread itself
    bo.command(DEVICE, "report_status", "lost-2")
    assert r.link.wait(lambda s: s.thread_restarts == 1, WAIT_S)
    r.ready(3)
    bo.command(DEVICE, "report_status", "after-2")
    assert bo.result("after-2")["ok"]
    assert "lost-1" not in bo.results and "lost-2" not in bo.results
    assert records(caplog, "network loop failed: RuntimeError: boom") >= 1
    assert records(caplog, "MQTT network thread was dead", logging.ERROR) == 1


# --- TLS, passwords ----------------------------------------------------------------------------


def tls_context(pki: TlsFiles, cert: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(certfile=str(cert[0]), keyfile=str(cert[1]))
    return ctx


def test_tls_client_certificate_required(
    tmp_path: Path, stack: ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    pki = make_test_pki(tmp_path / "pki", clients=(DEVICE, "backend"))
    broker = stack.enter_context(LocalBroker(tmp_path / "b", tls=pki, require_certificate=True))
    bo = back_office(stack, broker, tls=tls_context(pki, pki.clients["backend"]))
    crt, key = pki.clients[DEVICE]
    good = reader_config(
        tmp_path / "good",
        broker.port,
        extra=f'transport = "tls"\nca = "{pki.ca_cert}"\ncert = "{crt}"\nkey = "{key}"',
    )
    r = Running(good)
    try:
        r.ready()
        assert bo.wait(lambda: bo.online(DEVICE) is True)
    finally:
        r.stop()
    assert bo.wait(lambda: bo.online(DEVICE) is False)  # clean stop: offline, over TLS too

    anon = reader_config(
        tmp_path / "anon", broker.port, extra=f'transport = "tls"\nca = "{pki.ca_cert}"'
    )
    r = running(stack, anon, device="door-b")
    assert r.link.wait(lambda s: s.auth_refusals >= 5, WAIT_S)
    st = r.link.stats()
    assert (st.problem, st.connects) == ("auth", 0)
    assert "refused our TLS client certificate" in (st.last_failure or "")
    assert records(caplog, "refused our TLS client certificate", logging.ERROR) == 1
    # backed off to the (test) cap as the refusals go on: no hot loop
    assert r.link.wait(lambda s: s.backoff_ceiling_s == 1.0, WAIT_S)


@pytest.mark.parametrize("password", ["right", "wrong"])
def test_password_login(
    tmp_path: Path, stack: ExitStack, password: str, caplog: pytest.LogCaptureFixture
) -> None:
    passwd = tmp_path / "passwd"
    subprocess.run(
        [shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-c", "-b",
         str(passwd), "door", "right"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    passwd.chmod(0o600)
    broker = stack.enter_context(
        LocalBroker(tmp_path / "b", allow_anonymous=False, extra_config=f"password_file {passwd}")
    )
    secret = tmp_path / "secret"
    secret.write_text(password + "\n")
    cfg = reader_config(
        tmp_path / "r", broker.port, extra=f'username = "door"\npassword_file = "{secret}"'
    )
    r = running(stack, cfg)
    if password == "right":
        r.ready()
        return
    assert r.link.wait(lambda s: s.auth_refusals >= 3, WAIT_S)
    st = r.link.stats()
    assert (st.problem, st.connects) == ("auth", 0)
    assert "refused the connection: Not authorized" in (st.last_failure or "")
    assert records(caplog, "refused the connection", logging.ERROR) == 1


# --- last will ---------------------------------------------------------------------------------


KEEPALIVE = 2
MOSQUITTO_CHECK_S = 7.0


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_last_will_says_offline(tmp_path: Path, stack: ExitStack, how: str) -> None:
    """SIGKILL: the kernel closes the socket, the broker sees it at once. SIGSTOP: the process
    hangs with its socket open (what a power cut or a dead network looks like from the
    broker): only the keepalive (2 s here) can tell, after 1.5 of them. mosquitto 2.0 adds
    its own slack: its keepalive__check (src/keepalive.c) runs only once more than 5 s have
    passed since the last run, on whole seconds, so up to 7 s more."""
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    reel = tmp_path / "reel"
    reel.mkdir()
    shutil.copy(case_file("B07.png"), reel / "0.png")  # a scene without a code
    (tmp_path / "r").mkdir()
    cfg = daemon_config(tmp_path / "r", reel, broker.port, [], keepalive_s=KEEPALIVE)
    device = device_id()
    d = Daemon(cfg)
    stack.callback(d.kill)
    assert bo.wait(lambda: bo.online(device) is True), d.tail()
    birth = bo.statuses[-1]
    d.proc.send_signal(getattr(signal, how))
    gone = time.monotonic()
    assert bo.wait(lambda: bo.online(device) is False, KEEPALIVE * 1.5 + MOSQUITTO_CHECK_S)
    elapsed = time.monotonic() - gone
    assert bo.statuses[-1] == {
        "online": False,
        "device": device,
        "site": SITE,
        "door": "test-door",
        "boot_id": birth["boot_id"],
    }
    print(f"offline status {elapsed:.2f} s after {how} (keepalive {KEEPALIVE} s)")


# --- take-overs and refused publishes ----------------------------------------------------------


def impostor(broker: LocalBroker, protocol: MQTTProtocolVersion, *, reconnect: bool) -> mqtt.Client:
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"qrgate-{DEVICE}",
        protocol=protocol,
        reconnect_on_failure=reconnect,
    )
    c.reconnect_delay_set(0.05, 0.1)  # type: ignore[arg-type]  # floats work
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


class TakeoverBroker:
    """Speaks just enough MQTT 5 on a real socket: answers every CONNECT with a CONNACK and
    then DISCONNECT reason 0x8E "Session taken over", as a broker does when another client
    connects with the same id (mosquitto 2.0.11 just closes the socket instead)."""

    CONNACK = bytes([0x20, 0x03, 0x00, 0x00, 0x00])
    TAKEN_OVER = bytes([0xE0, 0x02, 0x8E, 0x00])

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sessions = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(WAIT_S)
                try:
                    if not conn.recv(4096):  # the CONNECT packet
                        continue
                    conn.sendall(self.CONNACK)
                    conn.sendall(self.TAKEN_OVER)
                    self.sessions += 1
                except OSError:
                    continue

    def close(self) -> None:
        # shutdown wakes the accept() in the serving thread; close alone does not
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(WAIT_S)


def test_mqtt5_session_taken_over_is_reported_not_fought(
    tmp_path: Path, stack: ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    fake = TakeoverBroker()
    stack.callback(fake.close)
    cfg = reader_config(tmp_path / "r", fake.port, extra='protocol = "5"')
    r = running(stack, cfg)
    assert r.link.wait(lambda s: s.takeovers >= 2, WAIT_S)
    st = r.link.stats()
    assert st.problem == "taken_over"
    assert "another client connected" in (st.last_failure or "")
    assert records(caplog, "session taken over") == 1  # reported once, not per take-over
    assert st.attempts <= st.takeovers + 1  # one attempt per take-over: backed off, no loop


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_repeated_drops_right_after_connect_are_reported_as_takeover(
    tmp_path: Path, stack: ExitStack, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    cfg = reader_config(tmp_path / "r", broker.port, extra=f'protocol = "{protocol}"')
    r = running(stack, cfg)
    r.ready()
    # a clone with our client id that reconnects at once whenever it is kicked out
    other = impostor(broker, mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311, reconnect=True)
    try:
        assert r.link.wait(lambda s: s.takeovers >= 1, WAIT_S)
        assert "connections in a row dropped within 10 s" in (r.link.stats().last_failure or "")
        assert records(caplog, "session take-over") == 1
    finally:
        other.disconnect()
        other.loop_stop()
    assert r.link.wait(lambda s: s.state == "connected", WAIT_S)
    # a later birth status reports it (the broker also published our will at each kick)
    assert bo.wait(
        lambda: any(st["online"] and st["uplink"]["takeovers"] >= 1 for st in bo.statuses)
    )


def test_mqtt5_refused_puback_is_not_a_publish(tmp_path: Path, stack: ExitStack) -> None:
    acl = tmp_path / "acl"
    deny = f"topic readwrite {PREFIX}/{SITE}/+/status\ntopic readwrite {PREFIX}/+/+/cmd/#\n"
    acl.write_text(deny + f"topic read {PREFIX}/+/+/events\n")
    broker = stack.enter_context(LocalBroker(tmp_path / "b", extra_config=f"acl_file {acl}"))
    cfg = reader_config(tmp_path / "r", broker.port, extra='protocol = "5"')
    r = running(stack, cfg)
    r.ready()
    seqs = [r.append(i) for i in range(3)]
    assert r.uplink.wait(lambda s: s["forwarder"]["refused"] >= 1, WAIT_S)
    assert r.reader.journal.flush()
    assert [journal_flags(cfg)[s][0] for s in seqs] == [False] * 3
    acl.write_text(deny + f"topic readwrite {PREFIX}/+/+/events\n")
    os.kill(broker.pid or 0, signal.SIGHUP)  # mosquitto reloads its ACL
    assert r.uplink.wait(lambda s: s["forwarder"]["events"] >= 3, WAIT_S)
    assert r.reader.journal.flush()
    assert [journal_flags(cfg)[s][0] for s in seqs] == [True] * 3


# --- Home Assistant discovery, last verdict, unlock and reload ---------------------------------


def test_home_assistant_discovery_unlock_button_and_reload(
    tmp_path: Path, stack: ExitStack, held: GrayImage
) -> None:
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    cfg = reader_config(tmp_path / "r", broker.port, extra="ha_discovery = true\ntelemetry_s = 1")
    r = running(stack, cfg)
    node = f"qrgate_{DEVICE}"
    topics = [
        f"homeassistant/binary_sensor/{node}/online/config",
        f"homeassistant/sensor/{node}/last_verdict/config",
        f"homeassistant/button/{node}/unlock/config",
    ]
    assert bo.wait(lambda: all(t in bo.latest for t in topics))
    button = json.loads(bo.latest[topics[2]])
    sensor = json.loads(bo.latest[topics[1]])

    assert r.scan(held).decision.granted
    assert bo.wait(lambda: sensor["state_topic"] in bo.latest)
    verdict = json.loads(bo.latest[sensor["state_topic"]])
    assert (verdict["decision"], verdict["reason"], verdict["door"]) == (
        "granted",
        "granted",
        "test-door",
    )

    bo.raw(button["command_topic"], button["payload_press"].encode())  # press "Unlock"
    assert bo.result("homeassistant")["ok"]
    assert r.reader.feedback.relay.pulse_count == 2
    assert bo.wait(
        lambda: any(e["kind"] == "command" and e["reason"] == "remote_unlock"
                    for e in bo.events.values())
    )  # fmt: skip

    badges = cfg.policy.badges
    assert badges is not None
    badges.write_text('{"allow": [42]}')
    bo.command(DEVICE, "reload_config", "bad-list")
    bad = bo.result("bad-list")
    assert not bad["ok"] and "allow[0]" in bad["error"] and "last good badge list" in bad["error"]
    assert r.scan(held).decision.granted  # still the last good list
    write_badges(badges, BadgeList.of(deny=[HASHER.subject(HELD)], version=2))
    bo.command(DEVICE, "reload_config", "revoke")
    assert bo.result("revoke") == {
        "request_id": "revoke",
        "ok": True,
        "result": {"version": 2, "allow": 0, "deny": 1},
    }
    assert str(r.scan(held).decision.reason) == "revoked"

    telemetry = Topics(SITE, DEVICE).telemetry
    assert bo.wait(lambda: telemetry in bo.latest)
    t = json.loads(bo.latest[telemetry])
    assert set(t) == {
        "wall_ns", "fps", "decode_ms_p50", "decode_ms_p99", "frames_decoded", "frames_dropped",
        "cpu_percent", "temperature_c", "disk_free_bytes", "backlog", "in_flight",
    }  # fmt: skip
    assert t["fps"] > 0 and t["frames_decoded"] >= 4 and t["decode_ms_p50"] > 0
    assert t["disk_free_bytes"] > 0 and t["backlog"] >= 0 and t["in_flight"] >= 0


# --- throughput ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 50])
def test_drain_rate(tmp_path: Path, stack: ExitStack, batch: int) -> None:
    broker = stack.enter_context(LocalBroker(tmp_path / "b", persistence=False))
    bo = back_office(stack, broker)
    cfg = reader_config(tmp_path / "r", broker.port, extra=f"batch = {batch}")
    n = 5000
    cfg.reader.state_dir.mkdir()
    with Journal(cfg.journal_path, boot_id="earlier") as j:  # a backlog from before the start
        for i in range(n):
            j.append(event(i))
    r = running(stack, cfg)
    r.ready()
    t0 = time.monotonic()
    assert r.uplink.wait(lambda s: s["forwarder"]["events"] >= n, 60.0)
    rate = n / (time.monotonic() - t0)
    fwd = r.uplink.stats()["forwarder"]
    assert fwd["max_in_flight"] <= 64
    if batch == 1:
        assert fwd["messages"] == n
    else:
        assert fwd["messages"] <= n // 50 + 64
    assert bo.wait(lambda: len(bo.events) >= n, 60.0)
    print(f"drained {n} events, batch {batch}: {rate:.0f} events/s, {fwd['messages']} messages")
