"""Hardware-in-the-loop tests: a real Raspberry Pi, its camera module and its GPIO lines.

They run only with ``QRGATE_HIL=1``; otherwise the module is skipped and says how to run it.
``QRGATE_HIL=1`` on a machine that is not a Raspberry Pi is an error, not a skip. On the Pi,
from the repository, with the venv made with ``--system-site-packages`` (picamera2, lgpio)::

    QRGATE_HIL=1 QRGATE_HIL_LOOPBACK=26:16 .venv/bin/python -m pytest tests/hil -v
    sudo QRGATE_HIL=1 QRGATE_HIL_LOOPBACK=26:16 .venv/bin/python -m pytest tests/hil -v  # + systemd

Environment:

- ``QRGATE_HIL=1``: run these tests.
- ``QRGATE_HIL_CAMERA``: the camera number (default 0).
- ``QRGATE_HIL_LOOPBACK=OUT:IN``: two free BCM pins joined by a jumper wire (26:16 is header
  pin 37 to 36, both free in README's wiring table), nothing else on them. Without it the GPIO
  loopback and cold-start tests are skipped, saying so.
- The systemd test needs root and ``systemd-run``; without them it is skipped, saying so.
"""

from __future__ import annotations

import itertools
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

HIL_ENV = "QRGATE_HIL"
CAMERA_ENV = "QRGATE_HIL_CAMERA"
LOOPBACK_ENV = "QRGATE_HIL_LOOPBACK"
MODEL_FILE = Path("/proc/device-tree/model")
HOW_TO_RUN = (
    f"hardware-in-the-loop tests: set {HIL_ENV}=1 on a Raspberry Pi with a camera module and"
    " the wiring in README's installer section (optional: "
    f"{LOOPBACK_ENV}=OUT:IN for two BCM pins joined by a jumper, {CAMERA_ENV}=N)"
)


def board_model() -> str:
    """The device tree's model string ("Raspberry Pi 5 Model B Rev 1.0"); "" when absent."""
    try:
        return MODEL_FILE.read_bytes().rstrip(b"\0").decode(errors="replace").strip()
    except OSError:
        return ""


if os.environ.get(HIL_ENV) != "1":
    pytest.skip(HOW_TO_RUN, allow_module_level=True)

MODEL = board_model()
if "Raspberry Pi" not in MODEL:
    # asked for explicitly: on the wrong machine that is an error, never a quiet skip
    pytest.fail(
        f"{HIL_ENV}=1 but this is not a Raspberry Pi ({MODEL_FILE}: {MODEL or 'missing'};"
        f" machine {platform.machine()}): run the hardware tests on the Pi, or unset {HIL_ENV}",
        pytrace=False,
    )

# Imported after the guard: off the Pi nothing below may be needed to report the skip.
from gpiozero import DigitalInputDevice  # noqa: E402

from drivers.exceptions import CameraUnavailableError  # noqa: E402
from drivers.picamera import Picamera2Source  # noqa: E402
from drivers.pins import make_pin_factory  # noqa: E402
from drivers.relay import DoorRelay  # noqa: E402
from firmware.policy.badges import BadgeList, write_badges  # noqa: E402
from tests.firmware.daemons import QRGATE, Daemon, write_codes  # noqa: E402
from tests.polling import wait_until  # noqa: E402

pytestmark = pytest.mark.hardware

REPO = Path(__file__).resolve().parents[2]
CAMERA_NUM = int(os.environ.get(CAMERA_ENV, "0"))
SIZE = (640, 480)  # (width, height) of the gray frames
SNAPSHOT_SIZE = (1280, 960)  # same aspect ratio as SIZE
FPS = 30.0
NS = 1_000_000_000
# pins the daemon's config claims for LED and buzzer (README's wiring)
LED_PINS = {"red": 5, "green": 6, "blue": 13}
BUZZER_PIN = 12


# -- helpers ---------------------------------------------------------------------------------


def open_camera(**kw: Any) -> Picamera2Source:
    source = Picamera2Source(
        size=SIZE, fps=FPS, snapshot_size=SNAPSHOT_SIZE, camera_num=CAMERA_NUM, **kw
    )
    source.open()
    return source


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def metadata(source: Picamera2Source, count: int) -> list[dict[str, Any]]:
    """The metadata of the next ``count`` requests, read past the driver (which does not
    expose it) from the same thread that reads frames."""
    camera = source._camera
    assert camera is not None, "the camera is not open"
    return [camera.capture_metadata() for _ in range(count)]


def loopback() -> tuple[int, int]:
    """(OUT, IN) from QRGATE_HIL_LOOPBACK, or skip this test saying how to wire it."""
    text = os.environ.get(LOOPBACK_ENV, "").strip()
    if not text:
        pytest.skip(
            f"needs {LOOPBACK_ENV}=OUT:IN: two free BCM pins joined by a jumper wire and"
            " nothing else (e.g. 26:16, header pin 37 to 36)"
        )
    try:
        out_pin, in_pin = (int(part) for part in text.split(":"))
    except ValueError:
        pytest.fail(f"{LOOPBACK_ENV}={text!r}: expected OUT:IN, two BCM numbers like 26:16")
    if out_pin == in_pin:
        pytest.fail(f"{LOOPBACK_ENV}={text!r}: OUT and IN must be two different pins")
    return out_pin, in_pin


def level(watcher: DigitalInputDevice) -> int:
    """The raw line level (0 or 1) whatever the watcher's active state."""
    return int(watcher.pin.state)


@pytest.fixture
def factory() -> Iterator[Any]:
    """The real pin factory "auto" finds, closed after the test: on lgpio a closed device's
    line stays claimed until its factory closes, and the next test (or the daemon) needs it."""
    f = make_pin_factory("auto")
    yield f
    f.close()


def write_daemon_config(
    folder: Path, *, camera: str, pin_factory: str, relay_pin: int = 17
) -> Path:
    """A complete reader config in ``folder``: door "hil-door", an empty badge list."""
    (folder / "site.key").write_text(bytes(range(32)).hex())
    write_badges(folder / "badges.json", BadgeList.of(version=1))
    leds = ", ".join(f"{k} = {v}" for k, v in LED_PINS.items())
    path = folder / "qrgate.toml"
    path.write_text(f"""
[reader]
door = "hil-door"
state_dir = "state"

[camera]
{camera}
read_timeout_s = 2

[policy]
badges = "badges.json"
hmac_key = "site.key"

[gpio]
pin_factory = "{pin_factory}"
relay_pin = {relay_pin}
pulse_s = 0.3
led = {{ {leds} }}
buzzer_pin = {BUZZER_PIN}
""")
    return path


def picamera_config() -> str:
    return (
        f'source = "picamera2"\ncamera_num = {CAMERA_NUM}\nwidth = {SIZE[0]}\n'
        f"height = {SIZE[1]}\nsnapshot_width = {SNAPSHOT_SIZE[0]}\n"
        f"snapshot_height = {SNAPSHOT_SIZE[1]}\nfps = {FPS}"
    )


def pulse_in_another_process(pin: int) -> None:
    """One 0.3 s relay pulse on ``pin`` from a separate process (its own GPIO claim)."""
    script = (
        "import sys\n"
        "from drivers.pins import make_pin_factory\n"
        "from drivers.relay import DoorRelay\n"
        "f = make_pin_factory('auto')\n"
        "r = DoorRelay(int(sys.argv[1]), pin_factory=f, pulse_s=0.3)\n"
        "r.pulse()\n"
        "r.wait_locked(5)\n"
        "r.close()\n"
        "f.close()\n"
    )
    subprocess.run([sys.executable, "-c", script, str(pin)], cwd=REPO, check=True, timeout=60)


def systemctl_show(unit: str) -> dict[str, str]:
    out = subprocess.run(
        ["systemctl", "show", unit, "-p", "ActiveState,SubState,StatusText,MainPID,Result"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


# -- camera ----------------------------------------------------------------------------------


def test_picamera2_frames_snapshot_and_focus() -> None:
    source = open_camera()
    try:
        frames = []
        for _ in range(60):
            frame = source.read(timeout_s=5.0)
            assert frame is not None
            now = time.monotonic_ns()
            assert 0 <= now - frame.t_ns <= 2 * NS, "t_ns is not on the monotonic clock"
            frames.append(frame)
        for f in frames:
            assert f.image.shape == (SIZE[1], SIZE[0])
            assert f.image.dtype == np.uint8
        assert [f.seq for f in frames] == list(range(60))
        stamps = [f.t_ns for f in frames]
        assert all(b > a for a, b in itertools.pairwise(stamps))
        interval_s = statistics.median(b - a for a, b in itertools.pairwise(stamps))
        assert abs(interval_s / NS - 1 / FPS) <= 0.2 / FPS, f"median interval {interval_s} ns"

        snap = source.snapshot(timeout_s=5.0)
        assert snap.shape == (SNAPSHOT_SIZE[1], SNAPSHOT_SIZE[0], 3)
        assert snap.dtype == np.uint8

        camera = source._camera
        assert camera is not None
        has_af = "AfMode" in camera.camera_controls
        if has_af:
            assert_continuous_af(source)
        source.focus_cycle()
        # 4 s of frames: the driver follows the cycle in read() and gives continuous AF back
        # when it ends, 3 s at the latest
        for _ in range(int(4 * FPS)):
            assert source.read(timeout_s=5.0) is not None
        if has_af:
            assert source._focus_started_ns is None, "the focus cycle was never handed back"
            assert_continuous_af(source)
    finally:
        source.close()


def assert_continuous_af(source: Picamera2Source) -> None:
    """Continuous AF is running: libcamera reports AfState, never Idle in continuous mode
    (Idle is manual mode, or auto mode with no scan triggered); metadata carries AfMode on
    some pipelines only, and then it must say continuous."""
    from libcamera import controls

    seen = metadata(source, 15)
    assert all("AfState" in m for m in seen), f"no AfState in metadata: {seen[-1]}"
    states = [int(m["AfState"]) for m in seen]
    assert int(controls.AfStateEnum.Idle) not in states, states
    modes = [m["AfMode"] for m in seen if "AfMode" in m]
    assert all(int(m) == int(controls.AfModeEnum.Continuous) for m in modes), modes


def test_picamera2_reopening_leaks_no_file_descriptors() -> None:
    for _ in range(2):  # the first opens load libcamera and its IPA: not a leak
        open_camera().close()
    before = fd_count()
    for _ in range(20):
        source = open_camera()
        try:
            frame = source.read(timeout_s=5.0)
            assert frame is not None and frame.image.shape == (SIZE[1], SIZE[0])
        finally:
            source.close()
    assert abs(fd_count() - before) <= 2, f"fds {before} -> {fd_count()}"


def test_a_busy_camera_is_unavailable_and_opens_once_freed() -> None:
    first = open_camera()
    second = Picamera2Source(size=SIZE, fps=FPS, snapshot_size=SNAPSHOT_SIZE, camera_num=CAMERA_NUM)
    try:
        with pytest.raises(CameraUnavailableError) as err:
            second.open()
        assert "busy" in str(err.value).lower(), str(err.value)
        first.close()
        second.open()
        frame = second.read(timeout_s=5.0)
        assert frame is not None and frame.image.shape == (SIZE[1], SIZE[0])
    finally:
        second.close()
        first.close()


def test_a_camera_held_by_another_process_is_unavailable_until_it_exits() -> None:
    script = (
        "import sys\n"
        "from drivers.picamera import Picamera2Source\n"
        "s = Picamera2Source(camera_num=int(sys.argv[1]))\n"
        "s.open()\n"
        "print('open', flush=True)\n"
        "sys.stdin.read()\n"
        "s.close()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(CAMERA_NUM)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    source = Picamera2Source(size=SIZE, fps=FPS, snapshot_size=SNAPSHOT_SIZE, camera_num=CAMERA_NUM)
    try:
        assert holder.stdout.readline() == "open\n", "the holder process could not open it"
        with pytest.raises(CameraUnavailableError) as err:
            source.open()
        assert "busy" in str(err.value).lower(), str(err.value)
        holder.stdin.close()
        assert holder.wait(30) == 0
        source.open()
        assert source.read(timeout_s=5.0) is not None
    finally:
        source.close()
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


# -- GPIO ------------------------------------------------------------------------------------


def test_auto_finds_a_working_pin_factory(factory: Any) -> None:
    name = type(factory).__name__
    assert factory.board_info.model, f"{name} cannot describe this board"
    if MODEL.startswith("Raspberry Pi 5"):
        assert name == "LGPIOFactory", f"a Pi 5 needs lgpio, auto chose {name}"


@pytest.mark.parametrize("active_high", [True, False], ids=["active-high", "active-low"])
def test_relay_pulses_on_a_real_line_and_rests_locked(factory: Any, active_high: bool) -> None:
    out_pin, in_pin = loopback()
    rest, on = (0, 1) if active_high else (1, 0)
    # the watcher's pull stands in for the relay board's input: an active-low board pulls
    # its input up, so a released line reads "off" on it, and a line left driven does not
    watcher = DigitalInputDevice(in_pin, pull_up=not active_high, pin_factory=factory)
    relay = DoorRelay(out_pin, pin_factory=factory, active_high=active_high, pulse_s=0.3)
    try:
        assert level(watcher) == rest, "the relay did not start locked"
        started_ns = relay.pulse(0.3)
        assert wait_until(lambda: level(watcher) == on, 0.1), "the pulse never reached IN"
        assert relay.is_unlocked
        assert wait_until(lambda: level(watcher) == rest, 2.0), "the pulse never ended"
        took_s = (time.monotonic_ns() - started_ns) / NS
        assert 0.3 <= took_s <= 0.4, f"a 0.3 s pulse lasted {took_s:.3f} s"
        assert not relay.is_unlocked
        relay.close()
        for _ in range(20):  # a line left driven would read "on" for as long as we look
            assert level(watcher) == rest, "close() left the relay energised"
            threading.Event().wait(0.01)
    finally:
        relay.close()
        watcher.close()


# -- the daemon on real hardware -------------------------------------------------------------


def test_daemon_start_and_stop_never_pulse_the_relay(factory: Any, tmp_path: Path) -> None:
    out_pin, in_pin = loopback()
    busy = {out_pin, in_pin} & {*LED_PINS.values(), BUZZER_PIN}
    if busy:
        pytest.fail(f"{LOOPBACK_ENV}: pins {sorted(busy)} are the daemon's LED/buzzer pins")
    config = write_daemon_config(
        tmp_path, camera=picamera_config(), pin_factory="auto", relay_pin=out_pin
    )
    activations: list[int] = []
    watcher = DigitalInputDevice(in_pin, pull_up=False, pin_factory=factory)
    # a Pi 5 lets one process claim a line: this process holds IN only, the daemon OUT
    watcher.when_activated = lambda: activations.append(time.monotonic_ns())
    try:
        assert level(watcher) == 0
        pulse_in_another_process(out_pin)  # proves the watcher sees a pulse at all
        assert wait_until(lambda: len(activations) == 1, 2.0), activations
        activations.clear()
        for run in range(5):
            daemon = Daemon(config)
            try:
                assert daemon.wait_for(r"reader (ready|started)", 60), daemon.tail()
                threading.Event().wait(1.0)  # let it run a while, camera and all
                assert level(watcher) == 0, f"run {run}: relay energised while idle"
                sig = signal.SIGTERM if run % 2 == 0 else signal.SIGKILL
                daemon.proc.send_signal(sig)
                code = daemon.finish()
                assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), daemon.tail()
            finally:
                daemon.kill()
        assert activations == [], f"the relay pulsed {len(activations)} times at start/stop"
        assert level(watcher) == 0
    finally:
        watcher.close()


def test_under_systemd_it_is_ready_with_a_status_and_feeds_the_watchdog(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the systemd test starts a transient service: run pytest as root (sudo)")
    if shutil.which("systemd-run") is None:
        pytest.skip("systemd-run is not installed")
    reel = write_codes(tmp_path / "reel", [b"QRG-HIL"])
    camera = f'source = "replay"\npath = "{reel}"\nfps = 10\nloop = true'
    config = write_daemon_config(tmp_path, camera=camera, pin_factory="mock")
    unit = f"qrgate-hil-{uuid.uuid4().hex[:8]}"
    start = [
        "systemd-run",
        f"--unit={unit}",
        "--collect",
        "--no-block",
        "--quiet",
        "-p",
        "Type=notify",
        "-p",
        "WatchdogSec=4",
        "-p",
        f"WorkingDirectory={REPO}",
        *QRGATE,
        "run",
        "--config",
        str(config),
    ]
    subprocess.run(start, check=True, timeout=30)
    try:
        state: dict[str, str] = {}

        def running() -> bool:
            state.update(systemctl_show(unit))
            return state["ActiveState"] == "active" and "camera ok" in state["StatusText"]

        assert wait_until(running, 60), state
        assert state["StatusText"].startswith("door hil-door:"), state
        pid = state["MainPID"]
        # two watchdog intervals: without pings systemd would have killed it by now
        threading.Event().wait(8.0)
        state.update(systemctl_show(unit))
        assert (state["ActiveState"], state["MainPID"]) == ("active", pid), state
        subprocess.run(["systemctl", "stop", unit], check=True, timeout=60)
        state.update(systemctl_show(unit))
        assert state["ActiveState"] in ("inactive", "failed"), state
        assert state["Result"] in ("success", ""), state
    finally:
        subprocess.run(["systemctl", "stop", unit], check=False, capture_output=True, timeout=60)
        subprocess.run(
            ["systemctl", "reset-failed", unit], check=False, capture_output=True, timeout=30
        )
