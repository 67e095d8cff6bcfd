"""The uplink's parts without a broker: device id, backoff, [uplink] config, command parsing,
status and discovery payloads, and the forwarder's outbox bookkeeping against a real journal
(PUBACKs are handed to it by the test, so every step is deterministic)."""

from __future__ import annotations

import dataclasses
import json
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware.config import load_config
from firmware.exceptions import BadMessageError, CommandError, ConfigError, DeviceIdentityError
from firmware.journal.events import NewEvent
from firmware.journal.outbox import OutboxReader
from firmware.journal.store import Journal
from firmware.metrics import PipelineMetrics
from firmware.policy.badges import BadgeKind, BadgeList, write_badges
from firmware.policy.policy import Policy
from firmware.policy.subjects import SubjectHasher
from firmware.uplink.commands import (
    Command,
    CommandLanes,
    parse_command,
    reload_badges_handler,
    unlock_handler,
)
from firmware.uplink.forwarder import Forwarder
from firmware.uplink.identity import client_id, device_id
from firmware.uplink.link import Backoff, LinkSettings, ReconnectBackoff
from firmware.uplink.status import Identity, ReaderState, Telemetry, ha_discovery
from firmware.uplink.topics import Topics

# --- device id ------------------------------------------------------------------------------


def test_device_id_prefers_board_serial_then_cpuinfo_then_machine_id(tmp_path: Path) -> None:
    dt, cpu, mid = tmp_path / "serial-number", tmp_path / "cpuinfo", tmp_path / "machine-id"
    dt.write_bytes(b"10000000A1B2C3D4\x00")
    cpu.write_text("processor\t: 0\nHardware\t: BCM2835\nSerial\t\t: 00000000deadbeef\n")
    mid.write_text("3d1219c7c4c5404aaa1f6d2a48adfda4\n")
    paths = {"devicetree": dt, "cpuinfo": cpu, "machine_id": mid}
    assert device_id(**paths) == "10000000a1b2c3d4"
    dt.write_bytes(b"0000000000000000\x00")  # boards and VMs without a serial say zeros
    assert device_id(**paths) == "00000000deadbeef"
    cpu.write_text("processor\t: 0\n")
    assert device_id(**paths) == "3d1219c7c4c5404aaa1f6d2a48adfda4"
    mid.write_text("not/an id\n")
    with pytest.raises(DeviceIdentityError, match="machine-id"):
        device_id(**paths)
    assert client_id("10000000a1b2c3d4") == "qrgate-10000000a1b2c3d4"


# --- backoff ----------------------------------------------------------------------------------


def test_backoff_is_exponential_full_jitter_and_capped() -> None:
    b = Backoff(0.5, 60.0, random.Random(7))
    ceilings, delays = [], []
    for _ in range(12):
        ceilings.append(b.ceiling_s)
        delays.append(b.next())
    assert ceilings == [0.5, 1, 2, 4, 8, 16, 32, 60, 60, 60, 60, 60]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered: no two alike
    assert max(delays[7:]) <= 60.0
    assert all(30.0 <= b.next(floor=0.5) <= 60.0 for _ in range(20))
    b.reset()
    assert b.ceiling_s == 0.5


class FakeClock:
    """Monotonic seconds the test sets."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_reconnect_ceiling_follows_the_age_of_the_outage() -> None:
    clock = FakeClock()
    b = ReconnectBackoff(0.5, 60.0, rng=random.Random(7), clock=clock)
    assert (b.ceiling_s, b.outage_s) == (0.5, 0.0)
    assert 0.0 <= b.next() <= 0.5  # the first failure starts the outage
    start = clock.t
    ceilings = []
    for age in (0.5, 1, 2, 3, 10, 60, 119, 120, 3600):
        clock.t = start + age
        ceilings.append(b.ceiling_s)
    assert ceilings == [0.5, 0.5, 1, 1.5, 5, 30, 59.5, 60, 60]  # half the age, 0.5 s to 60 s
    delays = [b.next() for _ in range(50)]
    assert all(0.0 <= d <= 60.0 for d in delays) and len(set(delays)) == 50  # jittered
    assert all(30.0 <= b.next(floor=0.5) <= 60.0 for _ in range(20))
    b.reset()  # a connection stayed up
    assert (b.ceiling_s, b.outage_s) == (0.5, 0.0)
    clock.t += 500
    b.next()  # a new outage starts at its own first failure, not at the last reset
    clock.t += 4
    assert b.ceiling_s == 2.0
    with pytest.raises(ValueError):
        ReconnectBackoff(0.0, 60.0)
    with pytest.raises(ValueError):
        ReconnectBackoff(0.5, 60.0, share=0.0)


def reconnect_after(backoff: Any, clock: FakeClock, outage_s: float) -> float:
    """Seconds from the broker's return to the first attempt after it: the link's loop
    (fail, wait the next delay, try again) with attempts that take no time."""
    start = clock.t
    while clock.t - start < outage_s:
        clock.t += backoff.next()
    return clock.t - start - outage_s


def test_reconnect_finds_a_returning_broker_within_half_the_outage() -> None:
    for outage in (0.2, 3.0, 20.0):
        late = []
        for seed in range(1000):
            clock = FakeClock()
            b = ReconnectBackoff(0.5, 60.0, rng=random.Random(seed), clock=clock)
            late.append(reconnect_after(b, clock, outage))
        assert max(late) <= max(0.5, outage / 2)
    # why not doubling ceilings: after a 3 s outage they overshoot that often
    clock = FakeClock()
    doubling = [
        reconnect_after(Backoff(0.5, 60.0, random.Random(s)), clock, 3.0) for s in range(1000)
    ]
    assert sum(d > 1.5 for d in doubling) > 300


def test_reconnect_attempts_thin_out_in_a_long_outage() -> None:
    clock = FakeClock()
    b = ReconnectBackoff(0.5, 60.0, rng=random.Random(1), clock=clock)
    start, ages = clock.t, []
    while clock.t - start < 3600:
        clock.t += b.next()
        ages.append(clock.t - start)
    assert sum(a <= 10 for a in ages) <= 30  # a few per second at first
    assert sum(a > 1800 for a in ages) <= 80  # about one per 30 s at the 60 s cap
    assert len(ages) < 200  # an hour: no hot loop


# --- config -----------------------------------------------------------------------------------

BASE = """
[reader]
state_dir = "state"
[camera]
source = "replay"
path = "reel"
"""


def load(tmp_path: Path, uplink: str) -> Any:
    f = tmp_path / "qrgate.toml"
    f.write_text(BASE + "[uplink]\n" + uplink)
    return load_config(f)


def test_uplink_config_defaults_and_values(tmp_path: Path) -> None:
    assert load(tmp_path, "").uplink.enabled is False
    u = load(
        tmp_path,
        """enabled = true
host = "mqtt.example.org"
transport = "tls"
protocol = "5"
keepalive_s = 45
ca = "pki/ca.crt"
cert = "pki/reader.crt"
key = "pki/reader.key"
username = "door-7"
password_file = "secret"
site = "hq"
window = 32
batch = 20
telemetry_s = 0
ha_discovery = true
""",
    ).uplink
    assert (u.host, u.port, u.transport, u.protocol, u.keepalive_s) == (
        "mqtt.example.org",
        8883,
        "tls",
        "5",
        45,
    )
    assert (u.ca, u.cert, u.key) == (
        tmp_path / "pki/ca.crt",
        tmp_path / "pki/reader.crt",
        tmp_path / "pki/reader.key",
    )
    assert (u.username, u.password_file, u.site) == ("door-7", tmp_path / "secret", "hq")
    assert (u.window, u.batch, u.telemetry_s, u.ha_discovery) == (32, 20, 0.0, True)
    assert u.reconnect_max_s == 60.0 and u.resend_after_s == 300.0


@pytest.mark.parametrize(
    ("text", "key", "expected", "found"),
    [
        ("enabled = true", "uplink.host", "the broker's host name", "nothing"),
        ('host = "h"\ntransport = "ssl"', "uplink.transport", "'tcp', 'tls'", "'ssl'"),
        ('host = "h"\nprotocol = "3"', "uplink.protocol", "'3.1.1', '5'", "'3'"),
        ('host = "h"\nkeepalive_s = 600', "uplink.keepalive_s", "from 2 to 60", "600"),
        ('host = "h"\nreconnect_max_s = 120', "uplink.reconnect_max_s", "from 1 to 60", "120"),
        ('host = "h"\nca = "ca.crt"', "uplink.ca", "transport 'tcp'", "'"),
        ('host = "h"\ntransport = "tls"\ncert = "c"', "uplink.key", "both", "only one"),
        ('host = "h"\npassword_file = "p"', "uplink.username", "a username", "nothing"),
        ('host = "h"\nsite = "a/b"', "uplink.site", "without '/'", "'a/b'"),
        ('host = "h"\nwindow = 0', "uplink.window", "from 1 to 1000", "0"),
        ('host = "h"\nbroker = "x"', "uplink.broker", "known keys", "an unknown key"),
    ],
)
def test_uplink_config_errors_name_key_expected_found(
    tmp_path: Path, text: str, key: str, expected: str, found: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    e = err.value
    assert e.file == str(tmp_path / "qrgate.toml")
    assert e.key == key
    assert expected in e.expected, e.expected
    assert found in e.found, e.found


def test_link_settings_refuse_half_a_client_certificate() -> None:
    with pytest.raises(ValueError, match="cert and key"):
        LinkSettings(host="h", port=1, client_id="c", transport="tls", cert=Path("c"))


# --- commands ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"x" * (1 << 20), "over the 262144 limit"),
        (b"[1, 2]", "a JSON list, not an object"),
        (b'{"args": {}}', "request_id"),
        (b'{"request_id": "r", "args": []}', "args must be a JSON object"),
        (b'{"request_id": "' + b"x" * 200 + b'"}', "request_id"),
    ],
)
def test_bad_commands_are_rejected_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(BadMessageError, match=reason):
        parse_command("unlock", payload)


def test_good_command_parses() -> None:
    cmd = parse_command("unlock", b'{"request_id": "r-1", "args": {"pulse_s": 2}}')
    assert cmd == Command("unlock", "r-1", {"pulse_s": 2})
    assert parse_command("report_status", b'{"request_id": "r-2"}').args == {}


class FakeDoor:
    def __init__(self, works: bool = True) -> None:
        self.works = works
        self.pulses: list[float | None] = []

    def granted(self, pulse_s: float | None = None) -> int:
        self.pulses.append(pulse_s)
        return time.monotonic_ns() if self.works else -1


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "j.db", boot_id="boot-1")
    j.open()
    yield j
    j.close()


def test_unlock_journals_a_command_event_then_pulses(journal: Journal) -> None:
    door = FakeDoor()
    run = unlock_handler(
        journal=journal, door=door, door_name="lobby", direction="in", clock_synced=lambda: True
    )
    result = run(Command("unlock", "r-9", {"pulse_s": 1.5}))
    assert door.pulses == [1.5]
    row = OutboxReader(journal.path).unsent_after(0, 10)[0]
    assert result == {"seq": row.seq, "event_id": row.event_id}
    e = row.event
    assert (e.kind, e.decision, e.reason, e.door, e.clock_synced) == (
        "command",
        "granted",
        "remote_unlock",
        "lobby",
        True,
    )
    assert e.detail == {"command": "unlock", "request_id": "r-9", "pulse_s": 1.5}
    with pytest.raises(CommandError, match="pulse_s"):
        run(Command("unlock", "r-10", {"pulse_s": 600}))
    with pytest.raises(CommandError, match=r"0\.1 <= x <= 60"):
        run(Command("unlock", "r-11", {"pulse_s": 1e-300}))  # no unlock anybody could use
    with pytest.raises(CommandError, match="stays locked"):
        unlock_handler(
            journal=journal,
            door=FakeDoor(works=False),
            door_name="lobby",
            direction="in",
            clock_synced=lambda: True,
        )(Command("unlock", "r-11", {}))


def test_reload_keeps_the_last_good_list(tmp_path: Path) -> None:
    hasher = SubjectHasher(bytes(32))
    path = tmp_path / "badges.json"
    write_badges(path, BadgeList.of(allow=[hasher.subject(b"A")], version=1))
    policy = Policy([BadgeKind()], hasher)
    run = reload_badges_handler(policy=policy, path=path)
    assert run(Command("reload_config", "r", {})) == {"version": 1, "allow": 1, "deny": 0}
    first = policy.credentials
    assert first.badges.allow == {hasher.subject(b"A")}
    path.write_text('{"allow": ["nothex"]}')
    with pytest.raises(CommandError, match=r"allow\[0\].*keeps its last good badge list"):
        run(Command("reload_config", "r", {}))
    assert policy.credentials is first
    # a signed snapshot in force is never undone by the local file
    policy.credentials = dataclasses.replace(first, source="snapshot", version=9)
    with pytest.raises(CommandError, match="snapshot version 9 is in force"):
        run(Command("reload_config", "r", {}))


def test_lanes_answer_unknown_and_busy_at_once() -> None:
    replies: list[dict[str, Any]] = []
    lanes = CommandLanes({}, lambda cmd, payload: replies.append(payload))
    lanes.submit(Command("explode", "r-1", {}))
    assert replies == [{"request_id": "r-1", "ok": False, "error": "unknown command 'explode'"}]
    assert lanes.stop()


# --- status and discovery ---------------------------------------------------------------------

IDENT = Identity(device="10000000a1b2c3d4", site="hq", door="lobby", version="0.1.0", boot_id="b")


def test_home_assistant_discovery_points_at_the_contract_topics() -> None:
    topics = Topics("hq", "10000000a1b2c3d4")
    msgs = {t: json.loads(p) for t, p in ha_discovery(topics, IDENT)}
    node = "qrgate_10000000a1b2c3d4"
    assert set(msgs) == {
        f"homeassistant/binary_sensor/{node}/online/config",
        f"homeassistant/sensor/{node}/last_verdict/config",
        f"homeassistant/button/{node}/unlock/config",
    }
    online = msgs[f"homeassistant/binary_sensor/{node}/online/config"]
    assert online["state_topic"] == "qrgate/v1/hq/10000000a1b2c3d4/status"
    assert online["device_class"] == "connectivity"
    verdict = msgs[f"homeassistant/sensor/{node}/last_verdict/config"]
    assert verdict["state_topic"] == "qrgate/v1/hq/10000000a1b2c3d4/last_verdict"
    button = msgs[f"homeassistant/button/{node}/unlock/config"]
    assert button["command_topic"] == "qrgate/v1/hq/10000000a1b2c3d4/cmd/unlock"
    assert json.loads(button["payload_press"]) == {"request_id": "homeassistant", "args": {}}
    assert {m["unique_id"] for m in msgs.values()} == {
        f"{node}_online",
        f"{node}_last_verdict",
        f"{node}_unlock",
    }
    assert all(m["device"]["identifiers"] == [node] for m in msgs.values())


class FakeTimes:
    def __init__(self) -> None:
        self.cpu = 0.0

    def __call__(self) -> Any:
        return type("T", (), {"user": self.cpu, "system": 0.0})()


def test_telemetry_sample(tmp_path: Path) -> None:
    now = [100.0]
    times = FakeTimes()
    m = PipelineMetrics()
    thermal = tmp_path / "temp"
    thermal.write_text("51234\n")
    t = Telemetry(
        metrics=m,
        frames_dropped=lambda: 7,
        state_dir=tmp_path,
        thermal=thermal,
        clock=lambda: now[0],
        cpu_times=times,
    )
    m.frames, m.decoded_frames = 300, 120
    for ms in (1.0, 2.0, 3.0, 100.0):
        m.decode_ms.add(ms)
    now[0], times.cpu = 110.0, 2.5
    s = t.sample()
    assert (s["fps"], s["frames_decoded"], s["frames_dropped"]) == (30.0, 120, 7)
    assert (s["cpu_percent"], s["temperature_c"]) == (25.0, 51.2)
    assert s["decode_ms_p50"] == 2.5 and s["decode_ms_p99"] > 90
    assert s["disk_free_bytes"] > 0
    thermal.unlink()
    assert t.sample()["temperature_c"] is None


def test_offline_and_birth_status_shapes() -> None:
    from firmware.uplink.status import birth_status, offline_status

    state = ReaderState(door="lobby", clock_synced=lambda: False)
    state.camera_ok()
    state.camera_event("camera_stalled")
    b = birth_status(IDENT, state, backlog=3, uplink={"takeovers": 0})
    assert set(b) == {
        "online", "device", "site", "door", "version", "boot_id", "backlog", "clock_synced",
        "camera", "last_scan_wall_ns", "config", "wall_ns", "uplink",
    }  # fmt: skip
    assert b["config"] is None  # no desired configuration yet
    assert (b["online"], b["backlog"], b["camera"], b["clock_synced"]) == (
        True,
        3,
        "stalled",
        False,
    )
    assert offline_status(IDENT) == {
        "online": False,
        "device": "10000000a1b2c3d4",
        "site": "hq",
        "door": "lobby",
        "boot_id": "b",
    }


# --- the forwarder against a real journal -----------------------------------------------------


def event(i: int) -> NewEvent:
    return NewEvent(
        kind="scan",
        wall_ns=1_700_000_000_000_000_000 + i,
        clock_synced=True,
        mono_ns=i,
        door="lobby",
        direction="in",
        decision="granted",
        reason="granted",
    )


def append(j: Journal, n: int) -> list[int]:
    seqs = [j.append(event(i)).seq for i in range(n)]
    assert j.flush()
    return seqs


class FakeBroker:
    """Takes publishes; the test decides when to acknowledge them."""

    def __init__(self) -> None:
        self.sent: dict[int, list[dict[str, Any]]] = {}
        self._mid = 0
        self.up = True

    def publish(self, topic: str, payload: bytes) -> int | None:
        if not self.up:
            return None
        assert topic == "qrgate/v1/hq/d1/events"
        doc = json.loads(payload)
        assert doc["device"] == "d1"
        self._mid += 1
        self.sent[self._mid] = doc["events"]
        return self._mid

    def seqs(self, mids: Any = None) -> list[int]:
        return [e["seq"] for m in (mids or self.sent) for e in self.sent[m]]


def flags(path: Path) -> dict[int, tuple[int, int]]:
    with sqlite3.connect(path) as c:
        return {s: (p, a) for s, p, a in c.execute("SELECT seq, published, acked FROM events")}


def forwarder(j: Journal, **kw: Any) -> Forwarder:
    defaults: dict[str, Any] = {"window": 64, "batch": 50}
    defaults.update(kw)
    return Forwarder(
        journal=j, outbox=OutboxReader(j.path), topic="qrgate/v1/hq/d1/events", device="d1",
        **defaults,
    )  # fmt: skip


def test_window_and_published_only_on_puback(journal: Journal) -> None:
    seqs = append(journal, 100)
    f, b = forwarder(journal, batch=1), FakeBroker()
    f.connected(b.publish)
    f.pump()
    assert len(b.sent) == 64 and b.seqs() == seqs[:64]  # one per message, in seq order
    assert all(len(ev) == 1 for ev in b.sent.values())
    assert journal.flush()
    assert all(p == 0 for p, _ in flags(journal.path).values())  # sent is not published
    for mid in list(b.sent)[:10]:
        assert f.on_puback(mid, True, "Success")
    f.pump()
    assert b.seqs() == seqs[:74]
    assert journal.flush()
    fl = flags(journal.path)
    assert [s for s in seqs if fl[s][0]] == seqs[:10]
    assert f.stats().max_in_flight == 64 and f.stats().in_flight == 64


def test_batches_only_while_the_backlog_exceeds_a_window(journal: Journal) -> None:
    seqs = append(journal, 230)
    f, b = forwarder(journal), FakeBroker()
    f.connected(b.publish)
    f.pump()
    assert [len(ev) for ev in b.sent.values()] == [50, 50, 50, 50, 30]
    assert b.seqs() == seqs
    for mid in list(b.sent):
        f.on_puback(mid, True, "Success")
    more = append(journal, 5)
    f.pump()
    assert [len(b.sent[m]) for m in list(b.sent)[5:]] == [1] * 5  # a small backlog: one each
    assert b.seqs(list(b.sent)[5:]) == more


def test_refused_puback_is_not_a_publish_and_is_retried_later(journal: Journal) -> None:
    seqs = append(journal, 3)
    now = [0.0]
    f, b = forwarder(journal, clock=lambda: now[0]), FakeBroker()
    f.connected(b.publish)
    f.pump()
    assert f.on_puback(1, False, "Not authorized")
    f.on_puback(2, True, "Success")
    f.on_puback(3, True, "Success")
    f.pump()
    assert len(b.sent) == 3  # paused after the refusal
    assert journal.flush()
    assert {s: p for s, (p, _) in flags(journal.path).items()} == {1: 0, 2: 1, 3: 1}
    now[0] = 61.0
    f.pump()
    assert b.seqs([4]) == [seqs[0]]
    assert f.stats().refused == 1


def test_reconnect_sends_what_was_in_flight_again(journal: Journal) -> None:
    seqs = append(journal, 5)
    f, b = forwarder(journal), FakeBroker()
    f.connected(b.publish)
    f.pump()
    f.on_puback(1, True, "Success")
    f.disconnected()
    first_ids = {e["event_id"] for m in b.sent for e in b.sent[m]}
    b2 = FakeBroker()
    f.connected(b2.publish)
    # a sweep from the start waits for seq 1's mark, so seq 1 is not read back as unsent
    assert journal.flush()
    f.pump()
    assert b2.seqs() == seqs[1:]  # 2-5 were never acknowledged: again, same ids
    assert {e["event_id"] for m in b2.sent for e in b2.sent[m]} <= first_ids
    assert not f.on_puback(99, True, "Success")  # not ours


def test_ack_marks_rows_and_a_stalled_ack_triggers_one_resend(journal: Journal) -> None:
    seqs = append(journal, 10)
    now = [0.0]
    f, b = forwarder(journal, clock=lambda: now[0], resend_after_s=30), FakeBroker()
    f.connected(b.publish)
    f.pump()
    for mid in list(b.sent):
        f.on_puback(mid, True, "Success")
    f.on_ack(3)
    assert journal.flush()
    fl = flags(journal.path)
    assert [s for s in seqs if fl[s] == (1, 1)] == seqs[:3]
    now[0] = 31.0
    f.pump()  # the back office stopped at 3 while 4-10 reached the broker: send them again
    resent = list(b.sent)[10:]
    assert b.seqs(resent) == seqs[3:]
    for mid in resent:
        f.on_puback(mid, True, "Success")
    now[0] = 62.0
    f.pump()
    assert len(b.sent) == 10 + len(resent)  # once per stall, not again until the ack moves
    assert f.stats().resent == 7


def test_gap_records_go_first_and_only_once(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    state = tmp_path / "j.db.gaps-sent"
    with Journal(path, boot_id="b", max_rows=20) as j:
        append(j, 30)
        f, b = forwarder(j, gap_state=state), FakeBroker()
        f.connected(b.publish)
        f.pump()
        first = b.sent[1]
        assert all(e["kind"] == "gap" for e in first)
        g = first[0]
        assert (g["from_seq"], g["seq"], g["reason"]) == (1, g["to_seq"], "cap_rows")
        assert sum(e["count"] for e in first) == 30 - len(flags(path))
        for mid in list(b.sent):
            f.on_puback(mid, True, "Success")
        assert json.loads(state.read_text())["id"] == len(first)
        f2, b2 = forwarder(j, gap_state=state), FakeBroker()  # a restart
        f2.connected(b2.publish)
        f2.pump()
        assert all(e["kind"] == "scan" for m in b2.sent for e in b2.sent[m])


def test_an_ack_beyond_what_was_published_is_ignored_whole(journal: Journal) -> None:
    seqs = append(journal, 6)
    f, b = forwarder(journal), FakeBroker()
    f.connected(b.publish)
    f.pump()
    for mid in list(b.sent)[:2]:
        f.on_puback(mid, True, "Success")
    # a retained ack from an earlier life of this device id (before a reflash): rows 1-2 were
    # PUBACKed, but the broker may have lost them; that ack says nothing about them
    f.on_ack(5000)
    assert journal.flush()
    fl = flags(journal.path)
    assert [fl[s] for s in seqs] == [(1, 0), (1, 0)] + [(0, 0)] * 4
    assert f.stats().acked_through == 0
    f.on_ack(2)  # this journal's back office, once it has them
    assert journal.flush()
    assert [flags(journal.path)[s] for s in seqs[:2]] == [(1, 1), (1, 1)]


class SlowMarks:
    """The real journal, whose writer the test can hold back from applying PUBACK marks."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.hold = True

    def mark_published(self, seqs: Any) -> int:
        return self.journal.mark_published(seqs)

    def mark_acked_through(self, seq: int) -> None:
        self.journal.mark_acked_through(seq)

    def applied(self, op_id: int) -> bool:
        return not self.hold and self.journal.applied(op_id)


def test_a_drain_waits_for_the_journal_to_apply_its_marks(journal: Journal) -> None:
    seqs = append(journal, 300)
    slow = SlowMarks(journal)
    f = Forwarder(
        journal=slow, outbox=OutboxReader(journal.path), topic="qrgate/v1/hq/d1/events",
        device="d1", window=2, batch=5,
    )  # fmt: skip
    b = FakeBroker()
    f.connected(b.publish)

    def round_trip() -> None:
        f.pump()
        for mid in list(b.sent)[acked[0] :]:
            assert f.on_puback(mid, True, "Success")
        acked[0] = len(b.sent)

    acked = [0]
    for _ in range(20):
        round_trip()
    # 4 windows of 2 messages PUBACKed and not yet marked: nothing more goes out, and what
    # must be remembered meanwhile stays small
    assert len(b.sent) == 8 and f.held_back and len(f._done) == 40
    slow.hold = False
    for _ in range(len(seqs)):
        assert journal.flush()
        round_trip()
    assert b.seqs() == seqs  # each once, in order: no re-send of rows marked late
    assert not f.held_back and len(f._done) == 0
    assert all(p == 1 for p, _ in flags(journal.path).values())
