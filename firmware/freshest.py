"""The bounded hand-off from the capture thread to the decoder: newest frames win."""

from __future__ import annotations

import threading
from collections import deque

from drivers.frames import Frame


class FrameQueue:
    """Holds at most ``depth`` frames; ``put`` on a full queue drops the OLDEST frame and
    counts it in ``dropped``, so the decoder always works on the freshest frames and a slow
    decode never builds a backlog (a backlog is latency at the door).
    """

    def __init__(self, depth: int = 1) -> None:
        self._frames: deque[Frame] = deque()
        self._depth = depth
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0
        self.put_count = 0

    def put(self, frame: Frame) -> None:
        """Offer a frame; never blocks."""
        with self._cond:
            if len(self._frames) >= self._depth:
                self._frames.popleft()
                self.dropped += 1
            self._frames.append(frame)
            self.put_count += 1
            self._cond.notify()

    def get(self, timeout_s: float | None = None) -> Frame | None:
        """The oldest frame held, waiting up to ``timeout_s`` seconds; None on timeout or
        when closed and empty."""
        with self._cond:
            if not self._frames and not self._closed:
                self._cond.wait(timeout_s)
            return self._frames.popleft() if self._frames else None

    def close(self) -> None:
        """No more frames: wakes the consumer; ``get`` drains what is left, then returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called and every frame has been taken."""
        with self._cond:
            return self._closed and not self._frames
