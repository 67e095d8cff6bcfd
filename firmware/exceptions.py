"""Errors raised by ``firmware``. Each name ends in Error and each says what happens next."""

from provisioning import exceptions as _provisioning_exceptions


class QrgateError(Exception):
    """Root of every error raised by ``firmware``."""


class ConfigError(QrgateError):
    """The configuration is invalid: fix the named file and key, then start again.

    ``file``, ``key``, ``expected`` and ``found`` say exactly what is wrong.
    """

    def __init__(self, file: str, key: str, expected: str, found: str) -> None:
        self.file, self.key, self.expected, self.found = file, key, expected, found
        super().__init__(f"{file}: [{key}] expected {expected}, found {found}")


class DecoderError(QrgateError):
    """A decoder backend cannot be used (library missing, bad image): pick another backend."""


class DecoderUnavailableError(DecoderError):
    """The backend's library is not installed here (e.g. libzbar0): install it or pick another."""


class CredentialListError(QrgateError):
    """A badge or credential list is unreadable or invalid: the reader keeps its last good list."""


class CredentialError(QrgateError):
    """A scanned credential (pass, rotating code, ID card, personal QR) cannot be accepted: the
    scan is denied with ``reason`` (a :class:`firmware.policy.verdict.Reason` value) and
    ``why`` (a precise, stable sub-reason such as ``"id_digits"``); nothing to retry, the
    holder needs a valid credential."""

    def __init__(self, reason: str, why: str, message: str) -> None:
        self.reason, self.why = reason, why
        super().__init__(message)


class PassError(CredentialError):
    """A signed pass or rotating code is malformed, unsigned by a trusted issuer key, or badly
    signed: denied; the administrator must issue a new pass (or add the issuer's key)."""


class IdCardError(CredentialError):
    """An ID card (CCCD) or personal QR payload is not well formed: denied with the precise
    rule it broke; the person shows the card again or checks in another way."""


class KeyFileError(QrgateError):
    """A key file is missing, unreadable, of the wrong kind or too open (a private key must be
    0600): fix the file or make a new key with ``qrgate keys new``; the command stops."""


class ScheduleError(CredentialListError):
    """A schedule document is invalid (unknown time zone, bad window, bad date): it is refused
    and the reader keeps its last good schedules."""


class SnapshotError(CredentialListError):
    """A credential snapshot or delta was refused (bad signature, older version, broken
    content, too large): the reader keeps the last good snapshot and reports the reason in its
    status; the administrator publishes a corrected one with a higher version."""


class JournalError(QrgateError):
    """The journal cannot store events: the scan is still decided; check the disk."""


class JournalDamagedError(JournalError):
    """The journal database failed its integrity check: it is moved aside and a fresh one opened."""


class InstanceLockedError(QrgateError):
    """Another qrgate daemon holds the reader: stop it, or send the action through it; give up."""


class CorpusError(QrgateError):
    """A QR test corpus (manifest, payload or image file) is unreadable: fix the named file; the
    test or benchmark run stops."""


class BrokerError(QrgateError):
    """The local MQTT broker used by the tests and the demo cannot run (mosquitto missing, bad
    config, port taken, did not come up in time): no broker process is left behind; install
    mosquitto (``apt-get install mosquitto``) or read the log tail in the message, then retry."""


class BadMessageError(QrgateError):
    """An inbound MQTT message is oversized or not a JSON object: it is logged with the reason
    and dropped; the link lives on."""


class StoreError(QrgateError):
    """The back office's event store cannot be opened or written (no such file, server down,
    database locked past the busy timeout, schema newer than this code): ``qrgate report`` and
    ``qrgate fleet`` exit with the reason; ``qrgate ingest`` leaves the message unacknowledged
    and retries it with backoff, so the broker keeps it and the reader keeps its rows."""


class BrokerConnectError(QrgateError):
    """The back office cannot reach or log in to the MQTT broker (wrong host or port, TLS or
    credentials refused): the command exits with the reason; check ``--broker`` and the TLS
    options. A running ``qrgate ingest`` does not raise it: it reconnects with backoff."""


class ClientIdTakenError(QrgateError):
    """Another MQTT client connected with this ingest worker's client id and the broker closed
    this one: the worker stops instead of fighting over the session; give every worker its own
    ``--client-id`` and start it again."""


# The same class as provisioning's (one class, so `except DeviceIdentityError` catches what
# provisioning.identity raises). provisioning imports nothing from firmware, so it is not a
# QrgateError: firmware catches it by name (daemon.py turns the uplink off with it).
DeviceIdentityError = _provisioning_exceptions.DeviceIdentityError


class CommandError(QrgateError):
    """A back-office command was refused or failed: its result message says why (``ok``
    false); the reader carries on unchanged."""


class DesiredConfigError(QrgateError):
    """The back office's desired configuration was refused (a setting that may not be set
    remotely, a bad value, no version): the reader keeps its current settings and says why in
    its status; the back office must publish a corrected document with a higher version."""


class StoreRetryAbortedError(StoreError):
    """The store stayed unusable until the ingest worker was told to stop: the message in
    hand is neither stored nor acknowledged, so the broker delivers it again when the worker
    (the same client id) comes back."""
