"""Fixtures for the provisioning tests: the firmware tests' real-broker and leak fixtures, and
the enrollment tests' fleet (CA, broker with both listeners, enrollment server)."""

from __future__ import annotations

from tests.firmware.conftest import need_mosquitto, no_leaks, stack
from tests.provisioning.test_enroll import bare_fleet, fleet

__all__ = ["bare_fleet", "fleet", "need_mosquitto", "no_leaks", "stack"]
