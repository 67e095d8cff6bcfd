"""Errors raised by ``firmware``. Each name ends in Error and each says what happens next."""


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


class DeviceIdentityError(QrgateError):
    """The reader cannot tell its own device id (no board serial, no machine-id): the reader
    still decides scans and journals them, but runs without the MQTT uplink; fix the board or
    write /etc/machine-id (``systemd-machine-id-setup``) and restart."""


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
