"""Daemon logging: journald detection on a real fd, structured journal fields through an
injected sender, escaping of untrusted text, the plain stderr format and the drop counter."""

from __future__ import annotations

import importlib
import io
import logging
import logging.handlers
import os
import queue
import syslog
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drivers.frames import Frame
from firmware.journal.events import Receipt
from firmware.logs import (
    JournalFieldsHandler,
    _DroppingQueueHandler,
    dropped_records,
    escape,
    log_incident,
    log_scan,
    scan_logger,
    setup_logging,
    stderr_is_journal,
)
from firmware.pipeline import ScanReport
from firmware.policy.verdict import Decision, Reason
from tests.polling import wait_until

pytestmark = pytest.mark.usefixtures("no_leaks")

HOSTILE = "bad id\nqrgate.scan: scan seq=1 granted\x1b[2J\u2028\u202eevil"
HOSTILE_ESCAPED = "bad id\\nqrgate.scan: scan seq=1 granted\\x1b[2J\\u2028\\u202eevil"


def _report(*, granted: bool = False, why: str | None = None, seq: int = 7) -> ScanReport:
    decision = Decision(
        granted=granted,
        reason=Reason.GRANTED if granted else Reason.MALFORMED,
        kind="badge",
        subject="ab" * 32,
        codes=(),
        detail=None if why is None else {"why": why},
    )
    return ScanReport(
        frame=Frame(np.zeros((4, 4), np.uint8), t_ns=0, seq=0),
        codes=(),
        decision=decision,
        receipt=Receipt(seq=seq, event_id=f"ev-{seq}", durability="committed"),
        decode_ms=1.25,
        verdict_ms=0.1,
        frame_to_relay_ms=12.5 if granted else None,
    )


class _Sent:
    """A stand-in for systemd.journal.send: keeps (MESSAGE, fields)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, message: str, **fields: Any) -> None:
        self.entries.append((message, fields))


@pytest.fixture
def root_logging() -> Iterator[None]:
    """setup_logging replaces the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _journal_env() -> dict[str, str]:
    st = os.fstat(2)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_escape() -> None:
    assert escape(HOSTILE) == HOSTILE_ESCAPED
    assert escape("tab\there\r\x00\x7f\x85") == "tab\\there\\r\\x00\\x7f\\x85"
    # printable text, non-ASCII letters and backslashes stay as they are
    assert escape("Trần Văn Bình C:\\x 🙂") == "Trần Văn Bình C:\\x 🙂"
    assert escape("\U000e0001") == "\\U000e0001"
    assert escape(ValueError("line1\nline2")) == "line1\\nline2"
    assert escape("a" * 10, limit=5) == "aaaa…"
    assert escape("short", limit=5) == "short"


def test_journal_stream_detection_on_a_real_fd(tmp_path: Path) -> None:
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        st = os.fstat(a.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stderr_is_journal(env, fd=a.fileno())
        assert not stderr_is_journal(env, fd=b.fileno())  # stderr redirected elsewhere
        assert not stderr_is_journal({}, fd=a.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, fd=a.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": "1:x"}, fd=a.fileno())
        fd = a.fileno()
    assert not stderr_is_journal(env, fd=fd)  # closed: no error
    assert stderr_is_journal(_journal_env())  # fd 2 by default


def test_scan_line_goes_to_the_journal_with_fields(root_logging: None) -> None:
    sent = _Sent()
    listener = setup_logging(environ=_journal_env(), journal_send=sent)
    try:
        scan_logger("front door")(_report(why=HOSTILE))
        log_scan(_report(granted=True, seq=8))
        assert wait_until(lambda: len(sent.entries) == 2)
    finally:
        listener.stop()
    message, fields = sent.entries[0]
    assert message == (
        "scan seq=7 denied reason=malformed why="
        + HOSTILE_ESCAPED
        + " kind=badge subject=abababababababab codes=0 durability=committed decode_ms=1.25"
    )
    assert {k: fields[k] for k in ("DOOR", "EVENT_SEQ", "EVENT_ID", "DECISION", "REASON")} == {
        "DOOR": "front door",
        "EVENT_SEQ": 7,
        "EVENT_ID": "ev-7",
        "DECISION": "denied",
        "REASON": "malformed",
    }
    assert fields["KIND"] == "badge"
    assert fields["WHY"] == HOSTILE_ESCAPED
    assert fields["PRIORITY"] == str(syslog.LOG_INFO)
    assert fields["SYSLOG_IDENTIFIER"] == "qrgate"
    assert fields["LOGGER"] == "qrgate.scan"
    assert fields["CODE_FUNC"] == "log_scan"
    assert all(k.isupper() for k in fields)  # no record internals (msg, args, ...) as fields
    message, fields = sent.entries[1]
    assert message.startswith("scan seq=8 granted reason=granted kind=badge")
    assert message.endswith("frame_to_relay_ms=12.50")
    assert "DOOR" not in fields and "WHY" not in fields
    assert (fields["EVENT_SEQ"], fields["DECISION"]) == (8, "granted")


def test_incident_fields_and_escaping(root_logging: None) -> None:
    sent = _Sent()
    listener = setup_logging(environ=_journal_env(), journal_send=sent)
    try:
        log_incident(
            "camera_stalled",
            {"error": OSError(5, "I/O error\r\nfake line"), "after_s": 5.0, "bad key!": "x"},
            door="front-door",
        )
        logging.getLogger("qrgate.camera").error("raw error: %s", "a\nb")
        assert wait_until(lambda: len(sent.entries) == 2)
    finally:
        listener.stop()
    message, fields = sent.entries[0]
    assert message == (
        "incident camera_stalled error=[Errno 5] I/O error\\r\\nfake line after_s=5.0 bad key!=x"
    )
    assert fields["INCIDENT"] == "camera_stalled"
    assert fields["DOOR"] == "front-door"
    assert fields["DETAIL_ERROR"] == "[Errno 5] I/O error\\r\\nfake line"
    assert fields["DETAIL_AFTER_S"] == "5.0"
    assert fields["DETAIL_BAD_KEY_"] == "x"
    assert fields["PRIORITY"] == str(syslog.LOG_WARNING)
    # any record's message is escaped, not only the helpers'
    message, fields = sent.entries[1]
    assert message == "raw error: a\\nb"
    assert fields["PRIORITY"] == str(syslog.LOG_ERR)


def test_stderr_format_outside_systemd(root_logging: None) -> None:
    out = io.StringIO()
    listener = setup_logging(environ={}, stream=out)
    try:
        log_scan(_report(why="x\ny"), door="d1")
        try:
            raise RuntimeError("boom\nsecond")
        except RuntimeError:
            logging.getLogger("qrgate.test").exception("failed: %s", "camera\x1b[0m")
        logging.getLogger("qrgate.test").debug("hidden at INFO")
    finally:
        listener.stop()
    lines = out.getvalue().splitlines()
    assert lines[0].split(" ", 2)[2] == (
        "INFO qrgate.scan: scan seq=7 denied reason=malformed why=x\\ny kind=badge "
        "subject=abababababababab codes=0 durability=committed decode_ms=1.25"
    )
    assert lines[1].split(" ", 2)[2] == "ERROR qrgate.test: failed: camera\\x1b[0m"
    # the traceback is the program's own text: kept on its lines
    assert lines[2] == "Traceback (most recent call last):"
    assert any(line.startswith('  File "') for line in lines)
    # ... but the exception's own message may carry outside text
    assert lines[-1] == "RuntimeError: boom\\nsecond"
    assert "hidden" not in out.getvalue()


def test_verbose_logs_debug(root_logging: None) -> None:
    out = io.StringIO()
    listener = setup_logging(True, environ={}, stream=out)
    try:
        logging.getLogger("qrgate.test").debug("shown")
    finally:
        listener.stop()
    assert out.getvalue().rstrip().endswith("DEBUG qrgate.test: shown")


def test_full_queue_drops_and_counts() -> None:
    q: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=2)
    h = _DroppingQueueHandler(q)
    before = dropped_records()
    for i in range(5):
        h.handle(logging.makeLogRecord({"msg": f"r{i}", "levelno": logging.INFO}))
    assert q.qsize() == 2
    assert dropped_records() - before == 3


def test_handler_sends_only_journal_field_names() -> None:
    sent = _Sent()
    h = JournalFieldsHandler(sent, identifier="qrgate-test")
    h.setFormatter(logging.Formatter("%(message)s"))
    record = logging.makeLogRecord(
        {
            "msg": "hello %s",
            "args": ("you",),
            "levelno": logging.WARNING,
            "name": "t",
            "DOOR": "d",
            "lower": "no",
            "_TRUSTED": "no",
            "9X": "no",
            "NONE": None,
        }
    )
    h.handle(record)
    ((message, fields),) = sent.entries
    assert message == "hello you"
    assert fields["DOOR"] == "d"
    assert fields["SYSLOG_IDENTIFIER"] == "qrgate-test"
    assert fields["PRIORITY"] == str(syslog.LOG_WARNING)
    assert not {"lower", "_TRUSTED", "9X", "NONE", "msg", "args"} & set(fields)


def test_default_sender_is_systemd_journal_send() -> None:
    journal = importlib.import_module("systemd.journal")
    assert JournalFieldsHandler()._send is journal.send
