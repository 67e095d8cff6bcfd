"""The reader's MQTT client id, and its device id (re-exported from
:mod:`provisioning.identity`, where it lives).

The device id comes from the hardware, never from config or state: a config (or a whole SD card
image) copied to a second reader must not make two readers share one client id, or they would
take each other's MQTT session over in a loop.
"""

from __future__ import annotations

from provisioning.identity import (
    CPUINFO,
    DEVICETREE_SERIAL,
    MACHINE_ID,
    device_id,
    device_id_source,
)

__all__ = [
    "CPUINFO",
    "DEVICETREE_SERIAL",
    "MACHINE_ID",
    "client_id",
    "device_id",
    "device_id_source",
]


def client_id(device: str) -> str:
    """The MQTT client id of the reader named ``device``: ``qrgate-<device>``."""
    return f"qrgate-{device}"
