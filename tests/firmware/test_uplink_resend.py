"""The forwarder's re-send of rows the back office has not acknowledged, when what it re-sent
is lost too (found by tests/firmware/test_chaos.py): a broker killed again right after the
re-send, or one that drops messages while the back office is away. PUBACKs and acks are
handed to the forwarder by the test, so every step is deterministic."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware.journal.outbox import OutboxReader
from firmware.journal.store import Journal
from firmware.uplink.forwarder import Forwarder
from tests.firmware.test_uplink_units import append

TOPIC = "qrgate/v1/hq/d1/events"
RESEND_AFTER_S = 30.0


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "j.db", boot_id="boot-1")
    j.open()
    yield j
    j.close()


class Broker:
    """Takes publishes (message ids from 1); the test PUBACKs them."""

    def __init__(self) -> None:
        self.sent: dict[int, list[int]] = {}  # mid -> seqs

    def publish(self, topic: str, payload: bytes) -> int | None:
        assert topic == TOPIC
        mid = len(self.sent) + 1
        self.sent[mid] = [e["seq"] for e in json.loads(payload)["events"]]
        return mid

    def since(self, mark: int) -> list[int]:
        """The seqs of the messages after the first ``mark``."""
        return [s for m in list(self.sent)[mark:] for s in self.sent[m]]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def started(journal: Journal, clock: Clock, **kw: Any) -> tuple[Forwarder, Broker]:
    """A forwarder that sent rows 1-10, got their PUBACKs and an ack for 1-3 at t=0."""
    f = Forwarder(
        journal=journal, outbox=OutboxReader(journal.path), topic=TOPIC, device="d1",
        resend_after_s=RESEND_AFTER_S, clock=clock, **kw,
    )  # fmt: skip
    b = Broker()
    f.connected(b.publish)
    f.pump()
    for mid in list(b.sent):
        assert f.on_puback(mid, True, "Success")
    f.on_ack(3)
    assert journal.flush()  # the marks are applied by the journal's writer thread
    return f, b


def test_a_resend_lost_with_the_broker_goes_out_again(journal: Journal) -> None:
    seqs = append(journal, 10)
    clock = Clock()
    f, b = started(journal, clock)
    clock.t = RESEND_AFTER_S + 1
    f.pump()
    assert b.since(10) == seqs[3:]  # the ack is stuck at 3: 4-10 again
    # the broker is SIGKILLed before it answers (or after its PUBACK, before it saved them)
    f.disconnected()
    b2 = Broker()
    f.connected(b2.publish)
    f.pump()
    assert b2.sent == {}  # 4-10 are marked published: nothing is unsent
    clock.t += 2 * RESEND_AFTER_S - 1
    f.pump()
    assert b2.sent == {}  # the second re-send waits twice as long
    clock.t += 2
    f.pump()
    assert b2.since(0) == seqs[3:]  # the ack never moved: the broker lost them, again
    for mid in list(b2.sent):
        f.on_puback(mid, True, "Success")
    f.on_ack(10)
    assert f.stats().acked_through == 10 and f.stats().resent == 7


def test_a_stuck_ack_is_chased_with_a_doubling_pause_that_resets_when_it_moves(
    journal: Journal,
) -> None:
    seqs = append(journal, 10)
    clock = Clock()
    f, b = started(journal, clock)
    at: list[float] = []  # when re-sends went out, seconds
    while clock.t < 60 * RESEND_AFTER_S:
        clock.t += 1
        before = len(b.sent)
        f.pump()
        if len(b.sent) > before:
            at.append(clock.t)
            assert b.since(before) == seqs[3:]
            for mid in list(b.sent)[before:]:
                f.on_puback(mid, True, "Success")  # taken, and dropped: no ack moves
    pauses = [round((t2 - t1) / RESEND_AFTER_S) for t1, t2 in zip([0.0, *at], at, strict=False)]
    assert pauses == [1, 2, 4, 8, 16, 16]  # doubling, up to 16 x resend_after_s
    f.on_ack(5)  # the ack moved: a new stall waits resend_after_s again
    before, moved = len(b.sent), clock.t
    while len(b.sent) == before:
        clock.t += 1
        f.pump()
    assert clock.t - moved == RESEND_AFTER_S
    assert b.since(before) == seqs[5:]


def test_a_link_that_drops_more_often_than_the_stall_still_resends(journal: Journal) -> None:
    seqs = append(journal, 10)
    clock = Clock()
    f, _ = started(journal, clock)
    resent_at: list[tuple[float, list[int]]] = []
    for t in range(1, 3 * int(RESEND_AFTER_S)):
        clock.t = float(t)
        if t % 20 == 0:  # the connection drops every 20 s, well under resend_after_s
            f.disconnected()
            broker = Broker()
            f.connected(broker.publish)
        f.pump()
        if t >= 20 and broker.sent and not resent_at:
            resent_at.append((clock.t, broker.since(0)))
    # stuck since t=0: the re-send goes out at 30 s, on the connection made at 20 s once its
    # 10 s grace passed; before, every reconnect restarted the stall clock and it never came
    assert resent_at == [(RESEND_AFTER_S, seqs[3:])]
