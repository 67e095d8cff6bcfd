"""C07: 200,000 frames alternating B06/B07 through the real decode path: RSS grows < 5 MB
after warm-up and the open fd count stays constant."""

from __future__ import annotations

import os
from pathlib import Path

from drivers.frames import Frame
from drivers.replay import ReplaySource, load_gray
from firmware.config import load_config
from tests.firmware.readers import make_reader, write_reader_config
from tests.shared import case_file

FRAME_NS = 33_333_333  # 30 fps


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_c07_memory_and_fds_flat_over_200k_frames(tmp_path: Path) -> None:
    held = b"DOOR1:7f3a9c21e4b8"
    # a 1 s window and synthetic 30 fps capture times: the badge is re-presented every 2,000
    # frames (101 grants, journal rows and relay pulses), held (suppressed) in between
    cfg = load_config(write_reader_config(tmp_path, allow=[held], repeat_window_s=1.0))
    reader = make_reader(cfg, ReplaySource([case_file("B06.png")]))
    code, empty = load_gray(case_file("B06.png")), load_gray(case_file("B07.png"))
    reader.journal.open()
    try:
        t = 0
        marks: dict[int, tuple[int, int]] = {}
        for i in range(200_000):
            t += FRAME_NS
            if i % 2000 == 1000:
                t += 2 * 10**9  # the badge leaves for 2 s
            reader.scan.handle(Frame(code if i % 2 == 0 else empty, t, i))
            if i + 1 in (20_000, 200_000):
                marks[i + 1] = (rss_kb(), fds())
    finally:
        reader.stop()
    m = reader.metrics
    assert m.decoded_frames == 200_000 and m.errors == 0
    assert m.granted == 101 and m.suppressed == 100_000 - 101  # first + 100 returns
    (rss0, fd0), (rss1, fd1) = marks[20_000], marks[200_000]
    assert rss1 - rss0 < 5 * 1024, f"RSS grew {(rss1 - rss0) / 1024:.1f} MB"
    assert fd1 == fd0
