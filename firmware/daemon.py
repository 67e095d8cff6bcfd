"""The composition root: the one place that builds every part from the config and wires them.

Start order matters for the door: the instance lock first (a second daemon must exit before it
touches a GPIO line), then the outputs (the relay is driven to its locked resting state before
anything else comes up, so a reboot never pulses the door), then the journal, the camera and
the threads, and last the MQTT uplink (which never waits for the broker). Stop order: relay
locked first, then threads, the uplink (offline status, DISCONNECT), camera, journal, lock.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drivers.frames import FrameSource
from firmware import __version__
from firmware.activity import ActivityDoor, ActivityWriter
from firmware.clock import ClockState, ClockTrust
from firmware.config import Config, UplinkConfig
from firmware.decoding.codes import Decoder
from firmware.decoding.registry import make_decoder
from firmware.exceptions import ConfigError, DeviceIdentityError, KeyFileError
from firmware.freshest import FrameQueue
from firmware.idle import ChangeGate
from firmware.journal.events import NewEvent
from firmware.journal.ids import boot_id as read_boot_id
from firmware.journal.outbox import OutboxReader
from firmware.journal.store import Journal
from firmware.lock import InstanceLock
from firmware.metrics import PipelineMetrics
from firmware.pipeline import CaptureLoop, ReaderIdentity, ScanLoop, ScanReport
from firmware.policy.badges import BadgeKind
from firmware.policy.context import CredentialKind
from firmware.policy.credentials import CredentialSet, load_local_credentials
from firmware.policy.keys import load_public_key
from firmware.policy.kinds import IdCardKind, PassRules, RotatingPassKind, SignedPassKind
from firmware.policy.policy import ClockSource, FixedClock, Policy
from firmware.policy.repeat import RepeatWindow
from firmware.policy.snapshot import SnapshotStore
from firmware.policy.subjects import SubjectHasher, load_key
from firmware.supervisor import CameraHealth
from firmware.uplink.commands import reload_badges_handler, unlock_handler
from firmware.uplink.credentials import CredentialSync
from firmware.uplink.desired import Desired, DesiredConfig, load_desired, overlay
from firmware.uplink.identity import client_id
from firmware.uplink.identity import device_id as read_device_id
from firmware.uplink.link import LinkSettings
from firmware.uplink.service import Uplink, UplinkOptions
from firmware.uplink.status import Identity, ReaderState, Telemetry

if TYPE_CHECKING:
    from drivers.door import DoorInputs
    from firmware.doors import DoorMonitor

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005
CAPTURE_THREAD, SCAN_THREAD = "qrgate-capture", "qrgate-scan"


def make_source(config: Config) -> FrameSource:
    """The camera named by ``[camera]``. Imports camera libraries lazily."""
    cam = config.camera
    if cam.source == "replay":
        from drivers.replay import IMAGE_SUFFIXES, ReplaySource

        assert cam.path is not None  # checked by the config validator
        items: Path | list[Path] = cam.path
        if cam.path.is_dir() and any(p.is_dir() for p in cam.path.iterdir()):
            # a corpus folder with sub-folders: replay every image below it, in path order
            items = sorted(p for p in cam.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return ReplaySource(items, fps=cam.fps, loop=cam.loop)
    if cam.source == "v4l2":
        from drivers.v4l2 import V4L2Source

        return V4L2Source(cam.device, width=cam.width, height=cam.height, fps=cam.fps)
    from drivers.picamera import Picamera2Source

    return Picamera2Source(
        size=(cam.width, cam.height),
        fps=cam.fps,
        snapshot_size=(cam.snapshot_width, cam.snapshot_height),
        autofocus=cam.autofocus,
        focus_range=cam.focus_range,
        exposure_value=cam.exposure_value,
        camera_num=cam.camera_num,
    )


def make_feedback(config: Config, pin_factory: Any) -> Any:
    """Status light, buzzer and door relay on ``pin_factory``; the relay starts locked."""
    from drivers.buzzer import Beeper
    from drivers.feedback import Feedback
    from drivers.light import StatusLight
    from drivers.relay import DoorRelay, unlock_energises_for

    g = config.gpio
    # the relay first: nothing else may come up while the door line is undefined
    relay = DoorRelay(
        g.relay_pin,
        pin_factory=pin_factory,
        active_high=g.relay_active_high,
        pulse_s=g.pulse_s,
        unlock_energises=unlock_energises_for(g.strike),
    )
    try:
        light = StatusLight(
            g.led["red"],
            g.led["green"],
            g.led.get("blue"),
            pin_factory=pin_factory,
            active_high=g.led_active_high,
        )
        beeper = Beeper(g.buzzer_pin, pin_factory=pin_factory) if g.buzzer_pin is not None else None
    except BaseException:
        relay.close()
        raise
    return Feedback(light, beeper, relay)


def make_focus(config: Config, camera: FrameSource) -> Callable[[Any, bool], object] | None:
    """The focus assist's per-frame hook for a camera with autofocus, else None."""
    from drivers.frames import Focusable

    n = config.camera.focus_after_frames
    if n <= 0 or not isinstance(camera, Focusable):
        return None
    from firmware.focus import FocusAssist

    return FocusAssist(camera, after_frames=n).observe


def with_provisioned(config: Config, device_id: str | None = None) -> Config:
    """``config`` with ``<state_dir>/provisioned.json`` (written by provisioning mode) laid
    over it, or unchanged when the reader was never provisioned. An overlay made for another
    device (an SD card copied from another reader) is not applied: its certificate names
    that reader (logged). Raises ConfigError when the overlay is damaged."""
    from firmware.provisioning_mode import apply_provisioned, load_provisioned

    prov = load_provisioned(config.reader.state_dir)
    if prov is None:
        return config
    if device_id is None:
        try:
            device_id = read_device_id()
        except DeviceIdentityError as e:
            log.error("provisioned settings not applied: %s", e)
            return config
    if prov.device != device_id:
        log.error(
            "provisioned settings are for device %s, this is %s (a copied SD card?): not"
            " applied; run provisioning mode again after qrgate factory-reset",
            prov.device,
            device_id,
        )
        return config
    config = apply_provisioned(config, prov)
    key = config.uplink.key
    if config.uplink.transport == "tls" and key is not None:
        from provisioning.device import DeviceKeys
        from provisioning.exceptions import DeviceKeyError

        try:
            DeviceKeys(key.parent).load_key()
        except DeviceKeyError as e:
            # the door keeps working offline; the broker never sees a key others could copy
            log.error("MQTT uplink off: %s", e)
            config = dataclasses.replace(
                config, uplink=dataclasses.replace(config.uplink, enabled=False)
            )
    return config


def make_door_inputs(config: Config, pin_factory: Any) -> DoorInputs | None:
    """The door contact, exit button and tamper switch ``[doors]`` names; None when none is
    wired. Raises DoorInputError when a pin cannot be claimed."""
    d = config.doors
    if not d.pins:
        return None
    from drivers.door import DoorInputs

    return DoorInputs(
        d.contact_pin,
        d.exit_pin,
        d.tamper_pin,
        pin_factory=pin_factory,
        pull_up=d.pull_up,
        bounce_s=d.bounce_ms / 1000,
    )


def make_door_monitor(
    config: Config,
    inputs: DoorInputs,
    feedback: Any,
    record: Callable[[str, dict[str, object]], None],
    *,
    activity: ActivityWriter | None = None,
) -> DoorMonitor:
    """The door state machine over ``inputs``: held-open and forced-open alarms, the exit
    button unlocking the relay (``[doors] exit_unlocks``; the pulse is recorded in
    ``activity`` when given), tamper."""
    from firmware.doors import DoorMonitor

    relay = feedback.relay
    unlock: Callable[[], object] | None = None
    if relay is not None:

        def unlock() -> object:
            t_ns = relay.pulse()
            if activity is not None:
                activity.on_pulse(t_ns, None)
            return t_ns

    return DoorMonitor(
        inputs,
        relay_unlocked=lambda: relay is not None and relay.is_unlocked,
        unlock=unlock,
        record=record,
        held_open_s=config.doors.held_open_s,
        exit_unlocks=config.doors.exit_unlocks,
        grace_s=config.doors.grace_s,
    )


def make_activity(config: Config, feedback: Any) -> ActivityWriter | None:
    """The door-activity file of ``[ota] activity_file`` (see :mod:`firmware.activity`);
    None when its folder does not exist (not under systemd, whose RuntimeDirectory= makes
    it: nobody updates this reader, so nobody reads the file)."""
    path = config.ota.activity_file
    if not path.parent.is_dir():
        log.info("door activity file off: %s does not exist", path.parent)
        return None
    relay = feedback.relay

    def pulse_s() -> float:
        return float(relay.pulse_s) if relay is not None else config.gpio.pulse_s

    return ActivityWriter(path, pulse_s=pulse_s)


def _door_event(
    journal: Journal,
    config: Config,
    code: str,
    detail: dict[str, object],
    clock_synced: bool,
    *,
    uplink: Uplink | None = None,
) -> None:
    """Journal a door event (kind "door"; ``code`` in firmware.doors.EVENT_CODES) and wake
    the uplink, which publishes it like a scan."""
    log.log(
        logging.WARNING if code in ALARMS else logging.INFO,
        "door %s: %s %s",
        config.reader.door,
        code,
        json.dumps(detail, sort_keys=True),
    )
    _record(journal, config, "door", code, detail, clock_synced=clock_synced, uplink=uplink)


def _record(
    journal: Journal,
    config: Config,
    kind: str,
    code: str,
    detail: dict[str, object],
    *,
    clock_synced: bool,
    uplink: Uplink | None,
) -> None:
    """Journal a non-scan event of ``kind`` and wake the uplink, which publishes it."""
    journal.append(
        NewEvent(
            kind=kind,
            wall_ns=time.time_ns(),
            clock_synced=clock_synced,
            mono_ns=time.monotonic_ns(),
            door=config.reader.door,
            direction=config.reader.direction,
            reason=code,
            detail=dict(detail),
        )
    )
    if uplink is not None:
        uplink.notify()


ALARMS = frozenset({"door_forced_open", "door_held_open", "tamper"})
"""Door events that are alarms: logged as warnings."""


class _FlagClock(FixedClock):
    """A clock whose trust is a plain synced flag (tests, the demo, the benchmark)."""

    def __init__(self, synced: Callable[[], bool]) -> None:
        super().__init__()
        self._synced = synced

    def state(self) -> ClockState:
        """SYNCED or UNTRUSTED, as the flag says."""
        return ClockState.SYNCED if self._synced() else ClockState.UNTRUSTED


def make_kinds(config: Config) -> list[CredentialKind]:
    """The credential kinds in claim order: signed pass, rotating pass, ID card, badge."""
    p = config.policy
    rules = PassRules(leeway_s=p.leeway_s, skew_steps=p.rotating_skew_steps)
    return [
        SignedPassKind(rules),
        RotatingPassKind(rules),
        IdCardKind(checkin=config.reader.mode == "checkin", keep=frozenset(p.keep)),
        BadgeKind(),
    ]


def make_policy(config: Config, clock: ClockSource | None = None) -> Policy:
    """The verdict policy of ``[policy]``: the site key, the local credential files (the
    applied snapshot replaces them, see :func:`firmware.policy.snapshot.SnapshotStore`).
    ``clock``: the clock's trust (default: never trusted). Raises CredentialListError."""
    p = config.policy
    if p.hmac_key is not None:
        hasher = SubjectHasher(load_key(p.hmac_key))
    else:
        import secrets

        # subjects then differ after every restart: fine for a demo, useless for reports
        log.warning("no site key (policy.hmac_key): subjects will not match across restarts")
        hasher = SubjectHasher(secrets.token_bytes(32))
    credentials = load_local_credentials(
        trust=p.trust, badges=p.badges, denylist=p.denylist, schedules=p.schedules
    )
    if p.badges is None and p.trust is None and config.reader.mode == "access":
        log.warning("no badge list or issuer keys configured: codes will be answered 'unknown'")
    return Policy(
        make_kinds(config),
        hasher,
        p.max_payload,
        credentials=credentials,
        clock=clock,
        door=config.reader.door,
        zones=config.reader.zones,
    )


def make_snapshot_store(config: Config) -> SnapshotStore:
    """The credential snapshot store in ``reader.state_dir``, checking snapshots with
    ``[policy] snapshot_key`` (none: every snapshot is refused) and, with the uplink on, for
    the site ``[uplink] site``. Raises ConfigError when the key file is not a usable public
    key."""
    path = config.policy.snapshot_key
    try:
        key = load_public_key(path) if path is not None else None
    except KeyFileError as e:
        raise ConfigError(
            config.source, "policy.snapshot_key", "a PEM public key (Ed25519 or P-256)", str(e)
        ) from None
    site = config.uplink.site if config.uplink.enabled else None
    return SnapshotStore(config.reader.state_dir, key, site=site)


@dataclass
class Reader:
    """A wired reader. ``start()`` brings it up, ``stop()`` takes it down (idempotent);
    ``wait()`` blocks until a stop was asked for, a thread failed, or a finite camera ended.
    ``exit_code`` is 0 after a clean stop, 1 after a fault. ``uplink``: the MQTT uplink, None
    when it is off; ``state``: what its status messages report."""

    config: Config
    lock: InstanceLock
    feedback: Any
    journal: Journal
    source: FrameSource
    scan: ScanLoop
    capture: CaptureLoop
    metrics: PipelineMetrics
    frames: FrameQueue
    health: CameraHealth
    state: ReaderState | None = None
    uplink: Uplink | None = None
    doors: DoorMonitor | None = None
    door_inputs: DoorInputs | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    exit_code: int = 0
    started_ns: int = 0
    _threads: list[threading.Thread] = field(default_factory=list)
    _stopped: bool = False

    def start(self) -> None:
        """Bring up the journal, camera and threads (lock and outputs are already held)."""
        self.started_ns = time.monotonic_ns()
        # CPython hands the GIL over every 5 ms by default: a frame that arrives while another
        # thread runs Python code could wait that long. 0.5 ms keeps the scan thread's
        # worst case inside the latency budget at a negligible switching cost.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.journal.open()
        # a busy or missing camera does not stop the start: the capture thread keeps trying
        # while the journal, the status and MQTT work (a crash loop would help nobody)
        if self.capture.open_first() and self.state is not None:
            self.state.camera_ok()
        for name, body in ((CAPTURE_THREAD, self.capture.run), (SCAN_THREAD, self.scan.run)):
            t = threading.Thread(target=self._guard, args=(name, body), name=name, daemon=True)
            self._threads.append(t)
            t.start()
        self.feedback.ready()
        if self.uplink is not None:
            # after the scan threads: the broker being away must never delay a decision
            self.uplink.start()
        if self.doors is not None:
            self.doors.start()  # its events need the journal (and the uplink) running
        log.info(
            "reader %s: door %s, camera %s, decoder %s, uplink %s",
            "ready" if self.health.opened.is_set() else "started, waiting for its camera",
            self.config.reader.door,
            self.config.camera.source,
            self.config.decoder.backend,
            self.uplink.link.settings.host if self.uplink is not None else "off",
        )

    def _guard(self, name: str, body: Callable[[threading.Event], None]) -> None:
        try:
            body(self.stop_event)
        except BaseException:
            # a dead scan or capture thread must never leave the door unlocked or the
            # daemon half alive: lock the door and stop everything
            log.critical("%s thread failed; stopping the reader", name, exc_info=True)
            self.exit_code = 1
            self.feedback.close()
            self.stop_event.set()
        else:
            # a finite camera ending closes the frame queue; the scan thread drains it and
            # its return is what ends the reader, so no frame already captured is lost
            if name == SCAN_THREAD:
                self.stop_event.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the reader to need stopping; True if it does."""
        return self.stop_event.wait(timeout_s)

    def stop(self) -> None:
        """Lock the door first, then stop threads, the uplink (offline status, then
        DISCONNECT), camera, journal and release the lock."""
        if self._stopped:
            return
        self._stopped = True
        self.feedback.close()
        self.stop_event.set()
        if self.doors is not None:
            self.doors.close()
        if self.door_inputs is not None:
            self.door_inputs.close()
        for t in self._threads:
            t.join(timeout=5.0)
        if self.uplink is not None:
            self.uplink.stop()
        self.source.close()
        self.journal.close()
        self.lock.release()

    def summary(self) -> dict[str, Any]:
        """Counts and latencies since start, for the demo and logs."""
        m = self.metrics
        return {
            "frames": m.frames,
            "decoded_frames": m.decoded_frames,
            "skipped_idle": m.skipped_idle,
            "dropped": self.frames.dropped,
            "decodes": m.codes,
            "decisions": m.decisions,
            "granted": m.granted,
            "denied": m.denied,
            "suppressed_repeats": m.suppressed,
            "errors": m.errors,
            "decode_ms_p50": m.decode_ms.percentile(50),
            "frame_to_relay_ms_p50": m.frame_to_relay_ms.percentile(50),
            "frame_to_relay_ms_p99": m.frame_to_relay_ms.percentile(99),
            "seconds": (time.monotonic_ns() - self.started_ns) / 1e9 if self.started_ns else 0.0,
        }


def describe(reader: Reader) -> str:
    """One line for a person reading `systemctl status qrgate` (the STATUS= line)."""
    m, h = reader.metrics, reader.health
    if h.state.value in ("stalled", "missing"):
        camera = f"camera {h.state.value}: {h.last_error}" if h.last_error else "camera down"
    else:
        camera = f"camera {h.state.value}"
    if reader.uplink is None:
        broker = "MQTT off"
    else:
        link = reader.uplink.link.stats()
        broker = f"MQTT {link.state}" + (f" ({link.problem})" if link.problem else "")
    return (
        f"door {reader.config.reader.door}: {camera}; {m.decisions} scans "
        f"({m.granted} granted, {m.denied} denied); {broker}"
    )


def _incident(
    journal: Journal,
    feedback: Any,
    config: Config,
    code: str,
    detail: dict[str, object],
    *,
    state: ReaderState | None = None,
    uplink: Uplink | None = None,
) -> None:
    """Journal a reader incident (camera stalled, ...) and show it: the fault pattern while
    the camera is gone, ready again when it is back; the uplink's status follows. A reader
    that cannot see locks the door (a grant's pulse in progress ends early)."""
    if code == "camera_recovered":
        feedback.ready()
    elif code.startswith("camera_"):
        if feedback.relay is not None:
            feedback.relay.off()
        feedback.fault()
    if state is not None:
        state.camera_event(code)
    _record(journal, config, "incident", code, detail, clock_synced=False, uplink=uplink)


def _secret(config: Config, key: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        found = getattr(e, "strerror", None) or str(e)
        raise ConfigError(
            config.source, key, "a readable UTF-8 file", f"{found} ({path})"
        ) from None


def _check_tls(config: Config, u: UplinkConfig) -> None:
    """Load the TLS files as the link will, so a wrong file is a ConfigError at start (and in
    ``qrgate config check``), not a failure on every reconnect."""
    import ssl

    try:
        ctx = ssl.create_default_context()
        if u.ca is not None:
            ctx.load_verify_locations(cafile=str(u.ca))
    except (ssl.SSLError, OSError, ValueError) as e:
        raise ConfigError(
            config.source, "uplink.ca", "a PEM CA certificate file", f"{e} ({u.ca})"
        ) from None
    if u.cert is not None and u.key is not None:
        try:
            # never a passphrase prompt: a reader has nobody to answer it
            ctx.load_cert_chain(certfile=str(u.cert), keyfile=str(u.key), password=_no_passphrase)
        except (ssl.SSLError, OSError, ValueError) as e:
            if isinstance(e, ValueError) and "passphrase" in str(e):
                raise ConfigError(
                    config.source,
                    "uplink.key",
                    "an unencrypted PEM key",
                    f"an encrypted key ({u.key})",
                ) from None
            raise ConfigError(
                config.source,
                "uplink.cert",
                "a PEM client certificate with its key in uplink.key",
                f"{e} ({u.cert}, {u.key})",
            ) from None


def _no_passphrase() -> bytes:
    raise ValueError("the key file asks for a passphrase")


def link_settings(config: Config, device: str) -> LinkSettings:
    """The broker settings from ``[uplink]`` for the reader named ``device``. Raises
    ConfigError when a TLS file is missing or the password file is unreadable."""
    u: UplinkConfig = config.uplink
    for key in ("ca", "cert", "key"):
        f: Path | None = getattr(u, key)
        if f is not None and not f.is_file():
            raise ConfigError(config.source, f"uplink.{key}", "an existing file", f"nothing at {f}")
    if u.transport == "tls":
        _check_tls(config, u)
    password = _secret(config, "uplink.password_file", u.password_file) if u.password_file else None
    return LinkSettings(
        host=u.host,
        port=u.port,
        client_id=client_id(device),
        protocol=u.protocol,
        transport=u.transport,
        keepalive_s=u.keepalive_s,
        ca=u.ca,
        cert=u.cert,
        key=u.key,
        username=u.username,
        password=password,
        connect_timeout_s=u.connect_timeout_s,
        backoff_min_s=u.reconnect_min_s,
        backoff_max_s=u.reconnect_max_s,
        max_inflight=u.window + 32,
    )


def make_uplink(
    config: Config,
    *,
    device: str,
    boot_id: str,
    journal: Journal,
    feedback: Any,
    policy: Policy,
    state: ReaderState,
    metrics: PipelineMetrics,
    frames: FrameQueue,
    desired: DesiredConfig | None = None,
    credentials: CredentialSync | None = None,
) -> Uplink:
    """The MQTT uplink of ``[uplink]``: events from ``journal``, status from ``state``,
    telemetry from ``metrics``/``frames``, commands ``unlock`` (through ``feedback``),
    ``reload_config`` (the badge list into ``policy``) and ``report_status``; ``desired``
    takes the retained ``config/desired``, ``credentials`` the reader's and the site's
    ``credentials/snapshot``. Raises ConfigError (see :func:`link_settings`)."""
    u = config.uplink
    r = config.reader
    return Uplink(
        link=link_settings(config, device),
        ident=Identity(
            device=device, site=u.site, door=r.door, version=__version__, boot_id=boot_id
        ),
        journal=journal,
        outbox=OutboxReader(config.journal_path),
        state=state,
        telemetry=Telemetry(
            metrics=metrics, frames_dropped=lambda: frames.dropped, state_dir=r.state_dir
        ),
        handlers={
            "unlock": unlock_handler(
                journal=journal,
                door=feedback,
                door_name=r.door,
                direction=r.direction,
                clock_synced=state.clock_synced,
            ),
            "reload_config": reload_badges_handler(policy=policy, path=config.policy.badges),
        },
        options=UplinkOptions(
            window=u.window,
            batch=u.batch,
            telemetry_s=u.telemetry_s,
            ha_discovery=u.ha_discovery,
            resend_after_s=u.resend_after_s,
        ),
        gap_state=config.journal_path.with_name(config.journal_path.name + ".gaps-sent"),
        desired=desired.offer if desired is not None else None,
        credentials=credentials,
    )


def build_reader(
    config: Config,
    *,
    pin_factory: Any = None,
    source: FrameSource | None = None,
    decoder: Decoder | None = None,
    listeners: Sequence[Callable[[ScanReport], None]] = (),
    clock_synced: Callable[[], bool] | None = None,
    device_id: str | None = None,
) -> Reader:
    """Wire a reader from ``config``. Takes the instance lock and creates the outputs (relay
    locked) before anything else; on any failure releases what it took and re-raises.

    ``pin_factory``/``source``/``decoder``/``clock_synced`` override what the config names
    (tests, the benchmark, the demo); ``device_id`` overrides the hardware's (tests: the id
    names the MQTT client and topics). With ``[uplink] enabled`` the MQTT uplink is built; a
    reader whose device id cannot be read runs without it (logged). A credential snapshot
    kept by an earlier run replaces the local credential files' set (a kept file that no
    longer verifies is moved aside and the local files are used). Raises
    InstanceLockedError, ConfigError, CredentialListError, DecoderError, PinFactoryError.
    """
    from drivers.pins import make_pin_factory

    state = config.reader.state_dir
    state.mkdir(parents=True, exist_ok=True)
    lock = InstanceLock(state / "qrgate.lock")
    lock.acquire()
    feedback = None
    door_inputs: DoorInputs | None = None
    try:
        # what provisioning mode wrote (door, broker, the device certificate) is laid over
        # the file first: the back office's desired settings go over both
        config = with_provisioned(config, device_id)
        # the back office's desired settings, kept from an earlier run, win over the file;
        # each document is laid over the file's config, never over the one before it
        file_config = config
        desired = load_desired(state)
        if desired is not None:
            config = overlay(file_config, desired)
        factory = (
            pin_factory
            if pin_factory is not None
            else make_pin_factory(
                None if config.gpio.pin_factory == "auto" else config.gpio.pin_factory
            )
        )
        feedback = make_feedback(config, factory)
        door_inputs = make_door_inputs(config, factory)
        boot = read_boot_id()
        clock: ClockSource
        if clock_synced is not None:
            clock = _FlagClock(clock_synced)
        else:
            clock = ClockTrust(
                state_file=state / "clock.json",
                boot_id=boot,
                holdover_s=config.policy.clock_holdover_h * 3600,
            )
        policy = make_policy(config, clock)
        snapshots = make_snapshot_store(config)
        applied = snapshots.load()
        if applied is not None:
            policy.credentials = applied

        def synced() -> bool:
            return clock.state() is not ClockState.UNTRUSTED

        dec = decoder if decoder is not None else make_decoder(config.decoder.backend)
        frames = FrameQueue(config.decoder.queue)
        metrics = PipelineMetrics()
        j = config.journal
        journal = Journal(
            config.journal_path,
            boot_id=boot,
            fsync_interval_s=j.fsync_interval_ms / 1000,
            append_deadline_s=j.append_deadline_ms / 1000,
            max_rows=j.max_rows,
            max_bytes=int(j.max_mb * 1024 * 1024),
            max_age_s=j.max_age_days * 86_400 if j.max_age_days > 0 else None,
            trusted_wall=lambda: time.time_ns() if synced() else None,
            report=lambda code, detail: log.error("journal: %s %s", code, detail),
        )
        cam = source if source is not None else make_source(config)
        reader_state = ReaderState(door=config.reader.door, clock_synced=synced)
        seen = RepeatWindow(int(config.policy.repeat_window_s * 1e9))
        uplink: Uplink | None = None

        def apply_desired(d: Desired) -> None:
            # each is one attribute its reader thread loads per use: no lock, no half state
            live = overlay(file_config, d)
            seen.window_ns = int(live.policy.repeat_window_s * 1e9)
            if feedback is not None and feedback.relay is not None:
                feedback.relay.pulse_s = live.gpio.pulse_s
            if uplink is not None:
                uplink.options = dataclasses.replace(
                    uplink.options, telemetry_s=live.uplink.telemetry_s
                )

        def install(credentials: CredentialSet) -> None:
            # one assignment: a scan decides on the old set or the new one, never on a mix
            policy.credentials = credentials

        activity = make_activity(config, feedback)
        if config.uplink.enabled:
            try:
                device = device_id if device_id is not None else read_device_id()
            except DeviceIdentityError as e:
                log.error("MQTT uplink off: %s", e)
            else:
                uplink = make_uplink(
                    config,
                    device=device,
                    boot_id=boot,
                    journal=journal,
                    feedback=feedback if activity is None else ActivityDoor(feedback, activity),
                    policy=policy,
                    state=reader_state,
                    metrics=metrics,
                    frames=frames,
                    desired=DesiredConfig(
                        state, apply_desired, reader_state.config_outcome, current=desired
                    ),
                    credentials=CredentialSync(
                        snapshots, install, reader_state.credentials_outcome
                    ),
                )
        # the activity file first: the updater must see a scan before anything slow runs
        scan_listeners = (
            ((activity.on_scan,) if activity is not None else ())
            + tuple(listeners)
            + ((uplink.on_scan,) if uplink is not None else ())
        )
        scan = ScanLoop(
            frames=frames,
            decoder=dec,
            policy=policy,
            seen=seen,
            journal=journal,
            feedback=feedback,
            identity=ReaderIdentity(config.reader.door, config.reader.direction),
            clock_synced=synced,
            gate=ChangeGate(max_skip=config.decoder.max_idle_skip)
            if config.decoder.idle_skip
            else None,
            metrics=metrics,
            listeners=scan_listeners,
            focus=make_focus(config, cam),
        )
        health = CameraHealth(
            lambda code, detail: _incident(
                journal, feedback, config, code, detail, state=reader_state, uplink=uplink
            ),
            stall_s=config.camera.read_timeout_s,
        )
        capture = CaptureLoop(
            cam, frames, health=health, read_timeout_s=config.camera.read_timeout_s
        )
        doors = (
            make_door_monitor(
                config,
                door_inputs,
                feedback,
                lambda code, detail: _door_event(
                    journal, config, code, detail, synced(), uplink=uplink
                ),
                activity=activity,
            )
            if door_inputs is not None
            else None
        )
        return Reader(
            config=config,
            lock=lock,
            feedback=feedback,
            journal=journal,
            source=cam,
            scan=scan,
            capture=capture,
            metrics=metrics,
            frames=frames,
            health=health,
            state=reader_state,
            uplink=uplink,
            doors=doors,
            door_inputs=door_inputs,
        )
    except BaseException:
        if feedback is not None:
            feedback.close()
        if door_inputs is not None:
            door_inputs.close()
        lock.release()
        raise
