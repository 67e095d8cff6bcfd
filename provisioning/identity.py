"""The reader's device id: its name on the MQTT broker, in every topic and in its certificate.

It comes from the hardware, never from config or state: a config (or a whole SD card image)
copied to a second reader must not make two readers share one id, or they would take each
other's MQTT session over in a loop and share one certificate name. For the same reason it is
stable across reinstalls and ``qrgate factory-reset``: wiping the SD card or the state folder
does not change it, so the back office and the fleet CA keep knowing the reader by one name (a
reset reader enrolls again under the same id, with a new key).

Sources, tried in order (:data:`DEVICETREE_SERIAL`, :data:`CPUINFO`, :data:`MACHINE_ID`):

1. the device tree's ``serial-number`` (Raspberry Pi, NUL-terminated): burnt into the SoC;
2. the ``Serial`` line of ``/proc/cpuinfo`` (older Pi kernels): the same number;
3. ``/etc/machine-id`` (any Linux): written at first boot, so a reinstall or a cloned image
   changes or shares it (``systemd-machine-id-setup`` makes a fresh one); a fallback only.
"""

from __future__ import annotations

import re
from pathlib import Path

from provisioning.exceptions import DeviceIdentityError

DEVICETREE_SERIAL = Path("/sys/firmware/devicetree/base/serial-number")
CPUINFO = Path("/proc/cpuinfo")
MACHINE_ID = Path("/etc/machine-id")

# What may stand in a topic level, a client id and a certificate CN: no "/", "+", "#",
# spaces or NULs.
_VALID = re.compile(r"[0-9a-z][0-9a-z_-]{3,63}")
_CPUINFO_SERIAL = re.compile(r"^Serial\s*:\s*(\S+)\s*$", re.MULTILINE)


def _clean(raw: str) -> str | None:
    """A usable id from raw text, or None: lowercased, NULs and whitespace stripped; all-zero
    serials (boards and VMs that report none) are no id."""
    text = raw.replace("\x00", "").strip().lower()
    if not _VALID.fullmatch(text) or set(text) <= {"0", "-", "_"}:
        return None
    return text


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def is_device_id(text: str) -> bool:
    """True when ``text`` has the shape of a device id: 4-64 of ``0-9a-z_-``, starting with a
    letter or digit (what :func:`device_id` returns and certificates must name)."""
    return _VALID.fullmatch(text) is not None


def device_id_source(
    *,
    devicetree: Path = DEVICETREE_SERIAL,
    cpuinfo: Path = CPUINFO,
    machine_id: Path = MACHINE_ID,
) -> tuple[str, str]:
    """``(device id, source)``: the id as :func:`device_id` returns it and where it came from:
    ``"<devicetree path>"``, ``"<cpuinfo path> Serial"`` or ``"<machine-id path>"``.

    Raises DeviceIdentityError naming every source tried when none gives an id.
    """
    tried: list[str] = []
    text = _read(devicetree)
    found = _clean(text) if text is not None else None
    if found:
        return found, str(devicetree)
    tried.append(f"{devicetree} ({'unusable' if text is not None else 'absent'})")
    text = _read(cpuinfo)
    if text is not None:
        m = _CPUINFO_SERIAL.search(text)
        found = _clean(m.group(1)) if m else None
        if found:
            return found, f"{cpuinfo} Serial"
    tried.append(f"{cpuinfo} Serial ({'unusable' if text is not None else 'absent'})")
    text = _read(machine_id)
    found = _clean(text) if text is not None else None
    if found:
        return found, str(machine_id)
    tried.append(f"{machine_id} ({'unusable' if text is not None else 'absent'})")
    raise DeviceIdentityError("no device id: tried " + ", ".join(tried))


def device_id(
    *,
    devicetree: Path = DEVICETREE_SERIAL,
    cpuinfo: Path = CPUINFO,
    machine_id: Path = MACHINE_ID,
) -> str:
    """The device id, e.g. ``"10000000a1b2c3d4"`` on a Raspberry Pi.

    Tried in order: the device tree's ``serial-number``, the ``Serial`` line of
    ``/proc/cpuinfo``, ``/etc/machine-id`` (see the module docstring). Each is lowercased; a
    value that is missing, all zeros or not 4-64 of ``0-9a-z_-`` is skipped. The paths are
    parameters for tests. Raises DeviceIdentityError when none gives an id.
    """
    return device_id_source(devicetree=devicetree, cpuinfo=cpuinfo, machine_id=machine_id)[0]
