"""A real ``qrgate run`` daemon as a subprocess, for tests that kill and restart it."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
from pathlib import Path

import segno

QRGATE = [sys.executable, "-m", "firmware.cli"]
SCAN_LINE = re.compile(r"scan seq=(\d+) ")


class Daemon:
    """A ``qrgate run`` subprocess; its stderr lines are collected by a thread."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [*QRGATE, "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in io.TextIOWrapper(self.proc.stderr, errors="replace"):
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    def wait_for(self, pattern: str, timeout_s: float = 60.0) -> bool:
        """True once a stderr line matches ``pattern``; False on timeout or exit without one."""
        rx = re.compile(pattern)
        with self.changed:
            return self.changed.wait_for(
                lambda: any(rx.search(x) for x in self.lines) or self.proc.poll() is not None,
                timeout_s,
            ) and any(rx.search(x) for x in self.lines)

    def kill(self) -> None:
        """SIGKILL (if still running) and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()

    def finish(self, timeout_s: float = 30.0) -> int:
        """Wait for the exit; its code (negative: the signal)."""
        code = self.proc.wait(timeout_s)
        self._reader.join(10)
        return code

    def tail(self) -> str:
        """The last 30 stderr lines, for assertion messages."""
        with self.changed:
            return "".join(self.lines[-30:])

    def scanned_seqs(self) -> set[int]:
        """Seqs of the scans the daemon logged after their feedback (complete lines only: a
        line cut by a kill is not evidence of anything)."""
        with self.changed:
            return {
                int(m.group(1))
                for line in self.lines
                if line.endswith("\n")
                for m in [SCAN_LINE.search(line)]
                if m
            }


def write_codes(folder: Path, payloads: list[bytes]) -> Path:
    """One plain QR image per payload, ``00000.png``…, in ``folder`` (created)."""
    folder.mkdir(parents=True)
    for i, p in enumerate(payloads):
        segno.make(p, error="m", boost_error=False).save(
            str(folder / f"{i:05d}.png"), scale=4, border=4
        )
    return folder
