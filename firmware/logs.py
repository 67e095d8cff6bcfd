"""Daemon logging: records go through a queue to a writer thread, so a slow or blocked
stderr (a full pipe, a stalled journald) never holds up the scan thread."""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys

from firmware.pipeline import ScanReport

log = logging.getLogger("qrgate.scan")


def setup_logging(verbose: bool = False) -> logging.handlers.QueueListener:
    """Route the root logger through a queue to stderr; returns the started listener (stop it
    at exit to flush)."""
    q: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=10_000)
    out = logging.StreamHandler(sys.stderr)
    out.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    listener = logging.handlers.QueueListener(q, out, respect_handler_level=False)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_DroppingQueueHandler(q))
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    listener.start()
    return listener


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Drops a record (and counts it) rather than block when the queue is full."""

    dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            type(self).dropped += 1


def log_scan(report: ScanReport) -> None:
    """A scan listener: one INFO line per decided scan, after its feedback. Subjects are keyed
    HMACs (shortened); payloads are never logged."""
    d = report.decision
    f2r = (
        f" frame_to_relay_ms={report.frame_to_relay_ms:.2f}"
        if report.frame_to_relay_ms is not None
        else ""
    )
    log.info(
        "scan seq=%d %s reason=%s kind=%s subject=%s codes=%d durability=%s decode_ms=%.2f%s",
        report.receipt.seq,
        "granted" if d.granted else "denied",
        d.reason,
        d.kind or "-",
        (d.subject or "-")[:16],
        len(d.codes),
        report.receipt.durability,
        report.decode_ms,
        f2r,
    )
