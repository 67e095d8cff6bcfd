"""``make bench``: qrgate's speed and memory targets, measured side by side in one run.

Prints a markdown table (targets next to measurements) and writes it to ``bench.md``.
Needs ``../shared/corpus`` (or $QRGATE_SHARED) for the decode section and mosquitto for the
uplink rows (each skipped, and said so, without).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from drivers.frames import Frame, FrameSource  # noqa: E402
from drivers.pins import make_pin_factory  # noqa: E402
from drivers.replay import ReplaySource  # noqa: E402
from firmware.config import Config, parse_config  # noqa: E402
from firmware.daemon import build_reader  # noqa: E402
from firmware.decoding.corpus import load_gray, load_manifest, read_ok  # noqa: E402
from firmware.decoding.registry import BACKENDS, make_decoder  # noqa: E402
from firmware.demo.broker import LocalBroker, find_mosquitto  # noqa: E402
from firmware.demo.reel import code_frame, idle_frames  # noqa: E402
from firmware.exceptions import BrokerError  # noqa: E402
from firmware.journal.bench import append_rate  # noqa: E402
from firmware.pipeline import ScanReport  # noqa: E402
from firmware.policy import bench as cb  # noqa: E402
from firmware.policy.badges import BadgeList, write_badges  # noqa: E402
from firmware.policy.subjects import SubjectHasher  # noqa: E402
from firmware.uplink import bench as ub  # noqa: E402
from firmware.uplink.forwarder import DEFAULT_BATCH, DEFAULT_WINDOW  # noqa: E402
from firmware.uplink.link import STABLE_S  # noqa: E402

Row = tuple[str, str, str, str, bool | None]  # area, measure, result, target, met


def shared_dir() -> Path | None:
    env = os.environ.get("QRGATE_SHARED")
    for c in ([Path(env)] if env else []) + [REPO.parent / "shared"]:
        if (c / "corpus").is_dir():
            return c
    return None


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def bench_corpus(rows: list[Row]) -> None:
    shared = shared_dir()
    if shared is None:
        rows.append(("decode", "corpus", "skipped: ../shared/corpus not found", "", None))
        return
    targets = {("cascade", "zxing-blackbox"): 169, ("cascade", "zxing-cpp-samples"): 129}
    for folder in ("zxing-blackbox", "zxing-cpp-samples"):
        items = load_manifest(shared / "corpus" / folder)
        images = [load_gray(it.image) for it in items]
        for backend in BACKENDS:
            dec = make_decoder(backend)
            ok, times = 0, []
            for it, img in zip(items, images, strict=True):
                t0 = time.perf_counter()
                codes = dec.decode(img)
                times.append((time.perf_counter() - t0) * 1000)
                ok += read_ok(it, codes)
            target = targets.get((backend, folder))
            rows.append(
                (
                    "decode",
                    f"{backend} on {folder}",
                    f"{ok}/{len(items)} read, median {statistics.median(times):.2f} ms, "
                    f"p95 {pct(times, 95):.2f} ms",
                    f"≥ {target}/{len(items)}" if target else "",
                    ok >= target if target else None,
                )
            )


def _write(folder: Path, name: str, image: np.ndarray) -> Path:
    p = folder / name
    Image.fromarray(image).save(p, compress_level=1)
    return p


def _reader_config(state: Path, allow: list[bytes]) -> Config:
    key = bytes(range(32))
    (state / "site.key").write_text(key.hex())
    h = SubjectHasher(key)
    write_badges(state / "badges.json", BadgeList.of(allow=[h.subject(p) for p in allow]))
    return parse_config(
        {
            "reader": {"state_dir": str(state / "state")},
            "camera": {"source": "replay", "path": str(state)},
            "policy": {"badges": "badges.json", "hmac_key": "site.key", "repeat_window_s": 0.5},
            "gpio": {"pin_factory": "mock", "pulse_s": 0.1},
        },
        "<bench>",
        state,
    )


def bench_latency(rows: list[Row], presentations: int) -> None:
    """Frame-to-relay through the whole reader (capture thread, queue, idle gate, decode,
    verdict, journal commit, relay) vs the bare decode call on the same frames."""
    for width, height in ((640, 480), (1280, 720)):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            idle = [
                _write(folder, f"idle{i}.png", f)
                for i, f in enumerate(idle_frames(width, height, 8, seed=7))
            ]
            payloads = [f"QRG-BENCH:{i:04d}".encode() for i in range(8)]
            codes = [
                _write(folder, f"code{i}.png", code_frame(width, height, p, seed=i))
                for i, p in enumerate(payloads)
            ]
            reel: list[Path] = []
            for i in range(presentations):
                reel += [idle[(i * 3 + k) % len(idle)] for k in range(3)] + [codes[i % 8]] * 2
            config = _reader_config(folder, payloads)
            reports: list[ScanReport] = []
            source = ReplaySource(reel, fps=30)
            reader = build_reader(
                config,
                pin_factory=make_pin_factory("mock"),
                source=source,
                listeners=[reports.append],
                clock_synced=lambda: True,
            )
            reader.start()
            reader.wait(presentations * 5 / 30 + 60)
            reader.stop()
            f2r = [r.frame_to_relay_ms for r in reports if r.frame_to_relay_ms is not None]
            added = [
                r.frame_to_relay_ms - r.decode_ms
                for r in reports
                if r.frame_to_relay_ms is not None
            ]
            dec = make_decoder("zxing-cpp")
            bare = []
            for _ in range(max(1, presentations // 8)):
                for p in codes:
                    img = np.asarray(Image.open(p))
                    t0 = time.perf_counter()
                    dec.decode(img)
                    bare.append((time.perf_counter() - t0) * 1000)
            label = f"{width}x{height}"
            rows.append(
                (
                    "latency",
                    f"frame→relay {label} ({len(f2r)} grants)",
                    f"p50 {pct(f2r, 50):.2f} ms, p99 {pct(f2r, 99):.2f} ms",
                    "p99 ≤ 5 ms" if width == 1280 else "",
                    pct(f2r, 99) <= 5.0 if width == 1280 else None,
                )
            )
            rows.append(
                (
                    "latency",
                    f"bare decode {label} (same frames)",
                    f"p50 {pct(bare, 50):.2f} ms, p99 {pct(bare, 99):.2f} ms",
                    "",
                    None,
                )
            )
            rows.append(
                (
                    "latency",
                    f"pipeline adds {label}",
                    f"p99 {pct(f2r, 99) - pct(bare, 99):.2f} ms "
                    f"(per scan, frame→relay − its decode: p50 {pct(added, 50):.2f}, "
                    f"p99 {pct(added, 99):.2f} ms)",
                    "≤ 1 ms at p99",
                    pct(f2r, 99) - pct(bare, 99) <= 1.0,
                )
            )


def bench_idle_cpu(rows: list[Row], seconds: float) -> None:
    """The real daemon (subprocess) on an idle 1280x720 scene with camera noise at 30 fps."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cfg = _idle_config(folder, 1280, 720)
        proc = subprocess.Popen(
            [sys.executable, "-m", "firmware.cli", "run", "--config", str(cfg)],
            stderr=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            cwd=REPO,
        )
        try:
            time.sleep(3.0)  # start-up and first pass through the reel (PNG decoding)
            c0, t0 = _cpu_s(proc.pid), time.monotonic()
            time.sleep(seconds)
            c1, t1 = _cpu_s(proc.pid), time.monotonic()
        finally:
            proc.terminate()
            proc.wait(30)
        cpu = (c1 - c0) / (t1 - t0) * 100
        rows.append(
            (
                "idle",
                "daemon CPU, idle 1280x720 @ 30 fps",
                f"{cpu:.2f} % of one core",
                "≤ 5 %",
                cpu <= 5.0,
            )
        )


def _idle_config(folder: Path, width: int, height: int) -> Path:
    """A daemon config on a looping idle reel (camera noise, no code) of ``width`` x
    ``height`` at 30 fps, mock pins, no MQTT."""
    reel = folder / "reel"
    reel.mkdir()
    for i, f in enumerate(idle_frames(width, height, 30, seed=3)):
        _write(reel, f"{i:03d}.png", f)
    cfg = folder / "qrgate.toml"
    cfg.write_text(f"""
[reader]
state_dir = "{folder / "state"}"
[camera]
source = "replay"
path = "{reel}"
fps = 30
loop = true
[gpio]
pin_factory = "mock"
""")
    return cfg


def _notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return sock


def _wait_ready(sock: socket.socket, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return False
        if b"READY=1" in data.split(b"\n"):
            return True
    return False


def _vm_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def bench_service(rows: list[Row], starts: int, steady_s: float) -> None:
    """The daemon as systemd runs it: process start to READY=1 (a real notification socket,
    a replay camera), and its resident memory once it has run a while."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cfg = _idle_config(folder, 640, 480)
        times: list[float] = []
        rss_mb = peak_mb = 0.0
        for i in range(starts):
            path = folder / f"notify-{i}"
            sock = _notify_socket(path)
            env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "10000000"}
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-m", "firmware.cli", "run", "--config", str(cfg)],
                stderr=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                cwd=REPO,
                env=env,
            )
            try:
                if not _wait_ready(sock, 60):
                    raise SystemExit("bench: the daemon never sent READY=1")
                times.append(time.monotonic() - t0)
                if i == starts - 1:  # the last one runs on: its steady-state memory
                    time.sleep(steady_s)
                    rss_mb = _vm_kb(proc.pid, "VmRSS") / 1024
                    peak_mb = _vm_kb(proc.pid, "VmHWM") / 1024
            finally:
                proc.terminate()
                proc.wait(30)
                sock.close()
    rows.append(
        (
            "service",
            f"process start to READY=1, replay camera (median / max of {starts})",
            f"{statistics.median(times):.2f} / {max(times):.2f} s",
            "≤ 1.5 s",
            max(times) <= 1.5,
        )
    )
    rows.append(
        (
            "service",
            f"daemon RSS after {steady_s:.0f} s at 30 fps (peak)",
            f"{rss_mb:.1f} MB ({peak_mb:.1f} MB)",
            "≤ 80 MB",
            rss_mb <= 80,
        )
    )


class _Paced(FrameSource):
    """Delivers ``inner``'s frames at ``fps`` (a camera's pace), whatever it can do."""

    def __init__(self, inner: FrameSource, fps: float) -> None:
        self.inner, self.period = inner, 1.0 / fps
        self._next = 0.0

    def open(self) -> None:
        self.inner.open()
        self._next = time.monotonic()

    def read(self, timeout_s: float = 5.0) -> Frame | None:
        self._next += self.period
        time.sleep(max(0.0, self._next - time.monotonic()))
        return self.inner.read(timeout_s)

    def close(self) -> None:
        self.inner.close()


def _reader_cpu(source: FrameSource, state: Path, seconds: float) -> float:
    """Per cent of one core the whole process used while a reader ran on ``source``."""
    cfg = _reader_config(state, [])
    reader = build_reader(cfg, pin_factory=make_pin_factory("mock"), source=source)
    reader.start()
    try:
        time.sleep(2.0)  # warm-up: first frames, caches
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        time.sleep(seconds)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    finally:
        reader.stop()
    used = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return used / (t1 - t0) * 100


def bench_lores_idle(rows: list[Row], seconds: float) -> None:
    """The picamera2 lores path (the Y plane of YUV420, no conversion) against a faithful
    fake of picamera2 on an idle 640x480 scene with noise at 30 fps, beside the replay camera
    on the same frames: the reader's CPU in this process. The fake builds each padded YUV
    buffer itself, a cost a real camera's DMA buffers do not have, so the lores figure is an
    upper bound."""
    from drivers.picamera import Picamera2Source
    from tests.drivers.fake_picamera2 import FakeCameraSystem

    scenes = idle_frames(640, 480, 30, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        reel = folder / "reel"
        reel.mkdir()
        for i, f in enumerate(scenes):
            _write(reel, f"{i:03d}.png", f)
        fake = FakeCameraSystem(scenes, keep_instances=False)
        lores = Picamera2Source(
            size=(640, 480), fps=30, snapshot_size=(1280, 960), module_loader=fake.load
        )
        (folder / "a").mkdir()
        (folder / "b").mkdir()
        cpu_lores = _reader_cpu(_Paced(lores, 30), folder / "a", seconds)
        cpu_replay = _reader_cpu(ReplaySource(reel, fps=30, loop=True), folder / "b", seconds)
    rows.append(
        (
            "service",
            "reader CPU, idle 640x480 @ 30 fps, picamera2 lores path (fake camera)",
            f"{cpu_lores:.2f} % of one core (replay camera: {cpu_replay:.2f} %)",
            "≤ 5 %",
            cpu_lores <= 5.0,
        )
    )


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_journal(rows: list[Row]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rate = append_rate(Path(tmp) / "journal.db", seconds=3.0)
    rows.append(
        (
            "journal",
            "appends/s, each waiting for its commit, group fsync on",
            f"{rate:,.0f}/s",
            "≥ 5,000/s",
            rate >= 5000,
        )
    )


RSS_CHILD = r"""
import sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
from drivers.frames import Frame
from drivers.pins import make_pin_factory
from drivers.replay import ReplaySource
from firmware.config import parse_config
from firmware.daemon import build_reader
from firmware.demo.reel import code_frame, idle_frames
from firmware.policy.badges import BadgeList, write_badges
from firmware.policy.subjects import SubjectHasher

def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

state = Path(sys.argv[2])
(state / "reel").mkdir()
(state / "site.key").write_text(bytes(range(32)).hex())
write_badges(state / "badges.json",
             BadgeList.of(allow=[SubjectHasher(bytes(range(32))).subject(b"QRG-BENCH:rss")]))
cfg = parse_config({"reader": {"state_dir": str(state)},
                    "camera": {"source": "replay", "path": str(state / "reel")},
                    "policy": {"repeat_window_s": 0.5, "badges": "badges.json",
                               "hmac_key": "site.key"},
                    "gpio": {"pin_factory": "mock"}}, "<bench>", state)
factory = make_pin_factory("mock")
reader = build_reader(cfg, pin_factory=factory,
                      source=ReplaySource([Path(sys.argv[3])]), clock_synced=lambda: True)
reader.journal.open()
frames = [code_frame(640, 480, b"QRG-BENCH:rss", seed=1), idle_frames(640, 480, 1, seed=2)[0]]
total = int(sys.argv[4])
marks = {}
import os
for i in range(total):
    # capture times 1 s apart: every code frame is a new presentation, so a grant
    reader.scan.handle(Frame(frames[i % 2], i * 1_000_000_000, i))
    if i % 1000 == 999:
        # gpiozero's mock pins record every level change: that is the harness, not the reader
        for pin in factory.pins.values():
            pin.clear_states()
    if i + 1 in (1_000, total):
        marks[i + 1] = (rss_kb(), len(os.listdir("/proc/self/fd")))
reader.stop()
print(marks[1_000][0], marks[total][0], marks[1_000][1], marks[total][1], reader.metrics.granted)
"""


def bench_rss(rows: list[Row], total: int) -> None:
    """RSS after 100,000 frames vs after 1,000 through the real decode → verdict → journal →
    feedback path (a code frame and an idle frame alternating: every code frame is a grant)."""
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "one.png"
        _write(Path(tmp), "one.png", idle_frames(64, 64, 1, seed=1)[0])
        state = Path(tmp) / "state"
        state.mkdir()
        out = subprocess.run(
            [sys.executable, "-c", RSS_CHILD, str(REPO), str(state), str(png), str(total)],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
    if out.returncode != 0:
        rows.append(("memory", "RSS", f"failed: {out.stderr[-300:]}", "", False))
        return
    r1, r2, fd1, fd2, grants = (int(x) for x in out.stdout.split())
    rows.append(
        (
            "memory",
            f"RSS after {total:,} frames vs 1,000 ({grants:,} grants)",
            f"{r1 / 1024:.1f} → {r2 / 1024:.1f} MB: +{(r2 - r1) / 1024:.2f} MB; fds {fd1} → {fd2}",
            "growth < 5 MB",
            r2 - r1 < 5 * 1024 and fd1 == fd2,
        )
    )


def _no_mosquitto(rows: list[Row], area: str) -> bool:
    try:
        find_mosquitto()
    except BrokerError as e:
        rows.append((area, "uplink", f"skipped: {e}", "", None))
        return True
    return False


def bench_uplink_drain(rows: list[Row], n: int, repeats: int = 2) -> None:
    """Drain an n-event backlog to loopback mosquitto through the real uplink, next to bare
    paho-mqtt publishing the same payloads; each run ``repeats`` times, the best counts."""
    if _no_mosquitto(rows, "uplink"):
        return
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalBroker(Path(tmp) / "broker", persistence=False) as broker,
    ):
        folder = Path(tmp)
        source = folder / "source.db"
        ub.build_backlog(source, n)
        batched = list(ub.outbox_payloads(source, DEFAULT_BATCH))
        single = list(ub.outbox_payloads(source, 1))
        best: dict[str, ub.DrainResult] = {}

        def keep(name: str, result: ub.DrainResult) -> None:
            if name not in best or result.rate > best[name].rate:
                best[name] = result

        host, port = broker.host, broker.port
        for i in range(repeats):
            keep("prebuilt", ub.drain_paho(batched, host, port, events=n))
            keep("single", ub.drain_paho(single, host, port, events=n))
            journal = folder / f"journal{i}.db"
            ub.build_backlog(journal, n)
            keep(
                "from_journal",
                ub.drain_paho(ub.outbox_payloads(journal, DEFAULT_BATCH), host, port, events=n),
            )
            keep("uplink", ub.drain_uplink(journal, host, port))
    up = best["uplink"]
    runs = f"best of {repeats}"
    rows.append(
        (
            "uplink",
            f"drain a {n:,}-event backlog to loopback mosquitto: the uplink (journal → "
            f"forwarder → link, window {DEFAULT_WINDOW}, batch {DEFAULT_BATCH}; done when every "
            f"event is PUBACKed and marked published)",
            f"{up.rate:,.0f} events/s ({up.messages:,} messages, {up.seconds:.2f} s, {runs})",
            "",
            None,
        )
    )
    baselines = (
        (
            "from_journal",
            f"bare paho, same batching ({DEFAULT_BATCH} events/message), QoS 1, ≤ "
            f"{DEFAULT_WINDOW} unacked; the same rows read from the journal and made into the "
            f"same JSON as it publishes, no rows marked (the target's baseline)",
            True,
        ),
        (
            "prebuilt",
            f"bare paho, the same {DEFAULT_BATCH}-event payloads built beforehand in memory "
            f"(transport only), QoS 1, ≤ {DEFAULT_WINDOW} unacked",
            False,
        ),
        (
            "single",
            f"bare paho, one event per message (payloads built beforehand), QoS 1, ≤ "
            f"{DEFAULT_WINDOW} unacked",
            False,
        ),
    )
    for name, what, judged in baselines:
        base = best[name]
        share = up.rate / base.rate * 100
        rows.append(
            (
                "uplink",
                what,
                f"{base.rate:,.0f} events/s ({base.messages:,} messages, {base.seconds:.2f} s, "
                f"{runs}); the uplink = {share:.0f} % of it",
                "uplink ≥ 50 %" if judged else "",
                share >= 50 if judged else None,
            )
        )


def bench_uplink_rss(rows: list[Row], small: int, large: int, max_s: float) -> None:
    """Peak RSS of a real `qrgate run` draining a small and a large backlog."""
    if _no_mosquitto(rows, "memory"):
        return
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalBroker(Path(tmp) / "broker", persistence=False) as broker,
    ):
        res = [
            ub.daemon_rss(Path(tmp) / f"rss{n}", broker.host, broker.port, backlog=n, max_s=max_s)
            for n in (small, large)
        ]
    a, b = res

    def how(r: ub.RssResult) -> str:
        state = "drained" if r.left == 0 else f"{r.backlog - r.left:,} sent, {r.left:,} left"
        return f"{r.hwm_kb / 1024:.1f} MB ({state} in {r.seconds:.0f} s)"

    growth = (b.hwm_kb - a.hwm_kb) / 1024
    rows.append(
        (
            "memory",
            f"daemon RSS, {large:,}- vs {small:,}-event backlog (qrgate run, broker reachable, "
            f"peak VmHWM from start to the end of the drain, max {max_s:.0f} s)",
            f"{a.backlog:,}: {how(a)}; {b.backlog:,}: {how(b)}: {growth:+.1f} MB; "
            f"VmRSS sampled while draining {a.drain_peak_kb / 1024:.1f} → "
            f"{b.drain_peak_kb / 1024:.1f} MB (backlog built in {b.build_s:.0f} s)",
            "within 10 MB",
            abs(growth) <= 10,
        )
    )


def bench_uplink_outage(rows: list[Row], trials: int) -> None:
    """Events flowing again after a 3 s broker outage (SIGKILL, then the same port)."""
    if _no_mosquitto(rows, "uplink"):
        return
    # the link's warnings ("connection lost", "refused") are what this step causes on purpose
    logging.getLogger("firmware.uplink.link").setLevel(logging.ERROR)
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalBroker(Path(tmp) / "broker", persistence=False) as broker,
    ):
        res = ub.outage_recovery(Path(tmp) / "reader", broker, outage_s=3.0, trials=trials)
    worst = max(t.to_puback_s for t in res)
    each = ", ".join(f"{t.to_puback_s:.2f}" for t in res)
    attempts = "/".join(str(t.attempts) for t in res)
    jitter = 0.5  # the first retry's ceiling, [uplink] reconnect_min_s (default)
    rows.append(
        (
            "uplink",
            f"broker back after a 3 s outage (SIGKILL, same port; {trials} outages, 20 events/s "
            f"flowing, each after {STABLE_S:g}+ s connected) → first event PUBACK",
            f"max {worst:.2f} s ({each} s; connection attempts per outage {attempts})",
            f"≤ {2 + jitter:g} s (2 s + {jitter:g} s reconnect jitter)",
            worst <= 2 + jitter,
        )
    )


def bench_credentials(rows: list[Row], hostile: int) -> None:
    """Pass verification per scan, denylist lookups and memory, snapshot apply, and hostile
    payloads (firmware/policy/bench.py)."""
    s = cb.make_setup(100_000)
    per_scan = cb.verify_per_scan(s)
    for name, ms in per_scan.items():
        p99 = pct(ms, 99)
        rows.append(
            (
                "credentials",
                f"verify per scan, {name}: Policy.decide incl. parsing, clock synced, "
                f"{s.deny_size:,}-entry denylist ({len(ms):,} scans)",
                f"p50 {pct(ms, 50):.3f} ms, p99 {p99:.3f} ms, max {max(ms):.3f} ms",
                "p99 ≤ 1 ms",
                p99 <= 1.0,
            )
        )
    for n in (100_000, 1_000_000):
        d = cb.denylist_bench(n)
        per_100k = d.nbytes / n * 100_000 / 1e6
        traced_100k = d.traced_bytes / n * 100_000 / 1e6
        rows.append(
            (
                "credentials",
                f"denylist of {n:,}: lookup (key in list, blake2b + probe; 200,000 keys, best "
                f"of 3, Python loop included: {d.loop_ns:.0f} ns alone)",
                f"member {d.member_ns:.0f} ns, non-member {d.absent_ns:.0f} ns",
                "",
                None,
            )
        )
        rows.append(
            (
                "credentials",
                f"denylist of {n:,}: memory (nbytes; tracemalloc retained / peak while "
                f"building; RSS delta of the build) and build time",
                f"nbytes {d.nbytes / 1e6:.2f} MB ({per_100k:.2f} MB per 100,000); traced "
                f"{d.traced_bytes / 1e6:.2f} MB (peak {d.traced_peak / 1e6:.2f} MB); RSS "
                f"+{d.rss_delta_kb / 1024:.1f} MB; built in {d.build_s:.2f} s",
                "≤ 2 MB per 100,000",
                per_100k <= 2.0 and traced_100k <= 2.0,
            )
        )
    sn = cb.snapshot_apply(s)
    rows.append(
        (
            "credentials",
            f"snapshot apply, {sn.entries:,} revoked pass ids (SnapshotStore.apply: verify, "
            f"build, keep with fsync in {sn.folder}; {len(sn.apply_s)} versions)",
            f"median {statistics.median(sn.apply_s) * 1000:.0f} ms, max "
            f"{max(sn.apply_s) * 1000:.0f} ms ({sn.bytes / 1e6:.1f} MB snapshot; signing "
            f"{sn.sign_s * 1000:.0f} ms)",
            "",
            None,
        )
    )

    def progress(i: int) -> None:
        print(f"bench: hostile payloads {i:,}/{hostile:,}", file=sys.stderr, flush=True)

    h = cb.hostile_run(s, hostile, progress)
    by_reason = ", ".join(f"{r} {c:,}" for r, c in h.reasons.most_common())
    by_kind = ", ".join(f"{k} {c:,}" for k, c in h.kinds.most_common())
    whys = ", ".join(f"{w} {c:,}" for w, c in h.why_top)
    families = ", ".join(f"{f} {c}" for f, c in h.families.items())
    answered = sum(h.reasons.values())
    rows.append(
        (
            "credentials",
            f"hostile payloads through Policy.check: {h.total:,} from a pool of {h.pool:,} "
            f"({families}; crafted ones ×{cb.CRAFTED_WEIGHT}), every other lap mutated",
            f"{h.total / h.seconds:,.0f}/s ({h.seconds:.1f} s); {answered:,} answered with a "
            f"reason, {h.escaped} exceptions escaped, internal_errors {h.internal_errors}; "
            f"by reason: {by_reason}; by kind: {by_kind}; top why: {whys}",
            "no exception, every one a reason, internal_errors 0",
            h.escaped == 0 and h.internal_errors == 0 and answered == h.total,
        )
    )


def bench_rollout(rows: list[Row], n: int) -> None:
    """A staged rollout (ota.rollout) to ``n`` simulated readers (ota.simulator: one paho
    connection for all) through loopback mosquitto: wall time and broker messages."""
    if _no_mosquitto(rows, "rollout"):
        return
    from ota.mqtt import PahoTransport, plain_client
    from ota.rollout import DeviceRef, Rollout, RolloutEngine
    from ota.simulator import FleetSimulator

    canary, batch, site = 10, 250, "bench"
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalBroker(Path(tmp) / "broker", persistence=False) as broker,
        FleetSimulator(broker.host, broker.port, site, n) as sim,
        PahoTransport(plain_client("bench-rollout"), broker.host, broker.port) as transport,
    ):
        transport.connect()
        plan = Rollout.create(
            "1.1.0",
            [DeviceRef(d, site) for d in sim.devices],
            canary=canary,
            batch_size=batch,
            error_threshold_pct=5,
        )
        t0 = time.monotonic()
        path = Path(tmp) / "rollout.json"
        status = RolloutEngine(plan, path, transport, wave_timeout_s=600).run()
        wall = time.monotonic() - t0
        sent = transport.published + sim.published
        delivered = transport.received + sim.received
    succeeded = plan.counts()["SUCCEEDED"]
    rows.append(
        (
            "rollout",
            f"staged rollout to {n:,} simulated readers (one MQTT connection for all, loopback "
            f"mosquitto; canary {canary}, waves of {batch}, {len(plan.waves)} waves; each reader "
            "QUEUED → DOWNLOADING ×3 → INSTALLING → PENDING_COMMIT → SUCCEEDED, retained QoS 1; "
            "from the first job to the last report; statuses published before)",
            f"{wall:.1f} s, {status.value}, {succeeded:,} succeeded; broker messages "
            f"{sent:,} in, {delivered:,} out ({(sent + delivered) / wall:,.0f}/s)",
            "every reader SUCCEEDED",
            succeeded == n,
        )
    )


DOWNLOAD_CHILD = r"""
import sys, threading, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
# what the updater process has loaded: the agent, the updater, TUF, paho
import ota.agent, ota.fetch, ota.install, ota.updater
from ota.download import download

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

mode, url, work, size = sys.argv[2], sys.argv[3], Path(sys.argv[4]), int(sys.argv[5])
base = status_kb("VmRSS")
peak = [base]
done = threading.Event()

def sample():
    while not done.wait(0.01):
        peak[0] = max(peak[0], status_kb("VmRSS"))

sampler = threading.Thread(target=sample)
sampler.start()
t0 = time.monotonic()
if mode == "download":
    dest = download(url, work / "bundle.tar", expected_size=size, max_size=size,
                    sha256=bytes.fromhex(sys.argv[6]))
else:  # the TUF client: refresh, find the target, download it, verify it through TUF
    fetcher = ota.fetch.Fetcher(work / "metadata", work / "cache", url,
                                Path(sys.argv[6]).read_bytes(), max_bundle_bytes=size + 2**20)
    dest = fetcher.fetch(fetcher.refresh_and_find(sys.argv[7]))
wall = time.monotonic() - t0
done.set()
sampler.join()
peak[0] = max(peak[0], status_kb("VmRSS"))
print(base, peak[0], status_kb("VmHWM"), f"{wall:.3f}", dest.stat().st_size)
"""


def _bench_bundle(folder: Path, version: str, size: int) -> Path:
    """A bundle in the real format whose one wheel is ``size`` random bytes (fine for
    publishing and fetching, not for installing), written without holding it in memory."""
    import hashlib
    import json
    import tarfile

    wheel = folder / f"qrgate-{version}-py3-none-any.whl"
    digest = hashlib.sha256()
    with wheel.open("wb") as f:
        for _ in range(size // (1024 * 1024)):
            chunk = os.urandom(1024 * 1024)
            digest.update(chunk)
            f.write(chunk)
    manifest = {
        "format": 1,
        "name": "qrgate",
        "version": version,
        "min_version": None,
        "device_types": ["rpi4", "rpi5"],
        "python": "cp311",
        "platform": f"linux_{os.uname().machine}",
        "build_time_ns": time.time_ns(),
        "wheels": {wheel.name: digest.hexdigest()},
        "system_packages": [],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "requirements.txt").write_text(
        f"qrgate=={version} --hash=sha256:{digest.hexdigest()}\n"
    )
    bundle = folder / f"qrgate-{version}.tar"
    with tarfile.open(bundle, "w") as tar:
        tar.add(folder / "manifest.json", "manifest.json")
        tar.add(folder / "requirements.txt", "requirements.txt")
        tar.add(wheel, f"wheels/{wheel.name}")
    wheel.unlink()
    return bundle


def bench_ota_download(rows: list[Row], size_mb: int) -> None:
    """Peak RSS of an updater-like process (agent, updater, TUF and paho loaded) getting a
    ``size_mb`` MB bundle from http.server on loopback, sampled every 10 ms: once through the
    resumable downloader alone (ota.download, SHA-256 checked), once through the TUF client
    (ota.fetch.Fetcher: metadata refresh, the same downloader, TUF's length and hash check)
    from a real repository (ota.repository)."""
    import functools
    import hashlib
    import http.server
    import threading

    from ota.repository import init_repository, publish, trusted_root

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    version = "9.9.9"
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "build").mkdir()
        bundle = _bench_bundle(t / "build", version, size_mb * 1024 * 1024)
        size = bundle.stat().st_size
        digest = hashlib.sha256()
        with bundle.open("rb") as f:
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
        repo = t / "repo"
        init_repository(repo, t / "keys")
        publish(repo, t / "keys", bundle)
        (repo / bundle.name).symlink_to(bundle)
        (t / "root.json").write_bytes(trusted_root(repo))
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Quiet, directory=str(repo))
        )
        thread = threading.Thread(target=server.serve_forever, name="bench-http", daemon=True)
        thread.start()
        base_url = f"http://127.0.0.1:{server.server_address[1]}"
        runs = {
            "ota.download": ["download", f"{base_url}/{bundle.name}", digest.hexdigest()],
            "ota.fetch.Fetcher (TUF)": ["fetcher", base_url, str(t / "root.json"), version],
        }
        results: dict[str, list[float] | str] = {}
        try:
            for n, (name, (mode, url, *extra)) in enumerate(runs.items()):
                work = t / f"work{n}"
                work.mkdir()
                out = subprocess.run(
                    [sys.executable, "-c", DOWNLOAD_CHILD, str(REPO), mode, url, str(work),
                     str(size), *extra],
                    capture_output=True,
                    text=True,
                    cwd=REPO,
                    timeout=600,
                    check=False,
                )  # fmt: skip
                ok = out.returncode == 0 and out.stdout.split()[-1:] == [str(size)]
                results[name] = [float(x) for x in out.stdout.split()] if ok else out.stderr[-300:]
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
    for name, r in results.items():
        if isinstance(r, str):
            rows.append(("ota", f"download RSS through {name}", f"failed: {r}", "", False))
            continue
        base_kb, peak_kb, hwm_kb, wall, _ = r
        rows.append(
            (
                "ota",
                f"updater RSS while downloading a {size_mb} MB bundle through {name} (one "
                "process with the agent, updater, TUF and paho loaded; loopback http.server; "
                "RSS sampled every 10 ms)",
                f"peak {peak_kb / 1024:.1f} MB (before the download {base_kb / 1024:.1f} MB: "
                f"+{(peak_kb - base_kb) / 1024:.1f} MB; VmHWM {hwm_kb / 1024:.1f} MB); "
                f"{size / wall / 1e6:.0f} MB/s",
                "flat, ≤ 60 MB",
                peak_kb <= 60 * 1024 and peak_kb - base_kb < 5 * 1024,
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    ap.add_argument(
        "--only",
        action="append",
        metavar="SECTION",
        help="run only this section (repeatable): decode, latency, idle, journal, memory, "
        "uplink-drain, uplink-memory, uplink-outage, credentials, service, lores, rollout, "
        "ota-download",
    )
    ap.add_argument(
        "--hostile",
        type=int,
        default=1_000_000,
        metavar="N",
        help="hostile payloads in the credentials section (default 1,000,000; 50,000 with --quick)",
    )
    args = ap.parse_args()
    hostile = 50_000 if args.quick and args.hostile == 1_000_000 else args.hostile
    rows: list[Row] = []
    steps: list[tuple[str, str, Callable[[], None]]] = [
        ("decode", "decode corpus", lambda: bench_corpus(rows)),
        (
            "latency",
            "frame-to-relay latency",
            lambda: bench_latency(rows, 40 if args.quick else 300),
        ),
        ("idle", "idle CPU", lambda: bench_idle_cpu(rows, 5 if args.quick else 20)),
        ("journal", "journal appends", lambda: bench_journal(rows)),
        ("memory", "memory", lambda: bench_rss(rows, 5_000 if args.quick else 100_000)),
        (
            "uplink-drain",
            "uplink drain",
            lambda: bench_uplink_drain(rows, 10_000 if args.quick else 100_000),
        ),
        (
            "uplink-memory",
            "uplink memory",
            lambda: bench_uplink_rss(
                rows, *((2_000, 20_000) if args.quick else (10_000, 1_000_000)), max_s=240.0
            ),
        ),
        (
            "uplink-outage",
            "uplink outage",
            lambda: bench_uplink_outage(rows, 1 if args.quick else 3),
        ),
        ("credentials", "credentials", lambda: bench_credentials(rows, hostile)),
        (
            "service",
            "service start and memory",
            lambda: bench_service(rows, 3 if args.quick else 7, 5 if args.quick else 20),
        ),
        ("lores", "picamera2 lores path", lambda: bench_lores_idle(rows, 5 if args.quick else 20)),
        ("rollout", "fleet rollout", lambda: bench_rollout(rows, 1_000)),
        ("ota-download", "OTA download memory", lambda: bench_ota_download(rows, 50)),
    ]
    known = [key for key, _, _ in steps]
    for key in args.only or ():
        if key not in known:
            ap.error(f"--only {key}: expected one of {', '.join(known)}")
    for key, name, step in steps:
        if args.only and key not in args.only:
            continue
        print(f"bench: {name}…", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        step()
        print(f"bench: {name} took {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    cpu = Path("/proc/cpuinfo").read_text()
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("model name")),
        "unknown CPU",
    )
    lines = [
        f"qrgate bench, {time.strftime('%Y-%m-%d')}, {model}, {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}",
        "",
        "| area | measure | result | target | met |",
        "|---|---|---|---|---|",
    ]
    verdict = {True: "yes", False: "**no**", None: ""}
    lines += [f"| {a} | {m} | {v} | {t} | {verdict[ok]} |" for a, m, v, t, ok in rows]
    missed = sum(ok is False for *_, ok in rows)
    lines += ["", f"{missed} target(s) missed." if missed else "Every target met."]
    text = "\n".join(lines)
    print(text)
    if args.only:  # a partial table must not replace the whole one
        print("bench: --only: bench.md left as it was", file=sys.stderr)
    else:
        (REPO / "bench.md").write_text(text + "\n")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
