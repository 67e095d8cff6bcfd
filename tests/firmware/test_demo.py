"""``qrgate demo`` end to end, as the user runs it: a subprocess with its private mosquitto,
the real ``qrgate ingest`` and the reader's uplink, on a short camera-like reel; then the
``qrgate report`` command the demo prints, run on what the back office stored. Without
mosquitto (``QRGATE_MOSQUITTO`` pointing at nothing) the demo still ends cleanly and reports
its growing backlog."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zxingcpp
from PIL import Image

from drivers.replay import load_gray
from firmware.config import load_config
from firmware.demo.backoffice import BACKOFFICE_DB
from firmware.demo.prepare import (
    DEVICE,
    DOOR,
    ISSUER,
    REEL_VERSION,
    ROTATING_PERIOD_S,
    SCREENSHOT_AGE_STEPS,
    pass_codes,
    prepare,
)
from firmware.demo.reel import (
    ALLOWED_BADGE,
    CHECKIN_CARD,
    UNKNOWN_BADGE,
    CodeSpec,
    code_frame,
    idle_frames,
    make_scene,
)
from firmware.policy.cose import kid_of
from firmware.policy.keys import generate_key, load_private_key, save_private_key
from firmware.policy.passes import VerifiedCache, read_rotating, step_of
from firmware.policy.trust import load_trust

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


def journal_outcomes(state: Path) -> list[tuple[str, str, str, dict[str, object]]]:
    """(credential kind, decision, reason, detail) of every scan row, in seq order."""
    with sqlite3.connect(f"file:{state / 'journal.db'}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT credential_kind, decision, reason, detail FROM events "
            "WHERE kind = 'scan' ORDER BY seq"
        ).fetchall()
    return [(str(k), str(d), str(r), json.loads(x)) for k, d, r, x in rows]


def test_demo_decides_passes_and_an_id_card_check_in(state: Path, tmp_path: Path) -> None:
    """The passes the demo signs for this run, and the README's CCCD, through the real
    daemon: the demo's issuer key (kept in the state folder) is what prepare trusts."""
    state.mkdir()
    key = generate_key()
    save_private_key(state / "issuer.key", key)
    codes = pass_codes(key, int(time.time()))
    story = list(codes)
    story.insert(0, ("id_card", (CodeSpec(CHECKIN_CARD, scale=0.42),)))
    folder = tmp_path / "reel"
    folder.mkdir()
    idle = idle_frames(640, 480, 4, seed=5)
    index = 0
    for n, (_, specs) in enumerate(story):
        for k in range(4):
            Image.fromarray(idle[k]).save(folder / f"{index:05d}.png", compress_level=1)
            index += 1
        for k in range(HOLD_FRAMES):
            image = make_scene(640, 480, codes=specs, seed=100 * n + k % 2)
            Image.fromarray(image).save(folder / f"{index:05d}.png", compress_level=1)
            index += 1
    Image.fromarray(idle[0]).save(folder / f"{index:05d}.png", compress_level=1)

    done = run_demo(state, folder, tmp_path, QRGATE_MOSQUITTO=str(tmp_path / "no-mosquitto"))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = journal_outcomes(state)
    assert [(k, d, r) for k, d, r, _ in rows] == [
        ("id_card", "granted", "granted"),
        ("signed_pass", "granted", "granted"),
        ("signed_pass", "denied", "expired"),
        ("rotating_pass", "granted", "granted"),
        ("rotating_pass", "denied", "stale_code"),
    ], done.stdout
    # the check-in keeps the masked name, birth year and ID HMAC, nothing else of the card
    person = rows[0][3]["person"]
    assert isinstance(person, dict) and set(person) == {"id_hmac", "name_masked", "birth_year"}
    assert person["name_masked"] == "Trần V** B**" and person["birth_year"] == 1985
    assert re.fullmatch(r"[0-9a-f]{64}", str(person["id_hmac"]))
    dump = json.dumps([r[3] for r in rows], ensure_ascii=False)
    for secret in ("074085003417", "280912345", "Văn Bình", "Bình Dương", "14031985"):
        assert secret not in dump
    # the passes were checked against the key the test put there (prepare kept it)
    kid = kid_of(key.public_key()).hex()
    assert {r[3]["kid"] for r in rows[1:]} == {kid}
    assert {r[3]["iss"] for r in rows[1:]} == {ISSUER}
    live, stale = rows[3][3]["step"], rows[4][3]["step"]
    assert isinstance(live, int) and stale == live - SCREENSHOT_AGE_STEPS
    assert " expired " in done.stdout and " stale_code " in done.stdout


def test_prepare_keeps_keys_and_badges_and_renders_fresh_passes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = load_config(prepare(state, reel=None, camera=None, fps=30))
    assert (config.reader.mode, config.reader.door) == ("checkin", DOOR)
    assert config.policy.trust == state / "trust.json"
    for name in ("issuer.key", "site.key"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    key = load_private_key(state / "issuer.key")
    trust = load_trust(state / "trust.json")
    assert [k.iss for k in trust.values()] == [ISSUER] and kid_of(key.public_key()) in trust
    folder = state / "reel"
    version, frames = (folder / ".reel-version").read_text().split()
    assert (version, frames) == (REEL_VERSION, "534")
    first = sorted(folder.glob("*.png"))
    pass_tail = [p.read_bytes() for p in first[534:]]
    assert len(first) == 534 + 4 * (30 + 54)

    prepare(state, reel=None, camera=None, fps=30)
    again = sorted(folder.glob("*.png"))
    assert kid_of(load_private_key(state / "issuer.key").public_key()) == kid_of(key.public_key())
    # the badge part is the cached files; the pass part was signed and drawn again
    assert [p.stat().st_ino for p in again[:534]] == [p.stat().st_ino for p in first[:534]]
    assert len(again) == len(first) and [p.read_bytes() for p in again[534:]] != pass_tail
    # the live rotating code is for now's step, within the reader's skew, for this door
    held = again[534 + 2 * 84]
    (text,) = [b.bytes for b in zxingcpp.read_barcodes(load_gray(held))]
    code = read_rotating(text, trust, VerifiedCache())
    assert abs(code.step - step_of(time.time(), ROTATING_PERIOD_S)) <= 1
    assert code.door == DOOR and code.pass_.claims.period_s == ROTATING_PERIOD_S
