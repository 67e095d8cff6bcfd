"""The freshest-frame queue, idle skipping and the single-instance lock."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from drivers.frames import Frame
from firmware.exceptions import InstanceLockedError
from firmware.freshest import FrameQueue
from firmware.idle import ChangeGate
from firmware.lock import InstanceLock


def frame(seq: int, image: np.ndarray | None = None) -> Frame:
    return Frame(np.zeros((4, 4), np.uint8) if image is None else image, seq * 1000, seq)


def test_queue_keeps_freshest_and_counts_drops() -> None:
    q = FrameQueue(depth=2)
    for i in range(10):
        q.put(frame(i))
    assert q.dropped == 8
    got = [q.get(0), q.get(0)]
    assert [f.seq for f in got if f] == [8, 9]
    assert q.get(0.01) is None and not q.closed


def test_queue_close_wakes_consumer_and_drains() -> None:
    q = FrameQueue(depth=1)
    q.put(frame(1))
    q.close()
    assert q.get(5).seq == 1  # type: ignore[union-attr]
    assert q.get(5) is None and q.closed


def test_queue_blocks_until_put() -> None:
    q = FrameQueue()
    got: list[Frame | None] = []
    t = threading.Thread(target=lambda: got.append(q.get(10)))
    t.start()
    q.put(frame(7))
    t.join(10)
    assert got[0] is not None and got[0].seq == 7


def scene(seed: int, code_at: tuple[int, int] | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.tile(np.linspace(60, 190, 640, dtype=np.float32), (480, 1))
    img = base + rng.normal(0, 3, base.shape)
    if code_at:
        y, x = code_at
        block = (rng.random((25, 25)) > 0.5).repeat(8, 0).repeat(8, 1)
        img[y : y + 200, x : x + 200] = np.where(block, 20, 235)
    return img.clip(0, 255).astype(np.uint8)


def test_gate_skips_noise_only_and_decodes_changes() -> None:
    gate = ChangeGate(max_skip=10)
    first = scene(0)
    assert gate.should_decode(first)
    gate.decoded(first, found_codes=False)
    skipped = sum(not gate.should_decode(scene(s)) for s in range(1, 10))
    assert skipped == 9  # sensor noise alone is not a change
    assert gate.should_decode(scene(11, code_at=(100, 200)))  # a code held up is


def test_gate_caps_skips_and_never_skips_while_a_code_is_in_view() -> None:
    gate = ChangeGate(max_skip=3)
    gate.decoded(scene(0), found_codes=False)
    decisions = [gate.should_decode(scene(s)) for s in range(1, 9)]
    assert decisions == [False, False, False, True, True, True, True, True]
    gate.decoded(scene(9), found_codes=True)
    assert all(gate.should_decode(scene(s)) for s in range(10, 15))


def test_gate_off() -> None:
    gate = ChangeGate(max_skip=0)
    gate.decoded(scene(0), False)
    assert gate.should_decode(scene(0))


def test_lock_excludes_second_holder_in_another_process(tmp_path: Path) -> None:
    lock = InstanceLock(tmp_path / "qrgate.lock")
    lock.acquire()
    try:
        code = (
            "import sys; from pathlib import Path; from firmware.lock import InstanceLock\n"
            "from firmware.exceptions import InstanceLockedError\n"
            "try:\n InstanceLock(Path(sys.argv[1])).acquire()\n"
            "except InstanceLockedError as e:\n print(e); sys.exit(3)\n"
        )
        r = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "qrgate.lock")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 3 and "another qrgate daemon" in r.stdout
        with pytest.raises(InstanceLockedError):
            InstanceLock(tmp_path / "qrgate.lock").acquire()
    finally:
        lock.release()
        lock.release()
    again = InstanceLock(tmp_path / "qrgate.lock")
    again.acquire()
    assert again.held
    again.release()
