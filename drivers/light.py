"""The reader's status light: one RGB LED, or a red/green pair of LEDs."""

from __future__ import annotations

import logging
import threading
from itertools import chain, cycle, repeat
from types import TracebackType
from typing import Any

from gpiozero import LED, RGBLED
from gpiozero.exc import PinPWMUnsupported

from drivers.exceptions import DeviceClosedError, FeedbackError

log = logging.getLogger(__name__)

RGB_COLORS: dict[str, tuple[float, float, float]] = {
    "off": (0.0, 0.0, 0.0),
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "amber": (1.0, 0.5, 0.0),
}
"""Color name -> (red, green, blue) duty, 0..1. Without PWM any non-zero duty is fully on, so
amber becomes red + green."""

PAIR_COLORS: dict[str, tuple[float, float]] = {
    "off": (0.0, 0.0),
    "red": (1.0, 0.0),
    "green": (0.0, 1.0),
    "amber": (1.0, 1.0),
    "white": (1.0, 1.0),
    "blue": (0.0, 0.0),
}
"""Color name -> (red, green) for a red/green pair. A pair has no blue: "blue" (the ready
light) stays dark, the usual idle look of two-LED readers; "white" shows as amber."""

COLORS: tuple[str, ...] = tuple(RGB_COLORS)
"""The color names :class:`StatusLight` accepts."""


class StatusLight:
    """The status light, RGB or red/green pair.

    ``red``, ``green``: gpiozero pin names or BCM numbers. ``blue``: the blue pin of an RGB LED;
    ``None`` means a red/green pair of plain LEDs. ``pin_factory``: from
    :func:`drivers.pins.make_pin_factory` (required). ``active_high``: ``False`` for
    common-anode RGB LEDs or LEDs wired to 3V3.

    An RGB LED uses PWM when its pins support it (so amber is amber) and on/off otherwise.
    Colors are the names in :data:`COLORS`. Starts off. Methods are thread-safe and return
    at once; blinking runs in a background thread. Raises
    :class:`drivers.exceptions.FeedbackError` when a pin cannot be claimed.
    """

    def __init__(
        self,
        red: int | str,
        green: int | str,
        blue: int | str | None = None,
        *,
        pin_factory: Any,
        active_high: bool = True,
    ) -> None:
        if pin_factory is None:
            raise FeedbackError(
                "status light: pin_factory is required (drivers.pins.make_pin_factory)"
            )
        self._lock = threading.RLock()
        self._closed = False
        self._color = "off"
        self._errors = 0
        self._reported: set[str] = set()
        self._rgb: Any = None
        self._pair: tuple[Any, ...] = ()
        self._blink_stop = threading.Event()
        self._blink_thread: threading.Thread | None = None
        self._pwm = False
        pins = f"red={red} green={green}" + (f" blue={blue}" if blue is not None else "")
        try:
            if blue is not None:
                self._rgb = self._make_rgb(red, green, blue, pin_factory, active_high)
            else:
                self._pair = self._make_pair(red, green, pin_factory, active_high)
        except Exception as exc:
            raise FeedbackError(f"status light on {pins}: {type(exc).__name__}: {exc}") from exc

    def _make_rgb(
        self, red: int | str, green: int | str, blue: int | str, factory: Any, active_high: bool
    ) -> Any:
        try:
            rgb = RGBLED(red, green, blue, active_high=active_high, pwm=True, pin_factory=factory)
            self._pwm = True
            return rgb
        except PinPWMUnsupported:
            log.info("status light: pins have no PWM; amber is shown as red + green")
            return RGBLED(red, green, blue, active_high=active_high, pwm=False, pin_factory=factory)

    @staticmethod
    def _make_pair(
        red: int | str, green: int | str, factory: Any, active_high: bool
    ) -> tuple[Any, ...]:
        red_led = LED(red, active_high=active_high, initial_value=False, pin_factory=factory)
        try:
            green_led = LED(
                green, active_high=active_high, initial_value=False, pin_factory=factory
            )
        except Exception:
            red_led.close()
            raise
        return (red_led, green_led)

    @property
    def kind(self) -> str:
        """``"rgb"`` or ``"pair"``."""
        return "rgb" if self._rgb is not None else "pair"

    @property
    def has_pwm(self) -> bool:
        """``True`` for an RGB LED driven with PWM (true amber)."""
        return self._pwm

    @property
    def color(self) -> str:
        """The color last shown or blinked; ``"off"`` after :meth:`off` or :meth:`close`."""
        return self._color

    @property
    def errors(self) -> int:
        """Failures of a red/green pair's blink thread (logged once per kind)."""
        return self._errors

    def show(self, color: str) -> None:
        """Show ``color`` steadily, stopping any blink.

        Raises ``ValueError`` for a name not in :data:`COLORS`,
        :class:`drivers.exceptions.DeviceClosedError` after :meth:`close`.
        """
        value = self._value(color)
        with self._lock:
            self._check_open()
            self._stop_blink()
            self._write(value)
            self._color = color

    def blink(
        self,
        color: str,
        on_s: float,
        off_s: float,
        n: int | None = None,
        *,
        off_color: str = "off",
    ) -> None:
        """Alternate ``color`` for ``on_s`` s and ``off_color`` for ``off_s`` s, ``n`` times.

        ``n``: number of cycles; ``None`` blinks until the next call. Returns at once; the light
        shows ``off_color`` after the last cycle. Raises ``ValueError`` for an unknown color or
        a negative time, :class:`drivers.exceptions.DeviceClosedError` after :meth:`close`.
        """
        on_value, off_value = self._value(color), self._value(off_color)
        if on_s < 0 or off_s < 0 or (n is not None and n < 0):
            raise ValueError("blink times and count must not be negative")
        with self._lock:
            self._check_open()
            self._stop_blink()
            if self._rgb is not None:
                self._rgb.blink(
                    on_time=on_s,
                    off_time=off_s,
                    on_color=on_value,
                    off_color=off_value,
                    n=n,
                    background=True,
                )
            else:
                self._blink_stop = threading.Event()
                self._blink_thread = threading.Thread(
                    target=self._pair_blink,
                    args=(self._blink_stop, ((on_value, on_s), (off_value, off_s)), n),
                    name="qrgate-light-blink",
                    daemon=True,
                )
                self._blink_thread.start()
            self._color = color

    def off(self) -> None:
        """Turn the light off, stopping any blink. No effect after :meth:`close`."""
        with self._lock:
            if self._closed:
                return
            self._stop_blink()
            self._write(self._value("off"))
            self._color = "off"

    def close(self) -> None:
        """Turn off, stop the blink thread and release the pins. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self.off()
            except Exception:
                log.exception("status light: could not turn off before close")
            self._closed = True
            devices = [self._rgb] if self._rgb is not None else list(self._pair)
            for device in devices:
                try:
                    device.close()
                except Exception:
                    log.exception("status light: close failed")

    def __enter__(self) -> StatusLight:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _value(self, color: str) -> tuple[float, ...]:
        table: dict[str, tuple[float, ...]] = dict(
            RGB_COLORS if self._rgb is not None else PAIR_COLORS
        )
        if color not in table:
            raise ValueError(f"unknown color {color!r}; use one of {', '.join(COLORS)}")
        value = table[color]
        if not self._pwm:
            value = tuple(1.0 if v > 0 else 0.0 for v in value)
        return value

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceClosedError("status light is closed")

    def _write(self, value: tuple[float, ...]) -> None:
        if self._rgb is not None:
            self._rgb.value = value
        else:
            for led, v in zip(self._pair, value, strict=True):
                led.value = v

    def _stop_blink(self) -> None:
        # RGBLED stops its own blink thread when its value is written; the pair's is ours.
        thread = self._blink_thread
        if thread is not None:
            self._blink_stop.set()
            if thread is not threading.current_thread():
                thread.join()
            self._blink_thread = None

    def _pair_blink(
        self,
        stop: threading.Event,
        period: tuple[tuple[tuple[float, ...], float], ...],
        n: int | None,
    ) -> None:
        # One thread drives both LEDs so red and green never drift apart (amber, red/amber).
        steps = cycle(period) if n is None else chain.from_iterable(repeat(period, n))
        for value, delay in steps:
            try:
                for led, v in zip(self._pair, value, strict=True):
                    led.value = v
            except Exception as exc:
                self._errors += 1
                kind = type(exc).__name__
                if kind not in self._reported:
                    self._reported.add(kind)
                    log.warning("status light: blink failed: %s: %s", kind, exc)
                return
            if stop.wait(delay):
                return
