"""How ``qrgate demo`` stops: SIGINT (Ctrl-C), SIGTERM and SIGHUP become a request for a clean
stop, which sets the reader's stop event once there is a reader, and an event that the waits
around it (for ``qrgate ingest`` to subscribe, for the back office's last acknowledgement)
look at; the count of signals lets a second Ctrl-C cut such a wait short.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from firmware.daemon import Reader


class Stopper:
    """SIGINT, SIGTERM and SIGHUP (the terminal closing) ask for a clean stop: the reader's
    stop event once it exists, and ``interrupted`` for the waits before and after it runs.
    The previous handlers come back with :meth:`restore`."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.interrupted = threading.Event()
        self.count = 0
        self.reader: Reader | None = None
        self._old = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.interrupted.set()
        if self.reader is not None:
            self.reader.stop_event.set()

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
