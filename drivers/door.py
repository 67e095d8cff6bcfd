"""Door inputs: door contact, request-to-exit button and tamper switch, debounced.

Wiring and levels
-----------------
Every input is a dry contact between a GPIO line and ground with ``pull_up=True`` (the Pi's
internal pull-up), or between the line and 3V3 with an external pull-down and
``pull_up=False``. Either way gpiozero reports the input "active" while the circuit is
*closed*, and each input maps that to the field's meaning:

* door contact: a normally-closed reed switch, closed while the door is shut. A cut wire
  reads as "door open" (it raises an alarm rather than hiding one).
* request-to-exit (REX): a normally-open push button, closed while pressed.
* tamper: closed while the reader's case is shut. A cut wire reads as "tampered".

Debouncing
----------
Door contacts and REX buttons bounce. Debouncing is done here, in software, the same way on
every pin factory: each edge (re)starts a ``bounce_s`` quiet period; when the line has been
quiet that long its level is read and, if it differs from the last reported level, the
callback runs. A burst of bounces therefore yields one change, and a glitch that ends where it
started yields none. gpiozero's own ``bounce_time`` is not used: MockPin does not implement it,
and the RPi.GPIO and native factories drop every edge within the bounce time of the first one,
which can lose the final edge and leave the reported state wrong until the next change.

Threads
-------
gpiozero calls the edge handler on its own thread (in the caller's thread for mock pins); the
handler only stamps a deadline. Each input has one long-lived worker thread that waits out the
quiet period and runs the user callbacks; a callback that raises is logged, never propagated.
``close()`` stops the worker and releases the pin; it is idempotent.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import Any

from gpiozero import DigitalInputDevice

from drivers.exceptions import DoorInputError

log = logging.getLogger(__name__)

Callback = Callable[[], None]
"""A no-argument callback, run on the input's worker thread."""

DEFAULT_BOUNCE_S = 0.05
"""Default debounce time, seconds."""


def _check_bounce(bounce_s: float) -> float:
    value = float(bounce_s)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"bounce time must be a number of seconds >= 0, not {bounce_s!r}")
    return value


class _DebouncedInput:
    """One gpiozero input line, debounced; ``on_change(closed)`` runs on the worker thread
    with the new level (``True``: circuit closed)."""

    def __init__(
        self,
        pin: int | str,
        *,
        pin_factory: Any,
        pull_up: bool,
        bounce_s: float,
        role: str,
        on_change: Callable[[bool], None],
    ) -> None:
        if pin_factory is None:
            raise DoorInputError(
                f"{role} on pin {pin}: pin_factory is required (drivers.pins.make_pin_factory)"
            )
        self._bounce_s = _check_bounce(bounce_s)
        self._role = role
        self._pin_name = str(pin)
        self._on_change = on_change
        try:
            self._device = DigitalInputDevice(
                pin, pull_up=pull_up, bounce_time=None, pin_factory=pin_factory
            )
        except Exception as exc:
            raise DoorInputError(f"{role} on pin {pin}: {type(exc).__name__}: {exc}") from exc
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._closed = False
        self._level = bool(self._device.is_active)
        self._device.when_activated = self._edge
        self._device.when_deactivated = self._edge
        self._worker = threading.Thread(
            target=self._run, name=f"qrgate-{role}-{self._pin_name}", daemon=True
        )
        self._worker.start()

    @property
    def level(self) -> bool:
        """Debounced level: ``True`` while the circuit is closed."""
        with self._cond:
            return self._level

    @property
    def settling(self) -> bool:
        """``True`` while an edge is waiting out the bounce time."""
        with self._cond:
            return self._deadline is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._deadline = None
            self._cond.notify_all()
        if self._worker is not threading.current_thread():
            self._worker.join(timeout=5.0)
            if self._worker.is_alive():
                log.error("%s on pin %s: worker thread did not stop", self._role, self._pin_name)
        try:
            self._device.when_activated = None
            self._device.when_deactivated = None
            self._device.close()
        except Exception:
            log.exception("%s on pin %s: close failed", self._role, self._pin_name)

    def _edge(self) -> None:
        # Runs on gpiozero's thread: stamp and return; never raise into gpiozero.
        try:
            with self._cond:
                if self._closed:
                    return
                self._deadline = time.monotonic() + self._bounce_s
                self._cond.notify_all()
        except Exception:
            log.exception("%s on pin %s: edge handler failed", self._role, self._pin_name)

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
                    level = bool(self._device.is_active)
                except Exception:
                    log.exception("%s on pin %s: cannot read the line", self._role, self._pin_name)
                    continue
                if level == self._level:
                    continue
                self._level = level
                # Callbacks run unlocked so they may read properties or close this input.
                self._cond.release()
                try:
                    self._on_change(level)
                except Exception:
                    log.exception("%s on pin %s: callback failed", self._role, self._pin_name)
                finally:
                    self._cond.acquire()


class _Input(ABC):
    """Shared parts of the three inputs: the debounced line, lifetime, context manager.
    Subclasses name their ``role`` (for logs) and turn level changes into their callbacks
    (class attributes default to no callback; assign one on the instance)."""

    role = "input"

    def __init__(
        self,
        pin: int | str,
        *,
        pin_factory: Any,
        pull_up: bool = True,
        bounce_s: float = DEFAULT_BOUNCE_S,
    ) -> None:
        self._input = _DebouncedInput(
            pin,
            pin_factory=pin_factory,
            pull_up=pull_up,
            bounce_s=bounce_s,
            role=self.role,
            on_change=self._changed,
        )

    @abstractmethod
    def _changed(self, circuit_closed: bool) -> None:
        """The debounced circuit closed (True) or opened (False): call the callback."""

    @property
    def settling(self) -> bool:
        """``True`` while an edge is waiting out the bounce time (the state may change)."""
        return self._input.settling

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` ran."""
        return self._input.closed

    def close(self) -> None:
        """Stop the worker thread and release the pin. Idempotent; callbacks stop."""
        self._input.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _call(callback: Callback | None) -> None:
    if callback is not None:
        callback()


class DoorContact(_Input):
    """The door contact: a normally-closed switch, closed while the door is shut.

    ``pin``: gpiozero pin name or BCM number. ``pin_factory``: from
    :func:`drivers.pins.make_pin_factory` (required). ``pull_up``: ``True`` for a switch to
    ground on the internal pull-up. ``bounce_s``: debounce time, seconds (>= 0).

    :attr:`when_opened` / :attr:`when_closed`: no-argument callbacks run on this input's worker
    thread once per debounced change. Raises :class:`drivers.exceptions.DoorInputError` when
    the pin cannot be claimed, ``ValueError`` for a bad ``bounce_s``.
    """

    role = "door-contact"

    when_opened: Callback | None = None
    when_closed: Callback | None = None

    @property
    def is_open(self) -> bool:
        """``True`` while the door is open (debounced); also when the wire is cut."""
        return not self._input.level

    def _changed(self, circuit_closed: bool) -> None:
        _call(self.when_closed if circuit_closed else self.when_opened)

    def __repr__(self) -> str:
        return f"<DoorContact {'open' if self.is_open else 'closed'}>"


class ExitButton(_Input):
    """The request-to-exit button: normally open, closed while pressed.

    Arguments as :class:`DoorContact`. :attr:`when_pressed`: no-argument callback run on this
    input's worker thread once per debounced press. Raises
    :class:`drivers.exceptions.DoorInputError` when the pin cannot be claimed.
    """

    role = "exit-button"

    when_pressed: Callback | None = None

    @property
    def is_pressed(self) -> bool:
        """``True`` while the button is held (debounced)."""
        return self._input.level

    def _changed(self, circuit_closed: bool) -> None:
        if circuit_closed:
            _call(self.when_pressed)

    def __repr__(self) -> str:
        return f"<ExitButton {'pressed' if self.is_pressed else 'released'}>"


class TamperSwitch(_Input):
    """The tamper switch: closed while the reader's case is shut.

    Arguments as :class:`DoorContact`. :attr:`when_tampered` / :attr:`when_restored`:
    no-argument callbacks run on this input's worker thread once per debounced change.
    Raises :class:`drivers.exceptions.DoorInputError` when the pin cannot be claimed.
    """

    role = "tamper"

    when_tampered: Callback | None = None
    when_restored: Callback | None = None

    @property
    def is_tampered(self) -> bool:
        """``True`` while the case is open (debounced); also when the wire is cut."""
        return not self._input.level

    def _changed(self, circuit_closed: bool) -> None:
        _call(self.when_restored if circuit_closed else self.when_tampered)

    def __repr__(self) -> str:
        return f"<TamperSwitch {'tampered' if self.is_tampered else 'ok'}>"


class DoorInputs:
    """The wired door inputs of one reader; any of them may be absent (pin ``None``).

    ``contact_pin``, ``exit_pin``, ``tamper_pin``: BCM numbers or ``None`` (not wired).
    ``pin_factory``: from :func:`drivers.pins.make_pin_factory` (required). ``pull_up`` and
    ``bounce_s`` (seconds) apply to every input. From the config:
    ``DoorInputs(d.contact_pin, d.exit_pin, d.tamper_pin, pin_factory=f, pull_up=d.pull_up,
    bounce_s=d.bounce_ms / 1000)``.

    Raises :class:`drivers.exceptions.DoorInputError` when a pin cannot be claimed (inputs
    already made are closed first), ``ValueError`` for a bad ``bounce_s``.
    """

    def __init__(
        self,
        contact_pin: int | str | None,
        exit_pin: int | str | None,
        tamper_pin: int | str | None,
        *,
        pin_factory: Any,
        pull_up: bool = True,
        bounce_s: float = DEFAULT_BOUNCE_S,
    ) -> None:
        _check_bounce(bounce_s)
        self.contact: DoorContact | None = None
        self.exit_button: ExitButton | None = None
        self.tamper: TamperSwitch | None = None
        self._closed = False
        kw: dict[str, Any] = {"pin_factory": pin_factory, "pull_up": pull_up, "bounce_s": bounce_s}
        try:
            if contact_pin is not None:
                self.contact = DoorContact(contact_pin, **kw)
            if exit_pin is not None:
                self.exit_button = ExitButton(exit_pin, **kw)
            if tamper_pin is not None:
                self.tamper = TamperSwitch(tamper_pin, **kw)
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` ran."""
        return self._closed

    def read(self) -> dict[str, bool | None]:
        """Current debounced states for the self-test: ``{"door_open", "exit_pressed",
        "tampered"}``, each ``None`` when that input is not wired."""
        return {
            "door_open": None if self.contact is None else self.contact.is_open,
            "exit_pressed": None if self.exit_button is None else self.exit_button.is_pressed,
            "tampered": None if self.tamper is None else self.tamper.is_tampered,
        }

    def close(self) -> None:
        """Close every input (threads stopped, pins released). Idempotent."""
        self._closed = True
        for device in (self.contact, self.exit_button, self.tamper):
            if device is not None:
                device.close()

    def __enter__(self) -> DoorInputs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DoorInputs {self.read()}>"
