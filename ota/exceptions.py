"""Errors raised by ``ota``. Each name ends in Error and each says what happens next.

``ota`` imports nothing from ``firmware``, so these do not derive from
``firmware.exceptions.QrgateError``; the updater and command-line code catch :class:`OtaError`.
"""

from __future__ import annotations


class OtaError(Exception):
    """Root of the over-the-air update errors."""


class ReleaseError(OtaError):
    """A release folder operation was refused (bad version string, unknown release, no
    ``current`` or ``previous`` link to act on): the ``current`` link was not changed and the
    running release keeps running; fix the version or the release folder."""


class JobStateError(OtaError):
    """An update job cannot move as asked (an illegal transition, or a damaged or unreadable
    job file, which the message names): the job is not changed; the updater reports the job as
    failed and keeps the running release."""


class DownloadFailedError(OtaError):
    """A download gave up (``reason`` says why: ``http_404``, ``too_large``,
    ``hash_mismatch``, ``bad_content_range``, ``gave_up_after_5_attempts``, ...): nothing was
    put at the destination and the running release keeps running; the updater reports the job
    as failed with the reason. A partial file is kept for a later resume unless its bytes were
    proven wrong (``too_large``, ``hash_mismatch``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"download failed: {reason}" + (f" ({detail})" if detail else ""))


class DownloadTooLargeError(DownloadFailedError):
    """The server announced or sent more bytes than expected (or the expected size is over
    the cap): the partial file was deleted, nothing was installed; the updater reports the
    job as failed with reason ``too_large``."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("too_large", detail)


class JobPayloadError(OtaError):
    """An ``ota/job`` or ``ota/state`` MQTT payload broke the contract (oversized, not UTF-8
    JSON, a missing or ill-typed field, a bad id, version or state): the message is dropped
    and logged with this text; a reader keeps its running release and current job, the
    rollout keeps the device's last good state."""


class RolloutError(OtaError):
    """A rollout cannot start or continue as asked (no devices, bad wave sizes, a damaged or
    foreign state file, another process holding it, resume of a finished rollout): nothing
    was published; fix the options or the file named in the message and run again."""


class FleetTransportError(OtaError):
    """The broker could not be reached, refused the login or a subscription, or did not take
    a publish in time: the rollout state file keeps what was done; run again with
    ``--resume`` once the broker answers."""


class BundleError(OtaError):
    """A release bundle could not be built (pip failed, no ``__version__``, a wheel listed
    twice) or was refused on opening (not a plain tar, an unexpected or oversized member, a
    damaged manifest, a wheel whose SHA-256 differs from the manifest or requirements.txt):
    nothing was installed and the running release keeps running; rebuild the bundle, or the
    updater reports the job as failed."""


class RepositoryError(OtaError):
    """The TUF repository could not be created or changed (keys missing or unreadable, a
    repository that exists already, damaged metadata, a bundle that is not one): no metadata
    file was replaced, so devices keep seeing the previous repository state; fix what the
    message names and run the command again."""


class RejectedError(OtaError):
    """The update was refused before anything was installed; ``reason`` is the job's reason
    code (``downgrade``, ``same_version``, ``wrong_device_type``, ``below_min_version``,
    ``python_mismatch``, ``insufficient_disk``, ...): the updater reports the job as REJECTED
    and keeps the running release."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"update rejected: {reason}" + (f" ({detail})" if detail else ""))


class MetadataExpiredError(RejectedError):
    """A TUF metadata file is past its expiry (TUF spec §5.3-5.6), or the device clock is
    ahead: reason ``metadata_expired``; the job is REJECTED, and the repository's timestamp
    must be re-signed (``qrgate ota timestamp``) before it is sent again."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("metadata_expired", detail)


class MetadataRejectedError(RejectedError):
    """TUF metadata failed verification (bad or missing signatures, a version older than the
    one trusted: a rollback or freeze attack, a snapshot/targets mismatch): reason
    ``metadata_rejected``; the job is REJECTED and the trusted metadata is kept."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("metadata_rejected", detail)


class TargetUnknownError(RejectedError):
    """The signed targets metadata lists no bundle for the requested version (or its custom
    fields are unusable): reason ``target_unknown``; the job is REJECTED; publish the bundle
    or fix the job's version."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("target_unknown", detail)


class TamperedError(RejectedError):
    """The downloaded bundle's length or SHA-256 differs from the signed targets metadata:
    reason ``tampered``; the file is deleted, the job is REJECTED and nothing is installed."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("tampered", detail)


class ClockNotReadyError(OtaError):
    """The wall clock cannot be trusted yet to judge metadata expiry: ``reason`` is
    ``clock_unsynced`` (not synchronised) or ``clock_behind_build`` (earlier than the bundle's
    build time). The updater waits and checks again; after its wait limit it rejects the job
    with this reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"clock not ready: {reason}" + (f" ({detail})" if detail else ""))


class InstallError(OtaError):
    """A verified bundle could not be installed into its release folder (``reason``
    ``bad_bundle``: the bundle would not open; ``install_failed``: making the venv, pip or the
    post-install checks failed; ``detail`` holds the last lines of the tool's error output):
    the half-made folder was removed, ``current`` was not touched and the running release
    keeps running; the updater reports the job as FAILED with the reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"install failed: {reason}" + (f" ({detail})" if detail else ""))


class UnhealthyError(OtaError):
    """The restarted service did not prove healthy within the deadline (``reason``:
    ``exited_at_start``, ``not_ready``, ``no_frames`` or ``broker_not_connected``; ``detail``
    the exit code or the last STATUS= line): the updater rolls back to the previous release,
    restarts it and reports the job as ROLLED_BACK with the reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"service unhealthy: {reason}" + (f" ({detail})" if detail else ""))
