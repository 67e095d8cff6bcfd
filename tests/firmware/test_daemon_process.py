"""The real daemon as a subprocess: C12 (second instance), C13(b) (SIGTERM), C20(a) (kill -9
during a burst: every scan that got feedback survives)."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from firmware.journal.reader import JournalReader
from tests.firmware.daemons import QRGATE, Daemon, write_codes
from tests.firmware.readers import write_reader_config
from tests.shared import case_file


@pytest.fixture(scope="module")
def burst_reel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes]]:
    """500 distinct codes, one per frame: a 500-scan burst."""
    payloads = [f"QRG-BURST:{i:05d}".encode() for i in range(500)]
    return write_codes(tmp_path_factory.mktemp("burst") / "reel", payloads), payloads


def test_c20a_kill9_during_burst_loses_no_scan_that_got_feedback(
    tmp_path: Path, burst_reel: tuple[Path, list[bytes]]
) -> None:
    folder, payloads = burst_reel
    config = write_reader_config(
        tmp_path, allow=payloads[::2], reel=folder, fps=240, repeat_window_s=60
    )
    rng = random.Random(2026)
    db = tmp_path / "state" / "journal.db"
    all_seen: set[int] = set()
    kills = 0
    for _ in range(50):
        d = Daemon(config)
        assert d.wait_for(r"scan seq=", 60), "".join(d.lines[-20:])
        time.sleep(rng.uniform(0.0, 1.5))
        d.proc.send_signal(signal.SIGKILL)
        code = d.finish()
        kills += code == -signal.SIGKILL
        seen = d.scanned_seqs()
        assert seen, "no scan got feedback before the kill"
        stored = {s.seq for s in JournalReader(db).tail(1_000_000)}
        assert seen <= stored, f"lost after kill -9: {sorted(seen - stored)[:10]}"
        all_seen |= seen
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert kills >= 40  # most runs were really cut mid-burst
    assert len(all_seen) > 50 * 20


def looping_config(tmp_path: Path) -> Path:
    reel = tmp_path / "reel"
    reel.mkdir()
    # the badge for one frame, then 0.7 s of empty wall: a new presentation every loop
    for i, name in enumerate(["B06.png"] + ["B07.png"] * 20):
        (reel / f"{i:02d}.png").write_bytes(case_file(name).read_bytes())
    cfg = write_reader_config(
        tmp_path, allow=[b"DOOR1:7f3a9c21e4b8"], reel=reel, fps=30, repeat_window_s=0.5
    )
    cfg.write_text(cfg.read_text().replace("fps = 30", "fps = 30\nloop = true"))
    return cfg


def test_c12_second_instance_exits_before_touching_anything(tmp_path: Path) -> None:
    cfg = looping_config(tmp_path)
    first = Daemon(cfg)
    try:
        assert first.wait_for("reader ready"), "".join(first.lines)
        second = subprocess.run(
            [*QRGATE, "run", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 3
        assert f"another qrgate daemon (pid {first.proc.pid})" in second.stderr
        assert "reader ready" not in second.stderr
        # the first one is unharmed and keeps deciding
        n = len(first.scanned_seqs())
        assert first.wait_for(r"scan seq=\d+ granted", 30)
        deadline = time.monotonic() + 30
        while len(first.scanned_seqs()) <= n and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(first.scanned_seqs()) > n and first.proc.poll() is None
    finally:
        first.proc.send_signal(signal.SIGTERM)
        assert first.finish() == 0


def test_c13b_sigterm_stops_cleanly(tmp_path: Path) -> None:
    d = Daemon(looping_config(tmp_path))
    assert d.wait_for(r"scan seq=\d+ granted", 60), "".join(d.lines)
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish(timeout_s=10) == 0
    assert d.wait_for("stopped:", 1)
    seen = d.scanned_seqs()
    stored = {s.seq for s in JournalReader(tmp_path / "state" / "journal.db").tail(100_000)}
    assert seen <= stored


def test_sighup_locks_and_stops_cleanly(tmp_path: Path) -> None:
    d = Daemon(looping_config(tmp_path))
    assert d.wait_for(r"scan seq=\d+ granted", 60), "".join(d.lines)
    d.proc.send_signal(signal.SIGHUP)
    assert d.finish(timeout_s=10) == 0
    assert d.wait_for("stopped:", 1)


def test_missing_camera_is_one_clear_line(tmp_path: Path) -> None:
    cfg = write_reader_config(tmp_path, reel=tmp_path / "no-such-reel")
    r = subprocess.run(
        [*QRGATE, "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 3
    assert "qrgate: cannot start:" in r.stderr and "no-such-reel" in r.stderr
    assert "Traceback" not in r.stderr


def test_c11_no_pin_factory_fails_fast_with_one_line_naming_them(tmp_path: Path) -> None:
    # this machine has neither lgpio nor RPi.GPIO hardware: "auto" finds no factory
    cfg = write_reader_config(tmp_path, reel=case_file("B06.png").parent)
    cfg.write_text(cfg.read_text().replace('pin_factory = "mock"', 'pin_factory = "auto"'))
    r = subprocess.run(
        [*QRGATE, "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "GPIOZERO_PIN_FACTORY"},
    )
    assert r.returncode == 3
    lines = [x for x in r.stderr.splitlines() if x.startswith("qrgate: cannot start:")]
    assert len(lines) == 1, r.stderr
    assert "no GPIO pin factory could be created" in lines[0]
    assert "lgpio" in lines[0] and "GPIOZERO_PIN_FACTORY" in lines[0]
    assert "[gpio] pin_factory" in lines[0]
    assert "reader ready" not in r.stderr and "Traceback" not in r.stderr
