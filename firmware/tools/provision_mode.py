"""``qrgate provision-mode``: the installer's one-minute set-up of a new reader.

Runs :class:`firmware.provisioning_mode.ProvisioningSession` with the camera, decoder and
feedback the config names (the daemon must not run: the instance lock is taken), until a
signed provisioning code is accepted (exit 0), the camera ends or the command is stopped
(SIGINT/SIGTERM; exit 1). Enrollment goes to the code's broker host on
``[provisioning] enroll_port`` with the provisioning-only user and password, over TLS trusting
``[provisioning] ca`` (:func:`provisioning.enroll.enroll` over
:class:`provisioning.mqtt_transport.PahoTransport`). Exit 2 for an unusable config.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import click

from firmware.exceptions import QrgateError

if TYPE_CHECKING:
    from firmware.config import Config
    from firmware.provisioning_mode import EnrollFn, ProvisioningSession
    from provisioning.qr import ProvisioningClaims

ENROLL_TIMEOUT_S = 30.0
NOT_AVAILABLE = "enrollment is not available in this build"


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"qrgate provision-mode: {message}", err=True)
    sys.exit(code)


def make_enroller(
    host_port: int, ca: Path, user: str, password: str, timeout_s: float
) -> EnrollFn | None:
    """The real ``enroll(claims, keys, device)``, or None when this build has no enrollment
    client (:mod:`provisioning.enroll`, :mod:`provisioning.mqtt_transport`)."""
    try:
        from provisioning.enroll import enroll
        from provisioning.mqtt_transport import PahoTransport
    except ImportError:
        return None
    from firmware.uplink.identity import client_id
    from provisioning.device import DeviceKeys

    def run(claims: ProvisioningClaims, keys: DeviceKeys, device: str) -> None:
        transport = PahoTransport(client_id(device))
        try:
            # the code names the broker's host; its enrollment listener is the firmware's
            transport.connect(claims.broker_host, host_port, str(ca), user, password)
            enroll(
                transport,
                keys,
                device,
                claims.token_id,
                claims.token_secret,
                site=claims.site,
                door=claims.door,
                timeout_s=timeout_s,
            )
        finally:
            transport.close()

    return run


@click.command("provision-mode")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    required=True,
    help="TOML config (the daemon's): camera, GPIO, state folder and [provisioning].",
)
@click.option(
    "--allow-plain-mqtt", is_flag=True, help="Accept codes naming an mqtt:// broker (labs only)."
)
def provision_mode(config_path: Path, allow_plain_mqtt: bool) -> None:
    """Wait for a signed provisioning code in front of the camera, then configure this reader,
    enroll it and confirm (rising beeps, green/blue blinks). Refused codes play the deny
    pattern with the reason logged; the reader keeps looking. Stop the daemon first."""
    from firmware.config import load_config

    try:
        config = load_config(config_path)
    except QrgateError as e:
        _fail(str(e), 2)
    try:
        enroll_fn = enroller_for(config)
    except QrgateError as e:
        _fail(str(e), 2)
    if enroll_fn is None:
        _fail(NOT_AVAILABLE, 1)
    sys.exit(_run(config, enroll_fn, allow_plain_mqtt))


def enroller_for(config: Config) -> EnrollFn | None:
    """The enrollment client ``[provisioning]`` describes (None: not in this build). Raises
    ConfigError when the section lacks the files installed with the firmware."""
    from firmware.exceptions import ConfigError

    p = config.provisioning
    if p.public_key is None or p.ca is None:
        raise ConfigError(
            config.source,
            "provisioning",
            "public_key and ca naming the files installed with the firmware",
            "them missing",
        )
    if p.enroll_password_file is None:
        raise ConfigError(
            config.source,
            "provisioning.enroll_password_file",
            "the enrollment password file",
            "none",
        )
    try:
        password = p.enroll_password_file.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            config.source,
            "provisioning.enroll_password_file",
            "a readable enrollment password file",
            str(e),
        ) from None
    return make_enroller(p.enroll_port, p.ca, p.enroll_user, password, ENROLL_TIMEOUT_S)


def run_provisioning(config: Config, notifier: Notifier, *, device: str | None = None) -> int:
    """Provisioning mode as the service runs it (``qrgate run`` on a reader with
    ``[provisioning]`` and no provisioned settings yet): READY=1 with a STATUS= line asking for
    the code, WATCHDOG=1 while the session goes round, STOPPING=1 at the end. Returns the exit
    status: 0 once provisioned (systemd's Restart= then starts the door reader on the new
    settings), 1 when stopped or failed, 2 for an unusable [provisioning] section."""
    try:
        enroll_fn = enroller_for(config)
    except QrgateError as e:
        click.echo(f"qrgate: {e}", err=True)
        return 2
    if enroll_fn is None:
        click.echo(f"qrgate: {NOT_AVAILABLE}", err=True)
        return 1
    return _run(config, enroll_fn, False, notifier=notifier, device=device)


class Notifier(Protocol):
    """What provisioning mode tells the service manager (drivers.systemd.ServiceNotifier)."""

    @property
    def watchdog_interval_s(self) -> float | None: ...
    def ready(self, status: str) -> None: ...
    def status(self, text: str) -> None: ...
    def watchdog(self) -> None: ...
    def stopping(self, status: str) -> None: ...


def _supervised(
    session: ProvisioningSession, stop: threading.Event, notifier: Notifier, device: str
) -> ProvisioningClaims | None:
    """Run the session on a thread; feed the watchdog only while its loop goes round."""
    result: list[ProvisioningClaims | None] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            result.append(session.run(stop))
        except BaseException as e:  # handed to the caller's thread below
            failure.append(e)

    worker = threading.Thread(target=body, name="qrgate-provisioning", daemon=True)
    worker.start()
    notifier.ready(f"provisioning mode: show this reader its provisioning code (device {device})")
    interval = notifier.watchdog_interval_s
    last_ping = 0
    while worker.is_alive():
        worker.join(min(0.25, interval / 8) if interval else 0.25)
        now = time.monotonic_ns()
        if (
            interval
            and now - session.beat_ns <= interval / 2 * 1e9
            and now - last_ping >= interval / 4 * 1e9
        ):
            notifier.watchdog()
            last_ping = now
    if failure:
        raise failure[0]
    claims = result[0] if result else None
    notifier.stopping(
        "provisioned: restarting as a door reader" if claims is not None else "stopping"
    )
    return claims


def _run(
    config: Config,
    enroll_fn: EnrollFn,
    allow_plain_mqtt: bool,
    *,
    notifier: Notifier | None = None,
    device: str | None = None,
) -> int:
    from drivers.exceptions import DriverError
    from drivers.pins import make_pin_factory
    from firmware.admin.provision import key_ring
    from firmware.clock import ClockTrust
    from firmware.daemon import make_feedback, make_source
    from firmware.decoding.registry import make_decoder
    from firmware.journal.ids import boot_id
    from firmware.lock import InstanceLock
    from firmware.policy.keys import load_public_key
    from firmware.provisioning_mode import ProvisioningSession
    from provisioning.exceptions import DeviceIdentityError
    from provisioning.identity import device_id

    p = config.provisioning
    assert p.public_key is not None and p.ca is not None  # checked by enroller_for
    if device is None:
        try:
            device = device_id()
        except DeviceIdentityError as e:
            click.echo(f"qrgate provision-mode: {e}", err=True)
            return 1
    try:
        keys = key_ring([load_public_key(p.public_key)])
    except QrgateError as e:
        _fail(f"[provisioning] public_key: {e}", 2)
    state = config.reader.state_dir
    state.mkdir(parents=True, exist_ok=True)
    lock = InstanceLock(state / "qrgate.lock")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    feedback: Any = None
    source: Any = None
    previous: dict[int, Any] = {}
    try:
        lock.acquire()
        g = config.gpio
        factory = make_pin_factory(None if g.pin_factory == "auto" else g.pin_factory)
        feedback = make_feedback(config, factory)
        clock = ClockTrust(
            state_file=state / "clock.json",
            boot_id=boot_id(),
            holdover_s=config.policy.clock_holdover_h * 3600,
        )
        session_source = make_source(config)
        source = session_source
        session_source.open()
        session = ProvisioningSession(
            source=session_source,
            decoder=make_decoder(config.decoder.backend),
            signals=feedback,
            enroll=enroll_fn,
            public_keys=keys,
            fleet=p.fleet,
            ca_file=p.ca,
            state_dir=state,
            device_id=device,
            clock_trusted=clock.synced,
            clock_floor=clock.floor_s,
            allow_plain_mqtt=allow_plain_mqtt,
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
        feedback.ready()
        click.echo(f"provisioning mode: device {device}; show the provisioning code", err=True)
        claims = (
            session.run(stop) if notifier is None else _supervised(session, stop, notifier, device)
        )
    except (QrgateError, DriverError) as e:
        if feedback is not None:
            feedback.fault()
            feedback.wait_settled(2.0)
        click.echo(f"qrgate provision-mode: {e}", err=True)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if feedback is not None:
            feedback.wait_settled(5.0)  # let the confirmation (or refusal) finish playing
            feedback.close()
        if source is not None:
            source.close()
        lock.release()
    if claims is None:
        click.echo("provisioning mode ended without a code accepted", err=True)
        return 1
    click.echo(
        f"provisioned: site {claims.site}, door {claims.door} ({claims.direction}), "
        f"broker {claims.broker}"
        + (
            "; the service starts again as a door reader"
            if notifier is not None
            else "; start the reader (systemctl start qrgate)"
        )
    )
    return 0
