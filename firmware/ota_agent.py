"""The updater service (``qrgate ota agent``, unit ``qrgate-updater.service``, runs as root):
wires the ``ota`` package to the reader's config and runs :class:`ota.agent.Agent`.

It reads the same config file as the daemon: ``[ota]`` for the repository, trust root,
folders and timings, ``[uplink]`` (with what provisioning mode wrote laid over it) for the
broker, the site and the TLS files. It connects with its own MQTT client id,
``qrgate-<device>-updater``, so it never takes the daemon's session over.

Exit codes: 0 after SIGTERM/SIGINT; 2 for a config that cannot work (fix it, then
``systemctl restart qrgate-updater``; the unit does not restart on 2); 3 when it cannot start
for another reason (systemd restarts it).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click

from firmware.config import DEVICE_TYPES, Config
from firmware.exceptions import ConfigError, QrgateError
from provisioning.files import NotRegularFileError, read_regular

if TYPE_CHECKING:
    from ota.agent import Agent, Connection

log = logging.getLogger("qrgate.ota")

TRUSTED_ROOT_CAP = 512 * 1024
"""Largest trusted root.json read (bytes): a root with a few keys is a few KB."""

MODEL_FILE = Path("/proc/device-tree/model")
"""The board's model string (NUL-terminated), e.g. "Raspberry Pi 5 Model B Rev 1.0"."""

SYSTEM_PYTHON = "/usr/bin/python3"
"""The base interpreter of release venvs: Debian's, so they see python3-picamera2."""


class SystemClock:
    """The wall clock and whether NTP synchronised it: the kernel's answer (adjtimex(2)),
    or systemd-timesyncd's flag file when the kernel cannot be asked."""

    def __init__(self, flag: Path | None = None) -> None:
        from firmware.clock import TIMESYNC_FLAG, KernelClock

        self._kernel = KernelClock(flag or TIMESYNC_FLAG)

    def wall_ns(self) -> int:
        """Now, ns since the epoch."""
        return time.time_ns()

    def synced(self) -> bool:
        """True once the clock is synchronised."""
        return self._kernel()


# board families by the SoC they share: a Pi 400 and a CM4 run what a Pi 4 runs
_MODELS = (
    ("Raspberry Pi 5", "rpi5"),
    ("Raspberry Pi Compute Module 5", "rpi5"),
    ("Raspberry Pi 500", "rpi5"),
    ("Raspberry Pi 4", "rpi4"),
    ("Raspberry Pi 400", "rpi4"),
    ("Raspberry Pi Compute Module 4", "rpi4"),
)


def detect_device_type(model_file: Path = MODEL_FILE) -> str:
    """ "rpi4" or "rpi5" from the device tree's model string. Raises ConfigError (key
    ``ota.device_type``) when the file is missing or names another board: set the key."""
    try:
        model = model_file.read_bytes()[:256].rstrip(b"\x00").decode("ascii", "replace")
    except OSError as e:
        model = f"nothing readable at {model_file} ({e.strerror})"
    # longest prefix first: "Raspberry Pi 500" must not be read as "Raspberry Pi 5"
    for prefix, device_type in sorted(_MODELS, key=lambda m: -len(m[0])):
        if model.startswith(prefix + " ") or model == prefix:
            return device_type
    raise ConfigError(
        str(model_file),
        "ota.device_type",
        " or ".join(repr(t) for t in DEVICE_TYPES) + " (set it in [ota]: the board is not known)",
        repr(model) if model else "an empty model string",
    )


def broker_connector(config: Config, device: str) -> Callable[[], Connection]:
    """A factory of connected :class:`ota.mqtt.PahoTransport` sessions to the ``[uplink]``
    broker, one new client per call. Raises ConfigError (uplink off, a missing TLS file, an
    unreadable password file) at once; the factory raises FleetTransportError."""
    from firmware.backoffice.mqtt import MqttSettings
    from firmware.daemon import link_settings
    from ota.exceptions import FleetTransportError
    from ota.mqtt import PahoTransport

    if not config.uplink.enabled:
        raise ConfigError(
            config.source,
            "uplink.enabled",
            "true: the updater takes its jobs from the broker of [uplink]",
            "false",
        )
    link = link_settings(config, device)
    settings = MqttSettings(
        host=link.host,
        port=link.port,
        tls=link.transport == "tls",
        ca_file=link.ca,
        cert_file=link.cert,
        key_file=link.key,
        username=link.username,
        password=link.password,
        keepalive_s=link.keepalive_s,
    )
    client_id = f"{link.client_id}-updater"

    def connect() -> Connection:
        try:
            # certificates are read again on every attempt: a renewed one is picked up
            client = settings.client(client_id)
        except (OSError, ValueError) as e:
            raise FleetTransportError(f"cannot load the MQTT TLS files: {e}") from e
        transport = PahoTransport(
            client,
            link.host,
            link.port,
            keepalive_s=link.keepalive_s,
            timeout_s=link.connect_timeout_s,
        )
        transport.connect()
        return transport

    return connect


def load_trusted_root(config: Config) -> bytes:
    """The bytes of ``[ota] trusted_root``, checked to be TUF root metadata. Raises
    ConfigError (key ``ota.trusted_root``) when it is unreadable or not a root.json."""
    from ota.exceptions import OtaError
    from ota.fetch import check_trusted_root

    path = config.ota.trusted_root
    try:
        data, _mode = read_regular(path, TRUSTED_ROOT_CAP)
        check_trusted_root(data)
    except (OSError, NotRegularFileError, OtaError) as e:
        raise ConfigError(
            config.source, "ota.trusted_root", "a readable TUF root.json", f"{path}: {e}"
        ) from None
    return data


def build_agent(config: Config, *, device: str) -> Agent:
    """The update agent of ``config`` for the reader ``device``: Fetcher (TUF client over the
    resumable downloader), Updater with the real installer, systemd supervisor of
    ``qrgate.service`` and the daemon's activity file, and the ``[uplink]`` broker. Raises
    ConfigError for a config it cannot work with (``ota.repo_url``/``ota.trusted_root``
    unset or unreadable, uplink off, an unknown board)."""
    from ota.agent import Agent
    from ota.fetch import Fetcher
    from ota.health import ActivityFile, SystemdSupervisor
    from ota.install import install_release
    from ota.job import Job, JobStore
    from ota.releases import Releases
    from ota.updater import Updater

    o = config.ota
    if not o.repo_url:
        raise ConfigError(
            config.source, "ota.repo_url", "the TUF repository's http(s) URL", "nothing"
        )
    trusted_root = load_trusted_root(config)
    device_type = o.device_type or detect_device_type()
    connect = broker_connector(config, device)
    state = o.state_dir
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    (state / "metadata").mkdir(mode=0o700, exist_ok=True)
    (state / "cache").mkdir(mode=0o700, exist_ok=True)
    releases = Releases(o.install_root)
    max_bytes = o.max_bundle_mb * 1024 * 1024
    fetcher = Fetcher(
        state / "metadata",
        state / "cache",
        o.repo_url,
        trusted_root,
        max_bundle_bytes=max_bytes,
    )

    def installer(bundle: Path, version: str) -> Path:
        return install_release(
            bundle,
            releases,
            version,
            python=SYSTEM_PYTHON,
            pip=None,  # each release gets its own pip, so it can install the next one
            max_bytes=max_bytes,
        )

    def make_updater(report: Callable[[Job], None]) -> Updater:
        return Updater(
            store=JobStore(state / "job.json"),
            releases=releases,
            fetcher=fetcher,
            installer=installer,
            supervisor=SystemdSupervisor(unit="qrgate.service"),
            activity=ActivityFile(o.activity_file, quiet_s=o.quiet_s),
            report=report,
            clock=SystemClock(),
            device_type=device_type,
            python_tag=f"cp{sys.version_info.major}{sys.version_info.minor}",
            keep=o.keep,
            health_deadline_s=o.health_deadline_s,
            clock_wait_s=o.clock_wait_s,
        )

    def current_version() -> str | None:
        return releases.current_version()

    u = config.uplink
    return Agent(
        make_updater,
        connect=connect,
        site=u.site,
        device=device,
        state_dir=state,
        current_version=current_version,
        backoff_min_s=u.reconnect_min_s,
        backoff_max_s=u.reconnect_max_s,
    )


@click.command("agent")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    required=True,
    help="The reader's TOML config file ([ota] and [uplink]).",
)
@click.option("-v", "--verbose", is_flag=True)
def ota_agent_command(config_path: Path, verbose: bool) -> None:
    """Run the updater service until SIGTERM or SIGINT: take update jobs from the broker,
    install them, restart the reader at a door-idle moment, commit or roll back, report.

    A job cut short (kill, power cut) carries on at the next start. Exit 2: the config
    cannot work (the message names the key); 3: another start failure."""
    from firmware.config import load_config
    from firmware.daemon import with_provisioned
    from ota.exceptions import OtaError
    from provisioning.exceptions import ProvisioningError
    from provisioning.identity import device_id

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        device = device_id()
        # the broker and certificate provisioning mode wrote, as the daemon sees them
        config = with_provisioned(load_config(config_path), device)
        agent = build_agent(config, device=device)
    except ConfigError as e:
        click.echo(f"qrgate ota agent: {e}", err=True)
        sys.exit(2)
    except (QrgateError, OtaError, ProvisioningError, OSError) as e:
        click.echo(f"qrgate ota agent: cannot start: {e}", err=True)
        sys.exit(3)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    started = time.monotonic()
    log.info("updater for %s started (repository %s)", device, config.ota.repo_url)
    agent.run(stop)
    log.info("updater stopped after %.0f s: %s", time.monotonic() - started, agent.stats)
