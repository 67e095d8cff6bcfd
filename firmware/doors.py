"""The door monitor: door contact, request-to-exit and tamper turned into door events.

Events, each recorded through ``record(code, detail)`` (the daemon makes each a journal event
of kind "door" and sends it over MQTT):

* ``door_opened`` ``{"cause": "unlocked" | "exit_request" | "forced"}``; ``{"cause":
  "unknown", "at_start": True}`` when the door was already open at :meth:`DoorMonitor.start`
  (its held-open time counts from then).
* ``door_forced_open`` ``{}``: the door opened while the relay was locked, had not been
  unlocked within ``grace_s`` and no exit request came within ``exit_window_s``. Recorded
  right after its ``door_opened``.
* ``door_held_open`` ``{"open_s"}``: still open ``held_open_s`` after it opened; once per
  opening.
* ``door_closed`` ``{"open_s", "was_held_open"}``.
* ``exit_request`` ``{"unlocked"}``: the request-to-exit button was pressed; ``unlocked`` is
  whether the relay was pulsed for it (``exit_unlocks``) and the pulse worked.
* ``tamper`` / ``tamper_cleared`` ``{}`` (``tamper`` gets ``"at_start": True`` when the case
  was open at start).

Why a grace after the relay locks: a person may push the door just as the unlock pulse ends,
and the contact's debounce delays the "opened" edge; that is not a forced entry. The relay is
sampled every ``poll_s`` by the monitor thread to know when it was last unlocked.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType

from drivers.door import DoorInputs

log = logging.getLogger(__name__)

Record = Callable[[str, dict[str, object]], None]
"""``record(code, detail)``: stores one door event; may raise (logged, the monitor goes on)."""

EVENT_CODES: tuple[str, ...] = (
    "door_opened",
    "door_closed",
    "door_held_open",
    "door_forced_open",
    "exit_request",
    "tamper",
    "tamper_cleared",
)
"""Every code :class:`DoorMonitor` records."""


def _positive(name: str, value: float, *, zero_ok: bool = False) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name} must be a number of seconds {bound}, not {value!r}")
    return v


class DoorMonitor:
    """Watches a reader's :class:`~drivers.door.DoorInputs` and records door events.

    ``inputs``: the door inputs (not owned: the caller closes them after this monitor).
    ``relay_unlocked()``: ``True`` while the door relay holds the door unlocked (e.g.
    ``lambda: relay.is_unlocked``). ``unlock()``: pulses the relay open for its usual time
    (e.g. ``relay.pulse``), or ``None`` when there is no relay. ``record``: see
    :data:`Record`. ``held_open_s``: seconds a door may stay open before ``door_held_open``
    (> 0). ``exit_unlocks``: the exit button pulses the relay. ``grace_s``: seconds after the
    relay locked again during which an opening still counts as unlocked (>= 0).
    ``exit_window_s``: seconds after an exit request during which the next opening counts as
    an exit (>= 0); one request excuses one opening. ``poll_s``: how often the relay's state
    is sampled, seconds (> 0).
    ``monotonic``: clock in seconds (a test seam; the thread still waits in real time, at most
    ``poll_s`` at a time).

    Call :meth:`start` once ``record`` can take events; :meth:`close` stops the monitor thread
    and detaches the callbacks (idempotent). Nothing here raises out of a callback; a failing
    ``record``, ``unlock`` or ``relay_unlocked`` is logged. Raises ``ValueError`` for bad
    times, ``RuntimeError`` from :meth:`start` after :meth:`close`.
    """

    def __init__(
        self,
        inputs: DoorInputs,
        *,
        relay_unlocked: Callable[[], bool],
        unlock: Callable[[], object] | None,
        record: Record,
        held_open_s: float,
        exit_unlocks: bool,
        grace_s: float = 2.0,
        exit_window_s: float = 5.0,
        poll_s: float = 0.1,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inputs = inputs
        self._relay_unlocked = relay_unlocked
        self._unlock = unlock
        self._record = record
        self._held_open_s = _positive("held_open_s", held_open_s)
        self._exit_unlocks = exit_unlocks
        self._grace_s = _positive("grace_s", grace_s, zero_ok=True)
        self._exit_window_s = _positive("exit_window_s", exit_window_s, zero_ok=True)
        self._poll_s = _positive("poll_s", poll_s)
        self._clock = monotonic
        self._cond = threading.Condition()
        self._emit_lock = threading.Lock()
        self._pending: deque[tuple[str, dict[str, object]]] = deque()
        self._started = False
        self._closed = False
        self._opened_at: float | None = None
        self._held_open = False
        self._last_unlocked: float | None = None
        self._last_exit: float | None = None
        self._errors = 0
        self._thread = threading.Thread(target=self._run, name="qrgate-doors", daemon=True)

    @property
    def door_open(self) -> bool:
        """``True`` while the monitor considers the door open (opened and not closed since)."""
        with self._cond:
            return self._opened_at is not None

    @property
    def relay_seen_unlocked_at(self) -> float | None:
        """``monotonic()`` time the relay was last seen unlocked, ``None`` if never."""
        with self._cond:
            return self._last_unlocked

    @property
    def errors(self) -> int:
        """Failures of ``record``, ``unlock`` or ``relay_unlocked`` so far."""
        with self._cond:
            return self._errors

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` ran."""
        return self._closed

    def start(self) -> None:
        """Attach the input callbacks, record abnormal states found at start (door open,
        case open) and start the monitor thread. A second call does nothing."""
        with self._cond:
            if self._closed:
                raise RuntimeError("door monitor is closed; create a new one")
            if self._started:
                return
            self._started = True
            self._sample_relay()
            contact, button, tamper = (
                self._inputs.contact,
                self._inputs.exit_button,
                self._inputs.tamper,
            )
            if contact is not None:
                contact.when_opened = self._on_opened
                contact.when_closed = self._on_closed
                if contact.is_open:
                    self._opened_at = self._clock()
                    self._queue("door_opened", {"cause": "unknown", "at_start": True})
            if button is not None:
                button.when_pressed = self._on_exit
            if tamper is not None:
                tamper.when_tampered = self._on_tampered
                tamper.when_restored = self._on_restored
                if tamper.is_tampered:
                    self._queue("tamper", {"at_start": True})
            self._thread.start()
        self._drain()

    def close(self) -> None:
        """Detach from the inputs and stop the monitor thread. Idempotent; no event is
        recorded after it returns (except by a ``record`` call already running)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()
        for device, names in (
            (self._inputs.contact, ("when_opened", "when_closed")),
            (self._inputs.exit_button, ("when_pressed",)),
            (self._inputs.tamper, ("when_tampered", "when_restored")),
        ):
            if device is not None:
                for name in names:
                    setattr(device, name, None)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                log.error("door monitor thread did not stop")

    def __enter__(self) -> DoorMonitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Callbacks from the inputs' worker threads.

    def _on_opened(self) -> None:
        with self._cond:
            if self._closed or self._opened_at is not None:
                return
            self._sample_relay()
            cause = self._cause()
            self._opened_at = self._clock()
            self._held_open = False
            self._queue("door_opened", {"cause": cause})
            if cause == "forced":
                self._queue("door_forced_open", {})
            self._cond.notify_all()
        self._drain()

    def _on_closed(self) -> None:
        with self._cond:
            if self._closed or self._opened_at is None:
                return
            open_s = round(max(0.0, self._clock() - self._opened_at), 3)
            self._queue("door_closed", {"open_s": open_s, "was_held_open": self._held_open})
            self._opened_at = None
            self._held_open = False
            self._cond.notify_all()
        self._drain()

    def _on_exit(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._last_exit = self._clock()
        unlocked = False
        if self._exit_unlocks and self._unlock is not None:
            try:
                self._unlock()
                unlocked = True
            except Exception:
                log.exception("exit request: could not unlock the door")
                with self._cond:
                    self._errors += 1
        with self._cond:
            if self._closed:
                return
            if unlocked:
                self._last_unlocked = self._clock()
            self._queue("exit_request", {"unlocked": unlocked})
        self._drain()

    def _on_tampered(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._queue("tamper", {})
        self._drain()

    def _on_restored(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._queue("tamper_cleared", {})
        self._drain()

    # Internals; the _cond lock is held where noted.

    def _cause(self) -> str:
        """Why the door is opening now (lock held)."""
        now = self._clock()
        if self._last_exit is not None and now - self._last_exit <= self._exit_window_s:
            # one press lets one person out: a second opening in the window is not excused
            self._last_exit = None
            return "exit_request"
        if self._last_unlocked is not None and now - self._last_unlocked <= self._grace_s:
            return "unlocked"
        return "forced"

    def _sample_relay(self) -> None:
        """Note the time if the relay is unlocked now (lock held)."""
        try:
            unlocked = bool(self._relay_unlocked())
        except Exception:
            self._errors += 1
            log.exception("door monitor: cannot read the relay state")
            return
        if unlocked:
            self._last_unlocked = self._clock()

    def _queue(self, code: str, detail: dict[str, object]) -> None:
        """Queue one event (lock held); :meth:`_drain` records it outside the lock."""
        self._pending.append((code, detail))

    def _drain(self) -> None:
        # One emitter at a time keeps events in the order they were decided, and record() runs
        # without the state lock, so a slow record() never blocks the inputs' bookkeeping.
        with self._emit_lock:
            while True:
                with self._cond:
                    if not self._pending:
                        return
                    code, detail = self._pending.popleft()
                try:
                    self._record(code, detail)
                except Exception:
                    log.exception("door monitor: could not record %s", code)
                    with self._cond:
                        self._errors += 1

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                self._sample_relay()
                wait_s = self._poll_s
                if self._opened_at is not None and not self._held_open:
                    open_s = self._clock() - self._opened_at
                    if open_s >= self._held_open_s:
                        self._held_open = True
                        self._queue("door_held_open", {"open_s": round(open_s, 3)})
                        self._cond.release()
                        try:
                            self._drain()
                        finally:
                            self._cond.acquire()
                        continue
                    wait_s = min(wait_s, self._held_open_s - open_s)
                self._cond.wait(wait_s)
