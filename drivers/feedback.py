"""What the reader shows and plays: idle states (ready, offline, fault) and verdicts.

:class:`Feedback` drives a :class:`~drivers.light.StatusLight`, a
:class:`~drivers.buzzer.Beeper` and a :class:`~drivers.relay.DoorRelay`. The relay is pulsed
in the caller's thread (shortest frame-to-door latency); light and sound run on one worker
thread, so no method waits for a pattern and no method raises.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from drivers.buzzer import Beeper, Tone, pattern_seconds
from drivers.light import StatusLight
from drivers.relay import DoorRelay

log = logging.getLogger(__name__)

GRANT_TONES: tuple[Tone, ...] = (Tone(2000.0, 0.15),)
"""Access granted: one 2 kHz beep of 150 ms."""

DENY_TONES: tuple[Tone, ...] = (Tone(400.0, 0.15, 0.15),) * 3
"""Access denied: three 400 Hz beeps, 150 ms on, 150 ms off."""

FAULT_TONES: tuple[Tone, ...] = (Tone(250.0, 1.0),)
"""Entering the fault state: one long low tone, 250 Hz for 1 s."""

CONFIRM_TONES: tuple[Tone, ...] = (
    Tone(1000.0, 0.15, 0.05),
    Tone(1500.0, 0.15, 0.05),
    Tone(2000.0, 0.3),
)
"""Configuration confirmed (the reader was provisioned): three rising beeps, 1, 1.5 and
2 kHz, unlike any verdict's sound."""

CONFIRM_BLINK = (0.1, 0.1, 3)
"""Confirmation light: green on s, blue off s, count (ends within :data:`CONFIRM_TONES`)."""

DENY_BLINK = (0.15, 0.15, 3)
"""Denied light: red on s, off s, count (as long as :data:`DENY_TONES`)."""

OFFLINE_BLINK = (0.5, 1.5)
"""Offline light: slow red blink, on s, off s, until the next state."""

FAULT_BLINK = (0.2, 0.2)
"""Fault light: fast red/amber alternation, red s, amber s, until the next state."""

DEFAULT_PULSE_S = 3.0
"""Unlock time when there is no relay to take it from, seconds."""

IDLE_STATES: tuple[str, ...] = ("ready", "offline", "fault")
"""The idle states the light returns to after a verdict pattern."""


@dataclass(frozen=True, slots=True)
class _Command:
    kind: str  # "idle" or "pattern"
    name: str
    seconds: float = 0.0


class Feedback:
    """The reader's feedback patterns over a light, a buzzer and the door relay.

    ``light``, ``beeper``, ``relay``: the devices (any may be ``None`` when the reader lacks
    it); this object owns them and closes them. ``clock``: monotonic nanoseconds, advancing in
    real time; pattern end times are measured with it.

    Idle states (the light shows one until a verdict pattern, then returns to it):
    :meth:`ready` steady blue, :meth:`offline` slow red blink, :meth:`fault` fast red/amber
    blink plus a long low tone when entered. Verdicts: :meth:`granted`, :meth:`denied`.
    Provisioning: :meth:`confirmed` (no relay); a refused code shows :meth:`denied`.

    Every method returns at once and never raises. A failing light or buzzer is logged once
    per kind of failure and counted in :attr:`errors`; a failing relay is logged every time.
    """

    def __init__(
        self,
        light: StatusLight | None,
        beeper: Beeper | None,
        relay: DoorRelay | None,
        *,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._light = light
        self._beeper = beeper
        self._relay = relay
        self._clock = clock
        self._cond = threading.Condition(threading.RLock())
        self._queue: deque[_Command] = deque()
        self._posted = 0
        self._done = 0
        self._active: str | None = None
        self._closed = False
        self._errors = 0
        self._reported: set[tuple[str, str]] = set()
        # Owned by the worker thread only.
        self._idle: str | None = None
        self._look: str | None = None
        self._sounded_idle: str | None = None
        self._worker = threading.Thread(target=self._run, name="qrgate-feedback", daemon=True)
        self._worker.start()

    @property
    def relay(self) -> DoorRelay | None:
        """The door relay given at construction (owned by this object)."""
        return self._relay

    @property
    def light(self) -> StatusLight | None:
        """The status light given at construction (owned by this object)."""
        return self._light

    @property
    def beeper(self) -> Beeper | None:
        """The buzzer given at construction (owned by this object)."""
        return self._beeper

    @property
    def errors(self) -> int:
        """Device failures so far: light, buzzer and relay, including background ones."""
        with self._cond:
            own = self._errors
        if self._beeper is not None:
            own += self._beeper.errors
        if self._light is not None:
            own += self._light.errors
        return own

    @property
    def pattern(self) -> str | None:
        """``"granted"``, ``"denied"`` or ``"confirmed"`` from the call until its pattern
        ended, else ``None``."""
        with self._cond:
            return self._active

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` ran."""
        return self._closed

    def ready(self) -> None:
        """Idle state "ready": steady blue."""
        self._post(_Command("idle", "ready"))

    def offline(self) -> None:
        """Idle state "offline": slow red blink."""
        self._post(_Command("idle", "offline"))

    def fault(self) -> None:
        """Idle state "fault": fast red/amber blink, and a long low tone when entered."""
        self._post(_Command("idle", "fault"))

    def granted(self, pulse_s: float | None = None) -> int:
        """Unlock the door now, then show green for the unlock time and beep 2 kHz for 150 ms.

        ``pulse_s``: unlock time in seconds; the relay's default when ``None`` (or not a
        positive number). The relay is pulsed in the caller's thread before anything else (a
        grant during a grant extends both the unlock and the green); light and sound follow in
        the background.

        Returns the ``time.monotonic_ns()`` at which the relay was switched (``clock()`` on a
        reader without relay), or -1 when the door could not be unlocked (the relay failed, or
        this object is closed): the failure is logged and counted, and the reader shows the
        denied pattern instead of green so nobody pulls a locked door. Never raises.
        """
        if self._closed:
            self._report("feedback", "granted() after close", None)
            return -1
        seconds = _seconds_or(pulse_s, self._relay.pulse_s if self._relay else DEFAULT_PULSE_S)
        if self._relay is None:
            t_ns = self._clock()
        else:
            try:
                t_ns = self._relay.pulse(seconds)
            except Exception as exc:
                with self._cond:
                    self._errors += 1
                log.error("door relay failed, door NOT unlocked: %s: %s", type(exc).__name__, exc)
                self._post(_Command("pattern", "denied", pattern_seconds(DENY_TONES)))
                return -1
        self._post(_Command("pattern", "granted", seconds))
        return t_ns

    def denied(self) -> None:
        """Blink red three times with three 400 Hz beeps, then return to the idle state."""
        self._post(_Command("pattern", "denied", pattern_seconds(DENY_TONES)))

    def confirmed(self) -> None:
        """Blink green/blue three times with three rising beeps, then return to the idle state.

        The reader's own settings were accepted (provisioning done): never touches the relay,
        so unlike :meth:`granted` it cannot open the door. Pattern name ``"confirmed"``."""
        self._post(_Command("pattern", "confirmed", pattern_seconds(CONFIRM_TONES)))

    def wait_settled(self, timeout_s: float) -> bool:
        """Block until every call so far was shown, no verdict pattern runs and the door is
        locked again; ``True`` if so.

        At most ``timeout_s`` seconds. For tests and orderly shutdown. The relay times its
        pulse on its own thread, which a loaded machine may run after the green light's end.
        """
        end = time.monotonic() + timeout_s
        with self._cond:
            shown = self._cond.wait_for(
                lambda: (
                    self._closed
                    or (not self._queue and self._done == self._posted and self._active is None)
                ),
                timeout=timeout_s,
            )
        if not shown or self._relay is None or self._closed:
            return shown
        return self._relay.wait_locked(max(0.0, end - time.monotonic()))

    def close(self) -> None:
        """Lock the door first, then turn light and buzzer off; join every thread. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
            self._active = None
            self._cond.notify_all()
        # The door first: nothing below may delay locking it.
        if self._relay is not None:
            _quietly(self._relay.close, "relay")
        if self._worker is not threading.current_thread():
            self._worker.join(timeout=5.0)
            if self._worker.is_alive():
                log.error("feedback worker thread did not stop")
        if self._light is not None:
            _quietly(self._light.close, "light")
        if self._beeper is not None:
            _quietly(self._beeper.close, "buzzer")

    def __enter__(self) -> Feedback:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _post(self, command: _Command) -> None:
        with self._cond:
            if self._closed:
                return
            self._queue.append(command)
            self._posted += 1
            if command.kind == "pattern":
                self._active = command.name
            self._cond.notify_all()

    def _report(self, device: str, what: str, exc: BaseException | None) -> None:
        kind = (device, type(exc).__name__ if exc is not None else what)
        with self._cond:
            self._errors += 1
            first = kind not in self._reported
            self._reported.add(kind)
        if first:
            detail = f"{type(exc).__name__}: {exc}" if exc is not None else what
            log.warning(
                "%s feedback failed (further failures of this kind not logged): %s", device, detail
            )

    def _light_do(self, what: str, action: Callable[[StatusLight], None]) -> None:
        if self._light is None:
            return
        try:
            action(self._light)
        except Exception as exc:
            self._report("light", what, exc)

    def _play(self, tones: tuple[Tone, ...]) -> None:
        if self._beeper is None:
            return
        try:
            self._beeper.play(tones)
        except Exception as exc:
            self._report("buzzer", "play", exc)

    def _show_pattern(self, name: str) -> None:
        if name == "granted":
            self._light_do("show", lambda light: light.show("green"))
            self._play(GRANT_TONES)
        elif name == "confirmed":
            on_s, off_s, n = CONFIRM_BLINK
            self._light_do(
                "blink", lambda light: light.blink("green", on_s, off_s, n, off_color="blue")
            )
            self._play(CONFIRM_TONES)
        else:
            on_s, off_s, n = DENY_BLINK
            self._light_do("blink", lambda light: light.blink("red", on_s, off_s, n))
            self._play(DENY_TONES)
        self._look = name

    def _show_idle(self) -> None:
        idle = self._idle
        if idle == "ready":
            self._light_do("show", lambda light: light.show("blue"))
        elif idle == "offline":
            self._light_do("blink", lambda light: light.blink("red", *OFFLINE_BLINK))
        elif idle == "fault":
            self._light_do(
                "blink", lambda light: light.blink("red", *FAULT_BLINK, off_color="amber")
            )
        else:
            self._light_do("off", lambda light: light.off())
        if idle == "fault" and self._sounded_idle != "fault":
            self._play(FAULT_TONES)
        self._sounded_idle = idle
        self._look = idle

    def _run(self) -> None:
        shown_end: int | None = None
        while True:
            with self._cond:
                while not self._closed and not self._queue:
                    if shown_end is None:
                        self._cond.wait()
                        continue
                    remaining_ns = shown_end - self._clock()
                    if remaining_ns <= 0:
                        break
                    self._cond.wait(remaining_ns / 1e9)
                if self._closed:
                    return
                commands = list(self._queue)
                self._queue.clear()
                batch_end = self._posted
            if shown_end is not None and self._clock() >= shown_end:
                shown_end = None
            for command in commands:
                if command.kind == "idle":
                    self._idle = command.name
                else:
                    end = self._clock() + int(command.seconds * 1e9)
                    if command.name == "granted" and self._look == "granted" and shown_end:
                        # The relay extends to the later end; so does the green.
                        end = max(end, shown_end)
                    self._show_pattern(command.name)
                    shown_end = end
            if shown_end is None and self._look != self._idle:
                self._show_idle()
            with self._cond:
                self._done = batch_end
                if shown_end is None and not self._queue:
                    self._active = None
                self._cond.notify_all()


def _seconds_or(seconds: float | None, default: float) -> float:
    if seconds is None:
        return default
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        return default
    return value if math.isfinite(value) and value > 0 else default


def _quietly(close: Callable[[], None], device: str) -> None:
    try:
        close()
    except Exception:
        log.exception("%s: close failed", device)
