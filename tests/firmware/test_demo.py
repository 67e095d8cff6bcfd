"""``qrgate demo`` end to end, as the user runs it: a subprocess with its private mosquitto,
the real ``qrgate ingest`` and the reader's uplink, on a short camera-like reel; then the
``qrgate report`` command the demo prints, run on what the back office stored. Without
mosquitto (``QRGATE_MOSQUITTO`` pointing at nothing) the demo still ends cleanly and reports
its growing backlog."""

from __future__ import annotations

import csv
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from firmware.demo.backoffice import BACKOFFICE_DB
from firmware.demo.prepare import DEVICE
from firmware.demo.reel import ALLOWED_BADGE, UNKNOWN_BADGE, code_frame, idle_frames

QRGATE = [sys.executable, "-m", "firmware.cli"]
DEMO_TIMEOUT_S = 180.0  # an upper bound for a 7 s reel plus start and stop; never expected
FPS = 20
# A code out of view longer than the demo's 1.5 s repeat window is a new scan: 2.5 s of wall
# between two presentations of the allowed badge leaves room for a slow machine.
GAP_FRAMES = 50
HOLD_FRAMES = 6  # a code held 0.3 s: a scan thread that lags a few frames still sees it
STORY: list[tuple[bytes | None, int]] = [
    (None, 4),
    (ALLOWED_BADGE, HOLD_FRAMES),
    (None, 4),
    (UNKNOWN_BADGE, HOLD_FRAMES),
    (None, GAP_FRAMES),
    (ALLOWED_BADGE, HOLD_FRAMES),
    (None, GAP_FRAMES),
    (ALLOWED_BADGE, HOLD_FRAMES),
    (None, 4),
]
GRANTED, DENIED = 3, 1
STATUS_BACKLOG = re.compile(r"^\s*\d+\.\d+s\s+uplink .*\bbacklog (\d+)")


@pytest.fixture(scope="module")
def reel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The story above as 640x480 camera-like PNG frames (one file per frame)."""
    folder = tmp_path_factory.mktemp("reel")
    idle = idle_frames(640, 480, 6, seed=11)
    index = 0
    for payload, count in STORY:
        for _ in range(count):
            image = (
                idle[index % len(idle)]
                if payload is None
                else code_frame(640, 480, payload, seed=index // 2)
            )
            Image.fromarray(image).save(folder / f"{index:05d}.png", compress_level=1)
            index += 1
    return folder


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """The demo's state folder; afterwards no process may still name it (the broker's config
    and ingest's --db are under it)."""
    folder = tmp_path / "state"
    yield folder
    assert processes_naming(str(folder)) == []


def processes_naming(text: str) -> list[str]:
    """Command lines of the live processes that contain ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def demo_env(**extra: str) -> dict[str, str]:
    """This environment, unbuffered and 200 columns wide (the summary and fleet tables keep
    whole cells), without a QRGATE_MOSQUITTO of the caller's unless ``extra`` sets one."""
    env = {k: v for k, v in os.environ.items() if k != "QRGATE_MOSQUITTO"}
    env.update(PYTHONUNBUFFERED="1", COLUMNS="200", **extra)
    return env


def run_demo(state: Path, reel: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*QRGATE, "demo", "--state", str(state), "--reel", str(reel), "--fps", str(FPS)],
        cwd=cwd,
        env=demo_env(**env),
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )


def journal_scans(state: Path) -> dict[str, tuple[int, str, int]]:
    """event_id -> (seq, decision, acked) of every scan row in the demo's journal."""
    with sqlite3.connect(f"file:{state / 'journal.db'}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT event_id, seq, decision, acked FROM events WHERE kind = 'scan'"
        ).fetchall()
    return {r[0]: (int(r[1]), str(r[2]), int(r[3])) for r in rows}


def journal_counts(state: Path) -> tuple[int, int, int]:
    """(rows, highest seq, rows not yet published) of the demo's journal."""
    with sqlite3.connect(f"file:{state / 'journal.db'}?mode=ro", uri=True) as db:
        rows, last = db.execute("SELECT count(*), max(seq) FROM events").fetchone()
        unsent = db.execute(
            "SELECT count(*) FROM events WHERE acked = 0 AND published = 0"
        ).fetchone()[0]
    return int(rows), int(last), int(unsent)


def summary_value(out: str, key: str) -> str:
    m = re.search(rf"│ {re.escape(key)}\s+│ (.+?)\s+│", out)
    assert m, f"no {key!r} row in the summary:\n{out}"
    return m.group(1)


def test_demo_stores_every_scan_in_the_back_office_and_reports_it(
    need_mosquitto: None, reel: Path, state: Path, tmp_path: Path
) -> None:
    done = run_demo(state, reel, tmp_path)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "no MQTT broker" not in out
    assert re.search(r"back office: \S+ ingest --broker 127\.0\.0\.1:\d+ --db \S+", out), out

    scans = journal_scans(state)
    assert sorted(d for _, d, _ in scans.values()) == ["denied"] + ["granted"] * GRANTED
    rows, last_seq, unsent = journal_counts(state)
    store = state / BACKOFFICE_DB
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        stored_scans = {
            r[0]: (int(r[1]), str(r[2]))
            for r in db.execute(
                "SELECT event_id, seq, decision FROM events WHERE device = ? AND kind = 'scan'",
                (DEVICE,),
            )
        }
        site, ack_seq, events = db.execute(
            "SELECT site, ack_seq, events FROM devices WHERE device = ?", (DEVICE,)
        ).fetchone()
    # every scan of the journal, by its event id, with its seq and decision
    assert stored_scans == {k: (seq, d) for k, (seq, d, _) in scans.items()}
    assert (site, ack_seq, events) == ("demo", last_seq, rows)
    # the ack came back to the reader: every row acknowledged, nothing left to send
    assert all(acked == 1 for _, _, acked in scans.values())
    assert unsent == 0
    assert summary_value(out, "back office: events stored") == str(rows)
    assert summary_value(out, "reader: acked through seq") == str(last_seq)
    assert summary_value(out, "backlog (unsent rows)") == "0"
    # the fleet table, shown while the broker ran, with the reader's status of the end
    fleet = next(x for x in out.splitlines() if x.startswith(f"│ {DEVICE} "))
    cells = [c.strip() for c in fleet.strip("│ ").split("│")]
    assert cells[:3] == [DEVICE, "demo", "demo-door"] and cells[4:6] == ["yes", "0"], fleet

    # the report command exactly as printed, with a CSV beside its table
    line = next(x for x in out.splitlines() if x.startswith("report:"))
    argv = shlex.split(line.removeprefix("report:"))
    assert argv[1:3] == ["report", "--db"] and "--by" in argv
    csv_path = tmp_path / "report.csv"
    report = subprocess.run(
        [*QRGATE, *argv[1:], "--csv", str(csv_path)],
        cwd=tmp_path,
        env=demo_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert report.returncode == 0, report.stdout + report.stderr
    with csv_path.open() as f:
        rows_csv = list(csv.DictReader(f))
    assert {(r["site"], r["door"]) for r in rows_csv} == {("demo", "demo-door")}
    assert sum(int(r["granted"]) for r in rows_csv) == GRANTED
    assert sum(int(r["entries"]) for r in rows_csv) == GRANTED
    assert sum(int(r["denied"]) for r in rows_csv) == DENIED
    total = next(x for x in report.stdout.splitlines() if "total" in x)
    assert [c.strip() for c in total.strip("│ ").split("│")][-4:] == [
        str(GRANTED),
        "0",
        str(GRANTED),
        str(DENIED),
    ]


def test_demo_without_mosquitto_says_so_and_its_backlog_grows(
    reel: Path, state: Path, tmp_path: Path
) -> None:
    done = run_demo(state, reel, tmp_path, QRGATE_MOSQUITTO=str(tmp_path / "no-mosquitto"))
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    said = [x for x in out.splitlines() if x.startswith("no MQTT broker")]
    assert len(said) == 1 and "sudo apt install mosquitto" in said[0], out
    rows, _, unsent = journal_counts(state)
    assert unsent == rows == GRANTED + DENIED
    backlogs = [int(m.group(1)) for x in out.splitlines() if (m := STATUS_BACKLOG.match(x))]
    assert backlogs == sorted(backlogs) and backlogs[-1] == rows and len(set(backlogs)) >= 2, out
    assert summary_value(out, "backlog (unsent rows)") == str(rows)
    assert re.search(rf"backlog: {rows} rows wait in \S+journal\.db for a broker", out), out
    assert not (state / BACKOFFICE_DB).exists()
    assert not any(x.startswith("report:") for x in out.splitlines())


def test_ctrl_c_stops_reader_then_ingest_then_broker(
    need_mosquitto: None, reel: Path, state: Path, tmp_path: Path
) -> None:
    proc = subprocess.Popen(
        [*QRGATE, "demo", "--state", str(state), "--reel", str(reel), "--fps", str(FPS)],
        cwd=tmp_path,
        env=demo_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # the first verdict: broker, ingest and reader are all up
            seen.append(line)
            if "GRANTED" in line:
                break
        assert any("GRANTED" in x for x in seen), "".join(seen)
        running = processes_naming(str(state))
        assert any("mosquitto -c" in x for x in running), running
        assert any(" ingest --broker " in x for x in running), running
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=DEMO_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    out = "".join(seen) + rest
    assert proc.returncode == 0, out + err
    assert "stopped the reader (offline status sent), then qrgate ingest, then mosquitto" in out
    # what was journaled before the Ctrl-C reached the back office before it stopped
    scans = journal_scans(state)
    with sqlite3.connect(f"file:{state / BACKOFFICE_DB}?mode=ro", uri=True) as db:
        stored = {r[0] for r in db.execute("SELECT event_id FROM events WHERE kind = 'scan'")}
    assert scans and stored == set(scans)
    assert "Traceback" not in err
