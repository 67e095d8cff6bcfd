"""Provisioning mode: a new reader reads a signed provisioning code with its own camera,
configures itself, enrolls and confirms (issue 6, item 5, the reader's side).

:class:`ProvisioningSession` reads frames from a :class:`~drivers.frames.FrameSource` through
the project's decoder (the same decode path as a scan). Every decoded payload starting with
``QGP1:`` (:mod:`provisioning.qr`) is checked with :func:`firmware.admin.provision.verify_code`
against the provisioning public keys and the fleet id installed with the firmware; the wall
clock is passed as ``now`` only while the clock is trusted, and the code ids already used on
this reader (:class:`UsedCodes`, ``<state_dir>/provisioning-used.json``) are refused as
replayed. A good code then goes through, in this order:

1. the fleet CA installed with the firmware must be the CA the code names (SHA-256 of its
   DER, :func:`~firmware.admin.provision.ca_fingerprint_of`), else refusal ``wrong_ca``;
2. the device key is made if missing (:meth:`provisioning.device.DeviceKeys.create_key`);
3. ``enroll(claims, keys, device_id)`` (injected; the command wires
   :func:`provisioning.enroll.enroll`) stores the reader's certificate or raises
   (``EnrollmentError`` and its ``reason``); then a certificate must be stored;
4. the code id is recorded as used (the enrollment server has spent the token);
5. the provisioned overlay (below) is written atomically: its presence is what makes the
   reader provisioned, so it is written last and never points at a missing certificate;
6. the feedback's ``confirmed()`` pattern (light and sound, never the relay).

Every refusal (each :class:`~provisioning.qr.Refusal` reason, ``wrong_ca``, ``enrollment``
with the enrollment error's reason as ``why``, ``device_key``, ``storage``) is logged with its
reason, shown with ``denied()`` (no relay either), and the session keeps looking: an installer
can show another code. The same payload seen again within ``repeat_s`` seconds (monotonic) of
the last time it was seen is not answered again, so a code held in view is answered once.

An enrollment refusal whose reason is retryable (:data:`RETRYABLE_ENROLLMENT`: no answer,
broker unreachable, server fault), or an error without a ``reason`` (a local problem such as
an unreadable device key), leaves the code unused on this reader: show it again once fixed.
Any other enrollment refusal (the server's answer) records it as used, as the server did.

Overlay file ``<state_dir>/provisioned.json`` (UTF-8 JSON, 0644; no secrets)::

    {"format": "qrgate-provisioned-1",
     "device": "<device id>", "fleet": "<fleet>", "token_id": "<16 hex>",
     "broker": "mqtts://host:port", "ca_fingerprint": "<64 hex>",
     "provisioned_at": <wall seconds>, "clock_checked": true|false,
     "reader": {"door": "<door>", "direction": "in"|"out"|"both"},
     "uplink": {"enabled": true, "site": "<site>", "host": "<host>", "port": <port>,
                "transport": "tls", "ca": "<installed CA path>",
                "cert": "<state_dir>/identity/device.crt",
                "key": "<state_dir>/identity/device.key",
                "username": null, "password_file": null}}

(a lab code with a plain ``mqtt://`` broker gives ``"transport": "tcp"`` and null ``ca``,
``cert`` and ``key``). :func:`load_provisioned` reads it back and :func:`apply_provisioned`
lays ``reader`` and ``uplink`` over a loaded :class:`~firmware.config.Config`: the daemon
applies it right after loading the config file and before the back office's desired
settings.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from drivers.exceptions import CameraTimeoutError
from drivers.frames import FrameSource
from firmware.admin.provision import ca_fingerprint_of, verify_code
from firmware.config import DIRECTIONS, Config
from firmware.decoding.codes import Decoder
from firmware.exceptions import ConfigError, KeyFileError, QrgateError
from firmware.policy.cose import PublicKey
from provisioning.device import DeviceKeys, identity_dir
from provisioning.exceptions import (
    DeviceCertificateError,
    DeviceKeyError,
    ProvisioningCodeError,
)
from provisioning.files import NotRegularFileError, read_regular, write_atomic
from provisioning.qr import PREFIX, ProvisioningClaims

__all__ = [
    "DEFAULT_REPEAT_S",
    "OVERLAY_FILE",
    "OVERLAY_FORMAT",
    "RETRYABLE_ENROLLMENT",
    "USED_FILE",
    "WRONG_CA",
    "EnrollFn",
    "Outcome",
    "Provisioned",
    "ProvisioningModeError",
    "ProvisioningSession",
    "Signals",
    "UsedCodes",
    "apply_provisioned",
    "load_provisioned",
    "overlay_document",
]

log = logging.getLogger(__name__)

OVERLAY_FILE = "provisioned.json"
OVERLAY_FORMAT = "qrgate-provisioned-1"
USED_FILE = "provisioning-used.json"
USED_FORMAT = "qrgate-provisioning-used-1"
MAX_USED = 4096  # codes live 30 days at most; a reader sees a handful in its life
MAX_STATE_BYTES = 256 * 1024
DEFAULT_REPEAT_S = 3.0
WRONG_CA = "wrong_ca"
RETRYABLE_ENROLLMENT = frozenset({"timeout", "transport", "internal"})
"""Enrollment refusals after which the same code may be shown again (the server did not
spend the token, or may not have)."""

_PREFIX = PREFIX.encode("ascii")

EnrollFn = Callable[[ProvisioningClaims, DeviceKeys, str], None]
"""``enroll(claims, keys, device_id)``: enroll over MQTT with the code's token and store the
certificate in ``keys``; raises (preferably an exception with a ``reason`` attribute, as
:class:`provisioning.exceptions.EnrollmentError`) when no certificate was issued."""


class ProvisioningModeError(QrgateError):
    """Provisioning mode cannot start: the fleet CA or the used-codes file in the state folder
    is missing or damaged. Nothing was changed; fix or reinstall the named file (the message
    names it), then start provisioning mode again."""


class Signals(Protocol):
    """What the session shows: :class:`drivers.feedback.Feedback` has both; neither may touch
    the door relay."""

    def confirmed(self) -> None: ...

    def denied(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one code. ``accepted``: the reader is provisioned. ``reason``: None
    when accepted, else a :class:`~provisioning.qr.Refusal` value, ``"wrong_ca"``,
    ``"enrollment"``, ``"device_key"`` or ``"storage"``. ``why``: the finer reason (the
    malformed code's ``why``, the enrollment error's ``reason``). ``message``: for logs and
    the installer. ``claims``: the verified claims (None when the code itself was refused)."""

    accepted: bool
    reason: str | None
    why: str | None
    message: str
    claims: ProvisioningClaims | None = None


# --- used codes ---------------------------------------------------------------------------------


class UsedCodes(Container[bytes]):
    """The code ids (token ids, 8 bytes) used on this reader, kept in ``path`` (JSON
    ``{"format": "qrgate-provisioning-used-1", "token_ids": ["<16 hex>", ...]}``, oldest
    first, at most :data:`MAX_USED`). Raises ProvisioningModeError when the file exists but
    is unreadable or damaged (refusing beats forgetting: a forgotten id could be replayed)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._ids: list[bytes] = self._load()

    def _load(self) -> list[bytes]:
        try:
            data, _ = read_regular(self.path, MAX_STATE_BYTES, follow_symlinks=False)
        except FileNotFoundError:
            return []
        except (OSError, NotRegularFileError) as e:
            raise ProvisioningModeError(
                f"{self.path}: cannot read the used provisioning codes: {e}; remove it only if "
                "no code shown to this reader may be shown again"
            ) from None
        try:
            doc = json.loads(data)
            if doc.get("format") != USED_FORMAT:
                raise ValueError("unknown format")
            ids = [bytes.fromhex(t) for t in doc["token_ids"]]
            if any(len(i) != 8 for i in ids):
                raise ValueError("a token id is not 8 bytes")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ProvisioningModeError(
                f"{self.path}: not a used-codes file ({e}); remove it only if no code shown "
                "to this reader may be shown again"
            ) from None
        return ids

    def __contains__(self, token_id: object) -> bool:
        return token_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, token_id: bytes) -> None:
        """Record ``token_id`` (atomic write, 0600). Raises OSError; the id is then still
        refused for the rest of this session."""
        if token_id in self._ids:
            return
        self._ids = [*self._ids, token_id][-MAX_USED:]
        doc = {"format": USED_FORMAT, "token_ids": [i.hex() for i in self._ids]}
        write_atomic(self.path, json.dumps(doc).encode("utf-8"), 0o600, overwrite=True)


# --- the overlay --------------------------------------------------------------------------------


def overlay_document(
    claims: ProvisioningClaims,
    *,
    device_id: str,
    ca_file: Path,
    state_dir: Path,
    provisioned_at: int,
) -> dict[str, Any]:
    """The overlay document (module docstring) for a reader provisioned with ``claims``."""
    keys = DeviceKeys(identity_dir(state_dir))
    tls = claims.broker_tls
    return {
        "format": OVERLAY_FORMAT,
        "device": device_id,
        "fleet": claims.fleet,
        "token_id": claims.token_id.hex(),
        "broker": claims.broker,
        "ca_fingerprint": claims.ca_fingerprint.hex(),
        "provisioned_at": provisioned_at,
        "clock_checked": claims.clock_checked,
        "reader": {"door": claims.door, "direction": claims.direction},
        "uplink": {
            "enabled": True,
            "site": claims.site,
            "host": claims.broker_host,
            "port": claims.broker_port,
            "transport": "tls" if tls else "tcp",
            "ca": str(Path(ca_file).absolute()) if tls else None,
            "cert": str(keys.cert_path.absolute()) if tls else None,
            "key": str(keys.key_path.absolute()) if tls else None,
            # the certificate is the reader's login: a password user from the file must go
            "username": None,
            "password_file": None,
        },
    }


@dataclass(frozen=True, slots=True)
class Provisioned:
    """A read overlay: what :func:`apply_provisioned` sets (``reader`` and ``uplink`` keyword
    values for :func:`dataclasses.replace`) and the record (``device``, ``fleet``,
    ``token_id``, ``broker``, ``provisioned_at``, ``clock_checked``)."""

    reader: Mapping[str, Any]
    uplink: Mapping[str, Any]
    device: str
    fleet: str
    token_id: str
    broker: str
    provisioned_at: int
    clock_checked: bool


_UPLINK_KEYS = {
    "enabled",
    "site",
    "host",
    "port",
    "transport",
    "ca",
    "cert",
    "key",
    "username",
    "password_file",
}


def _overlay_error(path: Path, key: str, expected: str, found: str) -> ConfigError:
    return ConfigError(str(path), key, expected, found)


def load_provisioned(state_dir: Path) -> Provisioned | None:
    """The overlay in ``<state_dir>/provisioned.json``, or None when the reader was never
    provisioned. Raises ConfigError (file = the overlay) when it is unreadable or damaged:
    run provisioning mode again (``qrgate factory-reset`` first) or remove the file."""
    path = Path(state_dir) / OVERLAY_FILE
    try:
        data, _ = read_regular(path, MAX_STATE_BYTES, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except (OSError, NotRegularFileError) as e:
        raise _overlay_error(path, "<file>", "a readable provisioned overlay", str(e)) from None
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise _overlay_error(path, "<file>", "JSON", str(e)) from None
    if not isinstance(doc, dict) or doc.get("format") != OVERLAY_FORMAT:
        raise _overlay_error(path, "format", repr(OVERLAY_FORMAT), "something else")
    reader, uplink = doc.get("reader"), doc.get("uplink")
    if not isinstance(reader, dict) or set(reader) != {"door", "direction"}:
        raise _overlay_error(path, "reader", "exactly door and direction", "something else")
    door, direction = reader["door"], reader["direction"]
    if not (isinstance(door, str) and 0 < len(door) <= 128 and door.isprintable()):
        raise _overlay_error(path, "reader.door", "a door name", repr(door)[:80])
    if direction not in DIRECTIONS:
        raise _overlay_error(path, "reader.direction", "in, out or both", repr(direction)[:80])
    if not isinstance(uplink, dict) or set(uplink) != _UPLINK_KEYS:
        raise _overlay_error(
            path, "uplink", "exactly " + ", ".join(sorted(_UPLINK_KEYS)), "something else"
        )
    out: dict[str, Any] = {"enabled": uplink["enabled"] is True}
    for key in ("site", "host"):
        value = uplink[key]
        if not (isinstance(value, str) and 0 < len(value) <= 253 and value.isprintable()):
            raise _overlay_error(path, f"uplink.{key}", "a non-empty string", repr(value)[:80])
        out[key] = value
    port = uplink["port"]
    if type(port) is not int or not 0 < port < 65536:
        raise _overlay_error(path, "uplink.port", "a TCP port", repr(port)[:80])
    out["port"] = port
    if uplink["transport"] not in ("tls", "tcp"):
        raise _overlay_error(path, "uplink.transport", "tls or tcp", repr(uplink["transport"]))
    out["transport"] = uplink["transport"]
    for key in ("ca", "cert", "key", "password_file"):
        value = uplink[key]
        if value is not None and not (isinstance(value, str) and os.path.isabs(value)):
            raise _overlay_error(path, f"uplink.{key}", "an absolute path or null", repr(value))
        out[key] = Path(value) if value is not None else None
    if uplink["username"] is not None and not isinstance(uplink["username"], str):
        raise _overlay_error(path, "uplink.username", "a string or null", "something else")
    out["username"] = uplink["username"]
    if out["transport"] == "tls" and (out["cert"] is None or out["key"] is None):
        raise _overlay_error(path, "uplink.cert", "the device certificate and key", "null")
    try:
        return Provisioned(
            reader={"door": door, "direction": direction},
            uplink=out,
            device=str(doc["device"]),
            fleet=str(doc["fleet"]),
            token_id=str(doc["token_id"]),
            broker=str(doc["broker"]),
            provisioned_at=int(doc["provisioned_at"]),
            clock_checked=doc["clock_checked"] is True,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise _overlay_error(path, "<file>", "the provisioning record", f"missing {e}") from None


def needs_provisioning(config: Config, device_id: str) -> bool:
    """True when this reader is set up for provisioning mode (``[provisioning] public_key``)
    and its state folder holds no provisioned settings for ``device_id``. Raises ConfigError
    when the overlay is damaged."""
    if config.provisioning.public_key is None:
        return False
    prov = load_provisioned(config.reader.state_dir)
    if prov is not None and prov.device != device_id:
        log.warning(
            "provisioned settings are for device %s, this is %s (a copied SD card?):"
            " provisioning this reader anew",
            prov.device,
            device_id,
        )
        return True
    return prov is None


def apply_provisioned(config: Config, provisioned: Provisioned) -> Config:
    """``config`` with the provisioned door, direction and broker settings in place."""
    return replace(
        config,
        reader=replace(config.reader, **dict(provisioned.reader)),
        uplink=replace(config.uplink, **dict(provisioned.uplink)),
    )


# --- the session --------------------------------------------------------------------------------


class ProvisioningSession:
    """The reader's provisioning mode (see the module docstring).

    ``source``: an open frame source. ``decoder``: the project's decoder
    (:func:`firmware.decoding.registry.make_decoder`). ``signals``: ``confirmed()`` /
    ``denied()`` (:class:`drivers.feedback.Feedback`). ``enroll``: :data:`EnrollFn`.
    ``public_keys``: provisioning public keys by kid
    (:func:`firmware.admin.provision.key_ring`). ``fleet``: this firmware's fleet id.
    ``ca_file``: the fleet CA installed with the firmware (PEM or DER). ``state_dir``: the
    reader's state folder (identity, used codes, overlay). ``device_id``: this reader's id.
    ``clock_trusted``: True while the wall clock may judge ``iat``/``exp``; ``clock_floor``:
    a time known to have passed (seconds since the epoch) or None. ``wall``: seconds since
    the epoch; ``monotonic_ns``: for the repeat window. ``repeat_s``: a payload seen again
    within this long of its last sighting is not answered again. ``allow_plain_mqtt``: labs.
    ``on_outcome``: called with every :class:`Outcome`, after its pattern was posted.

    Raises ProvisioningModeError when ``ca_file`` or the used-codes file cannot be used.
    :attr:`provisioned` is set once a code was accepted (:attr:`claims` then holds it).
    """

    def __init__(
        self,
        *,
        source: FrameSource,
        decoder: Decoder,
        signals: Signals,
        enroll: EnrollFn,
        public_keys: Mapping[bytes, PublicKey],
        fleet: str,
        ca_file: Path,
        state_dir: Path,
        device_id: str,
        clock_trusted: Callable[[], bool],
        clock_floor: Callable[[], float | None] | None = None,
        wall: Callable[[], float] = time.time,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        repeat_s: float = DEFAULT_REPEAT_S,
        allow_plain_mqtt: bool = False,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.source, self.decoder, self.signals = source, decoder, signals
        self._enroll = enroll
        self.public_keys, self.fleet = public_keys, fleet
        self.ca_file, self.state_dir, self.device_id = Path(ca_file), Path(state_dir), device_id
        self._trusted, self._floor = clock_trusted, clock_floor
        self._wall, self._mono = wall, monotonic_ns
        self.repeat_ns = int(repeat_s * 1e9)
        self.allow_plain_mqtt = allow_plain_mqtt
        self._on_outcome = on_outcome
        try:
            self.ca_fingerprint = ca_fingerprint_of(self.ca_file)
        except (KeyFileError, ValueError) as e:
            raise ProvisioningModeError(
                f"the fleet CA installed with the firmware cannot be used: {e}; reinstall it "
                "(provisioning.ca in the config)"
            ) from None
        self.keys = DeviceKeys(identity_dir(self.state_dir))
        self.used = UsedCodes(self.state_dir / USED_FILE)
        self.provisioned = threading.Event()
        self.beat_ns = time.monotonic_ns()
        self.claims: ProvisioningClaims | None = None
        self._last_payload: bytes | None = None
        self._last_ns = 0

    def run(
        self, stop: threading.Event | None = None, read_timeout_s: float = 1.0
    ) -> ProvisioningClaims | None:
        """Read frames until a code is accepted (returns its claims), ``stop`` is set or a
        finite source ends (returns None). A camera read timing out is logged and retried;
        other camera errors propagate (FrameSourceError)."""
        while not self.provisioned.is_set() and not (stop is not None and stop.is_set()):
            self.beat_ns = time.monotonic_ns()  # the service watchdog follows this loop
            try:
                frame = self.source.read(read_timeout_s)
            except CameraTimeoutError as e:
                log.warning("provisioning mode: no frame (%s); still looking", e)
                continue
            if frame is None:
                break
            self.handle(frame.image)
        return self.claims

    def handle(self, image: Any) -> list[Outcome]:
        """Decode one gray image and answer each provisioning code in it (stops after one
        is accepted). Codes that are not provisioning codes are ignored."""
        try:
            codes = self.decoder.decode(image)
        except Exception as e:  # a bad frame must not end provisioning mode
            log.warning("provisioning mode: frame not decoded: %s", e)
            return []
        outcomes: list[Outcome] = []
        for code in codes:
            if self.provisioned.is_set():
                break
            outcome = self.offer(code.payload)
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    def offer(self, payload: bytes) -> Outcome | None:
        """Answer one decoded payload: None when it is no provisioning code, the reader is
        already provisioned, or it is the payload last answered and still in view (seen
        within ``repeat_s``); else the :class:`Outcome`, shown and logged."""
        if not payload.startswith(_PREFIX) or self.provisioned.is_set():
            return None
        now_ns = self._mono()
        if payload == self._last_payload and now_ns - self._last_ns < self.repeat_ns:
            self._last_ns = now_ns  # still in view: the window slides while it is held up
            return None
        self._last_payload, self._last_ns = payload, now_ns
        outcome = self._decide(payload)
        if outcome.accepted:
            log.info("%s", outcome.message)
            self.signals.confirmed()
            self.claims = outcome.claims
            self.provisioned.set()
        else:
            log.warning("%s", outcome.message)
            self.signals.denied()
        if self._on_outcome is not None:
            self._on_outcome(outcome)
        return outcome

    def _decide(self, payload: bytes) -> Outcome:
        trusted = self._trusted()
        floor = self._floor() if self._floor is not None else None
        try:
            claims = verify_code(
                payload,
                public_keys=self.public_keys,
                fleet=self.fleet,
                now=int(self._wall()) if trusted else None,
                seen=self.used,
                clock_floor=int(floor) if floor else None,
                allow_plain_mqtt=self.allow_plain_mqtt,
            )
        except ProvisioningCodeError as e:
            return Outcome(False, e.reason, e.why, str(e))
        if claims.ca_fingerprint != self.ca_fingerprint:
            return Outcome(
                False,
                WRONG_CA,
                None,
                f"provisioning code refused, {WRONG_CA}: it names the CA "
                f"{claims.ca_fingerprint.hex()[:16]}…, the firmware's fleet CA {self.ca_file} "
                f"is {self.ca_fingerprint.hex()[:16]}…; ask the administrator for a code made "
                "with this fleet's CA (or install the right CA with the firmware)",
                claims,
            )
        try:
            if not self.keys.has_key():
                self.keys.create_key()
        except DeviceKeyError as e:
            return Outcome(False, "device_key", None, f"provisioning stopped: {e}", claims)
        try:
            self._enroll(claims, self.keys, self.device_id)
        except Exception as e:  # whatever the enroller raises is a refusal, never a crash
            return self._enroll_refused(claims, e)
        try:
            cert = self.keys.load_certificate()
            problem = "enrollment returned without storing a certificate"
        except DeviceCertificateError as e:
            cert, problem = None, str(e)
        if cert is None:
            return Outcome(False, "enrollment", "no_certificate", f"enrollment: {problem}", claims)
        self._mark_used(claims)
        doc = overlay_document(
            claims,
            device_id=self.device_id,
            ca_file=self.ca_file,
            state_dir=self.state_dir,
            provisioned_at=int(self._wall()),
        )
        path = self.state_dir / OVERLAY_FILE
        try:
            data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")
            write_atomic(path, data, 0o644, overwrite=True)
        except OSError as e:
            return Outcome(
                False,
                "storage",
                None,
                f"provisioning stopped: {path}: cannot write: {e.strerror or e}; free space "
                "or fix the state folder, then show a new code",
                claims,
            )
        return Outcome(
            True,
            None,
            None,
            f"provisioned: site {claims.site}, door {claims.door} ({claims.direction}), "
            f"broker {claims.broker}, device {self.device_id}",
            claims,
        )

    def _enroll_refused(self, claims: ProvisioningClaims, e: Exception) -> Outcome:
        reason = getattr(e, "reason", None)
        why = reason if isinstance(reason, str) else type(e).__name__
        if isinstance(reason, str) and reason not in RETRYABLE_ENROLLMENT:
            # the server answered no and spent the token (or never will take it): so does
            # this reader. Errors without a reason (a local key problem) leave it unused.
            self._mark_used(claims)
            step = "ask the administrator for a new code"
        else:
            step = "check the network and the broker, then show the code again"
        return Outcome(
            False, "enrollment", why, f"provisioning code refused, enrollment: {e}; {step}", claims
        )

    def _mark_used(self, claims: ProvisioningClaims) -> None:
        try:
            self.used.add(claims.token_id)
        except OSError as e:
            # still refused in this session (kept in memory); only a restart could replay it
            log.error("%s: cannot record the used code: %s", self.used.path, e.strerror or e)
