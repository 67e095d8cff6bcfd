"""Our own MQTT link on paho-mqtt 2.x: one connection at a time, rebuilt by our reconnect loop.

paho's own reconnect (``loop_forever``/``loop_start``) has no jitter, re-sends its whole
in-memory queue on reconnect ignoring ``max_inflight`` (paho #492), and a callback exception
kills its network thread while ``is_connected()`` still says True. So this module runs the
network loop itself, on a thread it owns ("qrgate-mqtt-net"):

* every connection attempt gets a **new** paho client (a generation number tells their events
  apart: message ids restart at 1 per client, and ``tls_set`` cannot be called twice, so a
  rotated certificate is simply read again on the next attempt);
* the attempt (DNS, TCP, TLS handshake, CONNECT) blocks only this thread, for at most
  ``connect_timeout_s`` plus the resolver's own time; failures wait a backoff with full
  jitter whose ceiling grows with the age of the outage, from ``backoff_min_s`` to at most
  half the outage so far, capped at ``backoff_max_s`` (60 s) (:class:`ReconnectBackoff`: a
  broker back after a short outage is found again within half that outage), and the outage
  ends only when a connection stayed up ``STABLE_S`` seconds, so a broker that accepts and
  then drops us (a refused login, a session take-over) is never retried in a hot loop;
* ``client.loop()`` runs here; an exception escaping it (an exception in a paho callback) is
  caught, logged and counted as a loop failure, and the client is rebuilt; should the thread
  itself die, :meth:`MqttLink.check_alive` (called by the uplink worker every second) notices
  and starts a new one;
* publishes from the worker thread never touch the socket: a no-op
  ``on_socket_register_write`` keeps paho from writing in the caller's thread (it would race
  this thread's reads, which an SSL socket does not survive); paho's socket pair wakes the
  loop instead.

Callbacks never block and never raise: they put an event on the sink (the uplink worker's
queue) or on this thread's own queue (CONNACK, disconnect: classified here right after
``loop()`` returns). ``on_publish`` runs under paho's message lock and can fire before the
publisher has stored the message id; the worker that publishes also consumes the sink, so it
always stores the id first.

The last will (retained, QoS 1) is set on every client; MQTT 5 sessions are started clean with
an explicit session expiry of 0: the journal is the outbox, subscriptions are renewed on every
connect, and a command queued by the broker while the reader was away (an ``unlock`` from an
hour ago) must not run when it comes back.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

PROTOCOLS = ("3.1.1", "5")
TRANSPORTS = ("tcp", "tls")

LOOP_TIMEOUT_S = 1.0
"""Longest a select() in the network loop waits; also how fast a stop request is seen."""
STABLE_S = 10.0
"""A connection that stayed up this long resets the backoff; shorter ones count as flapping."""
OUTAGE_SHARE = 0.5
"""A reconnect delay is at most this share of the outage so far (or ``backoff_min_s`` early
on): see :class:`ReconnectBackoff`."""
SHORT_SESSIONS_FOR_TAKEOVER = 3
"""MQTT 3.1.1 has no disconnect reason: this many unexpected drops in a row, each within
``STABLE_S`` of its CONNACK, are reported as a suspected session take-over."""
TAKEOVER_HOLD_S = 600.0
"""After a take-over, backoff delays stay in the upper half of their range this long."""
INBOUND_LIMIT = 256
"""Inbound messages waiting for the worker at most; more are dropped and counted (a flood of
commands must not grow memory without bound)."""

# CONNACK / DISCONNECT reason codes (MQTT 5; paho maps 3.1.1 CONNACK codes onto them)
_RC_BAD_CREDENTIALS = 134
_RC_NOT_AUTHORIZED = 135
_RC_BANNED = 138
_RC_BAD_AUTH_METHOD = 140
_RC_SESSION_TAKEN_OVER = 142
_EPISODE_KINDS = frozenset({"taken_over", "flapping"})
_AUTH_CODES = frozenset({_RC_BAD_CREDENTIALS, _RC_NOT_AUTHORIZED, _RC_BANNED, _RC_BAD_AUTH_METHOD})
# What a TLS peer says when it wants a client certificate or rejects ours.
_TLS_AUTH_HINTS = (
    "CERTIFICATE_REQUIRED",
    "BAD_CERTIFICATE",
    "UNKNOWN_CA",
    "CERTIFICATE_UNKNOWN",
    "HANDSHAKE_FAILURE",
    "ACCESS_DENIED",
    "CERTIFICATE_EXPIRED",
    "DECRYPT_ERROR",
)


@dataclass(frozen=True, slots=True)
class Will:
    """The last will: published by the broker when the link dies without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """How to reach the broker.

    ``host``/``port``: the broker. ``client_id``: ``qrgate-<device id>``. ``will``: the last
    will (None: none). ``protocol``:
    "3.1.1" or "5". ``transport``: "tcp" or "tls"; with TLS, ``ca`` is the CA file that
    signed the broker's certificate (None: the system's trust store) and ``cert``/``key`` the
    client certificate and key (both or neither). ``username``/``password``: optional login.
    ``keepalive_s``: seconds (30-60 in the field; the broker drops us after 1.5 x this without
    traffic). ``connect_timeout_s``: TCP connect plus TLS handshake, seconds.
    ``backoff_min_s``/``backoff_max_s``: the first backoff ceiling and the cap, seconds.
    ``max_inflight``: QoS 1 messages paho sends before it waits for PUBACKs (the forwarder's
    window plus room for status and results). ``max_packet_bytes``: MQTT 5 only, the largest
    packet the broker may send us (it drops larger ones instead of sending them).
    """

    host: str
    port: int
    client_id: str
    will: Will | None = None
    protocol: str = "3.1.1"
    transport: str = "tcp"
    keepalive_s: int = 60
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = None
    connect_timeout_s: float = 10.0
    backoff_min_s: float = 0.5
    backoff_max_s: float = 60.0
    max_inflight: int = 100
    max_packet_bytes: int = 512 * 1024

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {self.protocol!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {self.transport!r}")
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        if not 0 < self.backoff_min_s <= self.backoff_max_s:
            raise ValueError("need 0 < backoff_min_s <= backoff_max_s")


# --- what the link tells the worker ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkUp:
    """CONNACK success on client ``generation``: subscribe, publish the birth status."""

    generation: int
    session_present: bool


@dataclass(frozen=True, slots=True)
class LinkDown:
    """Client ``generation`` is gone (``reason`` for people). Its unacknowledged publishes
    will never be acknowledged."""

    generation: int
    reason: str


@dataclass(frozen=True, slots=True)
class PubAck:
    """The broker answered publish ``mid`` of client ``generation``. ``ok`` False for an MQTT 5
    failure reason code (>= 0x80): the message was NOT accepted. ``reason``: the code's name."""

    generation: int
    mid: int
    ok: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message for us. ``topic`` is "" when it was not valid UTF-8. Call
    :meth:`MqttLink.inbound_done` once it is handled."""

    generation: int
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True, slots=True)
class SubAck:
    """SUBACK for subscribe ``mid``; ``failed``: the reason names of refused filters."""

    generation: int
    mid: int
    failed: tuple[str, ...]


LinkEvent = LinkUp | LinkDown | PubAck | Inbound | SubAck


@dataclass(frozen=True, slots=True)
class LinkStats:
    """A snapshot of the link for status messages and tests.

    ``state``: "stopped", "connecting", "connected" or "waiting" (backoff). ``problem``: the
    last failure's kind while not connected ("dns", "refused", "timeout", "tls", "tls_verify",
    "tls_files", "auth", "network", "closed", "loop_failed", "taken_over", "flapping"), None
    when connected. ``last_failure``: its text. ``attempts``: connection attempts started;
    ``connects``: CONNACK successes; ``failures``: attempts or connections that failed;
    ``auth_refusals``: of which the broker refused our credentials; ``takeovers``: sessions
    taken over by another client with our id (MQTT 5 reason 142) or suspected so (3.1.1:
    repeated drops right after connect); ``loop_failures``: exceptions that escaped paho's
    loop; ``thread_restarts``: network threads found dead and restarted; ``inbound_dropped``:
    messages dropped because the worker was ``INBOUND_LIMIT`` behind; ``retry_in_s``: seconds
    to the next attempt while waiting, else None; ``backoff_ceiling_s``: the current upper
    bound of a backoff delay.
    """

    state: str
    problem: str | None
    last_failure: str | None
    attempts: int
    connects: int
    failures: int
    auth_refusals: int
    takeovers: int
    loop_failures: int
    thread_restarts: int
    inbound_dropped: int
    retry_in_s: float | None
    backoff_ceiling_s: float


class Backoff:
    """Exponential backoff with full jitter (the AWS architecture blog's "full jitter"): the
    n-th delay is uniform in [floor x c, c] with c = min(``cap_s``, ``base_s`` x 2**n); floor
    is 0 normally. ``rng``: the random source (seeded in tests). The forwarder's pause after
    the broker refused a message; reconnects use :class:`ReconnectBackoff`."""

    def __init__(self, base_s: float, cap_s: float, rng: random.Random | None = None) -> None:
        self.base_s, self.cap_s = base_s, cap_s
        self._rng = rng or random.Random()
        self._n = 0

    @property
    def ceiling_s(self) -> float:
        """The upper bound of the next delay, seconds."""
        return float(min(self.cap_s, self.base_s * (2 ** min(self._n, 32))))

    def next(self, floor: float = 0.0) -> float:
        """The next delay in seconds; ``floor`` (0-1) raises its lower bound to that share
        of the ceiling."""
        c = self.ceiling_s
        self._n += 1
        return self._rng.uniform(min(max(floor, 0.0), 1.0) * c, c)

    def reset(self) -> None:
        """Start again from ``base_s`` (after a connection that stayed up)."""
        self._n = 0


class ReconnectBackoff:
    """The reconnect schedule: full jitter under a ceiling that grows with the age of the
    outage, not with the number of attempts.

    A delay is uniform in [floor x c, c] with c = min(``cap_s``, max(``base_s``, ``share`` x
    age)), where age is the seconds since the first failure after the last :meth:`reset`
    (the first :meth:`next` call starts the outage). ``base_s``/``cap_s``: seconds;
    ``share``: 0 < share <= 1. ``rng``: the jitter source; ``clock``: monotonic seconds
    (both injected by tests).

    Why not ``base_s`` x 2**attempts (:class:`Backoff`): with full jitter the early draws are
    often short, so attempts pile up while little time passes and the ceiling runs ahead of
    the outage. After a 3 s broker restart the doubling ceiling had reached 4-8 s: the reader
    came back a median 1.7 s after the broker, in 3 of 10 restarts more than 2.5 s after it,
    at worst half a minute (100,000 simulated outages). Keyed to the outage's age, the reader
    tries again within ``share`` of the outage once the broker is back (at most 1.5 s after a
    3 s outage, 30 s after a minute, the 60 s cap after two), whatever the draws were. The
    attempt rate still falls as the outage goes on: delays grow geometrically, about
    1 + share/2 a step, so about 15 attempts in the first 10 s (6 with doubling, both at
    ``base_s`` 0.5 s), then about one per ``cap_s``/2 once at the cap, as before; and a fleet
    that lost its broker spreads its returns over ``share`` of the outage instead of
    arriving together.
    """

    def __init__(
        self,
        base_s: float,
        cap_s: float,
        *,
        share: float = OUTAGE_SHARE,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < base_s <= cap_s:
            raise ValueError("need 0 < base_s <= cap_s")
        if not 0 < share <= 1:
            raise ValueError("need 0 < share <= 1")
        self.base_s, self.cap_s, self.share = base_s, cap_s, share
        self._rng = rng or random.Random()
        self._clock = clock
        self._since: float | None = None  # when the current outage began

    @property
    def outage_s(self) -> float:
        """Seconds since the current outage began (0 when there is none)."""
        return 0.0 if self._since is None else max(0.0, self._clock() - self._since)

    @property
    def ceiling_s(self) -> float:
        """The upper bound of a delay drawn now, seconds."""
        return float(min(self.cap_s, max(self.base_s, self.share * self.outage_s)))

    def next(self, floor: float = 0.0) -> float:
        """The next delay in seconds (a failure happened now); ``floor`` (0-1) raises its
        lower bound to that share of the ceiling."""
        if self._since is None:
            self._since = self._clock()
        c = self.ceiling_s
        return self._rng.uniform(min(max(floor, 0.0), 1.0) * c, c)

    def reset(self) -> None:
        """The outage is over (a connection stayed up): the next failure starts a new one."""
        self._since = None


Sink = Callable[[LinkEvent], None]


class MqttLink:
    """One MQTT connection kept up by our own reconnect loop (see the module docstring).

    ``settings``: where and how. ``sink``: receives :data:`LinkEvent` objects from the network
    thread; it must not block (a ``queue.SimpleQueue.put``). ``rng``: for the backoff jitter.
    :meth:`publish`, :meth:`subscribe` and :meth:`disconnect` belong to one thread (the
    uplink worker); :meth:`stats` and :meth:`check_alive` may be called from any.
    """

    def __init__(
        self, settings: LinkSettings, sink: Sink, *, rng: random.Random | None = None
    ) -> None:
        self.settings = settings
        self._sink = sink
        self._backoff = ReconnectBackoff(settings.backoff_min_s, settings.backoff_max_s, rng=rng)
        # a Condition, so tests and the worker can wait for a change (see wait())
        self._lock = threading.Condition(threading.Lock())
        self._stop = threading.Event()
        self._net: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._inbound_slots = threading.BoundedSemaphore(INBOUND_LIMIT)
        self._thread: threading.Thread | None = None
        # shared state: written under _lock by the network thread
        self._client: mqtt.Client | None = None
        self._generation = 0
        self._up = False
        self._state = "stopped"
        self._problem: str | None = None
        self._last_failure: str | None = None
        self._retry_at: float | None = None
        self._attempts = self._connects = self._failures = 0
        self._auth_refusals = self._takeovers = self._loop_failures = 0
        self._thread_restarts = self._inbound_dropped = 0
        # network thread only
        self._reported: tuple[str, str] | None = None
        self._connected_at: float | None = None
        self._short_sessions = 0
        self._stable = False  # the current connection has been up STABLE_S
        self._episode: set[str] = set()  # take-over kinds reported until a stable connection
        self._takeover_until = 0.0
        self._closing = False  # we sent DISCONNECT on the current client
        self._last_paho_error = ""

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the network thread; it connects at once, then keeps reconnecting with backoff
        until :meth:`stop`. Returns at once. Idempotent."""
        with self._changing():
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._main, name="qrgate-mqtt-net", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float | None = None) -> bool:
        """Stop reconnecting and close the connection (without a DISCONNECT unless
        :meth:`disconnect` sent one: the broker then publishes the will). Waits for the
        network thread at most ``timeout_s`` (default: the connect timeout plus 2 s, as it may
        be inside a connection attempt); True if it ended. Idempotent."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(self.settings.connect_timeout_s + 2.0 if timeout_s is None else timeout_s)
        if thread.is_alive():
            log.warning("MQTT network thread still busy (a DNS lookup?); leaving it behind")
            return False
        with self._changing():
            self._state = "stopped"
        return True

    def check_alive(self) -> bool:
        """The watchdog: True when the network thread runs (or the link is stopped). A thread
        found dead (something killed it) is logged, counted and replaced, and False returned."""
        with self._lock:
            thread = self._thread
            if self._stop.is_set() or thread is None or thread.is_alive():
                return True
        log.error("MQTT network thread was dead; starting a new one and rebuilding the client")
        with self._changing():  # after the log line: waiters see both
            self._thread_restarts += 1
            self._up = False
            self._client = None
            self._thread = threading.Thread(target=self._main, name="qrgate-mqtt-net", daemon=True)
            self._thread.start()
        return False

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Hold the lock while changing shared state, then wake :meth:`wait` callers."""
        with self._lock:
            yield
            self._lock.notify_all()

    def wait(self, predicate: Callable[[LinkStats], bool], timeout_s: float) -> bool:
        """Block until ``predicate(stats)`` holds, at most ``timeout_s`` seconds; True if it
        does (tests and diagnostics)."""
        end = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if predicate(self._stats_locked()):
                    return True
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.5))

    @property
    def client(self) -> mqtt.Client | None:
        """The current paho client (diagnostics and fault-injection tests only: publish
        through :meth:`publish`)."""
        with self._lock:
            return self._client

    @property
    def generation(self) -> int:
        """The current client's generation (0 before the first)."""
        with self._lock:
            return self._generation

    def stats(self) -> LinkStats:
        """A consistent snapshot of the counters (see :class:`LinkStats`)."""
        with self._lock:
            return self._stats_locked()

    def _stats_locked(self) -> LinkStats:
        retry = None
        if self._state == "waiting" and self._retry_at is not None:
            retry = max(0.0, self._retry_at - time.monotonic())
        return LinkStats(
            state=self._state,
            problem=None if self._up else self._problem,
            last_failure=self._last_failure,
            attempts=self._attempts,
            connects=self._connects,
            failures=self._failures,
            auth_refusals=self._auth_refusals,
            takeovers=self._takeovers,
            loop_failures=self._loop_failures,
            thread_restarts=self._thread_restarts,
            inbound_dropped=self._inbound_dropped,
            retry_in_s=retry,
            backoff_ceiling_s=self._backoff.ceiling_s,
        )

    # --- the worker's calls ------------------------------------------------------------------

    def publish(
        self, generation: int, topic: str, payload: bytes, *, qos: int, retain: bool = False
    ) -> int | None:
        """Hand a message to client ``generation``; its message id, or None when that client
        is not connected (any more) or refused it. A PUBACK for it (QoS 1) arrives as
        :class:`PubAck` on the sink."""
        client = self._current(generation)
        if client is None:
            return None
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain)
        except (ValueError, RuntimeError) as e:
            log.error("MQTT publish to %s refused: %s", topic, e)
            return None
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return None
        return int(info.mid)

    def subscribe(self, generation: int, filters: list[tuple[str, int]]) -> int | None:
        """Subscribe client ``generation`` to ``(filter, qos)`` pairs; the message id, or
        None when it is not connected."""
        client = self._current(generation)
        if client is None:
            return None
        rc, mid = client.subscribe(filters)
        return int(mid) if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None else None

    def disconnect(self, generation: int) -> bool:
        """Send DISCONNECT on client ``generation`` (the broker then drops the will); True if
        it was connected. The network thread ends that connection and, unless stopping,
        reconnects."""
        client = self._current(generation)
        if client is None:
            return False
        self._net.put(("closing", generation))
        client.disconnect()
        return True

    def inbound_done(self) -> None:
        """The worker finished with one :class:`Inbound` message."""
        # more releases than messages would be a bug elsewhere: it must not stop the worker
        with contextlib.suppress(ValueError):
            self._inbound_slots.release()

    def _current(self, generation: int) -> mqtt.Client | None:
        with self._lock:
            if self._up and self._generation == generation:
                return self._client
            return None

    # --- the network thread ----------------------------------------------------------------

    def _main(self) -> None:
        try:
            while not self._stop.is_set():
                self._session()
                if self._stop.is_set():
                    break
                self._wait_backoff()
        except BaseException:
            # a thread that ends here is found by check_alive(); never die without a word
            log.critical("MQTT network thread died", exc_info=True)
            with self._changing():
                self._up = False
                self._client = None
                self._problem = "loop_failed"
        finally:
            with self._changing():
                if self._stop.is_set():
                    self._state = "stopped"

    def _wait_backoff(self) -> None:
        floor = 0.5 if time.monotonic() < self._takeover_until else 0.0
        delay = self._backoff.next(floor)
        with self._changing():
            self._state = "waiting"
            self._retry_at = time.monotonic() + delay
        log.debug("MQTT: next attempt in %.2f s", delay)
        self._stop.wait(delay)

    def _session(self) -> None:
        """One attempt and, if it connects, the life of that connection."""
        s = self.settings
        with self._changing():
            self._generation += 1
            gen = self._generation
            self._attempts += 1
            self._state = "connecting"
            self._retry_at = None
        self._closing = False
        self._connected_at = None
        self._stable = False
        self._last_paho_error = ""
        while True:  # events of an earlier client are void
            try:
                self._net.get_nowait()
            except queue.Empty:
                break
        try:
            client = self._make_client(gen)
        except (OSError, ValueError) as e:
            self._fail("tls_files", f"cannot load the TLS files: {e}")
            return
        try:
            if s.protocol == "5":
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = 0
                props.MaximumPacketSize = s.max_packet_bytes
                client.connect(s.host, s.port, s.keepalive_s, clean_start=True, properties=props)
            else:
                client.connect(s.host, s.port, s.keepalive_s)
        except Exception as e:
            _close_quietly(client)
            kind, text, auth = _classify_connect_error(e, s)
            self._fail(kind, text, auth=auth)
            return
        with self._changing():
            self._client = client
        reason = "closed"
        try:
            reason = self._run_loop(client, gen)
        except Exception as e:
            # an exception in a paho callback (or in paho) ends up here: paho's own threads
            # would have died from it silently
            reason = f"network loop failed: {type(e).__name__}: {e}"
            self._fail("loop_failed", f"{reason}; rebuilding the client")
            with self._changing():  # after the log line: waiters see both
                self._loop_failures += 1
        finally:
            was_up = self._connected_at is not None
            with self._changing():
                self._up = False
                self._client = None
            _close_quietly(client)
            if was_up:
                self._sink(LinkDown(gen, reason))

    def _run_loop(self, client: mqtt.Client, gen: int) -> str:
        """Run paho's loop until the connection ends; the reason it ended."""
        while True:
            if self._stop.is_set():
                return "stopping"
            rc = client.loop(LOOP_TIMEOUT_S)
            ended = self._handle_net_events(gen)
            if ended is not None:
                return ended
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return self._lost(f"connection lost ({mqtt.error_string(rc)})")
            self._check_stable()

    def _check_stable(self) -> None:
        """A connection up STABLE_S ends a trouble episode: backoff and counters start over."""
        if (
            self._connected_at is not None
            and not self._stable
            and time.monotonic() - self._connected_at >= STABLE_S
        ):
            self._stable = True
            self._short_sessions = 0
            self._backoff.reset()
            self._episode.clear()

    def _handle_net_events(self, gen: int) -> str | None:
        """CONNACK and disconnect events queued by the callbacks; the reason when the
        connection is over."""
        while True:
            try:
                event = self._net.get_nowait()
            except queue.Empty:
                return None
            kind = event[0]
            if event[1] != gen:
                continue
            if kind == "closing":
                self._closing = True
            elif kind == "log":
                self._last_paho_error = event[2]
            elif kind == "connack":
                rc: ReasonCode = event[2]
                if rc.is_failure:
                    auth = rc.value in _AUTH_CODES
                    self._fail(
                        "auth" if auth else "refused",
                        f"broker {self._where()} refused the connection: {rc}",
                        auth=auth,
                    )
                    return f"CONNACK {rc}"
                self._connected(gen, bool(event[3]))
            elif kind == "disconnect":
                return self._disconnected(event[2], bool(event[3]))

    def _connected(self, gen: int, session_present: bool) -> None:
        self._connected_at = time.monotonic()
        if self._episode:
            # fighting over our client id: one line per reconnect would be noise
            log.debug("MQTT connected to %s again", self._where())
        elif self._reported is not None:
            log.info(
                "MQTT connected to %s as %s (after %s)",
                self._where(),
                self.settings.client_id,
                self._reported[1],
            )
        else:
            log.info("MQTT connected to %s as %s", self._where(), self.settings.client_id)
        self._reported = None
        with self._changing():
            self._up = True
            self._state = "connected"
            self._connects += 1
            self._problem = None
        self._sink(LinkUp(gen, session_present))

    def _disconnected(self, rc: ReasonCode, from_server: bool) -> str:
        if self._connected_at is None:
            # closed before CONNACK: a TLS peer refusing our certificate (TLS 1.3 says so
            # only after the handshake), a broker that drops unknown clients
            err = self._last_paho_error
            if any(h in err.upper() for h in _TLS_AUTH_HINTS):
                self._fail(
                    "auth",
                    f"broker {self._where()} refused our TLS client certificate: {err}",
                    auth=True,
                )
            else:
                self._fail(
                    "closed",
                    f"broker {self._where()} closed the connection before CONNACK ({err or rc})",
                )
            return "closed before CONNACK"
        lived = time.monotonic() - self._connected_at
        if self._closing:
            return "disconnected"
        if rc.value == _RC_SESSION_TAKEN_OVER:
            self._takeover_until = time.monotonic() + TAKEOVER_HOLD_S
            self._fail(
                "taken_over",
                f"session taken over: another client connected to "
                f"{self._where()} as {self.settings.client_id} (a second "
                f"daemon, or a cloned reader with the same id?); backing off",
            )
            with self._changing():  # after the log line: waiters see both
                self._takeovers += 1
            return "session taken over"
        why = f"disconnected by the broker: {rc}" if from_server else f"connection lost ({rc})"
        return self._lost(why, lived)

    def _lost(self, why: str, lived: float | None = None) -> str:
        if lived is None:
            lived = 0.0 if self._connected_at is None else time.monotonic() - self._connected_at
        if self._closing:
            return "disconnected"
        if self._stable:
            self._fail("network", why, quiet=True)
            log.warning("MQTT %s after %.0f s up; reconnecting", why, lived)
            return why
        self._short_sessions += 1
        if self._short_sessions >= SHORT_SESSIONS_FOR_TAKEOVER:
            self._takeover_until = time.monotonic() + TAKEOVER_HOLD_S
            self._fail(
                "flapping",
                f"{self._short_sessions} connections in a row dropped within "
                f"{STABLE_S:g} s of connecting ({why}): another client using "
                f"{self.settings.client_id} (session take-over)?; backing off",
            )
            if self._short_sessions == SHORT_SESSIONS_FOR_TAKEOVER:
                with self._changing():  # after the log line: waiters see both
                    self._takeovers += 1
        else:
            self._fail("network", why)
        return why

    def _fail(self, kind: str, text: str, *, auth: bool = False, quiet: bool = False) -> None:
        """Count a failure; log it when it differs from the last one reported, so a broker
        that refuses us every minute for a day is one log line, not 1,440."""
        with self._changing():
            self._failures += 1
            self._problem = kind
            self._last_failure = text
            if auth:
                self._auth_refusals += 1
        if kind in _EPISODE_KINDS:
            if kind in self._episode:
                log.debug("MQTT %s", text)
            else:
                self._episode.add(kind)
                log.warning(
                    "MQTT %s; reported once until a connection stays up %g s", text, STABLE_S
                )
            return
        key = (kind, text)
        if quiet:
            self._reported = key
            return
        if key == self._reported:
            log.debug("MQTT still failing: %s", text)
            return
        self._reported = key
        if auth:
            log.error(
                "MQTT %s: check the client certificate, username and password file; "
                "retrying with backoff up to %g s, logged once",
                text,
                self.settings.backoff_max_s,
            )
        else:
            log.warning(
                "MQTT %s; retrying with backoff up to %g s", text, self.settings.backoff_max_s
            )

    def _where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def _make_client(self, gen: int) -> mqtt.Client:
        s = self.settings
        v5 = s.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            clean_session=None if v5 else True,
            userdata=gen,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        if s.transport == "tls":
            ctx = ssl.create_default_context(cafile=str(s.ca) if s.ca else None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if s.cert is not None and s.key is not None:
                # an empty passphrase, never a prompt: nobody answers one on a reader
                ctx.load_cert_chain(certfile=str(s.cert), keyfile=str(s.key), password=b"")
            client.tls_set_context(ctx)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.will is not None:
            w = s.will
            client.will_set(w.topic, w.payload, qos=w.qos, retain=w.retain)
        client.connect_timeout = s.connect_timeout_s
        client.max_inflight_messages_set(s.max_inflight)
        # paho's queue beyond the in-flight window: the forwarder never needs it, status and
        # results fit easily; a full queue refuses (publish returns None), never blocks
        client.max_queued_messages_set(s.max_inflight * 4)
        # an exception in a callback must surface in our loop, not be logged and forgotten
        client.suppress_exceptions = False
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_log = self._on_log
        client.on_socket_register_write = _no_write_in_caller
        return client

    # --- paho callbacks (network thread, under paho's locks): hand off and return ------------

    def _on_connect(
        self, _c: mqtt.Client, gen: int, flags: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        try:
            self._net.put(("connack", gen, rc, getattr(flags, "session_present", False)))
        except Exception:
            log.exception("on_connect hand-off failed")

    def _on_disconnect(
        self, _c: mqtt.Client, gen: int, flags: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        try:
            from_server = bool(getattr(flags, "is_disconnect_packet_from_server", False))
            self._net.put(("disconnect", gen, rc, from_server))
        except Exception:
            log.exception("on_disconnect hand-off failed")

    def _on_publish(
        self, _c: mqtt.Client, gen: int, mid: int, rc: ReasonCode, _p: Properties | None
    ) -> None:
        try:
            self._sink(PubAck(gen, mid, not rc.is_failure, str(rc)))
        except Exception:
            log.exception("on_publish hand-off failed")

    def _on_message(self, _c: mqtt.Client, gen: int, msg: mqtt.MQTTMessage) -> None:
        try:
            if not self._inbound_slots.acquire(blocking=False):
                with self._changing():
                    self._inbound_dropped += 1
                return
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                topic = ""
            self._sink(Inbound(gen, topic, bytes(msg.payload), bool(msg.retain)))
        except Exception:
            log.exception("on_message hand-off failed")

    def _on_subscribe(
        self, _c: mqtt.Client, gen: int, mid: int, rcs: list[ReasonCode], _p: Properties | None
    ) -> None:
        try:
            failed = tuple(str(rc) for rc in rcs if rc.is_failure)
            self._sink(SubAck(gen, mid, failed))
        except Exception:
            log.exception("on_subscribe hand-off failed")

    def _on_log(self, _c: mqtt.Client, gen: int, level: int, buf: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            # the only place paho says why a socket failed (an SSL alert, a reset)
            self._net.put(("log", gen, buf))


def _no_write_in_caller(_c: mqtt.Client, _u: Any, _sock: Any) -> None:
    """Registered so paho never writes to the socket in a publishing thread; the network
    loop (woken by paho's socket pair) writes instead."""


def _close_quietly(client: mqtt.Client) -> None:
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


def _classify_connect_error(e: Exception, s: LinkSettings) -> tuple[str, str, bool]:
    """(kind, text for people, is it an authentication refusal) for a failed connect()."""
    where = f"{s.host}:{s.port}"
    if isinstance(e, socket.gaierror):
        return "dns", f"cannot resolve broker host {s.host!r}: {e.strerror or e}", False
    if isinstance(e, ssl.SSLCertVerificationError):
        return "tls_verify", f"broker {where} certificate not trusted: {e.verify_message}", False
    if isinstance(e, ssl.CertificateError):
        return "tls_verify", f"broker {where} certificate does not match: {e}", False
    if isinstance(e, ssl.SSLError):
        reason = (e.reason or str(e)).upper()
        auth = any(h in reason for h in _TLS_AUTH_HINTS)
        what = "refused our TLS client certificate" if auth else "TLS handshake failed"
        return ("auth" if auth else "tls"), f"broker {where} {what}: {e}", auth
    if isinstance(e, ConnectionRefusedError):
        return "refused", f"broker {where} refused the TCP connection (nothing listens)", False
    if isinstance(e, TimeoutError):
        return "timeout", f"broker {where} did not answer within {s.connect_timeout_s:g} s", False
    if isinstance(e, OSError):
        return "network", f"cannot reach broker {where}: {e.strerror or e}", False
    return "network", f"cannot connect to broker {where}: {type(e).__name__}: {e}", False
