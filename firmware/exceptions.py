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
