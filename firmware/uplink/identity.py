"""The reader's device id: the name it has on the MQTT broker and in every topic.

It comes from the hardware, never from config: a config (or a whole SD card image) copied to a
second reader must not make two readers share one client id, or they would take each other's
MQTT session over in a loop.
"""

from __future__ import annotations

import re
from pathlib import Path

from firmware.exceptions import DeviceIdentityError

DEVICETREE_SERIAL = Path("/sys/firmware/devicetree/base/serial-number")
CPUINFO = Path("/proc/cpuinfo")
MACHINE_ID = Path("/etc/machine-id")

# What may stand in a topic level and a client id: no "/", "+", "#", spaces or NULs.
_VALID = re.compile(r"^[0-9a-z][0-9a-z_-]{3,63}$")
_CPUINFO_SERIAL = re.compile(r"^Serial\s*:\s*(\S+)\s*$", re.MULTILINE)


def _clean(raw: str) -> str | None:
    """A usable id from raw text, or None: lowercased, NULs and whitespace stripped; all-zero
    serials (boards and VMs that report none) are no id."""
    text = raw.replace("\x00", "").strip().lower()
    if not _VALID.match(text) or set(text) <= {"0", "-", "_"}:
        return None
    return text


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def device_id(
    *,
    devicetree: Path = DEVICETREE_SERIAL,
    cpuinfo: Path = CPUINFO,
    machine_id: Path = MACHINE_ID,
) -> str:
    """The device id, e.g. ``"10000000a1b2c3d4"`` on a Raspberry Pi.

    Tried in order: the device tree's ``serial-number`` (Raspberry Pi, NUL-terminated), the
    ``Serial`` line of ``/proc/cpuinfo`` (older Pi kernels), ``/etc/machine-id`` (any Linux;
    note that a cloned image shares it unless regenerated). Each is lowercased; a value that is
    missing, all zeros or not 4-64 of ``0-9a-z_-`` is skipped. The paths are parameters for
    tests. Raises DeviceIdentityError when none gives an id.
    """
    tried: list[str] = []
    text = _read(devicetree)
    found = _clean(text) if text is not None else None
    if found:
        return found
    tried.append(f"{devicetree} ({'unusable' if text is not None else 'absent'})")
    text = _read(cpuinfo)
    if text is not None:
        m = _CPUINFO_SERIAL.search(text)
        found = _clean(m.group(1)) if m else None
        if found:
            return found
    tried.append(f"{cpuinfo} Serial ({'unusable' if text is not None else 'absent'})")
    text = _read(machine_id)
    found = _clean(text) if text is not None else None
    if found:
        return found
    tried.append(f"{machine_id} ({'unusable' if text is not None else 'absent'})")
    raise DeviceIdentityError("no device id: tried " + ", ".join(tried))


def client_id(device: str) -> str:
    """The MQTT client id of the reader named ``device``: ``qrgate-<device>``."""
    return f"qrgate-{device}"
