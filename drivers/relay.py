"""The door relay: "unlock for N seconds", and locked at start and on every way out.

Strike types and what the relay does
-------------------------------------
*Fail-secure* strike: locked when unpowered. The relay powers it to unlock, so
``unlock_energises=True``: at rest the relay is de-energised (locked); a grant energises it.

*Fail-safe* lock (a magnetic lock, or a fail-safe strike): unlocked when unpowered. The relay
holds the lock powered and a grant CUTS power, so ``unlock_energises=False``: at rest the relay
is energised (locked); a grant de-energises it.

:func:`unlock_energises_for` maps the config's ``strike = "fail-secure" | "fail-safe"`` to the
flag. Either way :meth:`DoorRelay.pulse` means "unlock for N seconds" and the resting state is
"locked": the relay is driven to rest when it is created (before anything else, so a relay
never pulses at boot), when a pulse ends, and on every exit path of this process that runs
code: :meth:`DoorRelay.close`, the context manager, and an ``atexit`` hook for a relay that
was never closed (e.g. an unhandled exception ends the program).

What "never left energised by a crash" means
--------------------------------------------
Fail-secure: energised means *unlocked*. A Python exception, SIGTERM handled by the daemon or
a normal exit all drive the relay to rest before gpiozero releases the line (Python's default
SIGTERM action runs no exit hooks, so the daemon must handle SIGTERM and close). gpiozero's
``close()`` alone is not enough: on some factories an active-low output that is on stays
energised after close, so the relay is always driven to rest with ``off()`` first. Only
``kill -9``, a segfault or a kernel hang can leave the line where it was; the next start drives
it to rest at construction, so the daemon must create the relay before the camera or MQTT.

Fail-safe: energised means *locked*. While the daemon runs the relay is held energised. When
the process ends, gpiozero (or the kernel) releases the line, the relay board typically
de-energises and the lock opens: the designed life-safety behaviour of a fail-safe lock. So a
stopped or restarting daemon leaves the door unlocked for that time (supervise it, e.g.
systemd ``Restart=always``). A crash that leaves the line driven leaves the door locked with
no reader; egress then relies on the hard-wired request-to-exit and fire release that
building codes require for such locks.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
from types import TracebackType
from typing import Any

from gpiozero import DigitalOutputDevice

from drivers.exceptions import DeviceClosedError, FeedbackError

log = logging.getLogger(__name__)

STRIKE_TYPES: tuple[str, ...] = ("fail-secure", "fail-safe")
"""The values of the config's ``strike`` setting."""


def unlock_energises_for(strike: str) -> bool:
    """Whether unlocking energises the relay for a ``strike`` of :data:`STRIKE_TYPES`.

    ``"fail-secure"`` -> ``True`` (power opens it); ``"fail-safe"`` -> ``False`` (cutting power
    opens it). Raises ``ValueError`` for any other value (the config layer reports it).
    """
    key = strike.strip().lower()
    if key == "fail-secure":
        return True
    if key == "fail-safe":
        return False
    raise ValueError(f"strike must be one of {', '.join(STRIKE_TYPES)}, not {strike!r}")


class DoorRelay:
    """One relay output that unlocks the door for a while.

    ``pin``: gpiozero pin name or BCM number. ``pin_factory``: from
    :func:`drivers.pins.make_pin_factory` (required; gpiozero's global factory is never used).
    ``active_high``: ``True`` when the relay board energises on a high line, ``False`` for the
    common active-low boards. ``pulse_s``: default unlock time in seconds (> 0).
    ``unlock_energises``: see :func:`unlock_energises_for` and the module docstring.

    The relay is locked (at rest) from construction. A pulse is ended by one long-lived worker
    thread; all methods are thread-safe. Raises :class:`drivers.exceptions.FeedbackError` when
    the pin cannot be claimed, ``ValueError`` for a bad ``pulse_s``.
    """

    def __init__(
        self,
        pin: int | str,
        *,
        pin_factory: Any,
        active_high: bool = True,
        pulse_s: float = 3.0,
        unlock_energises: bool = True,
    ) -> None:
        if pin_factory is None:
            raise FeedbackError(
                f"relay on pin {pin}: pin_factory is required (drivers.pins.make_pin_factory)"
            )
        self._pulse_s = _check_seconds(pulse_s)
        self._unlock_energises = unlock_energises
        self._pin_name = str(pin)
        try:
            # gpiozero "active" = unlocked: for a fail-safe lock that is the de-energised level,
            # so the line polarity is inverted; initial_value=False is then "locked" for both.
            self._device = DigitalOutputDevice(
                pin,
                active_high=(active_high == unlock_energises),
                initial_value=False,
                pin_factory=pin_factory,
            )
        except Exception as exc:
            raise FeedbackError(f"relay on pin {pin}: {type(exc).__name__}: {exc}") from exc
        # RLock: close() may run in a signal handler that interrupted pulse() in this thread.
        self._cond = threading.Condition(threading.RLock())
        self._deadline: float | None = None
        self._pulse_count = 0
        self._closed = False
        self._worker = threading.Thread(
            target=self._run, name=f"qrgate-relay-{self._pin_name}", daemon=True
        )
        self._worker.start()
        # A relay left unclosed (unhandled exception, forgotten close) is still driven to rest
        # at interpreter exit; gpiozero's own exit hook only closes its global factory's devices.
        atexit.register(self.close)

    @property
    def pulse_s(self) -> float:
        """Default unlock time in seconds; settable while running (raises ValueError unless
        a finite number > 0); a pulse already running keeps its length."""
        return self._pulse_s

    @pulse_s.setter
    def pulse_s(self, seconds: float) -> None:
        self._pulse_s = _check_seconds(seconds)

    @property
    def unlock_energises(self) -> bool:
        """``True`` when unlocking energises the relay (fail-secure strike)."""
        return self._unlock_energises

    @property
    def is_unlocked(self) -> bool:
        """``True`` while a pulse holds the door unlocked; ``False`` after close."""
        with self._cond:
            return not self._closed and bool(self._device.is_active)

    @property
    def is_energised(self) -> bool:
        """``True`` while the relay coil is driven, whichever strike type; ``False`` after close."""
        with self._cond:
            if self._closed:
                return False
            return bool(self._device.is_active) == self._unlock_energises

    @property
    def pulse_count(self) -> int:
        """Number of accepted :meth:`pulse` calls (extensions included) since construction."""
        with self._cond:
            return self._pulse_count

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` ran."""
        return self._closed

    def pulse(self, seconds: float | None = None) -> int:
        """Unlock now, in the caller's thread, and lock again after ``seconds``.

        ``seconds``: unlock time in seconds (> 0, finite); :attr:`pulse_s` when ``None``. A pulse
        during a pulse extends it to whichever ends later; it never shortens it.

        Returns ``time.monotonic_ns()`` read right after the line was switched to "unlocked".
        Raises :class:`drivers.exceptions.DeviceClosedError` after :meth:`close` (the door is
        not opened), ``ValueError`` for a bad ``seconds``.
        """
        duration = self._pulse_s if seconds is None else _check_seconds(seconds)
        with self._cond:
            if self._closed:
                raise DeviceClosedError(f"relay on pin {self._pin_name} is closed")
            self._device.on()
            t_ns = time.monotonic_ns()
            end = time.monotonic() + duration
            if self._deadline is None or end > self._deadline:
                self._deadline = end
            self._pulse_count += 1
            self._cond.notify_all()
        return t_ns

    def off(self) -> None:
        """Lock now, ending any pulse. No effect after :meth:`close`."""
        with self._cond:
            if self._closed:
                return
            self._deadline = None
            self._device.off()
            self._cond.notify_all()

    def wait_locked(self, timeout_s: float) -> bool:
        """Block until no pulse is running, at most ``timeout_s`` seconds; ``True`` if locked."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or self._deadline is None, timeout=timeout_s
            )

    def close(self) -> None:
        """Lock, stop the worker and release the pin. Idempotent; never leaves the door unlocked.

        The line is driven to rest with ``off()`` before gpiozero's ``close()`` (which on an
        active-low board may leave an active line energised).
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._deadline = None
            try:
                self._device.off()
            except Exception:
                log.exception("relay on pin %s: could not lock before close", self._pin_name)
            self._cond.notify_all()
        if self._worker is not threading.current_thread():
            self._worker.join(timeout=5.0)
            if self._worker.is_alive():
                log.error("relay on pin %s: worker thread did not stop", self._pin_name)
        try:
            self._device.off()
            self._device.close()
        except Exception:
            log.exception("relay on pin %s: close failed", self._pin_name)
        atexit.unregister(self.close)

    def __enter__(self) -> DoorRelay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("unlocked" if self.is_unlocked else "locked")
        return f"<DoorRelay pin={self._pin_name} {state} pulses={self._pulse_count}>"

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                self._deadline = None
                try:
                    self._device.off()
                except Exception:
                    log.exception("relay on pin %s: could not lock after pulse", self._pin_name)
                self._cond.notify_all()


def _check_seconds(seconds: float) -> float:
    value = float(seconds)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"pulse time must be a positive number of seconds, not {seconds!r}")
    return value
