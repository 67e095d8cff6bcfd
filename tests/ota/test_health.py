"""The health gate: a real child speaking sd_notify over a real NOTIFY_SOCKET (a stand-in
daemon and the real ``qrgate run``), systemd through a fake ``systemctl`` printing ``show``
output in the real format, and the door-idle wait."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ota.exceptions import OtaError, UnhealthyError
from ota.health import (
    ActivityFile,
    Probe,
    SubprocessSupervisor,
    SystemdSupervisor,
    parse_show,
    wait_door_idle,
    wait_healthy,
)
from tests.firmware.conftest import no_leaks
from tests.firmware.test_daemon_process import looping_config
from tests.polling import wait_until

__all__ = ["no_leaks"]  # a fixture: no child or listener thread may outlive a test

pytestmark = pytest.mark.usefixtures("no_leaks")

FAKE = Path(__file__).with_name("fake_daemon.py")
_ENTRY = Path(sys.executable).with_name("qrgate")
# the console script pip made for the working tree (the entry point a release runs)
QRGATE = [_ENTRY] if _ENTRY.exists() else [Path(sys.executable), "-m", "firmware.cli"]


@pytest.fixture
def notify_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # a short path: AF_UNIX socket paths are limited to 107 bytes
    return tmp_path_factory.mktemp("n")


@pytest.fixture
def supervised(notify_dir: Path) -> Iterator[list[SubprocessSupervisor]]:
    made: list[SubprocessSupervisor] = []
    yield made
    for s in made:
        s.close()


def start(
    made: list[SubprocessSupervisor], notify_dir: Path, mode: str, *args: str
) -> SubprocessSupervisor:
    sup = SubprocessSupervisor(
        lambda: [sys.executable, str(FAKE), mode, *args], notify_dir=notify_dir, watchdog_s=0.4
    )
    made.append(sup)
    sup.restart()
    return sup


def test_healthy_child_passes_the_gate(
    supervised: list[SubprocessSupervisor], notify_dir: Path
) -> None:
    sup = start(supervised, notify_dir, "good")
    probe = wait_healthy(sup, deadline_s=30, min_pings=3)
    assert probe.ready and probe.running and probe.exit_code is None
    assert probe.watchdog_pings >= 3
    assert "MQTT connected" in probe.status
    pid = sup.pid
    sup.restart()  # the old process is stopped (SIGTERM) and a new one counted from zero
    assert sup.pid != pid
    assert wait_healthy(sup, deadline_s=30, min_pings=3).ready
    sup.close()
    assert not sup.probe().running
    assert sup.probe().exit_code == 0  # it stopped on SIGTERM, cleanly
    sup.close()  # idempotent


# Each case first waits (untimed) until the child shows what the case is about, so a slow
# machine cannot turn one reason into another; then a short deadline decides.
UNHEALTHY = [
    ("crash", lambda p: not p.running, "exited_at_start", "exit code 3"),
    ("never_ready", lambda p: "starting" in p.status, "not_ready", "no READY=1"),
    ("no_pings", lambda p: p.ready, "no_frames", "0 watchdog pings of 3"),
    ("no_broker", lambda p: p.watchdog_pings >= 3, "broker_not_connected", "MQTT connecting"),
]


@pytest.mark.parametrize(("mode", "shows", "reason", "detail"), UNHEALTHY)
def test_unhealthy_children_give_their_reason(  # noqa: PLR0917 - one per parametrized column
    supervised: list[SubprocessSupervisor],
    notify_dir: Path,
    mode: str,
    shows: Callable[[Probe], bool],
    reason: str,
    detail: str,
) -> None:
    sup = start(supervised, notify_dir, mode)
    assert wait_until(lambda: shows(sup.probe()), 30), sup.probe()
    with pytest.raises(UnhealthyError) as info:
        wait_healthy(sup, deadline_s=0.5, min_pings=3)
    assert info.value.reason == reason
    assert detail in info.value.detail
    assert isinstance(info.value, OtaError)


def test_broker_check_can_be_off(supervised: list[SubprocessSupervisor], notify_dir: Path) -> None:
    sup = start(supervised, notify_dir, "no_broker")
    assert wait_healthy(sup, deadline_s=30, min_pings=2, need_broker=False).ready


def test_a_child_ignoring_sigterm_is_killed(notify_dir: Path) -> None:
    sup = SubprocessSupervisor(
        lambda: [sys.executable, str(FAKE), "stubborn"],
        notify_dir=notify_dir,
        watchdog_s=0.4,
        stop_timeout_s=0.5,
    )
    try:
        sup.restart()
        assert wait_healthy(sup, deadline_s=30, min_pings=1).ready
    finally:
        sup.close()
    assert sup.probe().exit_code == -9


def test_datagrams_from_other_processes_are_ignored(
    supervised: list[SubprocessSupervisor], notify_dir: Path
) -> None:
    flag = notify_dir / "go"
    sup = start(supervised, notify_dir, "wait_file", str(flag))
    # a stray (or the old process's late) READY and ping, sent before the child speaks
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1\nSTATUS=impostor", str(sup.notify_path))
        s.sendto(b"WATCHDOG=1", str(sup.notify_path))
    flag.touch()
    assert wait_until(lambda: sup.probe().status == "hello", 30)
    probe = sup.probe()
    assert (probe.ready, probe.watchdog_pings, sup.messages) == (False, 0, 1)


def test_the_real_daemon_passes_the_gate(tmp_path: Path, notify_dir: Path) -> None:
    config = looping_config(tmp_path)
    sup = SubprocessSupervisor(
        lambda: [*QRGATE, "run", "--config", config], notify_dir=notify_dir, watchdog_s=2.0
    )
    try:
        sup.restart()
        probe = wait_healthy(sup, deadline_s=60, min_pings=3, need_broker=False)
        assert "door test-door" in probe.status
        assert "MQTT off" in probe.status  # the replay config has no uplink
    finally:
        sup.close()
    assert sup.probe().exit_code == 0, (notify_dir / "service.log").read_text()[-2000:]


class Scripted:
    """Probes from a list (the last repeats), for the gate's decisions on a fake clock."""

    def __init__(self, probes: list[Probe]) -> None:
        self.probes = probes
        self.calls = 0

    def restart(self) -> None:
        self.calls = 0

    def probe(self) -> Probe:
        self.calls += 1
        return self.probes[min(self.calls, len(self.probes)) - 1]


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_gate_decisions_on_a_fake_clock() -> None:
    starting = Probe(False, "waiting for the camera", 0, True, None, 0)
    ready = Probe(True, "door d: camera ok; MQTT connecting", 0, True, None, 0)
    good = Probe(True, "door d: camera ok; MQTT connected", 3, True, None, 0)
    t = FakeTime()
    sup = Scripted([starting, starting, ready, good])
    assert wait_healthy(sup, deadline_s=10, monotonic=t.monotonic, sleep=t.sleep) == good
    assert sup.calls == 4
    assert t.now == pytest.approx(0.6)
    # a service manager restarting a crashed service: exited at start, however it looks now
    restarted = Probe(True, "door d", 5, True, None, 1)
    with pytest.raises(UnhealthyError, match="exited_at_start"):
        wait_healthy(Scripted([restarted]), deadline_s=10, monotonic=t.monotonic, sleep=t.sleep)
    t.now = 0.0
    with pytest.raises(UnhealthyError) as info:
        wait_healthy(Scripted([ready]), deadline_s=5, monotonic=t.monotonic, sleep=t.sleep)
    assert info.value.reason == "no_frames"
    assert t.now == pytest.approx(5.0)


FAKE_SYSTEMCTL = textwrap.dedent(
    """\
    #!{python}
    import sys
    from pathlib import Path
    here = Path(__file__).parent
    with (here / "calls.log").open("a") as f:
        f.write(" ".join(sys.argv[1:]) + "\\n")
    if (here / "fail").exists():
        print("Failed to connect to bus: No such file or directory", file=sys.stderr)
        sys.exit(1)
    if sys.argv[1] == "show":
        sys.stdout.write((here / "show.txt").read_text())
    """
)


def show(**props: str) -> str:
    base = {
        "ActiveState": "active",
        "SubState": "running",
        "StatusText": "door front: camera ok; 12 scans (12 granted, 0 denied); MQTT connected",
        "NRestarts": "0",
        "ExecMainStatus": "0",
        "ExecMainCode": "0",
        "InvocationID": "0b1c5f6e2a3d4c5b8a7f6e5d4c3b2a19",
        "WatchdogTimestampMonotonic": "5123456789",
    }
    base.update(props)
    return "".join(f"{k}={v}\n" for k, v in base.items())


def test_systemd_supervisor_reads_systemctl_show(tmp_path: Path) -> None:
    tool = tmp_path / "systemctl"
    tool.write_text(FAKE_SYSTEMCTL.format(python=sys.executable))
    tool.chmod(0o755)
    state = tmp_path / "show.txt"
    state.write_text(show(NRestarts="2"))
    sup = SystemdSupervisor("qrgate.service", systemctl=[str(tool)])
    sup.restart()
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[-1] == "restart --no-block qrgate.service"
    assert calls[0].startswith("show -p ActiveState,SubState,StatusText,NRestarts,")
    # the queued restart has not happened: the old, healthy process must not count
    assert sup.probe() == Probe(False, "", 0, True, None, 0)
    new = "7d2e9a0b1c4f4e6a9b8c7d6e5f4a3b2c"
    state.write_text(
        show(
            InvocationID=new,
            ActiveState="activating",
            SubState="start",
            NRestarts="2",
            WatchdogTimestampMonotonic="0",
            StatusText="waiting for the camera",
        )
    )
    assert sup.probe() == Probe(False, "waiting for the camera", 0, True, None, 0)
    pings = 0
    for stamp in ("6000000000", "6000000000", "6500000000", "7000000000"):
        state.write_text(show(InvocationID=new, NRestarts="2", WatchdogTimestampMonotonic=stamp))
        pings = sup.probe().watchdog_pings
    assert pings == 3
    assert wait_healthy(sup, deadline_s=5, min_pings=3).ready
    # a crash loop: the process exited with 3 and systemd restarts it
    state.write_text(
        show(
            InvocationID=new,
            ActiveState="activating",
            SubState="auto-restart",
            NRestarts="3",
            ExecMainCode="1",
            ExecMainStatus="3",
        )
    )
    probe = sup.probe()
    assert (probe.running, probe.exit_code, probe.restarts) == (False, 3, 1)
    with pytest.raises(UnhealthyError, match="exit code 3"):
        wait_healthy(sup, deadline_s=5)
    state.write_text(
        show(
            InvocationID=new,
            ActiveState="failed",
            SubState="failed",
            ExecMainCode="2",
            ExecMainStatus="9",
            NRestarts="2",
        )
    )
    assert sup.probe().exit_code == -9  # killed by SIGKILL
    (tmp_path / "fail").touch()
    with pytest.raises(OSError, match="Failed to connect to bus"):
        sup.probe()


def test_parse_show_keeps_equals_in_values() -> None:
    assert parse_show("StatusText=a=b; MQTT connected\nNoValue\nNRestarts=0\n") == {
        "StatusText": "a=b; MQTT connected",
        "NRestarts": "0",
    }


def test_activity_file(tmp_path: Path) -> None:
    now = [100 * 10**9]
    path = tmp_path / "activity.json"
    act = ActivityFile(path, quiet_s=5, monotonic_ns=lambda: now[0])
    assert not act.busy()  # no file: the daemon is not running
    cases = [
        ({"last_scan_mono_ns": None, "relay_until_mono_ns": None}, False),
        ({"last_scan_mono_ns": now[0] - 4 * 10**9, "relay_until_mono_ns": None}, True),
        ({"last_scan_mono_ns": now[0] - 6 * 10**9, "relay_until_mono_ns": None}, False),
        ({"last_scan_mono_ns": None, "relay_until_mono_ns": now[0] + 1}, True),
        ({"last_scan_mono_ns": None, "relay_until_mono_ns": now[0]}, False),
    ]
    for obj, busy in cases:
        path.write_text(json.dumps(obj))
        assert act.busy() is busy, obj
    for damaged in ["{", "[]", '{"last_scan_mono_ns": "1", "relay_until_mono_ns": null}', "{}"]:
        path.write_text(damaged)
        assert act.busy() is False, damaged
    path.write_text("x" * 5000)
    assert act.busy() is False


def test_wait_door_idle_waits_and_says_so_once() -> None:
    looks = iter([True, True, True, False])

    class Door:
        def busy(self) -> bool:
            return next(looks)

    said: list[int] = []
    slept: list[float] = []
    assert (
        wait_door_idle(Door(), poll_s=0.5, on_busy=lambda: said.append(1), sleep=slept.append) == 3
    )
    assert said == [1]
    assert slept == [0.5, 0.5, 0.5]

    class Idle:
        def busy(self) -> bool:
            return False

    assert wait_door_idle(Idle(), on_busy=lambda: said.append(2), sleep=slept.append) == 0
    assert said == [1]
