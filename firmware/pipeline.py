"""The scan path: capture thread → frame queue → scan thread (decode, verdict, journal,
feedback).

The scan thread commits the event to the journal BEFORE it gives feedback, so every scan a
person saw or heard an answer to survives a kill -9. It never blocks on anything but the
journal's bounded append (which spills rather than waits on a locked database).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from drivers.exceptions import CameraTimeoutError, CameraUnavailableError, FrameSourceError
from drivers.frames import Frame, FrameSource, GrayImage
from firmware.decoding.codes import DecodedCode, Decoder
from firmware.freshest import FrameQueue
from firmware.idle import ChangeGate
from firmware.journal.events import NewEvent, Receipt
from firmware.metrics import PipelineMetrics
from firmware.policy.policy import Policy
from firmware.policy.repeat import RepeatWindow
from firmware.policy.verdict import Decision
from firmware.supervisor import CameraHealth

log = logging.getLogger(__name__)


class EventSink(Protocol):
    """What the scan thread needs of the journal."""

    def append(self, event: NewEvent) -> Receipt:
        """Commit ``event``; return once durable (see Journal.append)."""
        ...

    def update_timing(self, seq: int, frame_to_relay_ms: float) -> None:
        """Record the measured frame-to-relay time of an appended event, later."""
        ...


class Indicator(Protocol):
    """What the scan thread needs of the feedback devices. Methods never block or raise."""

    def granted(self, pulse_s: float | None = None) -> int:
        """Unlock the door now; return the monotonic ns at which the relay was energised."""
        ...

    def denied(self) -> None:
        """Show the deny pattern."""
        ...


@dataclass(frozen=True, slots=True)
class ScanReport:
    """One decided scan, for listeners (demo view, uplink, tests).

    Times in milliseconds; ``frame_to_relay_ms`` is None for a denied scan.
    """

    frame: Frame
    codes: tuple[DecodedCode, ...]
    decision: Decision
    receipt: Receipt
    decode_ms: float
    verdict_ms: float
    frame_to_relay_ms: float | None


@dataclass(frozen=True, slots=True)
class ReaderIdentity:
    """Where this reader is: door name and direction (in/out/both), copied into events."""

    door: str
    direction: str


class _Throttled:
    """Logs a repeated failure once, then a count at most every ``every_s`` seconds: a camera
    pointing at garbage must not flood the log at 30 lines a second."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_ns = int(every_s * 1e9)
        self._last: dict[str, tuple[int, int]] = {}

    def warn(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic_ns()
        last, count = self._last.get(key, (0, 0))
        if last == 0 or now - last >= self.every_ns:
            suffix = f" (and {count} more since)" if count else ""
            log.warning(msg + suffix, *args)
            self._last[key] = (now, 0)
        else:
            self._last[key] = (last, count + 1)


class ScanLoop:
    """The scan thread's body: decode the freshest frame, decide, journal, give feedback.

    Dependencies are passed in: ``decoder`` (raw bytes out), ``policy`` and its ``seen`` repeat
    window, ``journal`` (EventSink), ``feedback`` (Indicator), ``clock_synced`` (cached,
    non-blocking), ``gate`` (idle skipping, or None to decode every frame). ``listeners`` are
    called on the scan thread with each :class:`ScanReport`: they must hand off and return.
    ``progress_ns`` is the monotonic time of the last frame handled, ``beat_ns`` of the last
    time round the loop, busy or idle (the watchdog is tied to them, not to a timer).
    ``focus(image, readable)`` sees every decoded frame (a camera's focus assist) or is None.
    """

    def __init__(
        self,
        *,
        frames: FrameQueue,
        decoder: Decoder,
        policy: Policy,
        seen: RepeatWindow,
        journal: EventSink,
        feedback: Indicator,
        identity: ReaderIdentity,
        clock_synced: Callable[[], bool],
        gate: ChangeGate | None = None,
        metrics: PipelineMetrics | None = None,
        listeners: tuple[Callable[[ScanReport], None], ...] = (),
        focus: Callable[[GrayImage, bool], object] | None = None,
    ) -> None:
        self.frames, self.decoder, self.policy, self.seen = frames, decoder, policy, seen
        self.focus = focus
        self.journal, self.feedback, self.identity = journal, feedback, identity
        self.clock_synced, self.gate = clock_synced, gate
        self.metrics = metrics or PipelineMetrics()
        self.listeners = listeners
        self.progress_ns = self.beat_ns = time.monotonic_ns()
        self._throttle = _Throttled()

    def run(self, stop: threading.Event) -> None:
        """Handle frames until ``stop`` is set or the frame queue is closed and drained."""
        while not stop.is_set():
            self.beat_ns = time.monotonic_ns()
            frame = self.frames.get(timeout_s=0.2)
            if frame is None:
                if self.frames.closed:
                    return
                continue
            self.handle(frame)

    def handle(self, frame: Frame) -> ScanReport | None:
        """Decode, decide and act on one frame; the decided scan's report, or None."""
        m = self.metrics
        m.frames += 1
        self.progress_ns = time.monotonic_ns()
        image = frame.image
        if self.gate is not None and not self.gate.should_decode(image):
            m.skipped_idle += 1
            return None
        t0 = time.perf_counter_ns()
        try:
            codes = tuple(self.decoder.decode(image))
        except Exception as e:  # a bad frame must never stop the reader
            m.errors += 1
            self._throttle.warn(
                "decode", "frame %d (%s) not decoded: %s", frame.seq, frame.origin or "camera", e
            )
            return None
        t1 = time.perf_counter_ns()
        decode_ms = (t1 - t0) / 1e6
        m.decoded_frames += 1
        m.decode_ms.add(decode_ms)
        if self.gate is not None:
            self.gate.decoded(image, bool(codes))
        if self.focus is not None:
            try:
                self.focus(image, bool(codes))
            except Exception as e:  # focus is a help, never a reason to miss a scan
                self._throttle.warn("focus", "focus assist failed: %s", e)
        if not codes:
            return None
        m.codes += len(codes)
        decision = self.policy.decide(codes, self.seen, frame.t_ns, time.time_ns())
        in_view = [c.payload for c in codes]
        if decision is not None:
            in_view.extend(decision.seen_keys)
        self.seen.observe(in_view, frame.t_ns)
        t2 = time.perf_counter_ns()
        if decision is None:
            return None
        if decision.suppressed:
            m.suppressed += 1
            return None
        verdict_ms = (t2 - t1) / 1e6
        receipt = self.journal.append(self._event(decision, decode_ms, verdict_ms))
        # feedback only after the event is durable: what a person saw is what is stored
        f2r: float | None = None
        if decision.granted:
            relay_ns = self.feedback.granted()
            if relay_ns < 0:
                # the relay could not be driven (failed, or closed by a stop in progress): the
                # row already says granted, so a second row says the door did not open
                m.relay_failures += 1
                self.journal.append(self._incident("relay_not_driven", {"scan_seq": receipt.seq}))
            else:
                f2r = (relay_ns - frame.t_ns) / 1e6
                m.granted += 1
                m.frame_to_relay_ms.add(f2r)
                self.journal.update_timing(receipt.seq, f2r)
        else:
            self.feedback.denied()
            m.denied += 1
        m.decisions += 1
        m.frame_to_decision_ms.add((time.monotonic_ns() - frame.t_ns) / 1e6)
        report = ScanReport(frame, codes, decision, receipt, decode_ms, verdict_ms, f2r)
        for listener in self.listeners:
            try:
                listener(report)
            except Exception as e:
                self._throttle.warn("listener", "scan listener %r failed: %s", listener, e)
        return report

    def _incident(self, code: str, detail: dict[str, object]) -> NewEvent:
        return NewEvent(
            kind="incident",
            wall_ns=time.time_ns(),
            clock_synced=self.clock_synced(),
            mono_ns=time.monotonic_ns(),
            door=self.identity.door,
            direction=self.identity.direction,
            reason=code,
            detail=dict(detail),
        )

    def _event(self, d: Decision, decode_ms: float, verdict_ms: float) -> NewEvent:
        return NewEvent(
            kind="scan",
            wall_ns=time.time_ns(),
            clock_synced=self.clock_synced(),
            mono_ns=time.monotonic_ns(),
            door=self.identity.door,
            direction=self.identity.direction,
            decision="granted" if d.granted else "denied",
            reason=str(d.reason),
            credential_kind=d.kind,
            subject=d.subject,
            codes=tuple(
                {
                    "subject": v.subject,
                    "kind": v.kind,
                    "reason": str(v.reason),
                    "length": v.length,
                    "backend": v.backend,
                }
                for v in d.codes
            ),
            decode_ms=round(decode_ms, 3),
            verdict_ms=round(verdict_ms, 3),
            detail=dict(d.detail or {}),
        )


class CaptureLoop:
    """The capture thread's body: read frames from ``source`` into ``frames``.

    A failed read (CameraTimeoutError after ``read_timeout_s``, or a device error) or a
    camera that cannot be opened is reported to ``health`` (one incident per outage), the
    source is closed (the old instance first: libcamera and V4L2 refuse a second opener) and
    re-opened with exponential backoff from ``min_backoff_s`` to ``max_backoff_s``, with
    jitter; the scan thread, the journal and MQTT keep working meanwhile. Each recovery step
    is promised to ``health`` (``open_timeout_s`` bounds one open attempt), so a watchdog
    can tell recovering from hung. The end of a finite source closes the queue.
    """

    def __init__(
        self,
        source: FrameSource,
        frames: FrameQueue,
        *,
        health: CameraHealth,
        read_timeout_s: float = 5.0,
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        open_timeout_s: float = 10.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.source, self.frames, self.health = source, frames, health
        self.read_timeout_s = read_timeout_s
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self.open_timeout_s = open_timeout_s
        self.jitter = jitter
        self.reopens = 0
        self.failed_opens = 0
        self._open = False

    def open_first(self) -> bool:
        """Open the camera once, on the caller's thread (the reader's start). False when it
        is unavailable (busy, unplugged: CameraUnavailableError): the capture thread then
        keeps trying, and nothing else waits. Any other FrameSourceError (a replay reel that
        does not exist) is a configuration fault and propagates: retrying cannot cure it."""
        try:
            self.source.open()
        except CameraUnavailableError as e:
            log.error("camera unavailable at start: %s; retrying in the background", e)
            self.failed_opens += 1
            self.health.failed("camera_unavailable", str(e))
            return False
        self._open = True
        self.health.camera_opened()
        return True

    def run(self, stop: threading.Event) -> None:
        """Capture until ``stop`` is set or the source ends."""
        try:
            while not stop.is_set():
                if not self._open:
                    self._reopen(stop)
                    continue
                try:
                    frame = self.source.read(self.read_timeout_s)
                except FrameSourceError as e:
                    code = "camera_stalled" if isinstance(e, CameraTimeoutError) else "camera_error"
                    log.error("%s: %s; re-opening the camera", code, e)
                    self.health.failed(code, str(e))
                    self.source.close()
                    self._open = False
                    continue
                if frame is None:
                    return
                self.health.frame()
                self.frames.put(frame)
        finally:
            self.frames.close()

    def _reopen(self, stop: threading.Event) -> None:
        self.source.close()
        backoff = self.min_backoff_s
        while True:
            # jitter: readers on one power circuit must not all hammer their cameras (and
            # everything else) in step after an outage
            wait = backoff * (0.5 + self.jitter() / 2)
            self.health.recovering(wait + self.open_timeout_s)
            if stop.wait(wait):
                return
            try:
                self.source.open()
            except FrameSourceError as e:
                self.failed_opens += 1
                self.health.failed("camera_unavailable", str(e))
                self.source.close()
                backoff = min(backoff * 2, self.max_backoff_s)
                log.warning("camera still unavailable: %s (retrying within %.1f s)", e, backoff)
                continue
            self._open = True
            self.reopens += 1
            self.health.camera_opened()
            return
