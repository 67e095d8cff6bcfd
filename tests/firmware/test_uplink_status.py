"""The retained status follows the reader: a fleet table never shows the backlog of the
connect hours ago."""

from __future__ import annotations

import dataclasses
import json
from contextlib import ExitStack
from pathlib import Path

import pytest

from drivers.frames import GrayImage
from firmware.demo.broker import LocalBroker
from firmware.uplink.topics import Topics
from tests.firmware.test_uplink import (
    DEVICE,
    SITE,
    back_office,
    held,  # noqa: F401
    reader_config,
    running,
)

pytestmark = pytest.mark.usefixtures("no_leaks", "need_mosquitto")


def test_status_is_published_again_when_what_it_reports_changed(
    tmp_path: Path,
    held: GrayImage,  # noqa: F811
) -> None:
    with ExitStack() as stack:
        broker = stack.enter_context(LocalBroker(tmp_path / "b"))
        bo = back_office(stack, broker)
        r = running(stack, reader_config(tmp_path / "r", broker.port))
        r.uplink.options = dataclasses.replace(r.uplink.options, status_s=0.2)
        r.ready()
        topic = Topics(SITE, DEVICE).status

        def status() -> dict[str, object]:
            return json.loads(bo.latest[topic]) if topic in bo.latest else {}

        assert bo.wait(lambda: status().get("online") is True)
        assert status()["last_scan_wall_ns"] is None
        births = len(bo.statuses)
        report = r.scan(held)
        assert report.decision.granted
        assert bo.wait(lambda: status().get("last_scan_wall_ns") is not None)
        assert bo.wait(lambda: status()["uplink"]["published"] == 1)  # type: ignore[index]
        assert status()["backlog"] == 0
        settled = len(bo.statuses)
        assert settled > births
        # nothing changes: no more status messages
        assert not bo.wait(lambda: len(bo.statuses) > settled + 1, 1.0)
