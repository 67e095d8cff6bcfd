"""Errors raised by ``drivers``. Each says what the caller should do next."""


class DriverError(Exception):
    """Root of every error raised by ``drivers``."""


class FrameSourceError(DriverError):
    """A frame source cannot deliver frames: re-open it (with backoff) or give up on that camera."""


class CameraUnavailableError(FrameSourceError):
    """The camera cannot be opened (missing, busy, no permission): retry later with backoff."""


class CameraTimeoutError(FrameSourceError):
    """No frame arrived within the read timeout: the camera stalled; re-open it."""


class FrameFileError(FrameSourceError):
    """An image file in a replay reel cannot be read: it is skipped, the reel goes on."""


class PinFactoryError(DriverError):
    """No GPIO pin factory could be created: give up; fix ``[gpio] pin_factory`` or
    GPIOZERO_PIN_FACTORY and start again."""


class FeedbackError(DriverError):
    """An output device could not be created on its pin: check the pin numbers; give up."""


class DeviceClosedError(DriverError):
    """The output device was closed: the call did nothing; create a new device to drive it again."""


class DoorInputError(DriverError):
    """A door input (door contact, request-to-exit, tamper) could not be created on its pin:
    check ``[doors]`` pin numbers and that no other device or process holds the line; give up."""
