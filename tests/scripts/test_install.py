"""scripts/install.sh staged into a temporary folder with --root: the layout, idempotence, the
atomic `current` switch, a config never overwritten, and --uninstall / --purge; shellcheck
clean. The venv is real (made with this Python); --no-pip leaves qrgate itself out of it, since
pip would need the network to build it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from firmware import __version__
from firmware.config import load_config

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install.sh"


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run install.sh into ``root``; fails the test on a non-zero exit."""
    r = subprocess.run(
        [str(INSTALL), "--root", str(root), "--python", sys.executable, "--no-pip", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "LC_ALL": "C"},
    )
    assert r.returncode == 0, r.stderr
    return r


def tree(root: Path) -> dict[str, str]:
    """relative path -> what it is (link target, file digest and mode, or dir mode)."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = f"dir {p.stat().st_mode & 0o7777:o}"
        else:
            digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            out[rel] = f"file {p.stat().st_mode & 0o7777:o} {digest}"
    return out


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck not found: install the Debian package shellcheck (setup.sh --test)")
    r = subprocess.run(
        [shellcheck, "--severity=style", str(INSTALL)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (r.returncode, r.stdout) == (0, "")


def test_install_layout(tmp_path: Path) -> None:
    root = tmp_path / "sd"
    r = install(root)
    opt = root / "opt" / "qrgate"
    release = opt / "releases" / __version__
    # current is a relative link to the release, valid inside the image as on the Pi
    assert os.readlink(opt / "current") == f"releases/{__version__}"
    assert (opt / "current").resolve() == release.resolve()
    assert (release / ".qrgate-release").read_text() == f"{__version__}\n"
    assert (release / "README.md").read_bytes() == (REPO / "README.md").read_bytes()
    # a real venv that sees the system's packages (Debian's picamera2, lgpio, systemd)
    cfg = (release / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg
    prefix = subprocess.run(
        [str(opt / "current" / "bin" / "python"), "-c", "import sys; print(sys.prefix)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert Path(prefix).resolve() == release.resolve()
    # the unit, as shipped
    unit = root / "etc" / "systemd" / "system" / "qrgate.service"
    assert unit.read_bytes() == (REPO / "scripts" / "qrgate.service").read_bytes()
    assert unit.stat().st_mode & 0o777 == 0o644
    # config and state folders, not world-readable
    etc, state = root / "etc" / "qrgate", root / "var" / "lib" / "qrgate"
    assert etc.stat().st_mode & 0o777 == 0o750
    assert state.is_dir() and state.stat().st_mode & 0o777 == 0o750
    example = etc / "qrgate.toml"
    assert example.stat().st_mode & 0o777 == 0o640
    # the example parses as the daemon would read it (its paths pointed into the stage)
    text = example.read_text().replace('"/var/lib/qrgate"', f'"{state}"')
    (tmp_path / "qrgate.toml").write_text(text)
    config = load_config(tmp_path / "qrgate.toml")
    assert config.reader.state_dir == state
    assert (config.camera.source, config.gpio.pin_factory) == ("picamera2", "auto")
    assert config.policy.badges == tmp_path / "badges.json"  # relative to the config's folder
    # nothing outside the stage: what it would do to the system is only said
    said = r.stderr
    assert (
        "would run (for those missing): apt-get install -y python3-picamera2 libzbar0 "
        "python3-lgpio python3-venv python3-systemd"
    ) in said
    assert (
        "would run (unless passwd entry qrgate exists): useradd --system --user-group "
        "--home-dir /var/lib/qrgate --no-create-home --shell /usr/sbin/nologin "
        "--comment 'qrgate door reader' qrgate"
    ) in said
    assert "would run: usermod --append --groups gpio,video qrgate" in said
    assert f"would run: chown qrgate:qrgate {state}" in said
    assert "would run: systemctl enable qrgate.service" in said
    assert not (tmp_path / "opt").exists()


def test_install_twice_is_idempotent_and_keeps_an_edited_config(tmp_path: Path) -> None:
    root = tmp_path / "sd"
    install(root)
    first = tree(root)
    r = install(root)
    assert tree(root) == first
    assert f"release {__version__} is installed already" in r.stderr
    config = root / "etc" / "qrgate" / "qrgate.toml"
    config.write_text(config.read_text().replace('door = "front-door"', 'door = "side-door"'))
    edited = config.read_bytes()
    r = install(root)
    assert config.read_bytes() == edited
    assert "kept" in r.stderr and "wrote an example" not in r.stderr


def test_upgrade_switches_current_and_keeps_the_old_release(tmp_path: Path) -> None:
    root = tmp_path / "sd"
    opt = root / "opt" / "qrgate"
    old = opt / "releases" / "0.0.9"
    old.mkdir(parents=True)
    (old / ".qrgate-release").write_text("0.0.9\n")
    (opt / "current").symlink_to("releases/0.0.9")
    install(root)
    assert os.readlink(opt / "current") == f"releases/{__version__}"
    assert old.is_dir()  # kept for a rollback (ln -sfn releases/0.0.9 current.new; mv -T ...)
    assert not (opt / "current.new").exists()


def test_unfinished_release_is_rebuilt(tmp_path: Path) -> None:
    root = tmp_path / "sd"
    release = root / "opt" / "qrgate" / "releases" / __version__
    release.mkdir(parents=True)
    (release / "half-written").write_text("")  # an install cut off before its stamp
    install(root)
    assert not (release / "half-written").exists()
    assert (release / ".qrgate-release").is_file() and (release / "bin" / "python").exists()


def test_uninstall_keeps_config_and_state_and_purge_removes_them(tmp_path: Path) -> None:
    root = tmp_path / "sd"
    install(root)
    config = root / "etc" / "qrgate" / "qrgate.toml"
    config.write_text(config.read_text() + "# mine\n")
    journal = root / "var" / "lib" / "qrgate" / "journal.db"
    journal.write_bytes(b"rows")
    r = install(root, "--uninstall")
    assert not (root / "opt" / "qrgate").exists()
    assert not (root / "etc" / "systemd" / "system" / "qrgate.service").exists()
    assert config.read_text().endswith("# mine\n")
    assert journal.read_bytes() == b"rows"
    assert "would run: systemctl disable --now qrgate.service" in r.stderr
    install(root, "--uninstall")  # again: nothing left to remove, no error
    r = install(root, "--uninstall", "--purge")
    assert not (root / "etc" / "qrgate").exists()
    assert not (root / "var" / "lib" / "qrgate").exists()
    assert "would run (when the user exists): userdel qrgate" in r.stderr


def test_bad_options(tmp_path: Path) -> None:
    stage = str(tmp_path / "sd")
    # always with a stage first: a parsing bug must not make the test install on this machine
    for args, message in (
        (["--root", stage, "--purge"], "--purge goes with --uninstall"),
        (["--root", stage, "--frobnicate"], "unknown option --frobnicate"),
        (["--root", stage, "--root"], "usage: install.sh"),
    ):
        r = subprocess.run(
            [str(INSTALL), *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    r = subprocess.run(
        [str(INSTALL), "--root", stage, "--help"], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0 and "--uninstall" in r.stdout
    assert not (tmp_path / "sd" / "opt").exists()


@pytest.mark.parametrize("args", [["--root", ""], ["--root="], ["--root", "--no-pip"]])
def test_an_empty_or_missing_root_is_refused_not_taken_for_this_machine(args: list[str]) -> None:
    r = subprocess.run(
        ["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 2
    assert "--root needs a folder" in r.stderr
    assert "apt-get" not in r.stderr and "would run" not in r.stderr


def test_the_updater_unit_is_installed_enabled_and_removed(tmp_path: Path) -> None:
    root = tmp_path / "sd"
    units = root / "etc" / "systemd" / "system"
    r = install(root)
    unit = units / "qrgate-updater.service"
    assert unit.read_bytes() == (REPO / "scripts" / "qrgate-updater.service").read_bytes()
    assert unit.stat().st_mode & 0o777 == 0o644
    assert "would run: systemctl enable qrgate.service qrgate-updater.service" in r.stderr
    # its state folder comes from StateDirectory= at its first start; a purge removes it
    updater_state = root / "var" / "lib" / "qrgate-updater"
    updater_state.mkdir()
    (updater_state / "job.json").write_text("{}")
    r = install(root, "--uninstall")
    assert not unit.exists() and not (units / "qrgate.service").exists()
    said = r.stderr
    assert said.index("disable --now qrgate-updater.service") < said.index(
        "disable --now qrgate.service"
    )
    assert (updater_state / "job.json").exists()  # kept without --purge
    install(root, "--uninstall", "--purge")
    assert not updater_state.exists()
