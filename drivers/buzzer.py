"""The buzzer: tone patterns on a PWM pin, plain on/off beeps on a pin without PWM."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from gpiozero import Buzzer, TonalBuzzer
from gpiozero.exc import PinPWMUnsupported
from gpiozero.tones import Tone as _GpioTone

from drivers.exceptions import DeviceClosedError, FeedbackError

log = logging.getLogger(__name__)

MID_TONE_HZ = 880.0
"""TonalBuzzer's middle tone (A5). With :data:`OCTAVES` = 2 the playable range is
220-3520 Hz, which holds the 400 Hz deny and 2 kHz grant tones (gpiozero's default A4 with
one octave, 220-880 Hz, does not)."""

OCTAVES = 2
"""Octaves either side of :data:`MID_TONE_HZ`."""

MIN_HZ = MID_TONE_HZ / 2**OCTAVES
"""Lowest playable frequency, Hz; lower requests are clamped to it."""

MAX_HZ = MID_TONE_HZ * 2**OCTAVES
"""Highest playable frequency, Hz; higher requests are clamped to it."""


@dataclass(frozen=True, slots=True)
class Tone:
    """One beep: ``freq_hz`` (Hz, > 0) for ``on_s`` seconds, then silence for ``off_s`` seconds.

    Raises ``ValueError`` for a non-positive frequency or a negative time.
    """

    freq_hz: float
    on_s: float
    off_s: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.freq_hz) and self.freq_hz > 0):
            raise ValueError(f"tone frequency must be positive Hz, not {self.freq_hz!r}")
        for t in (self.on_s, self.off_s):
            if not (math.isfinite(t) and t >= 0):
                raise ValueError(f"tone times must be seconds >= 0, not {t!r}")


def pattern_seconds(pattern: Sequence[Tone]) -> float:
    """Total length of ``pattern`` in seconds (sum of on and off times)."""
    return sum(t.on_s + t.off_s for t in pattern)


class Beeper:
    """A buzzer that plays :class:`Tone` patterns in the background.

    ``pin``: gpiozero pin name or BCM number. ``pin_factory``: from
    :func:`drivers.pins.make_pin_factory` (required). ``active_high``: ``False`` when a low
    line sounds the buzzer.

    On a pin with PWM a gpiozero ``TonalBuzzer`` plays each tone's frequency (clamped to
    :data:`MIN_HZ`..:data:`MAX_HZ`). On a pin without PWM (``TonalBuzzer`` raises
    ``PinPWMUnsupported``) it falls back to a gpiozero ``Buzzer`` that beeps on/off with the
    same timing, and logs that once. One long-lived worker thread plays patterns; a new
    pattern interrupts the current one. Raises :class:`drivers.exceptions.FeedbackError`
    when the pin cannot be claimed.
    """

    def __init__(self, pin: int | str, *, pin_factory: Any, active_high: bool = True) -> None:
        if pin_factory is None:
            raise FeedbackError(
                f"buzzer on pin {pin}: pin_factory is required (drivers.pins.make_pin_factory)"
            )
        self._pin_name = str(pin)
        self._active_high = active_high
        self._tonal: Any = None
        self._plain: Any = None
        try:
            try:
                self._tonal = TonalBuzzer(
                    pin,
                    mid_tone=_GpioTone.from_frequency(MID_TONE_HZ),
                    octaves=OCTAVES,
                    pin_factory=pin_factory,
                )
            except PinPWMUnsupported:
                self._plain = Buzzer(
                    pin, active_high=active_high, initial_value=False, pin_factory=pin_factory
                )
                log.warning(
                    "buzzer on pin %s: pin has no PWM; playing on/off beeps instead of tones",
                    pin,
                )
            else:
                # TonalBuzzer has no active_high; its PWM output takes the polarity instead.
                self._tonal.pwm_device.active_high = active_high
                self._tonal.pwm_device.off()
        except Exception as exc:
            raise FeedbackError(f"buzzer on pin {pin}: {type(exc).__name__}: {exc}") from exc

        self._cond = threading.Condition(threading.RLock())
        self._pending: tuple[Tone, ...] | None = None
        self._generation = 0
        self._playing = False
        self._closed = False
        self._errors = 0
        self._reported: set[str] = set()
        self._clamp_reported = False
        self._sounding = False
        self._worker = threading.Thread(
            target=self._run, name=f"qrgate-buzzer-{self._pin_name}", daemon=True
        )
        self._worker.start()

    @property
    def has_tones(self) -> bool:
        """``True`` when frequencies are played (PWM pin), ``False`` for on/off beeps."""
        return self._tonal is not None

    @property
    def is_playing(self) -> bool:
        """``True`` from :meth:`play` until its pattern ended or was stopped."""
        with self._cond:
            return self._playing

    @property
    def errors(self) -> int:
        """Failures while playing in the background (each kind logged once)."""
        with self._cond:
            return self._errors

    def play(self, pattern: Sequence[Tone]) -> None:
        """Play ``pattern`` in the background, interrupting any pattern playing. Returns at once.

        An empty pattern silences the buzzer. Raises
        :class:`drivers.exceptions.DeviceClosedError` after :meth:`close`.
        """
        tones = tuple(pattern)
        with self._cond:
            if self._closed:
                raise DeviceClosedError(f"buzzer on pin {self._pin_name} is closed")
            self._pending = tones
            self._generation += 1
            self._playing = bool(tones)
            self._cond.notify_all()

    def stop(self) -> None:
        """Silence now, ending any pattern. No effect after :meth:`close`."""
        with self._cond:
            if self._closed:
                return
            self._pending = None
            self._generation += 1
            self._playing = False
            self._silence()
            self._cond.notify_all()

    def wait_silent(self, timeout_s: float) -> bool:
        """Block until no pattern is playing, at most ``timeout_s`` s; ``True`` if silent."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._playing, timeout=timeout_s)

    def close(self) -> None:
        """Silence, stop the worker and release the pin. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._pending = None
            self._generation += 1
            self._playing = False
            self._silence()
            self._cond.notify_all()
        if self._worker is not threading.current_thread():
            self._worker.join(timeout=5.0)
            if self._worker.is_alive():
                log.error("buzzer on pin %s: worker thread did not stop", self._pin_name)
        device = self._tonal if self._tonal is not None else self._plain
        try:
            device.close()
        except Exception:
            log.exception("buzzer on pin %s: close failed", self._pin_name)

    def __enter__(self) -> Beeper:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # The methods below run with self._cond held.

    def _sound(self, freq_hz: float) -> None:
        self._sounding = True
        if self._tonal is None:
            self._plain.on()
            return
        freq = min(max(freq_hz, MIN_HZ), MAX_HZ)
        if freq != freq_hz and not self._clamp_reported:
            self._clamp_reported = True
            log.warning(
                "buzzer on pin %s: %.0f Hz is outside %.0f-%.0f Hz; clamped",
                self._pin_name,
                freq_hz,
                MIN_HZ,
                MAX_HZ,
            )
        self._tonal.play(_GpioTone.from_frequency(freq))

    def _silence(self) -> None:
        self._sounding = False
        try:
            if self._tonal is None:
                self._plain.off()
            else:
                self._tonal.stop()
                # Stopping PWM leaves the line low: drive it to the inactive level.
                self._tonal.pwm_device.off()
        except Exception as exc:
            self._report(exc)

    def _report(self, exc: Exception) -> None:
        self._errors += 1
        kind = type(exc).__name__
        if kind not in self._reported:
            self._reported.add(kind)
            log.warning("buzzer on pin %s: %s: %s", self._pin_name, kind, exc)

    def _wait_interrupted(self, generation: int, seconds: float) -> bool:
        # True when close() or a newer play()/stop() came within ``seconds``.
        return self._cond.wait_for(lambda: self._closed or self._generation != generation, seconds)

    def _run(self) -> None:
        with self._cond:
            while True:
                self._cond.wait_for(lambda: self._closed or self._pending is not None)
                if self._closed:
                    return
                tones, self._pending = self._pending or (), None
                generation = self._generation
                for tone in tones:
                    try:
                        self._sound(tone.freq_hz)
                    except Exception as exc:
                        self._report(exc)
                        break
                    if self._wait_interrupted(generation, tone.on_s):
                        break
                    self._silence()
                    if self._wait_interrupted(generation, tone.off_s):
                        break
                if self._sounding:
                    self._silence()
                if not (self._closed or self._generation != generation):
                    self._playing = False
                    self._cond.notify_all()
