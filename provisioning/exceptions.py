"""Errors raised by ``provisioning``. Each name ends in Error and each says what happens next.

``provisioning`` imports nothing from ``firmware``, so these do not derive from
``firmware.exceptions.QrgateError``; command-line code catches :class:`ProvisioningError`.
"""

from __future__ import annotations


class ProvisioningError(Exception):
    """Root of the provisioning errors."""


class CaError(ProvisioningError):
    """The fleet CA folder cannot be used as asked (missing, damaged, already initialised,
    unreadable or unwritable files): nothing was changed; fix the folder or the command."""


class CsrError(ProvisioningError):
    """A certificate signing request was refused (bad signature, wrong name, key type or
    extension): nothing was issued; the reader must make a new CSR (re-enroll)."""


class DeviceIdentityError(ProvisioningError):
    """The reader cannot tell its own device id (no board serial, no machine-id): the reader
    still decides scans and journals them, but runs without the MQTT uplink and cannot enroll;
    fix the board or write /etc/machine-id (``systemd-machine-id-setup``) and restart.

    Also importable as ``firmware.exceptions.DeviceIdentityError`` (the same class)."""


class DeviceKeyError(ProvisioningError):
    """The reader's own key in ``<state_dir>/identity`` is missing, unreadable, damaged or
    readable by group or others, or a new one would overwrite it: nothing was changed; run
    ``chmod 600`` on the file (a key that was readable by others should be treated as leaked:
    ``qrgate factory-reset`` and enroll again)."""


class DeviceCertificateError(ProvisioningError):
    """A certificate offered to the reader does not fit it (another key, another device id,
    unreadable PEM) or the stored one is damaged: it is not stored and the reader keeps what
    it had; enroll again to get a certificate for this reader's key."""


class ProvisioningCodeError(ProvisioningError):
    """A provisioning code (``QGP1:``, :mod:`provisioning.qr`) was refused: the reader changes
    nothing, plays the deny pattern and stays in provisioning mode, looking for another code.

    ``reason``: one of "malformed", "unknown_key", "bad_signature", "wrong_fleet",
    "not_yet_valid", "expired", "replayed" (:class:`provisioning.qr.Refusal`); ``why``: a
    finer stable code for "malformed" (``None`` otherwise). The message says what the
    installer does next (usually: ask the administrator for a new code)."""

    def __init__(self, reason: str, why: str | None, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.why = why


class EnrollmentError(ProvisioningError):
    """Enrollment over MQTT (:mod:`provisioning.enroll`) did not give this reader a
    certificate: the reader keeps no certificate, plays the deny pattern and goes back to
    provisioning mode. ``reason``: "token_unknown", "token_used", "token_expired", "scope",
    "csr", "device_mismatch", "internal" (the server's answer) or "timeout" (no answer) /
    "transport" (the broker could not be reached or refused the login). Next: "timeout",
    "transport" and "internal" may be retried with the same code; the others need a new
    provisioning code from the administrator."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"enrollment refused: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail


class TokenStoreError(ProvisioningError):
    """An enrollment token record or the token database cannot be used (bad token file,
    damaged or unwritable database): nothing was changed; fix the file or make a new code
    with ``qrgate provision qr --token-out``."""
