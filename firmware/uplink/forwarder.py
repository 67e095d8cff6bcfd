"""The forwarder: the journal is the outbox; its rows go to ``events`` and stay until acked.

Runs on the uplink worker thread (never on the scan path, never in a paho callback): the
worker calls :meth:`Forwarder.pump` whenever something happened (a scan was journaled, a PUBACK
came in, the link came up) and at least once a second.

* Unsent rows go out in seq order, at most ``window`` unacknowledged QoS 1 messages at a time
  (paho's own queue lives in memory only and ignores its in-flight limit after a reconnect:
  the journal is the only queue). A message carries one event, or up to ``batch`` events while
  the backlog is larger than one window.
* A row is marked published only on its PUBACK, and only when the PUBACK carries no failure
  reason (MQTT 5 codes >= 0x80 mean the broker did not take it: the rows are sent again after
  a backoff). A connection lost with messages in flight leaves their rows unsent: the next
  connection sends them again (at least once; the back office deduplicates by event_id).
* ``events/ack`` from the back office (``{"seq": N}``, retained) marks rows up to N acked; only
  then may the journal forget them. A PUBACK only says the broker has a message: a broker
  killed right after its PUBACK, or one that dropped queued messages for an absent
  subscriber, loses it. So when the back office's ack has not moved for ``resend_after_s``
  while rows it has not acknowledged were published, those rows are published again. What was
  published again can be lost the same way (the broker crashes twice in a row, the back office
  is still away): while the ack stays stuck the rows go out again, each time after twice the
  pause before, up to ``RESEND_BACKOFF_MAX`` x ``resend_after_s``; the ack moving starts over
  at ``resend_after_s``. The stall clock runs on across reconnects (a link that drops more often
  than ``resend_after_s`` still re-sends); after a connect a re-send waits ``CONNECT_GRACE_S``
  at least, so the retained ack and the back office's queued share can come through first.
* Gap records (the journal's ``gaps`` table: seqs the size cap or a full disk dropped) go in the
  same stream, ahead of the rows, so the back office's contiguity can continue past them. The
  highest gap id the broker took is kept in a small state file beside the journal.

Rows a spill episode moves into the database late may carry seqs below what was already sent:
each sweep through the outbox that reaches its end starts the next from the beginning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from firmware.exceptions import JournalError
from firmware.journal.events import StoredEvent
from firmware.journal.outbox import GapRecord, OutboxReader
from firmware.uplink.link import Backoff
from firmware.uplink.topics import dumps, event_json, gap_json

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 64
DEFAULT_BATCH = 50
DEFAULT_RESEND_AFTER_S = 300.0
DONE_TTL_S = 10.0
"""How long a PUBACKed seq is remembered while the journal writer applies its mark; a row read
back unsent after that (a database locked longer) is sent again: a duplicate, never a loss."""
MARKS_WINDOWS = 4
"""PUBACK marks the journal has not applied yet, at most, in windows of messages: past that
the forwarder sends nothing new until the journal's writer catches up. A drain to a fast
broker PUBACKs faster than the writer marks rows (~30,000 events/s here), and every seq in
between must be remembered (else the next sweep would send it again): this bounds that memory
(4 x 64 messages x 50 events: ~13,000 seqs, ~2 MB)."""
READ_AHEAD = 512
"""Unsent rows read from the outbox at a time (one query feeds many messages)."""
GAP_POLL_S = 1.0
"""How often the gaps table is looked at while it has nothing new, seconds."""
CONNECT_GRACE_S = 10.0
"""After a (re)connect, how long a re-send waits at least (or ``resend_after_s`` if shorter),
seconds: the retained ack and what the back office queued need a moment to come through."""
RESEND_BACKOFF_MAX = 16
"""The longest pause between two re-sends of one stall, in multiples of ``resend_after_s`` (80
min at the default 300 s): re-sending cannot help while the back office is down, and each
re-send queues the whole unacknowledged backlog at the broker once more."""
REFUSED_BACKOFF = (1.0, 60.0)
"""First and largest pause, seconds, after the broker refused a message (MQTT 5 reason code)."""

Publish = Callable[[str, bytes], int | None]
"""QoS 1 publish on the current connection: (topic, payload) -> message id, or None when the
message could not be handed over (not connected, paho's queue full)."""


class OutboxJournal(Protocol):
    """What the forwarder writes to the journal (both return at once; the journal's writer
    thread applies them)."""

    def mark_published(self, seqs: Iterable[int]) -> int:
        """Events ``seqs`` reached the broker; returns the write's id for :meth:`applied`."""
        ...

    def applied(self, op_id: int) -> bool:
        """True once the write ``op_id`` shows in outbox reads."""
        ...

    def mark_acked_through(self, seq: int) -> None:
        """The back office stored every event up to ``seq``."""
        ...


@dataclass(slots=True)
class _Flight:
    seqs: tuple[int, ...]
    gap_ids: tuple[int, ...]
    resend: bool


@dataclass(frozen=True, slots=True)
class ForwarderStats:
    """Counters since start. ``messages``/``events``/``gaps``: messages, event rows and gap
    records the broker acknowledged. ``resent``: event rows published again after an ack
    stall. ``refused``: messages the broker refused (MQTT 5 reason). ``in_flight``: messages
    awaiting PUBACK now; ``max_in_flight``: the most there ever were (never above the window).
    ``acked_through``: the back office's last ack (0: none yet)."""

    messages: int
    events: int
    gaps: int
    resent: int
    refused: int
    in_flight: int
    max_in_flight: int
    acked_through: int


class Forwarder:
    """Sends the journal's outbox (see the module docstring). Worker thread only.

    ``journal``: marks rows published/acked. ``outbox``: reads rows and gaps. ``topic``: the
    ``events`` topic. ``device``: the device id in every message. ``window``: messages in
    flight at most. ``batch``: events per message at most while draining a backlog (1: never
    batch). ``gap_state``: the file keeping the highest gap id sent (None: gap records are
    sent again after each restart). ``resend_after_s``: the ack stall that triggers a re-send
    (0: never). ``clock``: monotonic seconds.
    """

    def __init__(
        self,
        *,
        journal: OutboxJournal,
        outbox: OutboxReader,
        topic: str,
        device: str,
        window: int = DEFAULT_WINDOW,
        batch: int = DEFAULT_BATCH,
        gap_state: Path | None = None,
        resend_after_s: float = DEFAULT_RESEND_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window < 1 or batch < 1:
            raise ValueError("window and batch must be >= 1")
        self.journal, self.outbox = journal, outbox
        self.topic, self.device = topic, device
        self.window, self.batch = window, batch
        self.gap_state = gap_state
        self.resend_after_s = resend_after_s
        self._clock = clock
        self._publish: Publish | None = None
        self._inflight: dict[int, _Flight] = {}
        self._inflight_seqs: set[int] = set()
        # PUBACKed seq -> when, oldest first; an OrderedDict, since a dict whose front keeps
        # being deleted makes each look at its first item slower (quadratic over a drain)
        self._done: OrderedDict[int, float] = OrderedDict()
        self._marks: deque[tuple[int, tuple[int, ...]]] = deque()  # (journal write, seqs)
        self._marks_max = MARKS_WINDOWS * window
        self._read_deferred = False  # a read waits for the journal to apply marks
        self._tracked_max = 0  # no in-flight or done seq above this
        self._ahead: deque[StoredEvent] = deque()  # unsent rows read, not sent yet
        self._ahead_end = True  # the read that filled it reached the end of the outbox
        self._read_pos = 0  # unsent rows are read after this seq (0: a sweep from the start)
        self._gaps_due = 0.0
        self._gap_cursor: int | None = None  # None: load from gap_state first
        self._gap_sent = 0  # highest gap id the broker took, every lower one too
        self._resend_cursor: int | None = None
        self._stall_resends = 0  # re-send sweeps since the ack last moved
        self._acked_through = 0
        self._ack_seen = False
        self._ack_warned = False
        self._puback_max = 0  # the highest seq PUBACKed in this process
        self._ack_moved_at = clock()
        self._connected_at = self._ack_moved_at
        self._paused_until = 0.0
        self._refused_backoff = Backoff(*REFUSED_BACKOFF)
        self._last_refusal = ""
        self._messages = self._events = self._gaps = self._resent = self._refused = 0
        self._max_in_flight = 0

    # --- link events -------------------------------------------------------------------

    def connected(self, publish: Publish) -> None:
        """A new connection: send through ``publish`` from now on. What was in flight on the
        last one is sent again (it was never marked published)."""
        self._reset()
        self._publish = publish
        # the stall clock goes on (a link that drops more often than resend_after_s must
        # still get its re-send); only a short grace lets the retained ack come through first
        self._connected_at = self._clock()

    def disconnected(self) -> None:
        """The connection is gone: nothing in flight will be acknowledged."""
        self._reset()
        self._publish = None

    def _reset(self) -> None:
        self._inflight.clear()
        self._inflight_seqs.clear()
        self._restart_sweep()
        self._resend_cursor = None
        self._gaps_due = 0.0
        if self._gap_cursor is not None:
            self._gap_cursor = self._gap_sent

    def on_puback(self, mid: int, ok: bool, reason: str) -> bool:
        """A PUBACK for ``mid`` on the current connection; True if it was one of ours."""
        flight = self._inflight.pop(mid, None)
        if flight is None:
            return False
        self._inflight_seqs.difference_update(flight.seqs)
        if not ok:
            self._refused += 1
            self._rewind(flight, reason)
            return True
        self._refused_backoff.reset()
        self._messages += 1
        if flight.seqs:
            if flight.resend:
                self._resent += len(flight.seqs)
            else:
                op_id = self.journal.mark_published(flight.seqs)
                self._marks.append((op_id, flight.seqs))
                self._puback_max = max(self._puback_max, flight.seqs[-1])
                now = self._clock()
                for s in flight.seqs:
                    self._done[s] = now
            self._events += len(flight.seqs)
        if flight.gap_ids:
            self._gaps += len(flight.gap_ids)
            self._gap_acked(flight.gap_ids)
        return True

    def on_ack(self, seq: int) -> None:
        """The back office's ``events/ack``: it stored every event up to ``seq``.

        An ack above the highest seq this journal has published is ignored whole (logged
        once): it cannot be about this journal's rows. It is a retained ack left by an earlier
        life of this device id (a reflashed card starts again at seq 1), and taking even part
        of it would mark rows the broker PUBACKed but lost as stored. Right after a kill -9
        it can also be the rows whose PUBACK came just before the kill: they go out again
        and the next ack covers them. Raises JournalError when the journal cannot be read."""
        self._ack_seen = True
        if seq <= self._acked_through:
            return  # the retained ack again, after a (re)subscribe
        top = self._puback_max
        if seq > top:
            # rows published before this process started count too
            top = self._puback_max = max(top, self.outbox.max_published())
        if seq > top:
            if not self._ack_warned:
                self._ack_warned = True
                log.warning(
                    "back office acknowledges up to seq %d but this journal has published only "
                    "up to %d: ignoring that ack (right after a kill -9 these are rows whose "
                    "PUBACK came just before it: they go out again; otherwise an earlier life "
                    "of this device id, e.g. a reflashed card, whose ack says nothing about "
                    "this journal)",
                    seq, top,
                )  # fmt: skip
            return
        self._acked_through = seq
        self._ack_moved_at = self._clock()
        self._stall_resends = 0
        self.journal.mark_acked_through(seq)

    # --- sending ---------------------------------------------------------------------------

    def pump(self) -> None:
        """Fill the window from the outbox. Raises JournalError when the journal cannot be read
        (the worker logs it and tries again later)."""
        if self._publish is None:
            return
        now = self._clock()
        if now < self._paused_until:
            return
        self._prune_done(now)
        self._check_ack_stall(now)
        while len(self._inflight) < self.window and len(self._marks) < self._marks_max:
            if not (self._send_gaps() or self._send_resend() or self._send_unsent()):
                break

    @property
    def idle(self) -> bool:
        """True when nothing is in flight."""
        return not self._inflight

    @property
    def held_back(self) -> bool:
        """True while sending waits for the journal to apply PUBACK marks (the worker should
        pump again soon: no event announces that)."""
        return len(self._marks) >= self._marks_max or (self._read_deferred and bool(self._marks))

    def stats(self) -> ForwarderStats:
        """The counters (see :class:`ForwarderStats`)."""
        return ForwarderStats(
            self._messages,
            self._events,
            self._gaps,
            self._resent,
            self._refused,
            len(self._inflight),
            self._max_in_flight,
            self._acked_through,
        )

    def _send_unsent(self) -> bool:
        free = self.window - len(self._inflight)
        if len(self._ahead) < free * self.batch:
            self._refill(free * self.batch)
        if not self._ahead:
            return False
        backlog = len(self._ahead) if self._ahead_end else len(self._ahead) + READ_AHEAD
        per_message = self.batch if backlog > self.window else 1
        sent = False
        while self._ahead and len(self._inflight) < self.window:
            n = min(per_message, len(self._ahead))
            if not self._send([self._ahead[i] for i in range(n)], (), resend=False):
                break
            for _ in range(n):
                self._ahead.popleft()
            sent = True
        if not self._ahead and self._ahead_end:
            # the sweep reached the end: the next starts from the beginning, so rows moved in
            # late from the spill log (lower seqs) are not passed over
            self._read_pos = 0
        return sent

    def _refill(self, want: int) -> None:
        """Read unsent rows after the read position into the read-ahead buffer."""
        after = self._read_pos
        if after < self._tracked_max and self._marks:
            # a sweep from the start while PUBACK marks wait in the journal's queue would read
            # all those rows back as unsent only to skip them (thousands at drain speed): the
            # writer applies them within milliseconds, read then
            self._read_deferred = True
            return
        self._read_deferred = False
        # rows in flight or PUBACKed-but-not-yet-marked come back from the read and are
        # skipped: read that many more (none lie above the position while a sweep drains)
        skip = 0 if after >= self._tracked_max else len(self._inflight_seqs) + len(self._done)
        limit = max(want, READ_AHEAD) + skip
        rows = self.outbox.unsent_after(after, limit)
        complete = len(rows) < limit
        self._prune_done_from_read(after, rows, complete)
        self._ahead.extend(
            r for r in rows if r.seq not in self._inflight_seqs and r.seq not in self._done
        )
        if rows:
            self._read_pos = rows[-1].seq
        self._ahead_end = complete

    def _send_resend(self) -> bool:
        if self._resend_cursor is None:
            return False
        free = self.window - len(self._inflight)
        rows = self.outbox.sent_unacked_after(self._resend_cursor, free * self.batch)
        fresh = [r for r in rows if r.seq not in self._inflight_seqs]
        if not fresh:
            self._resend_cursor = None
            return False
        sent = 0
        for i in range(0, len(fresh), self.batch):
            if len(self._inflight) >= self.window:
                break
            chunk = fresh[i : i + self.batch]
            if not self._send(chunk, (), resend=True):
                break
            sent += len(chunk)
        if sent == 0:
            return False
        self._resend_cursor = fresh[sent - 1].seq
        return True

    def _send_gaps(self) -> bool:
        now = self._clock()
        if now < self._gaps_due:
            return False
        if self._gap_cursor is None:
            self._gap_sent = self._load_gap_state()
            self._gap_cursor = self._gap_sent
        free = self.window - len(self._inflight)
        gaps = self.outbox.gaps_after(self._gap_cursor, free * self.batch)
        if not gaps:
            # gap records are rare (the size cap, a full disk): look again a little later
            self._gaps_due = now + GAP_POLL_S
            return False
        for i in range(0, len(gaps), self.batch):
            if len(self._inflight) >= self.window:
                break
            chunk = gaps[i : i + self.batch]
            if not self._send((), chunk, resend=False):
                return False
            self._gap_cursor = chunk[-1].id
        return True

    def _send(
        self, rows: Sequence[StoredEvent], gaps: Sequence[GapRecord], *, resend: bool
    ) -> bool:
        assert self._publish is not None
        events: list[dict[str, Any]] = [gap_json(g) for g in gaps]
        events += [event_json(r) for r in rows]
        mid = self._publish(self.topic, dumps({"device": self.device, "events": events}))
        if mid is None:
            return False
        seqs = tuple(r.seq for r in rows)
        self._inflight[mid] = _Flight(seqs, tuple(g.id for g in gaps), resend)
        self._max_in_flight = max(self._max_in_flight, len(self._inflight))
        self._inflight_seqs.update(seqs)
        if seqs:
            self._tracked_max = max(self._tracked_max, seqs[-1])
        return True

    # --- bookkeeping -------------------------------------------------------------------------

    def _rewind(self, flight: _Flight, reason: str) -> None:
        """The broker refused a message: send its content again after a pause."""
        delay = self._refused_backoff.next(floor=0.5)
        self._paused_until = self._clock() + delay
        what = (
            f"events seq {flight.seqs[0]}..{flight.seqs[-1]}"
            if flight.seqs
            else f"{len(flight.gap_ids)} gap records"
        )
        if reason != self._last_refusal:
            self._last_refusal = reason
            log.error(
                "MQTT broker refused %s (%s); they stay unsent, retrying in %.1f s "
                "(check the broker's ACL for the events topic)",
                what,
                reason,
                delay,
            )
        else:
            log.debug("MQTT broker refused %s again (%s)", what, reason)
        self._restart_sweep()
        if flight.gap_ids and self._gap_cursor is not None:
            self._gap_cursor = min(self._gap_cursor, min(flight.gap_ids) - 1)
        if flight.resend and self._resend_cursor is not None:
            self._resend_cursor = min(self._resend_cursor, flight.seqs[0] - 1)

    def _restart_sweep(self) -> None:
        self._ahead.clear()
        self._ahead_end = True
        self._read_pos = 0

    def _prune_done(self, now: float) -> None:
        # seqs whose published mark the journal committed read back as sent from now on
        while self._marks and self.journal.applied(self._marks[0][0]):
            for s in self._marks.popleft()[1]:
                self._done.pop(s, None)
        while self._done:
            seq, at = next(iter(self._done.items()))
            if now - at < DONE_TTL_S:
                break
            del self._done[seq]

    def _prune_done_from_read(self, after: int, rows: list[StoredEvent], complete: bool) -> None:
        """A PUBACKed seq that the read no longer returns as unsent has its mark applied."""
        if not self._done or after >= self._tracked_max:
            return
        top = None if complete else (rows[-1].seq if rows else after)
        returned = {r.seq for r in rows}
        for s in [s for s in self._done if s > after and (top is None or s <= top)]:
            if s not in returned:
                del self._done[s]

    def _check_ack_stall(self, now: float) -> None:
        # Not only once per stall: a re-send the broker lost as well (killed again before it
        # saved them, or dropping them for an absent back office) would leave the ack stuck,
        # and the journal unable to forget anything, until the reader restarted.
        doubled = 2.0 ** min(self._stall_resends, 32)  # bounded: a stall may last years
        pause = self.resend_after_s * min(doubled, RESEND_BACKOFF_MAX)
        if (
            self.resend_after_s <= 0
            or not self._ack_seen
            or self._resend_cursor is not None
            or now - self._ack_moved_at < pause
            or now - self._connected_at < min(pause, CONNECT_GRACE_S)
        ):
            return
        stalled, self._ack_moved_at = now - self._ack_moved_at, now
        if self.outbox.has_sent_unacked_after(self._acked_through):
            self._stall_resends += 1
            self._resend_cursor = self._acked_through
            log.warning(
                "back office ack stuck at seq %d for %.0f s: publishing the rows it has "
                "not acknowledged again (%s)",
                self._acked_through,
                stalled,
                "first time"
                if self._stall_resends == 1
                else f"time {self._stall_resends}; the ack did not move since",
            )

    def _gap_acked(self, ids: tuple[int, ...]) -> None:
        lowest_in_flight = min(
            (g for f in self._inflight.values() for g in f.gap_ids), default=None
        )
        top = max(ids)
        if lowest_in_flight is not None:
            top = min(top, lowest_in_flight - 1)
        if top <= self._gap_sent:
            return
        self._gap_sent = top
        self._save_gap_state(top)

    def _load_gap_state(self) -> int:
        """The highest gap id already sent; 0 when unknown or when the journal was recreated
        since (its gap ids started again: a record that does not match means a new file)."""
        if self.gap_state is None:
            return 0
        try:
            data = json.loads(self.gap_state.read_text(encoding="utf-8"))
            gap_id, first, last = int(data["id"]), int(data["from_seq"]), int(data["to_seq"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning(
                "gap state %s unreadable (%s): sending every gap record again", self.gap_state, e
            )
            return 0
        try:
            record = self.outbox.gap(gap_id)
        except JournalError:
            return 0
        if record is None or (record.from_seq, record.to_seq) != (first, last):
            return 0
        return gap_id

    def _save_gap_state(self, gap_id: int) -> None:
        if self.gap_state is None:
            return
        try:
            record = self.outbox.gap(gap_id)
        except JournalError:
            return
        if record is None:
            return
        doc = {"id": gap_id, "from_seq": record.from_seq, "to_seq": record.to_seq}
        tmp = self.gap_state.with_name(self.gap_state.name + ".tmp")
        try:
            tmp.write_text(json.dumps(doc), encoding="utf-8")
            # no fsync: a lost update only sends gap records again, which the back office
            # deduplicates
            os.replace(tmp, self.gap_state)
        except OSError as e:
            log.warning("cannot save gap state %s: %s", self.gap_state, e)
            with contextlib.suppress(OSError):
                tmp.unlink()
