"""Reader configuration: one TOML file, validated at start.

Every error names the file, the key, what was expected and what was found
(:class:`firmware.exceptions.ConfigError`). Relative paths are resolved against the
config file's folder, so a config and its badge list can travel together.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.exceptions import ConfigError

CAMERA_SOURCES = ("replay", "v4l2", "picamera2")
DECODER_BACKENDS = ("zxing-cpp", "zbar", "cascade")
DIRECTIONS = ("in", "out", "both")
STRIKES = ("fail-secure", "fail-safe")
READER_MODES = ("access", "checkin")
# what an ID-card check-in may keep about a person (firmware.policy.checkin.KEEP_ALLOWED)
KEEP_CHOICES = (
    "id_hmac",
    "name_masked",
    "birth_year",
    "sex",
    "full_name",
    "birth_date",
    "issue_date",
)
PIN_FACTORIES = ("auto", "mock", "mock-nopwm", "lgpio", "rpigpio", "pigpio", "native")
AUTOFOCUS_MODES = ("continuous", "off")
FOCUS_RANGES = ("macro", "normal", "full")
UPLINK_TRANSPORTS = ("tcp", "tls")
UPLINK_PROTOCOLS = ("3.1.1", "5")
DEVICE_TYPES = ("rpi4", "rpi5")
# a fleet id as provisioning.qr.check_fleet takes it (not imported: config loads light)
_FLEET = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)


@dataclass(frozen=True)
class ReaderConfig:
    """``door``: door name in events. ``direction``: in/out/both. ``state_dir``: journal,
    lock, control socket, last clock sync and applied credential snapshot live here.
    ``mode``: "access" (a door: grants what the credentials allow) or "checkin" (a venue's
    entry log: every well-formed ID card or personal QR is logged with ``direction`` and
    answered granted). ``zones``: zones this door belongs to (a pass may name zones instead of
    doors)."""

    door: str = "door-1"
    direction: str = "in"
    state_dir: Path = Path("/var/lib/qrgate")
    mode: str = "access"
    zones: tuple[str, ...] = ()


@dataclass(frozen=True)
class CameraConfig:
    """``source``: replay | v4l2 | picamera2. Replay: ``path`` (folder, image or video),
    ``fps``, ``loop``. v4l2: ``device``. ``width``/``height``: pixels requested from a camera.
    ``read_timeout_s``: a read slower than this is a stall.
    picamera2 only: ``camera_num``; ``snapshot_width``/``snapshot_height``: the main stream
    (snapshots, ``qrgate camera check``), ``width``/``height`` being the lores gray stream;
    ``autofocus`` continuous | off and ``focus_range`` macro | normal | full (cameras with
    autofocus); ``exposure_value``: EV bias in stops (negative keeps bright phone screens from
    burning out); ``focus_after_frames``: a run of this many unreadable frames showing a
    code-like blob triggers a focus cycle (0: never)."""

    source: str = "replay"
    path: Path | None = None
    fps: float = 30.0
    loop: bool = False
    device: str = "/dev/video0"
    width: int = 640
    height: int = 480
    read_timeout_s: float = 5.0
    camera_num: int = 0
    snapshot_width: int = 1280
    snapshot_height: int = 960
    autofocus: str = "continuous"
    focus_range: str = "macro"
    exposure_value: float = -0.5
    focus_after_frames: int = 15


@dataclass(frozen=True)
class DecoderConfig:
    """``backend``: zxing-cpp | zbar | cascade. ``queue``: frames held for the decoder; older
    ones are dropped (the decoder always works on the freshest frame). ``idle_skip``: skip
    decoding a frame that is unchanged from the last empty one, at most ``max_idle_skip``
    frames in a row."""

    backend: str = "zxing-cpp"
    queue: int = 1
    idle_skip: bool = True
    max_idle_skip: int = 10


@dataclass(frozen=True)
class PolicyConfig:
    """``badges``: JSON badge list (allowlist and denylist of keyed HMACs). ``hmac_key``: the
    site key file (hex) those HMACs are made with. ``repeat_window_s``: seconds a payload must
    be out of view before it counts as a new scan. ``max_payload``: bytes; longer is
    malformed.

    Signed passes: ``trust`` (issuer keys, JSON), ``denylist`` (revoked pass ids and holders,
    JSON), ``schedules`` (JSON): the local credential files, used until a signed snapshot
    arrives. ``snapshot_key``: the public key (PEM) that signs credential snapshots; without it
    snapshots are refused. ``leeway_s``: seconds of clock difference allowed at a pass's
    ``exp``/``nbf``. ``rotating_skew_steps``: rotating-code time steps accepted either side of
    the current one. ``clock_holdover_h``: hours after the last NTP sync the clock is still
    trusted. ``keep``: what an ID-card check-in keeps about a person (see
    :data:`firmware.policy.checkin.KEEP_ALLOWED`)."""

    badges: Path | None = None
    hmac_key: Path | None = None
    repeat_window_s: float = 5.0
    max_payload: int = 4096
    trust: Path | None = None
    denylist: Path | None = None
    schedules: Path | None = None
    snapshot_key: Path | None = None
    leeway_s: float = 60.0
    rotating_skew_steps: int = 1
    clock_holdover_h: float = 24.0
    keep: tuple[str, ...] = ("id_hmac", "name_masked", "birth_year")


@dataclass(frozen=True)
class GpioConfig:
    """BCM pin numbers. ``led``: {red, green, blue} for an RGB LED or {red, green} for a
    pair. ``strike``: fail-secure (unlocks when powered) or fail-safe (a maglock: unlocks when
    power is cut). ``pulse_s``: seconds the door stays unlocked after a grant."""

    pin_factory: str = "auto"
    relay_pin: int = 17
    relay_active_high: bool = True
    strike: str = "fail-secure"
    pulse_s: float = 3.0
    led: Mapping[str, int] = field(default_factory=lambda: {"red": 5, "green": 6, "blue": 13})
    led_active_high: bool = True
    buzzer_pin: int | None = 12


@dataclass(frozen=True)
class DoorsConfig:
    """Door inputs, BCM pin numbers (None: not wired). ``contact_pin``: door contact, closed
    circuit while the door is shut (a normally-closed reed switch to ground); ``exit_pin``:
    request-to-exit button, normally open to ground; ``tamper_pin``: tamper switch, closed
    while the case is shut. ``pull_up``: the inputs use the internal pull-ups (switch to
    ground). ``bounce_ms``: debounce time, milliseconds. ``held_open_s``: a door open longer
    than this raises the held-open alarm. ``exit_unlocks``: the exit button pulses the relay
    (off when the strike is released mechanically on the inside). ``grace_s``: an opening this
    soon after the relay locked again still counts as the grant's (a person pushing the door
    just as the pulse ends), not as forced."""

    contact_pin: int | None = None
    exit_pin: int | None = None
    tamper_pin: int | None = None
    pull_up: bool = True
    bounce_ms: float = 50.0
    held_open_s: float = 30.0
    exit_unlocks: bool = True
    grace_s: float = 2.0

    @property
    def pins(self) -> list[int]:
        """The wired input pins."""
        return [p for p in (self.contact_pin, self.exit_pin, self.tamper_pin) if p is not None]


@dataclass(frozen=True)
class JournalConfig:
    """``path``: SQLite file (relative to ``reader.state_dir``). ``fsync_interval_ms``: group
    fsync period: the power-cut window. ``max_rows``/``max_mb``: size cap. ``max_age_days``:
    rows older than this are deleted, sent or not (0: no age limit)."""

    path: Path = Path("journal.db")
    fsync_interval_ms: float = 100.0
    append_deadline_ms: float = 50.0
    max_rows: int = 1_000_000
    max_mb: float = 512.0
    max_age_days: float = 90.0


@dataclass(frozen=True)
class UplinkConfig:
    """The MQTT uplink (off unless ``enabled``).

    ``host``/``port``: the broker (port defaults to 1883 for tcp, 8883 for tls).
    ``transport``: tcp | tls. ``protocol``: "3.1.1" | "5". ``keepalive_s``: seconds between
    keepalive pings (30-60 in the field; the broker drops a silent reader after 1.5 x this;
    lower values are for tests). ``connect_timeout_s``: TCP plus TLS handshake.
    ``reconnect_min_s``/``reconnect_max_s``: first backoff ceiling and cap (<= 60 s).
    ``ca``: CA file for the broker's certificate (tls; absent: the system trust store).
    ``cert``/``key``: client certificate and key (tls; both or neither). ``username`` and
    ``password_file`` (a file holding the password: it stays out of the config). ``site``:
    the site name in topics. ``window``: event messages in flight at most. ``batch``: events
    per message at most while draining a backlog (1: never batch). ``telemetry_s``: seconds
    between telemetry messages (0: none). ``ha_discovery``: publish Home Assistant discovery.
    ``resend_after_s``: publish again rows the back office has not acknowledged once its ack
    stalled this long (0: never).
    """

    enabled: bool = False
    host: str = ""
    port: int = 1883
    transport: str = "tcp"
    protocol: str = "3.1.1"
    keepalive_s: int = 60
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    site: str = "default"
    window: int = 64
    batch: int = 50
    telemetry_s: float = 60.0
    ha_discovery: bool = False
    resend_after_s: float = 300.0


@dataclass(frozen=True)
class ProvisioningConfig:
    """Provisioning mode (``qrgate provision-mode``): what the firmware image brings to check
    a signed provisioning code and to enroll.

    ``public_key``: the fleet's provisioning public key (PEM, Ed25519 or P-256), installed
    with the firmware; none: provisioning mode refuses to start. ``fleet``: this firmware's
    fleet id (1-64 of A-Z a-z 0-9 . _ -); a code for another fleet is refused. ``ca``: the
    fleet's root (or issuing) CA certificate, PEM, installed with the firmware: the reader
    trusts the broker with it, and a code whose CA fingerprint is not this file's SHA-256
    is refused. ``enroll_port``: the broker's TLS port for the enrollment credential.
    ``enroll_user`` and ``enroll_password_file``: the provisioning-only MQTT credential (a
    file holding the password, kept out of the config).
    """

    public_key: Path | None = None
    fleet: str = "default"
    ca: Path | None = None
    enroll_port: int = 8884
    enroll_user: str = "enroll"
    enroll_password_file: Path | None = None


@dataclass(frozen=True)
class OtaConfig:
    """Over-the-air updates: the updater service (``qrgate ota agent``) and the daemon's
    door-activity file. Never settable remotely (not in the desired-config keys).

    ``repo_url``: the TUF repository's base URL (http or https; TUF checks every byte, so
    plain http is safe against tampering but shows what is downloaded); "" when updates are
    not set up (the updater refuses to start). ``trusted_root``: the TUF ``root.json``
    installed with the firmware (the first trusted root; later ones come signed through the
    repository; the updater unit starts only when the default path exists).
    ``install_root``: the release folders and the ``current``/``previous`` links.
    ``state_dir``: the updater's own state (TUF metadata, download cache, job file).
    ``device_type``: "rpi4" or "rpi5" (bundles name the types they run on); None: read from
    /proc/device-tree/model. ``keep``: releases kept (current and previous always are).
    ``health_deadline_s``: seconds the new release has to become healthy before it is rolled
    back. ``quiet_s``: seconds without a scan (and no relay pulse) before the daemon may be
    restarted. ``activity_file``: the JSON file the daemon writes on every decided scan and
    relay pulse, which the updater reads (on tmpfs: the daemon's RuntimeDirectory).
    ``max_bundle_mb``: the largest bundle accepted, MiB. ``clock_wait_s``: seconds a job
    waits for a synced clock later than the bundle's build time before it is rejected with
    the clock as the reason.
    """

    repo_url: str = ""
    trusted_root: Path = Path("/etc/qrgate/ota-root.json")
    install_root: Path = Path("/opt/qrgate")
    state_dir: Path = Path("/var/lib/qrgate-updater")
    device_type: str | None = None
    keep: int = 3
    health_deadline_s: float = 120.0
    quiet_s: float = 5.0
    activity_file: Path = Path("/run/qrgate/activity.json")
    max_bundle_mb: int = 400
    clock_wait_s: float = 3600.0


@dataclass(frozen=True)
class Config:
    """The whole reader configuration. ``source``: the file it came from ("<defaults>")."""

    reader: ReaderConfig = field(default_factory=ReaderConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    gpio: GpioConfig = field(default_factory=GpioConfig)
    doors: DoorsConfig = field(default_factory=DoorsConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    provisioning: ProvisioningConfig = field(default_factory=ProvisioningConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    source: str = "<defaults>"

    @property
    def journal_path(self) -> Path:
        """The journal file, resolved against ``reader.state_dir``."""
        return self.reader.state_dir / self.journal.path


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"number {v!r}"
    if isinstance(v, str):
        shown = v if len(v) <= 40 else v[:40] + "…"
        return f"string {shown!r}"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "an array"
    return type(v).__name__


class _Section:
    """Reads one table, tracking which keys were used so unknown keys are reported."""

    def __init__(self, file: str, name: str, data: Any, base: Path) -> None:
        if not isinstance(data, dict):
            raise ConfigError(file, name, "a table", _kind(data))
        self.file, self.name, self.data, self.base = file, name, data, base
        self.used: set[str] = set()

    def _err(self, key: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(
            self.file, f"{self.name}.{key}" if self.name else key, expected, _kind(value)
        )

    def get(self, key: str, default: Any, check: Callable[[Any], Any], expected: str) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        try:
            return check(value)
        except (TypeError, ValueError):
            raise self._err(key, expected, value) from None

    def text(self, key: str, default: str, choices: tuple[str, ...] | None = None) -> str:
        expected = (
            "one of " + ", ".join(repr(c) for c in choices)
            if choices
            else "a non-empty printable string of at most 128 characters"
        )

        def check(v: Any) -> str:
            if not isinstance(v, str) or (choices and v not in choices):
                raise ValueError
            # names end up in logs, terminals and MQTT payloads: no control characters
            if not choices and not (v and len(v) <= 128 and v.isprintable()):
                raise ValueError
            return v

        return str(self.get(key, default, check, expected))

    def number(self, key: str, default: float, lo: float, hi: float, integer: bool = False) -> Any:
        what = "an integer" if integer else "a number"

        def check(v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
                raise ValueError
            if not lo <= v <= hi:
                raise ValueError
            return v

        return self.get(key, default, check, f"{what} from {lo:g} to {hi:g}")

    def flag(self, key: str, default: bool) -> bool:
        def check(v: Any) -> bool:
            if not isinstance(v, bool):
                raise ValueError
            return v

        return bool(self.get(key, default, check, "true or false"))

    def path(self, key: str, default: Path | None) -> Path | None:
        def check(v: Any) -> Path:
            if not isinstance(v, str) or not v:
                raise ValueError
            p = Path(v).expanduser()
            return p if p.is_absolute() else self.base / p

        result: Path | None = self.get(key, default, check, "a path string")
        return result

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            key = unknown[0]
            where = f"{self.name}.{key}" if self.name else key
            known = ", ".join(sorted(self.used))
            raise ConfigError(
                self.file, where, f"one of the known keys ({known})", "an unknown key"
            )


def _pins(section: _Section) -> Mapping[str, int]:
    def check(v: Any) -> dict[str, int]:
        if not isinstance(v, dict) or set(v) not in ({"red", "green", "blue"}, {"red", "green"}):
            raise ValueError
        for pin in v.values():
            if isinstance(pin, bool) or not isinstance(pin, int) or not 0 <= pin <= 53:
                raise ValueError
        return dict(v)

    default = GpioConfig().led
    result: Mapping[str, int] = section.get(
        "led",
        default,
        check,
        "a table {red, green, blue} (RGB LED) or {red, green} (LED pair) of pins 0-53",
    )
    return result


def _pin_or_none(s: _Section, key: str, default: int | None = None) -> int | None:
    result: int | None = s.get(
        key,
        default,
        lambda v: (
            v
            if v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 53)
            else _raise()
        ),
        "a pin number 0-53",
    )
    return result


def _names(
    s: _Section, key: str, default: tuple[str, ...] = (), choices: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """A list of distinct short names (zones, privacy fields)."""

    def check(v: Any) -> tuple[str, ...]:
        if not isinstance(v, list) or len(v) > 64 or len(set(map(str, v))) != len(v):
            raise ValueError
        for x in v:
            if not (isinstance(x, str) and x and len(x) <= 64 and x.isprintable()):
                raise ValueError
            if choices and x not in choices:
                raise ValueError
        return tuple(v)

    expected = (
        "a list of distinct names from " + ", ".join(choices)
        if choices
        else "a list of distinct printable names (at most 64)"
    )
    result: tuple[str, ...] = s.get(key, default, check, expected)
    return result


def parse_config(
    data: Mapping[str, Any], file: str = "<memory>", base: Path | None = None
) -> Config:
    """Validate a parsed TOML document into a :class:`Config`. Raises ConfigError."""
    base = base or Path.cwd()
    top = _Section(file, "", dict(data), base)
    sections = {}
    for name in (
        "reader",
        "camera",
        "decoder",
        "policy",
        "gpio",
        "doors",
        "journal",
        "uplink",
        "provisioning",
        "ota",
    ):
        top.used.add(name)
        sections[name] = _Section(file, name, data.get(name, {}), base)
    top.done()

    s = sections["reader"]
    reader = ReaderConfig(
        door=s.text("door", ReaderConfig.door),
        direction=s.text("direction", ReaderConfig.direction, DIRECTIONS),
        state_dir=s.path("state_dir", ReaderConfig.state_dir) or ReaderConfig.state_dir,
        mode=s.text("mode", ReaderConfig.mode, READER_MODES),
        zones=_names(s, "zones"),
    )
    s.done()

    s = sections["camera"]
    camera = CameraConfig(
        source=s.text("source", CameraConfig.source, CAMERA_SOURCES),
        path=s.path("path", None),
        fps=s.number("fps", CameraConfig.fps, 0, 240),
        loop=s.flag("loop", CameraConfig.loop),
        device=s.text("device", CameraConfig.device),
        width=s.number("width", CameraConfig.width, 16, 8192, integer=True),
        height=s.number("height", CameraConfig.height, 16, 8192, integer=True),
        read_timeout_s=s.number("read_timeout_s", CameraConfig.read_timeout_s, 0.1, 600),
        camera_num=s.number("camera_num", CameraConfig.camera_num, 0, 16, integer=True),
        snapshot_width=s.number(
            "snapshot_width", CameraConfig.snapshot_width, 16, 8192, integer=True
        ),
        snapshot_height=s.number(
            "snapshot_height", CameraConfig.snapshot_height, 16, 8192, integer=True
        ),
        autofocus=s.text("autofocus", CameraConfig.autofocus, AUTOFOCUS_MODES),
        focus_range=s.text("focus_range", CameraConfig.focus_range, FOCUS_RANGES),
        exposure_value=s.number("exposure_value", CameraConfig.exposure_value, -8, 8),
        focus_after_frames=s.number(
            "focus_after_frames", CameraConfig.focus_after_frames, 0, 10_000, integer=True
        ),
    )
    if camera.snapshot_width < camera.width or camera.snapshot_height < camera.height:
        # picamera2 refuses a lores stream larger than the main stream
        raise ConfigError(
            file,
            "camera.snapshot_width",
            f"a snapshot size at least the frame size {camera.width}x{camera.height}",
            f"{camera.snapshot_width}x{camera.snapshot_height}",
        )
    if camera.source == "replay" and camera.path is None:
        raise ConfigError(
            file,
            "camera.path",
            "a folder, image or video to replay (camera.source is 'replay')",
            "nothing",
        )
    s.done()

    s = sections["decoder"]
    decoder = DecoderConfig(
        backend=s.text("backend", DecoderConfig.backend, DECODER_BACKENDS),
        queue=s.number("queue", DecoderConfig.queue, 1, 64, integer=True),
        idle_skip=s.flag("idle_skip", DecoderConfig.idle_skip),
        max_idle_skip=s.number("max_idle_skip", DecoderConfig.max_idle_skip, 0, 300, integer=True),
    )
    s.done()

    s = sections["policy"]
    policy = PolicyConfig(
        badges=s.path("badges", None),
        hmac_key=s.path("hmac_key", None),
        # below half a second a badge held to the camera would re-open the door frame after
        # frame whenever one frame is missed
        repeat_window_s=s.number("repeat_window_s", PolicyConfig.repeat_window_s, 0.5, 3600),
        max_payload=s.number("max_payload", PolicyConfig.max_payload, 1, 1 << 20, integer=True),
        trust=s.path("trust", None),
        denylist=s.path("denylist", None),
        schedules=s.path("schedules", None),
        snapshot_key=s.path("snapshot_key", None),
        leeway_s=s.number("leeway_s", PolicyConfig.leeway_s, 0, 3600),
        rotating_skew_steps=s.number(
            "rotating_skew_steps", PolicyConfig.rotating_skew_steps, 0, 5, integer=True
        ),
        clock_holdover_h=s.number("clock_holdover_h", PolicyConfig.clock_holdover_h, 0, 720),
        keep=_names(s, "keep", PolicyConfig.keep, KEEP_CHOICES),
    )
    if policy.badges is not None and policy.hmac_key is None:
        raise ConfigError(
            file, "policy.hmac_key", "the site key the badge list is made with", "nothing"
        )
    s.done()

    s = sections["gpio"]
    buzzer = _pin_or_none(s, "buzzer_pin", GpioConfig.buzzer_pin)
    gpio = GpioConfig(
        pin_factory=s.text("pin_factory", GpioConfig.pin_factory, PIN_FACTORIES),
        relay_pin=s.number("relay_pin", GpioConfig.relay_pin, 0, 53, integer=True),
        relay_active_high=s.flag("relay_active_high", GpioConfig.relay_active_high),
        strike=s.text("strike", GpioConfig.strike, STRIKES),
        pulse_s=s.number("pulse_s", GpioConfig.pulse_s, 0.1, 60),
        led=_pins(s),
        led_active_high=s.flag("led_active_high", GpioConfig.led_active_high),
        buzzer_pin=buzzer,
    )
    s.done()

    s = sections["doors"]
    doors = DoorsConfig(
        contact_pin=_pin_or_none(s, "contact_pin"),
        exit_pin=_pin_or_none(s, "exit_pin"),
        tamper_pin=_pin_or_none(s, "tamper_pin"),
        pull_up=s.flag("pull_up", DoorsConfig.pull_up),
        bounce_ms=s.number("bounce_ms", DoorsConfig.bounce_ms, 0, 1000),
        held_open_s=s.number("held_open_s", DoorsConfig.held_open_s, 1, 3600),
        exit_unlocks=s.flag("exit_unlocks", DoorsConfig.exit_unlocks),
        grace_s=s.number("grace_s", DoorsConfig.grace_s, 0, 60),
    )
    s.done()
    used: dict[str, int] = {"gpio.relay_pin": gpio.relay_pin}
    used.update({f"gpio.led.{colour}": pin for colour, pin in gpio.led.items()})
    if buzzer is not None:
        used["gpio.buzzer_pin"] = buzzer
    for key in ("contact_pin", "exit_pin", "tamper_pin"):
        pin = getattr(doors, key)
        if pin is not None:
            used[f"doors.{key}"] = pin
    by_pin: dict[int, list[str]] = {}
    for key, pin in used.items():
        by_pin.setdefault(pin, []).append(key)
    clashes = [f"{' and '.join(keys)} use {pin}" for pin, keys in by_pin.items() if len(keys) > 1]
    if clashes:
        raise ConfigError(
            file,
            "gpio",
            "a pin of its own for each of relay, LED, buzzer and door inputs",
            "; ".join(clashes),
        )

    s = sections["journal"]
    jpath = s.get(
        "path",
        JournalConfig.path,
        lambda v: Path(v) if isinstance(v, str) and v else _raise(),
        "a path string",
    )
    journal = JournalConfig(
        path=jpath,
        fsync_interval_ms=s.number("fsync_interval_ms", JournalConfig.fsync_interval_ms, 5, 1000),
        append_deadline_ms=s.number(
            "append_deadline_ms", JournalConfig.append_deadline_ms, 5, 1000
        ),
        max_rows=s.number("max_rows", JournalConfig.max_rows, 100, 100_000_000, integer=True),
        max_mb=s.number("max_mb", JournalConfig.max_mb, 1, 1_000_000),
        max_age_days=s.number("max_age_days", JournalConfig.max_age_days, 0, 36_500),
    )
    s.done()

    uplink = _uplink(sections["uplink"])
    provisioning = _provisioning(sections["provisioning"])
    ota = _ota(sections["ota"])

    return Config(
        reader=reader,
        camera=camera,
        decoder=decoder,
        policy=policy,
        gpio=gpio,
        doors=doors,
        journal=journal,
        uplink=uplink,
        provisioning=provisioning,
        ota=ota,
        source=file,
    )


def _topic_level(v: Any) -> str:
    if not isinstance(v, str) or not v or len(v) > 64 or any(c in v for c in "/+#\x00 "):
        raise ValueError
    return v


def _uplink(s: _Section) -> UplinkConfig:
    file = s.file
    transport = s.text("transport", UplinkConfig.transport, UPLINK_TRANSPORTS)
    default_port = 8883 if transport == "tls" else 1883
    username = s.get(
        "username",
        None,
        lambda v: v if isinstance(v, str) and v else _raise(),
        "a non-empty string",
    )
    c = UplinkConfig(
        enabled=s.flag("enabled", UplinkConfig.enabled),
        host=s.get(
            "host",
            "",
            lambda v: v if isinstance(v, str) and v and not v.isspace() else _raise(),
            "a host name or address",
        ),
        port=s.number("port", default_port, 1, 65535, integer=True),
        transport=transport,
        protocol=s.text("protocol", UplinkConfig.protocol, UPLINK_PROTOCOLS),
        keepalive_s=s.number("keepalive_s", UplinkConfig.keepalive_s, 2, 60, integer=True),
        connect_timeout_s=s.number("connect_timeout_s", UplinkConfig.connect_timeout_s, 1, 60),
        reconnect_min_s=s.number("reconnect_min_s", UplinkConfig.reconnect_min_s, 0.05, 10),
        reconnect_max_s=s.number("reconnect_max_s", UplinkConfig.reconnect_max_s, 1, 60),
        ca=s.path("ca", None),
        cert=s.path("cert", None),
        key=s.path("key", None),
        username=username,
        password_file=s.path("password_file", None),
        site=s.get(
            "site",
            UplinkConfig.site,
            _topic_level,
            "1-64 characters without '/', '+', '#', spaces or NUL",
        ),
        window=s.number("window", UplinkConfig.window, 1, 1000, integer=True),
        batch=s.number("batch", UplinkConfig.batch, 1, 500, integer=True),
        telemetry_s=_zero_or(s, "telemetry_s", UplinkConfig.telemetry_s, 1, 86400),
        ha_discovery=s.flag("ha_discovery", UplinkConfig.ha_discovery),
        resend_after_s=_zero_or(s, "resend_after_s", UplinkConfig.resend_after_s, 1, 86400),
    )
    s.done()
    if c.enabled and not c.host:
        raise ConfigError(
            file,
            "uplink.host",
            "the broker's host name or address (uplink.enabled is true)",
            "nothing",
        )
    if c.reconnect_min_s > c.reconnect_max_s:
        raise ConfigError(
            file,
            "uplink.reconnect_min_s",
            f"at most uplink.reconnect_max_s ({c.reconnect_max_s:g})",
            _kind(c.reconnect_min_s),
        )
    if transport != "tls":
        for key in ("ca", "cert", "key"):
            value = getattr(c, key)
            if value is not None:
                raise ConfigError(
                    file,
                    f"uplink.{key}",
                    "no TLS file with transport 'tcp' (set uplink.transport = 'tls')",
                    _kind(str(value)),
                )
    if (c.cert is None) != (c.key is None):
        missing = "uplink.key" if c.key is None else "uplink.cert"
        raise ConfigError(
            file, missing, "both uplink.cert and uplink.key, or neither", "only one of them"
        )
    if c.password_file is not None and c.username is None:
        raise ConfigError(
            file, "uplink.username", "a username to go with uplink.password_file", "nothing"
        )
    return c


def _provisioning(s: _Section) -> ProvisioningConfig:
    d = ProvisioningConfig
    c = ProvisioningConfig(
        public_key=s.path("public_key", None),
        fleet=s.get(
            "fleet",
            d.fleet,
            lambda v: v if isinstance(v, str) and _FLEET.fullmatch(v) else _raise(),
            "a fleet id: 1-64 letters, digits, '.', '_' or '-'",
        ),
        ca=s.path("ca", None),
        enroll_port=s.number("enroll_port", d.enroll_port, 1, 65535, integer=True),
        enroll_user=s.get(
            "enroll_user",
            d.enroll_user,
            lambda v: (
                v if isinstance(v, str) and v and len(v) <= 128 and v.isprintable() else _raise()
            ),
            "a non-empty printable string of at most 128 characters",
        ),
        enroll_password_file=s.path("enroll_password_file", None),
    )
    s.done()
    return c


def _repo_url(v: Any) -> str:
    if not isinstance(v, str) or len(v) > 1024 or not v.isprintable() or " " in v:
        raise ValueError
    scheme, sep, rest = v.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or rest.startswith("/"):
        raise ValueError
    return v.rstrip("/")


def _ota(s: _Section) -> OtaConfig:
    d = OtaConfig
    c = OtaConfig(
        repo_url=s.get(
            "repo_url", d.repo_url, _repo_url, "an http:// or https:// URL of a TUF repository"
        ),
        trusted_root=s.path("trusted_root", d.trusted_root) or d.trusted_root,
        install_root=s.path("install_root", d.install_root) or d.install_root,
        state_dir=s.path("state_dir", d.state_dir) or d.state_dir,
        device_type=s.get(
            "device_type",
            None,
            lambda v: v if v in DEVICE_TYPES else _raise(),
            "one of " + ", ".join(repr(t) for t in DEVICE_TYPES),
        ),
        keep=s.number("keep", d.keep, 1, 20, integer=True),
        health_deadline_s=float(s.number("health_deadline_s", d.health_deadline_s, 10, 3600)),
        quiet_s=float(s.number("quiet_s", d.quiet_s, 0, 600)),
        activity_file=s.path("activity_file", d.activity_file) or d.activity_file,
        max_bundle_mb=s.number("max_bundle_mb", d.max_bundle_mb, 1, 4096, integer=True),
        clock_wait_s=float(s.number("clock_wait_s", d.clock_wait_s, 0, 86400)),
    )
    s.done()
    if c.state_dir == c.install_root:
        raise ConfigError(
            s.file, "ota.state_dir", "a folder other than ota.install_root", _kind(str(c.state_dir))
        )
    return c


def _zero_or(s: _Section, key: str, default: float, lo: float, hi: float) -> float:
    """0 (off) or a number from lo to hi."""

    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError
        if v != 0 and not lo <= v <= hi:
            raise ValueError
        return float(v)

    return float(s.get(key, default, check, f"0 (off) or a number from {lo:g} to {hi:g}"))


def _raise() -> Any:
    raise ValueError


def load_config(path: Path) -> Config:
    """Read and validate a TOML config file.

    Raises ConfigError for a missing/unreadable file, broken TOML (with line and column) or an
    invalid value. Relative paths in the file are resolved against its folder.
    """
    name = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(name, "<file>", "a readable TOML file", e.strerror or str(e)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            name, "<file>", "UTF-8 text", f"invalid byte at offset {e.start}"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(name, "<file>", "valid TOML", str(e)) from None
    except RecursionError:
        raise ConfigError(
            name, "<file>", "valid TOML", "tables or arrays nested too deeply"
        ) from None
    return parse_config(data, name, path.resolve().parent)
