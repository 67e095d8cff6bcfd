"""Desired configuration: the back office's retained ``config/desired``, applied and kept.

Payload (UTF-8 JSON)::

    {"version": 7, "settings": {"policy": {"repeat_window_s": 3},
                                "gpio": {"pulse_s": 5},
                                "uplink": {"telemetry_s": 30}}}

Only the settings in :data:`REMOTE_SETTINGS` may be set from afar: the ones a reader can change
while it runs, and none that could cut it off (broker, TLS, identity) or touch wiring (pins,
strike type): a mistake there would need a technician at the door. Values go through the same
checks as the config file (:func:`firmware.config.parse_config`).

A document is whole: the settings it leaves out go back to the config file's values (it is
laid over the config file, never over the previous document).

Versions: a document is applied only when its version is higher than the one applied before
(the broker hands the retained document again on every reconnect; an older one left by a
restored backup must not undo a newer one). The applied document is written to
``desired.json`` in the state folder (temp file, fsync, rename) *before* it takes effect, and
the daemon lays it over the config file at start, so a restart keeps it. Editing the config
file does not override it: delete ``desired.json`` (or publish a higher version) for that.

The outcome is in the retained status: ``"config": {"version", "state": "applied" |
"refused", "error"?, "settings"}``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from firmware.config import Config, parse_config
from firmware.exceptions import BadMessageError, ConfigError, DesiredConfigError
from firmware.uplink.topics import loads

log = logging.getLogger(__name__)

FILE_NAME = "desired.json"
MAX_VERSION = 2**53 - 1
"""The highest version taken (JSON's exact integers): one absurd version must not lock a
reader out of every later document."""
REMOTE_SETTINGS: Mapping[str, frozenset[str]] = {
    "policy": frozenset({"repeat_window_s"}),
    "gpio": frozenset({"pulse_s"}),
    "uplink": frozenset({"telemetry_s"}),
}
"""Section -> keys the back office may set."""


@dataclass(frozen=True, slots=True)
class Desired:
    """A checked desired configuration: ``version`` (>= 1) and ``settings`` (section -> key
    -> value, only :data:`REMOTE_SETTINGS`, values as the config file checks them)."""

    version: int
    settings: Mapping[str, Mapping[str, Any]]


def parse_desired(payload: bytes) -> Desired:
    """Check a ``config/desired`` payload. Raises BadMessageError (not a JSON object, oversized)
    or DesiredConfigError (no valid version, a setting that may not be set remotely, a value
    the config file would refuse) with the reason."""
    obj = loads(payload)
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise DesiredConfigError(f"'version' must be an integer from 1 to {MAX_VERSION}")
    settings = obj.get("settings", {})
    if not isinstance(settings, dict):
        raise DesiredConfigError("'settings' must be an object of sections")
    clean: dict[str, dict[str, Any]] = {}
    for section, values in settings.items():
        allowed = REMOTE_SETTINGS.get(section)
        if allowed is None or not isinstance(values, dict):
            raise DesiredConfigError(
                f"section {section!r} cannot be set remotely; allowed: {_allowed()}"
            )
        for key, value in values.items():
            if key not in allowed:
                raise DesiredConfigError(
                    f"{section}.{key} cannot be set remotely; allowed: {_allowed()}"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise DesiredConfigError(f"{section}.{key} must be a finite number")
            clean.setdefault(section, {})[key] = value
    try:
        # the config file's own checks; the other sections take defaults that need no files
        checked = parse_config({"camera": {"source": "v4l2"}, **clean}, "config/desired")
    except ConfigError as e:
        raise DesiredConfigError(f"{e.key}: expected {e.expected}, found {e.found}") from None
    # the values as the config file would hold them (an integer 3 for a float setting: 3.0)
    typed = {
        section: {key: getattr(getattr(checked, section), key) for key in values}
        for section, values in clean.items()
    }
    return Desired(version, typed)


def _allowed() -> str:
    return ", ".join(
        f"{s}.{k}" for s, keys in sorted(REMOTE_SETTINGS.items()) for k in sorted(keys)
    )


def overlay(config: Config, desired: Desired) -> Config:
    """``config`` with ``desired``'s settings in place."""
    sections = {name: getattr(config, name) for name in desired.settings}
    changed = {
        name: replace(sections[name], **dict(values)) for name, values in desired.settings.items()
    }
    return replace(config, **changed)


def load_desired(state_dir: Path) -> Desired | None:
    """The desired configuration kept in ``state_dir``, or None when there is none. A file
    that cannot be read or no longer passes the checks is logged and ignored (the config file
    alone then applies; the back office's retained document arrives again on connect)."""
    path = state_dir / FILE_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.error("desired config %s unreadable (%s): using the config file alone", path, e)
        return None
    try:
        return parse_desired(raw)
    except (BadMessageError, DesiredConfigError) as e:
        log.error("desired config %s refused (%s): using the config file alone", path, e)
        return None


def save_desired(state_dir: Path, desired: Desired) -> None:
    """Keep ``desired`` in ``state_dir`` (temp file, fsync, rename, fsync of the folder).
    Raises OSError (the caller refuses the document: not kept means not applied)."""
    path = state_dir / FILE_NAME
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps({"version": desired.version, "settings": desired.settings}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


Apply = Callable[[Desired], None]
"""Puts a checked desired configuration in force in the running reader; must not fail for a
checked one."""


class DesiredConfig:
    """The reader's side of ``config/desired``: check, keep, apply, report.

    ``state_dir``: where ``desired.json`` lives. ``apply``: puts the settings in force.
    ``report``: called with the status's ``config`` object after every document (applied or
    refused). Thread-safe enough for its one caller (the command lane of the uplink).
    """

    def __init__(
        self,
        state_dir: Path,
        apply: Apply,
        report: Callable[[dict[str, Any]], None],
        *,
        current: Desired | None = None,
    ) -> None:
        self.state_dir = state_dir
        self._apply = apply
        self._report = report
        self.current = current
        if current is not None:
            report(_status(current, "applied"))

    def offer(self, payload: bytes) -> dict[str, Any]:
        """Handle one ``config/desired`` payload; the status's ``config`` object after it."""
        try:
            desired = parse_desired(payload)
        except (BadMessageError, DesiredConfigError) as e:
            version = _version_of(payload)
            log.error("desired config (version %s) refused: %s", version, e)
            status = {"version": version, "state": "refused", "error": str(e)}
            if self.current is not None:
                status["applied_version"] = self.current.version
            self._report(status)
            return status
        if self.current is not None and desired.version <= self.current.version:
            # the retained document again after a reconnect: nothing to do
            if desired.version < self.current.version:
                log.warning(
                    "desired config version %d ignored: version %d is applied already",
                    desired.version,
                    self.current.version,
                )
            return _status(self.current, "applied")
        try:
            save_desired(self.state_dir, desired)
        except OSError as e:
            log.error("desired config version %d not kept (%s): not applied", desired.version, e)
            status = {
                "version": desired.version,
                "state": "refused",
                "error": f"cannot keep it on the reader: {e.strerror or e}",
            }
            self._report(status)
            return status
        self._apply(desired)
        self.current = desired
        log.info("desired config version %d applied: %s", desired.version, desired.settings)
        status = _status(desired, "applied")
        self._report(status)
        return status


def _status(desired: Desired, state: str) -> dict[str, Any]:
    return {"version": desired.version, "state": state, "settings": desired.settings}


def _version_of(payload: bytes) -> int | None:
    try:
        v = json.loads(payload).get("version")
    except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) else None
