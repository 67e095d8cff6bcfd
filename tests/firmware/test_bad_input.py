"""Bad input end to end: hostile payloads and broken reel files get a verdict with a reason and
a journal row, or a clear error; never a crash. Payloads never reach logs raw."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import segno
from click.testing import CliRunner

from drivers.replay import ReplaySource
from firmware.cli import main, printable
from firmware.config import load_config
from firmware.journal.reader import JournalReader
from firmware.pipeline import ScanReport
from tests.firmware.readers import HASHER, make_reader, write_reader_config
from tests.firmware.test_reader import run_reel
from tests.shared import case_file

HOSTILE = {
    "binary": bytes([0xB2, 0x55, 0xF6, 0x25, 0x00, 0x1C, 0xF7, 0xA0, 0x51, 0x3D]),
    "control": b"\x1b[31mRED\x1b[0m\r\n\x07\x00tail",
    "invalid_utf8": b"\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc",
    "huge": bytes(range(256)) * 11,  # 2,816 bytes, near the QR maximum
    "format": b"%s%s%n{0}${jndi:ldap://x}",
}


def code_png(folder: Path, name: str, payload: bytes) -> Path:
    path = folder / f"{name}.png"
    segno.make(payload, mode="byte", boost_error=False).save(path, scale=4, border=4)
    return path


def test_hostile_payloads_get_verdicts_and_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reel = tmp_path / "reel"
    reel.mkdir()
    order = []
    for i, (name, payload) in enumerate(HOSTILE.items()):
        code_png(reel, f"{i}-{name}", payload)
        order.append(name)
    (reel / "9-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (reel / "9-empty.png").write_bytes(b"")
    cfg = load_config(
        write_reader_config(
            tmp_path, allow=[HOSTILE["binary"]], reel=reel, fps=30, extra="", repeat_window_s=1.0
        )
    )
    reports: list[ScanReport] = []
    reader = make_reader(cfg, ReplaySource(reel, fps=30, repeat=3), listeners=[reports.append])
    with caplog.at_level(logging.DEBUG):
        run_reel(reader)
    got = {r.codes[0].payload: r for r in reports}
    assert set(got) == set(HOSTILE.values())  # every hostile code read exactly, byte for byte
    assert got[HOSTILE["binary"]].decision.granted
    huge = got[HOSTILE["huge"]].decision
    assert not huge.granted and huge.reason == "unknown"
    rows = [s.event for s in JournalReader(cfg.journal_path).tail(100) if s.event.kind == "scan"]
    assert len(rows) == len(HOSTILE)
    assert {r.subject for r in rows} == {HASHER.subject(p) for p in HOSTILE.values()}
    assert all(r.reason in {"granted", "unknown"} for r in rows)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "9-broken.png" in text and "9-empty.png" in text  # one clear line each
    for payload in HOSTILE.values():
        assert payload.hex() not in text and "RED" not in text


def test_payload_over_policy_limit_is_malformed(tmp_path: Path) -> None:
    reel = tmp_path / "reel"
    reel.mkdir()
    code_png(reel, "big", b"x" * 300)
    cfg_path = write_reader_config(tmp_path, reel=reel)
    cfg_path.write_text(cfg_path.read_text().replace("[policy]", "[policy]\nmax_payload = 256"))
    reader = make_reader(load_config(cfg_path), ReplaySource(reel, fps=30))
    run_reel(reader)
    rows = JournalReader(reader.config.journal_path).tail(10)
    assert [(r.event.decision, r.event.reason) for r in rows] == [("denied", "malformed")]


def test_printable_escapes_and_limits() -> None:
    assert printable(b"plain text") == "plain text"
    assert printable(b"\x1b[31m\n") == "\\x1b[31m\\n"
    assert printable(b"\xff\xfe") == "hex:fffe"
    out = printable(b"a" * 500, limit=50)
    assert out.startswith("a" * 50) and out.endswith("(500 bytes)")


def test_decode_cli_json_exact_bytes(tmp_path: Path) -> None:
    files = [str(case_file(n)) for n in ("B01.png", "B02.png", "B07.png")]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    r = CliRunner().invoke(main, ["decode", "--json", *files, str(bad)])
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 1  # one file could not be read
    assert lines[0]["codes"][0]["bytes_hex"] == "Tür 3 Zürich Straße".encode().hex()
    assert lines[0]["codes"][0]["text"] == "Tür 3 Zürich Straße"
    assert lines[1]["codes"][0]["bytes_hex"] == "b255f6251cf7a0513d07"
    assert lines[1]["codes"][0]["text"] is None  # not UTF-8: no guessed text
    assert lines[2] == {"file": files[2], "codes": []}
    assert lines[3]["file"] == str(bad) and "cannot read image" in lines[3]["error"]
    for backend in ("zbar", "cascade"):
        r = CliRunner().invoke(main, ["decode", "--json", "--backend", backend, files[1]])
        assert json.loads(r.stdout)["codes"][0]["bytes_hex"] == "b255f6251cf7a0513d07"


def test_journal_cli_tail_and_stats(tmp_path: Path) -> None:
    cfg_path = write_reader_config(tmp_path, allow=[b"DOOR1:7f3a9c21e4b8"])
    cfg = load_config(cfg_path)
    reader = make_reader(
        cfg, ReplaySource([case_file("B06.png")] * 3 + [case_file("B01.png")], fps=30)
    )
    run_reel(reader)
    r = CliRunner().invoke(main, ["journal", "tail", "--config", str(cfg_path), "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["decision"], x["reason"]) for x in rows] == [
        ("granted", "granted"),
        ("denied", "unknown"),
    ]
    assert rows[0]["seq"] < rows[1]["seq"] and rows[0]["frame_to_relay_ms"] is not None
    r = CliRunner().invoke(main, ["journal", "stats", "--db", str(cfg.journal_path)])
    stats = json.loads(r.stdout)
    assert stats["rows"] == 2 and stats["by_decision"] == {"granted": 1, "denied": 1}
    r = CliRunner().invoke(main, ["journal", "tail", "--db", str(cfg.journal_path)])
    assert "granted" in r.stdout and "unknown" in r.stdout
