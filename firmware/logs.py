"""Daemon logging: to journald with structured fields under systemd, to stderr otherwise.

Records go through a bounded queue to a writer thread, so a slow or blocked output (a full
pipe, a stalled journald) never holds up the scan thread; when the queue is full a record is
dropped and counted (:func:`dropped_records`) rather than waited for.

Under systemd (stderr is the journal's stream: ``JOURNAL_STREAM`` names fd 2's device and
inode) records are sent with ``systemd.journal.send``, one journal entry each, with PRIORITY,
LOGGER, CODE_* and every upper-case ``extra=`` key as a field: the scan line carries DOOR,
EVENT_SEQ, EVENT_ID, DECISION, REASON, KIND, so ``journalctl -u qrgate DECISION=denied`` works.

Text that may come from outside (a decoder's ``why``, an error string from a broken device, a
hostile payload's parse failure) is escaped: control characters, line and paragraph separators
and bidi controls are written as ``\\n``, ``\\x1b``, ``\\u202e``, so one record is one line
and no record can forge another or drive a terminal.
"""

from __future__ import annotations

import importlib
import logging
import logging.handlers
import os
import queue
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from firmware.pipeline import ScanReport

log = logging.getLogger("qrgate.scan")
incidents = logging.getLogger("qrgate.incident")

QUEUE_SIZE = 10_000
"""Records waiting for the writer thread at most; more are dropped and counted."""

SYSLOG_IDENTIFIER = "qrgate"
STDERR_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELD_VALUE_MAX = 200
"""Characters of one untrusted value kept in a log line or journal field."""

JournalSend = Callable[..., object]
"""``systemd.journal.send``'s shape: ``send(MESSAGE, **FIELDS)``."""

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: object, limit: int | None = None) -> str:
    """``str(text)`` with every non-printable character escaped as Python's repr does
    (``\\n``, ``\\x1b``, ``\\u2028``); printable text, spaces and backslashes unchanged. With
    ``limit``, at most ``limit`` characters of the result are kept (``…`` marks a cut)."""
    s = str(text)
    if not s.isprintable():
        s = "".join(ch if ch.isprintable() else _escape_char(ch) for ch in s)
    if limit is not None and len(s) > limit:
        s = s[: max(limit - 1, 0)] + "…"
    return s


def _escape_char(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def stderr_is_journal(environ: Mapping[str, str] = os.environ, fd: int = 2) -> bool:
    """True when ``fd`` is the stream systemd connected to the journal: ``JOURNAL_STREAM``
    ("<device>:<inode>", decimal) equals ``fstat(fd)``. False when unset, malformed or
    another file (e.g. the service's stderr was redirected by hand)."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(fd)
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (OSError, ValueError):
        return False


# chunks of TracebackException.format() that are the program's own text (stack frames, chain
# headers); everything else is an exception's message, which may carry outside text
_TRACE_CHUNKS = (
    "Traceback (most recent call last):",
    "  File ",
    "  [Previous line",
    "\nThe above",
    "\nDuring handling",
)


class EscapingFormatter(logging.Formatter):
    """Escapes the message (see :func:`escape`) and the exception messages in a traceback, but
    keeps the traceback's stack lines: those are the program's own text."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        if ei[1] is None:
            return super().formatException(ei)
        chunks = traceback.TracebackException(type(ei[1]), ei[1], ei[2]).format()
        return "".join(
            c if c.startswith(_TRACE_CHUNKS) else escape(c.rstrip("\n")) + "\n" for c in chunks
        ).rstrip("\n")


class JournalFieldsHandler(logging.Handler):
    """Sends each record to journald as one entry: MESSAGE (the formatted record), PRIORITY
    (syslog level), LOGGER, THREAD_NAME, CODE_FILE/CODE_LINE/CODE_FUNC, SYSLOG_IDENTIFIER and
    every record attribute whose name is a valid journal field name (upper case: what
    ``extra={"DOOR": ...}`` sets). Lower-case record attributes are not sent.

    ``send``: ``systemd.journal.send`` by default (imported here, so the stderr path never
    loads libsystemd); tests pass their own.
    """

    def __init__(
        self, send: JournalSend | None = None, *, identifier: str = SYSLOG_IDENTIFIER
    ) -> None:
        super().__init__()
        journal: Any = importlib.import_module("systemd.journal")
        self._send: JournalSend = send if send is not None else journal.send
        self._priority: Callable[[int], int] = journal.JournalHandler.map_priority
        self._identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        """Send ``record``; a failure goes to logging's handleError (never raises)."""
        try:
            fields: dict[str, object] = {
                k: v for k, v in record.__dict__.items() if _is_field_name(k) and v is not None
            }
            fields.update(
                PRIORITY=str(self._priority(record.levelno)),
                LOGGER=record.name,
                THREAD_NAME=record.threadName,
                SYSLOG_IDENTIFIER=self._identifier,
                CODE_FILE=record.pathname,
                CODE_LINE=record.lineno,
                CODE_FUNC=record.funcName,
            )
            self._send(self.format(record), **fields)
        except Exception:
            self.handleError(record)


def _is_field_name(name: str) -> bool:
    # journald's rule: A-Z, 0-9 and "_", not starting with "_" (trusted fields) or a digit
    return (
        bool(name)
        and not name[0].isdigit()
        and name[0] != "_"
        and all(c.isupper() or c.isdigit() or c == "_" for c in name)
        and name.isascii()
    )


def setup_logging(
    verbose: bool = False,
    *,
    environ: Mapping[str, str] = os.environ,
    stream: TextIO | None = None,
    journal_send: JournalSend | None = None,
) -> logging.handlers.QueueListener:
    """Route the root logger through a queue to journald (when stderr is the journal, see
    :func:`stderr_is_journal`) or to ``stream`` (default ``sys.stderr``) as
    ``<time> <LEVEL> <logger>: <message>``. Returns the started listener: stop it at exit to
    flush. ``journal_send`` replaces ``systemd.journal.send`` (tests)."""
    out: logging.Handler
    if stderr_is_journal(environ):
        # journald stamps the time and the priority itself
        out = JournalFieldsHandler(journal_send)
        out.setFormatter(logging.Formatter("%(message)s"))
    else:
        out = logging.StreamHandler(sys.stderr if stream is None else stream)
        out.setFormatter(logging.Formatter(STDERR_FORMAT))
    q: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=QUEUE_SIZE)
    listener = logging.handlers.QueueListener(q, out, respect_handler_level=False)
    front = _DroppingQueueHandler(q)
    # the message is escaped (and the traceback appended) in the caller's thread, once
    front.setFormatter(EscapingFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(front)
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


def dropped_records() -> int:
    """Log records dropped so far because the writer thread was :data:`QUEUE_SIZE` behind."""
    return _DroppingQueueHandler.dropped


def scan_logger(door: str) -> Callable[[ScanReport], None]:
    """A scan listener for ``door`` (the config's ``reader.door``): :func:`log_scan` with the
    DOOR field set."""

    def listener(report: ScanReport) -> None:
        log_scan(report, door=door)

    return listener


def log_scan(report: ScanReport, door: str | None = None) -> None:
    """A scan listener: one INFO line per decided scan, after its feedback, with journal fields
    DOOR (when given), EVENT_SEQ, EVENT_ID, DECISION (granted/denied), REASON, KIND and WHY
    (the deciding code's sub-reason, escaped). Subjects are keyed HMACs (shortened); payloads
    are never logged."""
    d = report.decision
    f2r = (
        f" frame_to_relay_ms={report.frame_to_relay_ms:.2f}"
        if report.frame_to_relay_ms is not None
        else ""
    )
    decision = "granted" if d.granted else "denied"
    why_raw = (d.detail or {}).get("why")
    why = None if why_raw is None else escape(why_raw, FIELD_VALUE_MAX)
    fields: dict[str, object] = {
        "EVENT_SEQ": report.receipt.seq,
        "EVENT_ID": report.receipt.event_id,
        "DECISION": decision,
        "REASON": str(d.reason),
        "KIND": d.kind or "-",
    }
    if door is not None:
        fields["DOOR"] = escape(door, FIELD_VALUE_MAX)
    if why is not None:
        fields["WHY"] = why
    log.info(
        "scan seq=%d %s reason=%s%s kind=%s subject=%s codes=%d durability=%s decode_ms=%.2f%s",
        report.receipt.seq,
        decision,
        d.reason,
        f" why={why}" if why is not None else "",
        d.kind or "-",
        (d.subject or "-")[:16],
        len(d.codes),
        report.receipt.durability,
        report.decode_ms,
        f2r,
        extra=fields,
    )


def log_incident(
    code: str,
    detail: Mapping[str, object] | None = None,
    *,
    door: str | None = None,
    level: int = logging.WARNING,
) -> None:
    """One line for an incident or a door event (``code``: "camera_stalled", "door_forced_open",
    ...), as ``incident <code> key=value ...``, on the ``qrgate.incident`` logger with journal
    fields INCIDENT (the code), DOOR (when given) and one ``DETAIL_<KEY>`` per detail key.
    Every value is escaped and cut to :data:`FIELD_VALUE_MAX` characters: details may carry
    error strings from devices or text from scanned codes."""
    code_s = escape(code, FIELD_VALUE_MAX)
    fields: dict[str, object] = {"INCIDENT": code_s}
    if door is not None:
        fields["DOOR"] = escape(door, FIELD_VALUE_MAX)
    parts = []
    for key, value in (detail or {}).items():
        k = escape(key, 64)
        v = escape(value, FIELD_VALUE_MAX)
        parts.append(f"{k}={v}")
        field = "DETAIL_" + "".join(c if c.isalnum() and c.isascii() else "_" for c in k.upper())
        if _is_field_name(field):
            fields[field] = v
    incidents.log(level, "incident %s%s", code_s, "".join(" " + p for p in parts), extra=fields)
