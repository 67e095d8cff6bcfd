"""The uplink: one worker thread ("qrgate-uplink") that ties the MQTT link, the forwarder,
status, telemetry and commands together.

Threads and what they may do:

* the scan thread calls :meth:`Uplink.on_scan` (a ScanReport listener) or :meth:`notify`
  after it journaled something: a few assignments and at most one queue put;
* the network thread ("qrgate-mqtt-net", :mod:`firmware.uplink.link`) runs paho; its
  callbacks put events on this worker's queue and return;
* the worker takes events off the queue, publishes (it is the only thread that publishes, so
  it has always stored a message id before it handles that id's PUBACK), reads the journal's
  outbox (its own read-only SQLite connection) and hands commands to their lanes;
* command lanes ("qrgate-cmd-<name>", :mod:`firmware.uplink.commands`) run handlers that may
  take seconds and give results back to the worker's queue;
* the credentials thread ("qrgate-credentials", :mod:`firmware.uplink.credentials`) takes the
  ``credentials/snapshot`` payloads the worker hands it (the newest per topic), downloads,
  verifies and applies them, and asks the worker for a status publish when done.

So nothing slow runs in a callback, the scan path never waits on MQTT, and a slow command
never holds up keepalives (network thread) or PUBACK handling (worker).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.exceptions import BadMessageError, JournalError
from firmware.journal.outbox import OutboxReader
from firmware.pipeline import ScanReport
from firmware.uplink.commands import (
    Command,
    CommandLanes,
    Handler,
    parse_command,
    result_payload,
)
from firmware.uplink.credentials import DEVICE, SITE, CredentialSync
from firmware.uplink.forwarder import (
    DEFAULT_BATCH,
    DEFAULT_RESEND_AFTER_S,
    DEFAULT_WINDOW,
    Forwarder,
    OutboxJournal,
)
from firmware.uplink.link import (
    Inbound,
    LinkDown,
    LinkEvent,
    LinkSettings,
    LinkUp,
    MqttLink,
    PubAck,
    SubAck,
    Will,
)
from firmware.uplink.status import (
    Identity,
    ReaderState,
    Telemetry,
    birth_status,
    ha_discovery,
    offline_status,
)
from firmware.uplink.topics import COMMANDS, Topics, dumps, loads

log = logging.getLogger(__name__)

POLL_S = 1.0
"""The worker looks at the outbox (and the network thread) at least this often, seconds:
rows journaled without a notify (incidents, spilled rows moved in later) go out within it."""
STOP_ACK_S = 2.0
"""At stop, how long the offline status may wait for its PUBACK, and the DISCONNECT for its
write, seconds each."""
HELD_BACK_POLL_S = 0.005
"""The pump's pace while the forwarder waits for the journal's writer to apply PUBACK marks
(it does so within milliseconds), seconds."""
STATUS_REFRESH_S = 30.0
"""The retained status is published again this often while what it reports (backlog, last
scan, events sent) changed since, seconds; camera changes and commands publish it at once."""
PENDING_RESULTS = 32
"""Command results kept while disconnected, published on the next connect."""
LOG_EVERY_S = 60.0
WAKE_WAITERS_S = 0.02
"""How often, at most, :meth:`Uplink.wait` callers are woken to look at the stats."""


@dataclass(frozen=True, slots=True)
class UplinkOptions:
    """``window``: event messages in flight at most. ``batch``: events per message at most
    while draining a backlog (1: never batch). ``telemetry_s``: seconds between telemetry
    messages (0: none). ``ha_discovery``: publish Home Assistant discovery on connect.
    ``resend_after_s``: re-publish rows the back office did not acknowledge after its ack
    stalled this long (0: never). ``status_s``: see :data:`STATUS_REFRESH_S`."""

    window: int = DEFAULT_WINDOW
    batch: int = DEFAULT_BATCH
    telemetry_s: float = 60.0
    ha_discovery: bool = False
    resend_after_s: float = DEFAULT_RESEND_AFTER_S
    status_s: float = STATUS_REFRESH_S


@dataclass(frozen=True, slots=True)
class _Wake:
    """Something to send: pump the outbox now."""


@dataclass(frozen=True, slots=True)
class _Result:
    cmd: Command
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _StatusNow:
    """Publish the status now (something it reports changed on another thread)."""


@dataclass(frozen=True, slots=True)
class _Stop:
    """Stop: publish the offline status and leave."""


_WAKE = _Wake()
_Item = LinkEvent | _Wake | _Result | _StatusNow | _Stop


class _Throttle:
    """Logs the first few of a kind of message per period, then counts the rest."""

    def __init__(self, burst: int = 10, every_s: float = LOG_EVERY_S) -> None:
        self.burst, self.every_s = burst, every_s
        self._start = 0.0
        self._n = 0
        self._held = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._start >= self.every_s:
            if self._held:
                log.warning("... and %d more such messages", self._held)
            self._start, self._n, self._held = now, 0, 0
        self._n += 1
        if self._n > self.burst:
            self._held += 1
            return False
        return True


class Uplink:
    """The reader's MQTT uplink (see the module docstring).

    ``link``: broker settings (the last will is set here). ``ident``: device, site, door,
    version, boot id; topics are ``qrgate/v1/<site>/<device>/...``. ``journal``: the journal
    (marks rows published/acked); ``outbox``: its read-only view. ``state``: what the status
    reports. ``telemetry``: the telemetry source (None: no telemetry). ``handlers``: command
    handlers by name (``report_status`` is answered here). ``gap_state``: file for the
    forwarder's gap bookkeeping. ``desired``: takes the retained ``config/desired`` payloads
    (see :mod:`firmware.uplink.desired`; None: not subscribed). ``credentials``: takes the
    reader's and the site's ``credentials/snapshot`` (see :mod:`firmware.uplink.credentials`;
    None: not subscribed); its thread is started and stopped with the uplink. ``rng``: the
    backoff jitter source.
    """

    def __init__(
        self,
        *,
        link: LinkSettings,
        ident: Identity,
        journal: OutboxJournal,
        outbox: OutboxReader,
        state: ReaderState,
        telemetry: Telemetry | None = None,
        handlers: Mapping[str, Handler] | None = None,
        options: UplinkOptions | None = None,
        gap_state: Path | None = None,
        desired: Callable[[bytes], Any] | None = None,
        credentials: CredentialSync | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.ident = ident
        self.options = options or UplinkOptions()
        self.topics = Topics(ident.site, ident.device)
        self.state = state
        self.telemetry = telemetry
        self.outbox = outbox
        will = Will(self.topics.status, dumps(offline_status(ident)), qos=1, retain=True)
        self._q: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self.link = MqttLink(dataclasses.replace(link, will=will), self._q.put, rng=rng)
        self.forwarder = Forwarder(
            journal=journal,
            outbox=outbox,
            topic=self.topics.events,
            device=ident.device,
            window=self.options.window,
            batch=self.options.batch,
            gap_state=gap_state,
            resend_after_s=self.options.resend_after_s,
        )
        self.lanes = CommandLanes(handlers or {}, self._reply)
        self._desired = desired
        self.credentials = credentials
        if credentials is not None:
            credentials.on_change = self.status_changed
        self._thread: threading.Thread | None = None
        self._wake_pending = False
        self._stopping = False
        self._gen: int | None = None  # the connected client's generation
        self._sub_mid: int | None = None
        self._subscribed = False  # the broker confirmed this connection's subscriptions
        self._pending_results: deque[tuple[str, bytes]] = deque(maxlen=PENDING_RESULTS)
        self._verdict_sent = 0
        self._camera_sent = 0
        self._status_seen: tuple[Any, ...] = ()
        self._status_due = 0.0
        self._next_telemetry = 0.0
        self._waiting: dict[int, str] = {}  # mid -> what (status, results) awaiting PUBACK
        self._bad_messages = 0
        self._reject_log = _Throttle()
        self._error_log = _Throttle(burst=3)
        self._progress = threading.Condition()
        self._notified_at = 0.0

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and the link; returns at once (the broker may be unreachable for
        as long as it likes: the reader decides and journals meanwhile)."""
        if self._thread is not None:
            return
        if self.credentials is not None:
            self.credentials.start()
        self._thread = threading.Thread(target=self._main, name="qrgate-uplink", daemon=True)
        self._thread.start()
        self.link.start()

    def stop(self, timeout_s: float | None = None) -> bool:
        """Publish the offline status (retained) and wait for its PUBACK, send DISCONNECT,
        stop the link and the command lanes; True when every thread ended within
        ``timeout_s`` (default: long enough for each of those steps). Idempotent."""
        thread = self._thread
        if thread is None:
            return True
        self._q.put(_Stop())
        limit = (
            3 * STOP_ACK_S + self.link.settings.connect_timeout_s + 3.0
            if timeout_s is None
            else timeout_s
        )
        thread.join(limit)
        if thread.is_alive():
            log.error("uplink worker did not stop within %.1f s", limit)
            return False
        return True

    # --- the reader's calls (any thread; never blocks) ---------------------------------------

    def notify(self) -> None:
        """Something was journaled: look at the outbox soon."""
        if not self._wake_pending:
            self._wake_pending = True
            self._q.put(_WAKE)

    def status_changed(self) -> None:
        """What the status reports changed (another thread): publish it soon."""
        self._q.put(_StatusNow())

    def on_scan(self, report: ScanReport) -> None:
        """ScanReport listener: remember the verdict and wake the forwarder."""
        self.state.scan(report)
        self.notify()

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float) -> bool:
        """Block until ``predicate(self.stats())`` holds, at most ``timeout_s`` seconds; True
        if it does. Looks again at least every 40 ms (tests and diagnostics)."""
        end = time.monotonic() + timeout_s
        with self._progress:
            while not predicate(self.stats()):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._progress.wait(min(left, WAKE_WAITERS_S * 2))
        return True

    def stats(self) -> dict[str, Any]:
        """Link and forwarder counters (see LinkStats and ForwarderStats), plus
        ``subscribed`` (the broker confirmed this connection's command and ack subscriptions)
        and ``bad_messages`` (inbound messages rejected)."""
        return {
            "link": dataclasses.asdict(self.link.stats()),
            "forwarder": dataclasses.asdict(self.forwarder.stats()),
            "subscribed": self._subscribed,
            "bad_messages": self._bad_messages,
        }

    # --- the worker ----------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._serve()
        except BaseException:
            log.critical("uplink worker failed; the reader goes on without MQTT", exc_info=True)
            self.link.stop()
        finally:
            if self.credentials is not None:
                self.credentials.stop(STOP_ACK_S)
            self.outbox.close()

    def _serve(self) -> None:
        while True:
            try:
                item: _Item | None = self._q.get(timeout=self._timeout())
            except queue.Empty:
                item = None
            while item is not None:
                self._guarded(self._handle, item)
                if self._stopping:
                    self._shutdown()
                    return
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    item = None
            self._guarded(self._tick)
            now = time.monotonic()
            if now - self._notified_at >= WAKE_WAITERS_S:
                # not after every round: a waiter re-reading stats thousands of times a
                # second would compete with this thread for the GIL
                self._notified_at = now
                with self._progress:
                    self._progress.notify_all()

    def _guarded(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except JournalError as e:
            if self._error_log.allow():
                log.error("uplink cannot read the journal (%s); retrying", e)
        except Exception:
            if self._error_log.allow():
                log.exception("uplink worker step failed; carrying on")

    def _timeout(self) -> float:
        t = POLL_S
        if self.forwarder.held_back:
            t = HELD_BACK_POLL_S
        if self._gen is not None and self.telemetry is not None and self.options.telemetry_s > 0:
            t = min(t, max(0.0, self._next_telemetry - time.monotonic()))
        return t

    def _handle(self, item: _Item) -> None:
        if isinstance(item, PubAck):
            if item.generation != self._gen:
                return
            if not self.forwarder.on_puback(item.mid, item.ok, item.reason):
                what = self._waiting.pop(item.mid, None)
                if what is not None and not item.ok:
                    log.error("MQTT broker refused %s: %s", what, item.reason)
        elif isinstance(item, _Wake):
            self._wake_pending = False
        elif isinstance(item, Inbound):
            try:
                if item.generation == self._gen:
                    self._on_message(item.topic, item.payload)
            finally:
                self.link.inbound_done()
        elif isinstance(item, _Result):
            self._publish_result(item.cmd.name, dumps(item.payload))
        elif isinstance(item, LinkUp):
            self._on_up(item.generation)
        elif isinstance(item, LinkDown):
            if item.generation == self._gen:
                self._gen = None
                self._subscribed = False
                self._waiting.clear()
                self.forwarder.disconnected()
        elif isinstance(item, SubAck):
            if item.generation == self._gen and item.mid == self._sub_mid:
                self._subscribed = True
            if item.failed:
                log.error(
                    "MQTT broker refused a subscription (%s): commands or acks will not "
                    "arrive; check the broker's ACL",
                    ", ".join(item.failed),
                )
        elif isinstance(item, _StatusNow):
            if self._gen is not None:
                self._publish_status()
        elif isinstance(item, _Stop):
            self._stopping = True

    def _on_up(self, gen: int) -> None:
        self._gen = gen
        self._waiting.clear()
        t = self.topics
        self._subscribed = False
        subscriptions = [(t.command("+"), 1), (t.events_ack, 1)]
        if self._desired is not None:
            subscriptions.append((t.config_desired, 1))
        if self.credentials is not None:
            subscriptions += [(t.credentials_snapshot, 1), (t.site_credentials_snapshot, 1)]
        self._sub_mid = self.link.subscribe(gen, subscriptions)
        self._publish_status()
        if self.options.ha_discovery:
            for topic, payload in ha_discovery(t, self.ident):
                self._publish(topic, payload, retain=True, what="Home Assistant discovery")
        self._verdict_sent = -1  # the broker may hold an older one: send ours again
        while self._pending_results and self._gen is not None:
            topic, payload = self._pending_results.popleft()
            self._publish(topic, payload, what="a command result")
        self._next_telemetry = time.monotonic() + self.options.telemetry_s
        self.forwarder.connected(self._publish_event)

    def _tick(self) -> None:
        self.link.check_alive()
        if self._gen is None:
            return
        self.forwarder.pump()
        gen, verdict = self.state.verdict()
        if gen != self._verdict_sent and verdict is not None:
            self._verdict_sent = gen
            self._publish(
                self.topics.last_verdict, dumps(verdict), retain=True, what="the last verdict"
            )
        camera_gen = self.state.camera_generation
        if camera_gen != self._camera_sent:
            self._camera_sent = camera_gen
            self._publish_status()
        elif time.monotonic() >= self._status_due and self._status_changed():
            # a technician's fleet table must not show the backlog of the connect hours ago
            self._publish_status()
        if (
            self.telemetry is not None
            and self.options.telemetry_s > 0
            and time.monotonic() >= self._next_telemetry
        ):
            self._next_telemetry = time.monotonic() + self.options.telemetry_s
            self._publish_telemetry()

    def _on_message(self, topic: str, payload: bytes) -> None:
        t = self.topics
        if topic == t.events_ack:
            try:
                seq = loads(payload).get("seq")
                if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
                    raise BadMessageError("'seq' must be a non-negative integer")
            except BadMessageError as e:
                self._reject(topic, e)
                return
            self.forwarder.on_ack(seq)
            return
        if topic == t.config_desired and self._desired is not None:
            # here on the worker, not a lane: a check and one small fsynced file, rare, and
            # the status published right after must already carry the outcome
            self._desired(payload)
            self._publish_status()
            return
        if self.credentials is not None and topic in (
            t.credentials_snapshot,
            t.site_credentials_snapshot,
        ):
            # handed over, never handled here: a download or a 100,000-entry build must not
            # hold up PUBACKs and commands (field case C17)
            self.credentials.offer(DEVICE if topic == t.credentials_snapshot else SITE, payload)
            return
        prefix = t.command("")
        if not topic.startswith(prefix):
            self._reject(topic or "<not UTF-8>", BadMessageError("not a topic of this reader"))
            return
        name = topic[len(prefix) :]
        try:
            cmd = parse_command(name, payload)
        except BadMessageError as e:
            self._reject(topic, e)
            return
        if name not in COMMANDS:
            self._publish_result(
                name,
                dumps(
                    result_payload(
                        cmd, error=f"unknown command {name!r}; known: {', '.join(COMMANDS)}"
                    )
                ),
            )
        elif name == "report_status":
            status = self._publish_status()
            self._publish_result(name, dumps(result_payload(cmd, result=status)))
        else:
            self.lanes.submit(cmd)

    def _reject(self, topic: str, e: BadMessageError) -> None:
        self._bad_messages += 1
        if self._reject_log.allow():
            log.warning("rejected a message on %s: %s", topic, e)

    def _reply(self, cmd: Command, payload: dict[str, Any]) -> None:
        """A lane's result (any thread): published by the worker."""
        self._q.put(_Result(cmd, payload))

    # --- publishing (worker only) -----------------------------------------------------------

    def _publish(
        self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, what: str
    ) -> int | None:
        if self._gen is None:
            return None
        mid = self.link.publish(self._gen, topic, payload, qos=qos, retain=retain)
        if mid is not None and qos > 0:
            self._waiting[mid] = what
        return mid

    def _publish_event(self, topic: str, payload: bytes) -> int | None:
        if self._gen is None:
            return None
        return self.link.publish(self._gen, topic, payload, qos=1)

    def _publish_result(self, name: str, payload: bytes) -> None:
        topic = self.topics.command_result(name)
        if self._publish(topic, payload, what=f"the result of {name}") is None:
            self._pending_results.append((topic, payload))

    def _publish_status(self) -> dict[str, Any]:
        try:
            backlog: int | None = self.outbox.backlog()
        except JournalError as e:
            log.warning("status without backlog: %s", e)
            backlog = None
        link, fwd = self.link.stats(), self.forwarder.stats()
        counters = {
            "reconnects": max(0, link.connects - 1),
            "takeovers": link.takeovers,
            "auth_refusals": link.auth_refusals,
            "loop_failures": link.loop_failures,
            "inbound_dropped": link.inbound_dropped,
            "published": fwd.events,
            "resent": fwd.resent,
            "refused": fwd.refused,
        }
        status = birth_status(self.ident, self.state, backlog=backlog, uplink=counters)
        self._camera_sent = self.state.camera_generation
        self._status_seen = self._status_key()
        self._status_due = time.monotonic() + self.options.status_s
        self._publish(self.topics.status, dumps(status), retain=True, what="the status")
        return status

    def _status_key(self) -> tuple[Any, ...]:
        fwd = self.forwarder.stats()
        return (self.state.last_scan_wall_ns, fwd.events, fwd.acked_through)

    def _status_changed(self) -> bool:
        self._status_due = time.monotonic() + self.options.status_s
        return self._status_key() != self._status_seen

    def _publish_telemetry(self) -> None:
        assert self.telemetry is not None
        sample = self.telemetry.sample()
        try:
            sample["backlog"] = self.outbox.backlog()
        except JournalError:
            sample["backlog"] = None
        sample["in_flight"] = self.forwarder.stats().in_flight
        self._publish(self.topics.telemetry, dumps(sample), qos=0, what="telemetry")

    # --- stopping -------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        self.lanes.stop(STOP_ACK_S)
        if self.credentials is not None:
            self.credentials.stop(STOP_ACK_S)
        gen = self._gen
        if gen is not None:
            mid = self.link.publish(
                gen, self.topics.status, dumps(offline_status(self.ident)), qos=1, retain=True
            )
            if mid is not None:
                self._drain_until(
                    lambda i: isinstance(i, PubAck) and i.generation == gen and i.mid == mid
                )
            if self.link.disconnect(gen):
                self._drain_until(lambda i: isinstance(i, LinkDown) and i.generation == gen)
        self._gen = None
        self.link.stop()

    def _drain_until(self, done: Any) -> bool:
        """Handle PUBACKs (and release inbound messages) until ``done(item)``, at most
        STOP_ACK_S seconds; True if it came."""
        end = time.monotonic() + STOP_ACK_S
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return False
            try:
                item = self._q.get(timeout=left)
            except queue.Empty:
                return False
            if isinstance(item, Inbound):
                self.link.inbound_done()
            elif isinstance(item, PubAck) and item.generation == self._gen:
                self.forwarder.on_puback(item.mid, item.ok, item.reason)
            if done(item):
                return True
