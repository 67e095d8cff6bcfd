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
