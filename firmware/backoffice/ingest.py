"""The ingest worker: readers' events and status from MQTT into the store, acks back.

Subscriptions. ``$share/<group>/qrgate/v1/+/+/events`` (QoS 1): the broker hands each events
message to one worker of the group, so workers share the load. ``qrgate/v1/+/+/status``
(QoS 1) is a plain subscription on purpose: every worker stores every status in the broker's
order, so the stored status converges on the latest one whichever worker is slower (with a
shared subscription a birth and the will after it could land on two workers and commit in
the wrong order); statuses are few, and the retained ones fill the table on subscribe.

Per message: check it (:mod:`firmware.backoffice.records`), store it in one transaction,
then send the MQTT acknowledgement (manual PUBACK). A worker that dies before its commit has
not acknowledged the message, so the broker delivers it again to the same session (same
client id, session not expired) and the store ignores what it already holds. A malformed
message is logged, counted and acknowledged (it would only come back); a store that cannot
be written (server down, lock timeout) keeps the message unacknowledged and is retried with
backoff, which also stops the flow: the broker sends at most ``receive_maximum``
unacknowledged messages.

Acknowledgements to readers. After storing, the device's retained ``events/ack`` ``{"seq":
N}`` is published with N read from the store (its highest contiguous seq), when the inbound
queue runs dry or after ``ACK_FLUSH_EVERY`` messages. Two workers may publish one device's ack
in either order, so after the broker accepts (PUBACK) an ack the worker reads the store again
and publishes again if the seq grew meanwhile: the ack published last is then at least every
ack committed before it, and the retained ack ends at the store's value. A reader can meet a
lower ack after a higher one for a moment; it forgets rows up to the highest it has seen. An
ack the broker accepted is recorded (``ack_sent``), so a worker that starts publishes the acks
a stopped worker committed but never got out.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from firmware.backoffice.mqtt import MqttSettings
from firmware.backoffice.records import parse_events, parse_status
from firmware.backoffice.store import Store
from firmware.exceptions import (
    BadMessageError,
    ClientIdTakenError,
    StoreError,
    StoreRetryAbortedError,
)
from firmware.uplink.topics import ALL_EVENTS, ALL_STATUS, Topics, dumps, parse_topic

log = logging.getLogger("qrgate.backoffice.ingest")

DEFAULT_GROUP = "qrgate-ingest"
DEFAULT_SESSION_EXPIRY_S = 3600
RECEIVE_MAXIMUM = 64
ACK_FLUSH_EVERY = 32
PUBACK_TIMEOUT_S = 10.0
IDLE_POLL_S = 0.5
RETRY_MIN_S = 0.2
RETRY_MAX_S = 10.0
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
QUICK_DROP_S = 5.0
QUICK_DROPS_SUSPECT = 3
_SESSION_TAKEN_OVER = 0x8E

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class IngestStats:
    """Counters of one worker since it started. ``messages``: events and status messages
    handled (stored or skipped); ``events_stored``/``duplicates``: event rows new/already
    stored; ``gap_records``: new gap records; ``malformed``: messages skipped whole;
    ``rejected_items``: events or gap records refused inside good messages;
    ``gaps_opened``/``gaps_filled``: holes first seen/closed; ``acks_published``: acks the
    broker accepted; ``store_retries``: store calls retried."""

    messages: int = 0
    event_messages: int = 0
    status_messages: int = 0
    events_stored: int = 0
    duplicates: int = 0
    gap_records: int = 0
    malformed: int = 0
    rejected_items: int = 0
    gaps_opened: int = 0
    gaps_filled: int = 0
    acks_published: int = 0
    store_retries: int = 0


def default_client_id(group: str) -> str:
    """``qrgate-ingest-<host>-<group>``: stable across restarts, so a restarted worker
    resumes its session and gets what it had not acknowledged."""
    return f"qrgate-ingest-{socket.gethostname()}-{group}"[:128]


class IngestWorker:
    """One ingest worker: a paho network thread and one thread that stores and acknowledges.

    ``store``: where events go (used from the worker's thread only). ``mqtt_settings``: the
    broker.
    ``group``: the shared-subscription group (workers of one group share the events).
    ``client_id``: unique per worker and stable across its restarts (default
    :func:`default_client_id`). ``session_expiry_s``: how long the broker keeps this
    worker's session and queues its share of messages while it is away; 0 for a clean
    session each time (what was in flight at a crash is then only sent again by the reader).
    ``receive_maximum``: unacknowledged messages the broker may send at once.
    ``clock_ns``: the worker's clock for ``received_ns``.

    :meth:`start` connects in the background (retrying forever with backoff); :meth:`stop`
    joins both threads. When the broker closes the connection because another client took
    the client id (MQTT 5 reason "session taken over") the worker stops by itself
    (:attr:`failure` is then a ClientIdTakenError); brokers that close it without a reason
    (mosquitto 2.0) get an error log line after three such drops in a row. Raises ValueError
    for a group holding ``/``, ``+`` or ``#``.
    """

    def __init__(
        self,
        store: Store,
        mqtt_settings: MqttSettings,
        *,
        group: str = DEFAULT_GROUP,
        client_id: str | None = None,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
        receive_maximum: int = RECEIVE_MAXIMUM,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if not group or any(c in group for c in "/+#\x00"):
            raise ValueError(f"group {group!r} cannot be part of a shared subscription")
        self.store = store
        self.settings = mqtt_settings
        self.group = group
        self.client_id = client_id or default_client_id(group)
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self._clock_ns = clock_ns
        self._client = mqtt_settings.client(self.client_id, manual_ack=True)
        self._client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        # (connection generation, message): an ack is only sent on the connection the message
        # came on; after a reconnect the broker sends unacknowledged ones again itself.
        # None wakes the storing thread (stop, connected).
        self._inbox: queue.Queue[tuple[int, mqtt.MQTTMessage | None]] = queue.Queue()
        self._generation = 0
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._stop = threading.Event()
        self._stats = IngestStats()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._started = False
        self.failure: ClientIdTakenError | None = None
        self._connected_at: float | None = None  # monotonic; paho thread only
        self._quick_drops = 0

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background and start storing. Raises RuntimeError if called
        twice."""
        if self._started:
            raise RuntimeError("an IngestWorker starts once")
        self._started = True
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry_s
        props.ReceiveMaximum = self.receive_maximum
        self._client.connect_async(
            self.settings.host, self.settings.port, self.settings.keepalive_s,
            clean_start=self.session_expiry_s == 0, properties=props,
        )  # fmt: skip
        self._thread = threading.Thread(target=self._run, name="qrgate-ingest", daemon=True)
        self._thread.start()
        self._client.loop_start()
        log.info(
            "ingest %s: %s, group %s, store %s",
            self.client_id,
            self.settings.address,
            self.group,
            self.store.kind,
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the message in hand, then disconnect (keeping the session: messages not
        yet stored are delivered again on the next start) and join the threads; idempotent.
        ``timeout_s`` bounds the wait for the storing thread (a store call retrying)."""
        self._stop.set()
        self._inbox.put((0, None))
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._started:
            self._client.disconnect()
            self._client.loop_stop()

    def __enter__(self) -> IngestWorker:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def wait_subscribed(self, timeout_s: float) -> bool:
        """True once both subscriptions are granted on the current connection."""
        return self._subscribed.wait(timeout_s)

    def wait_handled(self, messages: int, timeout_s: float) -> bool:
        """True once ``stats().messages`` >= ``messages``; False after ``timeout_s``."""
        with self._changed:
            return self._changed.wait_for(lambda: self._stats.messages >= messages, timeout_s)

    def wait_stopping(self, timeout_s: float) -> bool:
        """True once the worker stops by itself (see :attr:`failure`) or :meth:`stop` ran."""
        return self._stop.wait(timeout_s)

    def stats(self) -> IngestStats:
        """A copy of the counters."""
        with self._changed:
            return self._stats

    def _count(self, **deltas: int) -> None:
        with self._changed:
            s = self._stats
            self._stats = replace(s, **{k: getattr(s, k) + v for k, v in deltas.items()})
            self._changed.notify_all()

    # -- paho callbacks (network thread: never raise, never block) -------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error("broker %s refused the connection: %s", self.settings.address, reason_code)
            return
        self._generation += 1
        self._connected_at = time.monotonic()
        _no_delay(client)
        self._connected.set()
        self._inbox.put((self._generation, None))  # wake: acks to publish after a reconnect
        log.info(
            "connected to %s (session present: %s)", self.settings.address, flags.session_present
        )
        try:
            client.subscribe(
                [
                    (f"$share/{self.group}/{ALL_EVENTS}", SubscribeOptions(qos=1)),
                    (ALL_STATUS, SubscribeOptions(qos=1)),
                ]
            )
        except Exception:
            log.exception("cannot subscribe")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        log.warning("cannot reach broker %s; retrying", self.settings.address)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            log.error("broker refused the subscriptions: %s", ", ".join(refused))
            return
        log.info("subscribed to $share/%s/%s and %s", self.group, ALL_EVENTS, ALL_STATUS)
        self._subscribed.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        self._subscribed.clear()
        if reason_code.value == _SESSION_TAKEN_OVER:
            self.failure = ClientIdTakenError(
                f"another client connected as {self.client_id!r}; this worker stops"
            )
            log.error("%s", self.failure)
            self._stop.set()
            self._inbox.put((0, None))
            client.disconnect()  # no reconnect: two workers would take the session in turns
        elif not self._stop.is_set():
            log.warning(
                "disconnected from %s: %s; reconnecting", self.settings.address, reason_code
            )
            self._note_quick_drop()

    def _note_quick_drop(self) -> None:
        # Brokers that do not say "session taken over" (mosquitto 2.0.11 just closes the old
        # connection) leave two workers with one client id kicking each other out every
        # reconnect. Network trouble looks alike, so this only says so; it does not stop.
        connected_at, self._connected_at = self._connected_at, None
        quick = connected_at is not None and time.monotonic() - connected_at < QUICK_DROP_S
        self._quick_drops = self._quick_drops + 1 if quick else 0
        if self._quick_drops == QUICK_DROPS_SUSPECT:
            log.error(
                "the broker closed %d connections in a row within %.0f s of accepting them: "
                "probably another client uses client id %r; give each worker its own "
                "--client-id",
                self._quick_drops, QUICK_DROP_S, self.client_id,
            )  # fmt: skip

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put((self._generation, msg))

    # -- the storing thread ------------------------------------------------------------------

    def _run(self) -> None:
        dirty: dict[str, None] = {}  # devices whose ack is to be published, in arrival order
        since_flush = 0
        recovered = False
        while not self._stop.is_set():
            if not recovered and self._connected.is_set():
                recovered = self._recover_acks(dirty)
            try:
                generation, msg = self._inbox.get(timeout=IDLE_POLL_S)
            except queue.Empty:
                msg = None
            if self._stop.is_set():
                break
            if msg is not None:
                try:
                    device = self._handle(msg)
                except StoreRetryAbortedError:
                    break  # not stored, not acknowledged: the broker keeps it
                if generation == self._generation:
                    self._client.ack(msg.mid, msg.qos)
                if device is not None:
                    dirty[device] = None
                since_flush += 1
            if dirty and (msg is None or self._inbox.empty() or since_flush >= ACK_FLUSH_EVERY):
                dirty = self._publish_acks(dirty)
                since_flush = 0

    def _recover_acks(self, dirty: dict[str, None]) -> bool:
        try:
            late = self._store_call(self.store.unsent_acks)
        except StoreRetryAbortedError:
            return False
        if late:
            log.info("publishing %d acks committed but not sent before", len(late))
        dirty.update(dict.fromkeys(late))
        return True

    def _handle(self, msg: mqtt.MQTTMessage) -> str | None:
        """Store one message; the device whose ack may have changed, or None. Raises
        StoreRetryAbortedError when stop() comes while the store is unavailable."""
        kind = "unknown"
        try:
            parsed = parse_topic(msg.topic)
            if parsed is None:
                raise BadMessageError("not a qrgate/v1 topic")
            site, device, rest = parsed
            payload = bytes(msg.payload)
            if rest == "events":
                kind = "event"
                return self._handle_events(site, device, payload)
            if rest == "status":
                kind = "status"
                if not payload:
                    log.info("status of %s/%s cleared on the broker", site, device)
                    return None
                status = parse_status(site, device, payload)
                self._store_call(lambda: self.store.store_status(status, self._clock_ns()))
                return None
            raise BadMessageError("not a topic ingest subscribes to")
        except BadMessageError as e:
            log.warning("skipped %s message on %s: %s", kind, msg.topic, e)
            self._count(malformed=1)
            return None
        except StoreRetryAbortedError:
            kind = "stopping"  # neither stored nor skipped: the broker keeps it
            raise
        except Exception:
            # A bug must not stop the door's events; the message is skipped and shown.
            log.exception("skipped %s message on %s after an unexpected error", kind, msg.topic)
            self._count(malformed=1)
            return None
        finally:
            if kind == "event":
                self._count(messages=1, event_messages=1)
            elif kind == "status":
                self._count(messages=1, status_messages=1)
            elif kind != "stopping":
                self._count(messages=1)

    def _handle_events(self, site: str, device: str, payload: bytes) -> str:
        batch = parse_events(site, device, payload)
        for reason in batch.rejected:
            log.warning("skipped an item of %s/%s events: %s", site, device, reason)
        result = self._store_call(lambda: self.store.store_events(batch, self._clock_ns()))
        # Holes open and close all the time while workers store a device's messages in
        # parallel; the store's ``missing`` table is where a lasting one shows.
        for r in result.opened:
            log.debug("device %s: seqs %d..%d missing", device, r.first, r.last)
        for r in result.filled:
            log.debug("device %s: seqs %d..%d arrived, hole closed", device, r.first, r.last)
        self._count(
            events_stored=result.inserted,
            duplicates=result.duplicates,
            gap_records=result.gaps_inserted,
            rejected_items=len(batch.rejected),
            gaps_opened=len(result.opened),
            gaps_filled=len(result.filled),
        )
        return device

    def _store_call(self, call: Callable[[], T]) -> T:
        delay = RETRY_MIN_S
        while True:
            try:
                return call()
            except StoreError as e:
                self._count(store_retries=1)
                log.warning("store unavailable (retrying in %.1f s): %s", delay, e)
                if self._stop.wait(delay):
                    raise StoreRetryAbortedError(str(e)) from e
                delay = min(delay * 2, RETRY_MAX_S)

    def _publish_acks(self, dirty: dict[str, None]) -> dict[str, None]:
        """Publish the stored ack of each device in ``dirty``; returns the devices to do again
        at the next flush: the broker or the store was away, or the store's ack grew while
        the publish was on its way (another worker's ack may have landed before ours)."""
        again: dict[str, None] = {}
        if not self._connected.is_set():
            return dict(dirty)
        sent: list[tuple[str, int, mqtt.MQTTMessageInfo]] = []
        for device in dirty:
            try:
                state = self.store.ack_state(device)
            except StoreError as e:
                log.warning("cannot read the ack of %s: %s", device, e)
                again[device] = None
                continue
            if state is None or state[1] <= 0:
                continue  # nothing contiguous yet: nothing a reader may forget
            site, seq = state
            info = self._client.publish(
                Topics(site, device).events_ack, dumps({"seq": seq}), qos=1, retain=True
            )
            sent.append((device, seq, info))
        for device, seq, info in sent:
            try:
                info.wait_for_publish(PUBACK_TIMEOUT_S)
                ok = info.is_published()
            except (RuntimeError, ValueError):
                ok = False
            if not ok:
                again[device] = None
                continue
            self._count(acks_published=1)
            try:
                now = self.store.confirm_ack(device, seq)
            except StoreError as e:
                log.warning("cannot confirm the ack of %s: %s", device, e)
                again[device] = None
                continue
            if now > seq:
                # Not in a loop here: under load the other worker would keep this one
                # publishing instead of storing. The next flush (at the latest when the
                # inbox runs dry) publishes the newer value.
                again[device] = None
        return again


def _no_delay(client: mqtt.Client) -> None:
    # paho leaves Nagle on: a PUBACK or an ack publish then waits for the TCP ack of the
    # previous segment (delayed up to 40 ms by the peer), which capped a worker at ~600 msg/s.
    sock = client.socket()
    if isinstance(sock, socket.socket):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            log.debug("cannot set TCP_NODELAY: %s", e)


def serve(worker: IngestWorker, stop: threading.Event) -> int:
    """Run ``worker`` until ``stop`` is set or it stops by itself; returns the exit code:
    0 after ``stop``, 3 when the worker failed (its :attr:`~IngestWorker.failure`)."""
    worker.start()
    try:
        while not stop.wait(IDLE_POLL_S):
            if worker.wait_stopping(0):
                break
    finally:
        worker.stop()
    log.info("ingest stopped: %s", worker.stats())
    return 3 if worker.failure is not None else 0
