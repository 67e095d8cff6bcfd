"""The repeat window: a held code decides once; a code out of view longer than the window is
a new scan. On the monotonic clock, so an NTP step never re-opens or suppresses a door."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class RepeatWindow:
    """Last time each payload was in view (monotonic ns).

    ``window_ns``: how long a payload must be out of view to count again. ``capacity``: entries
    kept (oldest forgotten first), so memory stays bounded whatever is shown to the camera.
    Not thread-safe: owned by the scan thread.
    """

    def __init__(self, window_ns: int, capacity: int = 1024) -> None:
        self.window_ns = window_ns
        self.capacity = capacity
        self._seen: OrderedDict[bytes, int] = OrderedDict()

    def is_recent(self, payload: bytes, now_ns: int) -> bool:
        """True when ``payload`` was in view less than the window ago."""
        t = self._seen.get(payload)
        return t is not None and now_ns - t < self.window_ns

    def observe(self, payloads: Iterable[bytes], now_ns: int) -> None:
        """Record that ``payloads`` are in view at ``now_ns``."""
        for p in payloads:
            self._seen[p] = now_ns
            self._seen.move_to_end(p)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)
