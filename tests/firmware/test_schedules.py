"""Schedules: weekly windows, past-midnight windows, holidays, DST in local wall time, errors.

Instants are written out in UTC by hand (calendar.timegm) from the published DST rules, so
the tests do not lean on the zone conversion they check.
"""

from __future__ import annotations

import calendar
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.exceptions import ScheduleError
from firmware.policy import schedules as sm
from firmware.policy.schedules import Schedules


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, *, s: float = 0) -> float:
    return calendar.timegm((y, mo, d, h, mi, 0)) + s


def win(days: str, start: str, end: str) -> dict[str, str]:
    return {"days": days, "from": start, "to": end}


def doc(tz: Any, groups: Any, holidays: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"timezone": tz, "groups": groups}
    if holidays is not None:
        out["holidays"] = holidays
    return out


def minutes_allowed(s: Schedules, group: str, start: float, hours: int) -> int:
    """Minutes (sampled at each minute's 30th second) in [start, start + hours) allowed."""
    return sum(bool(s.allows(group, start + 60 * m + 30)) for m in range(hours * 60))


STAFF = {
    "windows": [win("mon-fri", "07:00", "19:00"), win("sat", "22:00", "06:00")],
}


@pytest.fixture
def staff_utc() -> Schedules:
    return Schedules.from_json(doc("UTC", {"staff": STAFF}))


def test_weekday_window_boundaries(staff_utc: Schedules) -> None:
    s = staff_utc
    # 2026-06-01 is a Monday
    assert s.allows("staff", utc(2026, 6, 1, 6, 59, s=59.999)) is False
    assert s.allows("staff", utc(2026, 6, 1, 7)) is True
    assert s.allows("staff", utc(2026, 6, 1, 18, 59, s=59.9)) is True
    assert s.allows("staff", utc(2026, 6, 1, 19)) is False  # "to" is excluded
    assert s.allows("staff", utc(2026, 6, 5, 12)) is True  # Friday
    assert s.allows("staff", utc(2026, 6, 6, 12)) is False  # Saturday noon
    assert s.allows("staff", utc(2026, 6, 7, 12)) is False  # Sunday noon


def test_window_past_midnight_belongs_to_its_start_day(staff_utc: Schedules) -> None:
    s = staff_utc
    assert s.allows("staff", utc(2026, 6, 6, 21, 59, s=59)) is False  # Saturday
    assert s.allows("staff", utc(2026, 6, 6, 22)) is True
    assert s.allows("staff", utc(2026, 6, 7, 0)) is True  # Sunday midnight
    assert s.allows("staff", utc(2026, 6, 7, 3)) is True
    assert s.allows("staff", utc(2026, 6, 7, 5, 59, s=59)) is True
    assert s.allows("staff", utc(2026, 6, 7, 6)) is False
    assert s.allows("staff", utc(2026, 6, 5, 23)) is False  # Friday night: starts only on sat
    assert s.allows("staff", utc(2026, 6, 6, 3)) is False  # Saturday early: Friday has none
    assert s.allows("staff", utc(2026, 6, 8, 3)) is False  # Monday early
    # the whole week: 5 x 12 h + 8 h
    assert minutes_allowed(s, "staff", utc(2026, 6, 1), 7 * 24) == 5 * 12 * 60 + 8 * 60


def test_sunday_night_window_wraps_into_monday() -> None:
    s = Schedules.from_json(doc("UTC", {"g": {"windows": [win("sun", "23:00", "01:00")]}}))
    assert s.allows("g", utc(2026, 6, 7, 23, 30)) is True  # Sunday
    assert s.allows("g", utc(2026, 6, 8, 0, 30)) is True  # Monday
    assert s.allows("g", utc(2026, 6, 8, 1)) is False
    assert s.allows("g", utc(2026, 6, 9, 0, 30)) is False  # Tuesday
    assert s.allows("g", utc(2026, 6, 7, 0, 30)) is False  # Sunday early: Saturday has none


def test_equal_from_and_to_is_24_hours_and_24_00_ends_the_day() -> None:
    s = Schedules.from_json(
        doc(
            "UTC",
            {
                "full": {"windows": [win("wed", "07:00", "07:00")]},
                "late": {"windows": [win("wed", "20:00", "24:00")]},
                "midnight": {"windows": [win("wed", "20:00", "00:00")]},
            },
        )
    )
    wed = utc(2026, 6, 3)
    assert minutes_allowed(s, "full", wed - 86400, 72) == 24 * 60
    assert s.allows("full", wed + 7 * 3600) and s.allows("full", wed + 86400 + 7 * 3600 - 1)
    assert not s.allows("full", wed + 86400 + 7 * 3600)
    assert minutes_allowed(s, "late", wed, 48) == minutes_allowed(s, "midnight", wed, 48) == 240
    assert s.allows("late", wed + 86400 - 1) and not s.allows("late", wed + 86400)


HOLIDAY_DOC = doc(
    "UTC",
    {
        "staff": STAFF,
        "guards": {
            "windows": [win("daily", "08:00", "16:00")],
            "holidays": [{"from": "10:00", "to": "14:00"}, {"from": "20:00", "to": "02:00"}],
        },
        "weekend_holidays": {
            "windows": [win("daily", "08:00", "16:00")],
            "holidays": [win("sat,sun", "08:00", "16:00")],
        },
    },
    ["2026-12-25", "2026-12-27", "2026-06-13"],  # Friday, Sunday, and a Saturday
)


def test_holiday_closes_a_group_without_holiday_windows() -> None:
    s = Schedules.from_json(HOLIDAY_DOC)
    assert s.allows("staff", utc(2026, 12, 24, 12)) is True  # Thursday
    assert s.allows("staff", utc(2026, 12, 25, 12)) is False  # Friday, a holiday
    assert s.allows("staff", utc(2026, 12, 28, 12)) is True  # Monday


def test_holiday_does_not_cut_a_window_started_the_day_before() -> None:
    s = Schedules.from_json(HOLIDAY_DOC)
    # Saturday 2026-12-26 22:00 .. Sunday 06:00, and Sunday 12-27 is a holiday
    assert s.allows("staff", utc(2026, 12, 26, 23)) is True
    assert s.allows("staff", utc(2026, 12, 27, 3)) is True
    # Saturday 2026-06-13 is a holiday: its night window is replaced, tail included
    assert s.allows("staff", utc(2026, 6, 13, 23)) is False
    assert s.allows("staff", utc(2026, 6, 14, 3)) is False
    assert s.allows("staff", utc(2026, 6, 20, 23)) is True  # the next Saturday is ordinary


def test_holiday_windows_replace_the_weekly_ones() -> None:
    s = Schedules.from_json(HOLIDAY_DOC)
    fri = utc(2026, 12, 25)
    assert s.allows("guards", fri + 9 * 3600) is False  # weekly 08-16 does not apply
    assert s.allows("guards", fri + 10 * 3600) is True
    assert s.allows("guards", fri + 14 * 3600) is False
    assert s.allows("guards", fri + 21 * 3600) is True
    assert s.allows("guards", fri + 25 * 3600) is True  # Saturday 01:00: the holiday's night
    assert s.allows("guards", fri + 26 * 3600) is False
    assert s.allows("guards", fri + 33 * 3600) is True  # Saturday 09:00: weekly again
    assert minutes_allowed(s, "guards", fri, 24) == 4 * 60 + 4 * 60
    # holiday windows with days: only a holiday on those weekdays opens
    assert s.allows("weekend_holidays", fri + 12 * 3600) is False  # a Friday holiday
    assert s.allows("weekend_holidays", utc(2026, 12, 27, 12)) is True  # a Sunday holiday
    assert s.allows("weekend_holidays", utc(2026, 12, 24, 12)) is True  # ordinary Thursday


def test_unknown_group_is_none(staff_utc: Schedules) -> None:
    t = utc(2026, 6, 1, 12)
    assert staff_utc.allows("nobody", t) is None
    assert staff_utc.allows("", t) is None
    assert staff_utc.allows(["staff"], t) is None  # type: ignore[arg-type]
    assert Schedules.empty().allows("staff", t) is None
    assert Schedules.empty().groups == ()
    assert Schedules.empty("Asia/Ho_Chi_Minh").timezone == "Asia/Ho_Chi_Minh"


@pytest.mark.parametrize("t", [math.nan, math.inf, -math.inf, -1.0, 1e300, -1e300, 10**400])
def test_non_finite_or_insane_instants_are_not_allowed(t: float) -> None:
    s = Schedules.from_json(doc("UTC", {"always": {"windows": [win("daily", "00:00", "24:00")]}}))
    assert s.allows("always", 0.0) is True
    assert s.allows("always", sm.MAX_UNIX_S) is True
    assert s.allows("always", t) is False
    assert s.allows("always", "1700000000") is False  # type: ignore[arg-type]
    assert s.allows("nobody", t) is None


DAY_9_17 = {"windows": [win("daily", "09:00", "17:00")]}


def test_berlin_spring_forward_keeps_09_to_17_local() -> None:
    s = Schedules.from_json(doc("Europe/Berlin", {"day": DAY_9_17}))
    # Saturday 2026-03-28, CET (UTC+1): 08:00 .. 16:00 UTC
    assert s.allows("day", utc(2026, 3, 28, 7, 59, s=59)) is False
    assert s.allows("day", utc(2026, 3, 28, 8)) is True
    assert s.allows("day", utc(2026, 3, 28, 15, 59, s=59)) is True
    assert s.allows("day", utc(2026, 3, 28, 16)) is False
    # Sunday 2026-03-29 after 02:00 CET -> 03:00 CEST (UTC+2): 07:00 .. 15:00 UTC
    assert s.allows("day", utc(2026, 3, 29, 6, 59, s=59)) is False
    assert s.allows("day", utc(2026, 3, 29, 7)) is True
    assert s.allows("day", utc(2026, 3, 29, 14, 59, s=59)) is True
    assert s.allows("day", utc(2026, 3, 29, 15)) is False
    # 8 hours of real time on both days
    assert minutes_allowed(s, "day", utc(2026, 3, 28), 24) == 480
    assert minutes_allowed(s, "day", utc(2026, 3, 29), 24) == 480


def test_berlin_fall_back_keeps_09_to_17_local() -> None:
    s = Schedules.from_json(doc("Europe/Berlin", {"day": DAY_9_17}))
    # Saturday 2026-10-24, CEST (UTC+2): 07:00 .. 15:00 UTC
    assert s.allows("day", utc(2026, 10, 24, 6, 59, s=59)) is False
    assert s.allows("day", utc(2026, 10, 24, 7)) is True
    assert s.allows("day", utc(2026, 10, 24, 15)) is False
    # Sunday 2026-10-25 after 03:00 CEST -> 02:00 CET (UTC+1): 08:00 .. 16:00 UTC
    assert s.allows("day", utc(2026, 10, 25, 7, 59, s=59)) is False
    assert s.allows("day", utc(2026, 10, 25, 8)) is True
    assert s.allows("day", utc(2026, 10, 25, 15, 59, s=59)) is True
    assert s.allows("day", utc(2026, 10, 25, 16)) is False
    assert minutes_allowed(s, "day", utc(2026, 10, 24), 24) == 480
    assert minutes_allowed(s, "day", utc(2026, 10, 25), 24) == 480


def test_berlin_spring_forward_hour_does_not_exist() -> None:
    s = Schedules.from_json(
        doc("Europe/Berlin", {"night": {"windows": [win("sun", "02:00", "03:00")]}})
    )
    # the instant before the jump is 01:59:59 CET, the jump lands on 03:00 CEST
    assert s.allows("night", utc(2026, 3, 29, 0, 59, s=59)) is False
    assert s.allows("night", utc(2026, 3, 29, 1)) is False
    assert minutes_allowed(s, "night", utc(2026, 3, 28, 12), 24) == 0
    # a week before, CET all night: 02:00 .. 03:00 local is 01:00 .. 02:00 UTC
    assert minutes_allowed(s, "night", utc(2026, 3, 22), 24) == 60
    assert s.allows("night", utc(2026, 3, 22, 1)) is True


def test_berlin_fall_back_repeated_hour_is_inside_both_times() -> None:
    s = Schedules.from_json(
        doc("Europe/Berlin", {"night": {"windows": [win("sun", "02:00", "03:00")]}})
    )
    berlin = ZoneInfo("Europe/Berlin")
    first, second = utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 30)
    # the setup: both instants are 02:30 local, once in CEST (fold 0), once in CET (fold 1)
    for t, fold in ((first, 0), (second, 1)):
        local = datetime.fromtimestamp(t, berlin)
        assert (local.hour, local.minute, local.fold) == (2, 30, fold)
        assert s.allows("night", t) is True
    assert s.allows("night", utc(2026, 10, 24, 23, 59, s=59)) is False  # 01:59:59 CEST
    assert s.allows("night", utc(2026, 10, 25, 2)) is False  # 03:00 CET
    assert minutes_allowed(s, "night", utc(2026, 10, 24, 12), 24) == 120


def test_new_york_spring_forward_and_fall_back() -> None:
    s = Schedules.from_json(
        doc(
            "America/New_York",
            {
                "day": DAY_9_17,
                "night": {"windows": [win("sun", "01:00", "02:00")]},
                "two": {"windows": [win("sun", "02:00", "03:00")]},
            },
        )
    )
    # Saturday 2026-03-07, EST (UTC-5): 14:00 .. 22:00 UTC; Sunday 03-08 EDT (UTC-4): 13 .. 21
    assert s.allows("day", utc(2026, 3, 7, 13, 59, s=59)) is False
    assert s.allows("day", utc(2026, 3, 7, 14)) is True
    assert s.allows("day", utc(2026, 3, 7, 22)) is False
    assert s.allows("day", utc(2026, 3, 8, 12, 59, s=59)) is False
    assert s.allows("day", utc(2026, 3, 8, 13)) is True
    assert s.allows("day", utc(2026, 3, 8, 20, 59, s=59)) is True
    assert s.allows("day", utc(2026, 3, 8, 21)) is False
    # 02:00 EST -> 03:00 EDT at 07:00 UTC: no local 02:xx that night
    assert minutes_allowed(s, "two", utc(2026, 3, 8), 24) == 0
    assert minutes_allowed(s, "night", utc(2026, 3, 8), 24) == 60  # 01:00 .. 02:00 EST
    # Saturday 2026-10-31 EDT: 13 .. 21 UTC; Sunday 11-01 EST: 14 .. 22 UTC
    assert s.allows("day", utc(2026, 10, 31, 13)) is True
    assert s.allows("day", utc(2026, 10, 31, 21)) is False
    assert s.allows("day", utc(2026, 11, 1, 13, 59, s=59)) is False
    assert s.allows("day", utc(2026, 11, 1, 14)) is True
    assert s.allows("day", utc(2026, 11, 1, 21, 59, s=59)) is True
    assert s.allows("day", utc(2026, 11, 1, 22)) is False
    # 02:00 EDT -> 01:00 EST at 06:00 UTC: 01:30 local at 05:30 (fold 0) and 06:30 UTC (fold 1)
    new_york = ZoneInfo("America/New_York")
    for t, fold in ((utc(2026, 11, 1, 5, 30), 0), (utc(2026, 11, 1, 6, 30), 1)):
        local = datetime.fromtimestamp(t, new_york)
        assert (local.hour, local.minute, local.fold) == (1, 30, fold)
        assert s.allows("night", t) is True
    assert s.allows("night", utc(2026, 11, 1, 4, 59, s=59)) is False  # 00:59:59 EDT
    assert s.allows("night", utc(2026, 11, 1, 7)) is False  # 02:00 EST
    assert minutes_allowed(s, "night", utc(2026, 11, 1), 24) == 120


def test_zone_without_dst() -> None:
    s = Schedules.from_json(
        doc("Asia/Ho_Chi_Minh", {"day": {"windows": [win("mon-fri", "09:00", "17:00")]}})
    )
    # UTC+7 all year: 02:00 .. 10:00 UTC on weekdays, in March, July and November alike
    for y, mo, d in ((2026, 3, 30), (2026, 7, 6), (2026, 11, 2)):
        assert s.allows("day", utc(y, mo, d, 1, 59, s=59)) is False
        assert s.allows("day", utc(y, mo, d, 2)) is True
        assert s.allows("day", utc(y, mo, d, 9, 59, s=59)) is True
        assert s.allows("day", utc(y, mo, d, 10)) is False
    # the weekday is the local one
    assert s.allows("day", utc(2026, 3, 29, 2)) is False  # Sunday 09:00 local
    assert s.allows("day", utc(2026, 4, 3, 9)) is True  # Friday 16:00 local
    assert s.allows("day", utc(2026, 4, 3, 20)) is False  # Saturday 03:00 local


def test_days_syntax_and_normal_form() -> None:
    s = Schedules.from_json(
        doc(
            "UTC",
            {
                "a": {"windows": [win(" Mon - Wed , fri ", "07:00", "08:00")]},
                "b": {"windows": [win("fri-mon", "07:00", "08:00")]},
                "c": {"windows": [win("all", "07:00", "08:00"), win("sat,sun", "09:00", "10:00")]},
                "d": {"windows": [win("SUN,mon,sun", "07:00", "08:00")]},
            },
            ["2026-12-25", "2026-01-01", "2026-12-25"],
        )
    )
    j = s.to_json()
    assert j["holidays"] == ["2026-01-01", "2026-12-25"]
    groups = j["groups"]
    assert isinstance(groups, dict)
    assert [w["days"] for w in groups["a"]["windows"]] == ["mon-wed,fri"]
    assert [w["days"] for w in groups["b"]["windows"]] == ["mon,fri-sun"]
    assert [w["days"] for w in groups["c"]["windows"]] == ["daily", "sat,sun"]
    assert [w["days"] for w in groups["d"]["windows"]] == ["mon,sun"]
    group_b = s.group("b")
    assert group_b is not None and group_b.windows[0].days == frozenset({4, 5, 6, 0})
    assert s.groups == ("a", "b", "c", "d")
    again = Schedules.from_json(json.loads(json.dumps(j)))
    assert again == s and again.to_json() == j
    assert again != Schedules.empty()


def test_to_json_round_trip_keeps_everything() -> None:
    s = Schedules.from_json(HOLIDAY_DOC)
    j = s.to_json()
    assert j["timezone"] == "UTC"
    assert j["groups"]["guards"] == {
        "windows": [{"days": "daily", "from": "08:00", "to": "16:00"}],
        "holidays": [
            {"days": "daily", "from": "10:00", "to": "14:00"},
            {"days": "daily", "from": "20:00", "to": "02:00"},
        ],
    }
    assert Schedules.from_json(j) == s
    assert s.holidays == Schedules.from_json(j).holidays and len(s.holidays) == 3


def many(n: int, item: Any) -> list[Any]:
    return [item] * n


BAD_DOCS: list[tuple[Any, str]] = [
    ([], r"^schedules: expected a JSON object, found a list"),
    ({"groups": {}}, r'"timezone" is missing'),
    ({"timezone": "UTC"}, r'"groups" is missing'),
    (doc("Mars/Olympus_Mons", {}), r"timezone: expected an IANA time zone name.*'Mars/Olympus"),
    (doc("localtime", {}), r"IANA time zone"),
    (doc("right/UTC", {}), r"IANA time zone"),
    (doc("../../etc/passwd", {}), r"IANA time zone"),
    (doc("Europe", {}), r"IANA time zone"),
    (doc("", {}), r"IANA time zone"),
    (doc(5, {}), r"IANA time zone.*found 5"),
    ({"timezone": "UTC", "groups": {}, "holiday": []}, r"unknown key 'holiday'"),
    (doc("UTC", []), r"^groups: expected a JSON object"),
    (doc("UTC", {"": {"windows": []}}), r"group name must be 1\.\.64"),
    (doc("UTC", {"x" * 65: {"windows": []}}), r"group name"),
    (doc("UTC", {"g": []}), r"groups\['g'\]: expected a JSON object"),
    (doc("UTC", {"g": {}}), r"groups\['g'\]: \"windows\" is missing"),
    (doc("UTC", {"g": {"windows": {}}}), r"groups\['g'\]\.windows: expected a list"),
    (doc("UTC", {"g": {"windows": [], "extra": 1}}), r"groups\['g'\]: unknown key 'extra'"),
    (
        doc("UTC", {"g": {"windows": [win("mon-fry", "07:00", "08:00")]}}),
        r"groups\['g'\]\.windows\[0\]\.days: unknown day 'mon-fry'",
    ),
    (doc("UTC", {"g": {"windows": [win("monday", "07:00", "08:00")]}}), r"unknown day 'monday'"),
    (doc("UTC", {"g": {"windows": [win("mon,,tue", "07:00", "08:00")]}}), r"unknown day ''"),
    (doc("UTC", {"g": {"windows": [win("", "07:00", "08:00")]}}), r"\.days: expected days"),
    (
        doc("UTC", {"g": {"windows": [{"days": ["mon"], "from": "07:00", "to": "08:00"}]}}),
        r"\.days: expected days.*found a list",
    ),
    (
        doc("UTC", {"g": {"windows": [win("mon", "7:00", "08:00")]}}),
        r"groups\['g'\]\.windows\[0\]\.from: expected \"HH:MM\" \(00:00\.\.23:59\), found '7:00'",
    ),
    (doc("UTC", {"g": {"windows": [win("mon", "24:00", "08:00")]}}), r"\.from: expected"),
    (
        doc("UTC", {"g": {"windows": [win("mon", "07:00", "24:01")]}}),
        r"\.to: expected \"HH:MM\" \(00:00\.\.23:59 or 24:00\), found '24:01'",
    ),
    (doc("UTC", {"g": {"windows": [win("mon", "07:00", "08:60")]}}), r"\.to: expected"),
    (doc("UTC", {"g": {"windows": [win("mon", "07:00", "０８:00")]}}), r"\.to: expected"),
    (
        doc("UTC", {"g": {"windows": [{"days": "mon", "from": 700, "to": "08:00"}]}}),
        r"\.from: expected.*found 700",
    ),
    (
        doc("UTC", {"g": {"windows": [{"days": "mon", "from": "07:00"}]}}),
        r"windows\[0\]: \"to\" is missing",
    ),
    (
        doc("UTC", {"g": {"windows": [{"from": "07:00", "to": "08:00"}]}}),
        r"windows\[0\]: \"days\" is missing",
    ),
    (
        doc("UTC", {"g": {"windows": [{"days": "mon", "form": "07:00", "to": "08:00"}]}}),
        r"unknown key 'form'",
    ),
    (
        doc("UTC", {"g": {"windows": [], "holidays": [{"from": "07:00", "to": "x"}]}}),
        r"groups\['g'\]\.holidays\[0\]\.to: expected",
    ),
    (doc("UTC", {}, ["2026-02-30"]), r"holidays\[0\]: expected a date \"YYYY-MM-DD\""),
    (doc("UTC", {}, ["2026-12-25", "2026-1-01"]), r"holidays\[1\]: expected a date"),
    (doc("UTC", {}, ["20261225"]), r"holidays\[0\]"),
    (doc("UTC", {}, [20261225]), r"holidays\[0\].*found 20261225"),
    (doc("UTC", {}, "2026-12-25"), r"^holidays: expected a list"),
    (
        doc("UTC", {}, many(sm.MAX_HOLIDAYS + 1, "2026-12-25")),
        r"holidays: 1001 entries, at most 1000",
    ),
    (
        doc("UTC", {f"g{i}": {"windows": []} for i in range(sm.MAX_GROUPS + 1)}),
        r"groups: 257 groups, at most 256",
    ),
    (
        doc("UTC", {"g": {"windows": many(sm.MAX_WINDOWS + 1, win("mon", "07:00", "08:00"))}}),
        r"groups\['g'\]\.windows: 65 entries, at most 64",
    ),
    (
        doc("UTC", {"g": {"windows": [], "holidays": many(65, {"from": "07:00", "to": "08:00"})}}),
        r"groups\['g'\]\.holidays: 65 entries",
    ),
]


@pytest.mark.parametrize(("bad", "message"), BAD_DOCS)
def test_invalid_documents_raise_schedule_error(bad: Any, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        Schedules.from_json(bad)


def test_caps_are_inclusive() -> None:
    groups = {
        f"g{i}": {"windows": many(sm.MAX_WINDOWS, win("mon", "07:00", "08:00"))}
        for i in range(sm.MAX_GROUPS)
    }
    s = Schedules.from_json(doc("UTC", groups, many(sm.MAX_HOLIDAYS, "2026-12-25")))
    assert len(s.groups) == sm.MAX_GROUPS and s.allows("g7", utc(2026, 6, 1, 7, 30)) is True


def test_error_messages_stay_short_for_huge_values() -> None:
    with pytest.raises(ScheduleError) as e:
        Schedules.from_json(doc("UTC", {"g": {"windows": [win("mon", "x" * 10**6, "08:00")]}}))
    assert len(str(e.value)) < 200
    with pytest.raises(ScheduleError, match="a very large int"):
        Schedules.from_json(doc(10**5000, {}))


def test_constructor_and_empty_check_the_zone() -> None:
    with pytest.raises(ScheduleError, match="IANA"):
        Schedules.empty("Nowhere/Land")
    with pytest.raises(ScheduleError, match="IANA"):
        Schedules(None)  # type: ignore[arg-type]


# --- fuzzing -------------------------------------------------------------------------------

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
TIMES = (
    st.sampled_from(["00:00", "07:30", "23:59", "24:00", "7:00", "25:00", "", "12:60"]) | JSONISH
)
DAYS = (
    st.sampled_from(["mon", "mon-fri", "fri-mon", "sat,sun", "daily", "all", "", "xyz", "mon-"])
    | JSONISH
)
WINDOW = st.fixed_dictionaries({"from": TIMES, "to": TIMES}, optional={"days": DAYS, "x": JSONISH})
ZONES = (
    st.sampled_from(["UTC", "Europe/Berlin", "Asia/Ho_Chi_Minh", "Nope/Zone", "..", "/"]) | JSONISH
)
DATES = st.sampled_from(["2026-12-25", "2026-02-29", "0000-01-01", "9999-12-31"]) | JSONISH
GROUP = st.fixed_dictionaries(
    {"windows": st.lists(WINDOW, max_size=3) | JSONISH},
    optional={"holidays": st.lists(WINDOW, max_size=3) | JSONISH},
)
DOCS = st.fixed_dictionaries(
    {
        "timezone": ZONES,
        "groups": st.dictionaries(st.text(max_size=70), GROUP, max_size=3) | JSONISH,
    },
    optional={"holidays": st.lists(DATES, max_size=3) | JSONISH, "extra": JSONISH},
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSONISH, DOCS))
def test_from_json_raises_only_schedule_error(candidate: Any) -> None:
    try:
        s = Schedules.from_json(candidate)
    except ScheduleError as e:
        assert str(e)
        return
    assert Schedules.from_json(s.to_json()) == s
    for name in s.groups:
        assert s.allows(name, utc(2026, 3, 29, 1)) in (True, False)


VALID_WINDOW = st.builds(
    win,
    st.sampled_from(["mon", "tue,thu", "fri-mon", "daily", "sat,sun", "mon-fri"]),
    st.sampled_from(["00:00", "01:00", "02:30", "09:00", "22:00", "23:59"]),
    st.sampled_from(["00:00", "01:00", "03:00", "06:00", "17:00", "24:00"]),
)
VALID_DOCS = st.builds(
    lambda tz, ws, hs, hol: doc(tz, {"g": {"windows": ws, "holidays": hs}}, hol),
    st.sampled_from(
        ["UTC", "Europe/Berlin", "America/New_York", "Asia/Ho_Chi_Minh", "Australia/Lord_Howe"]
    ),
    st.lists(VALID_WINDOW, max_size=4),
    st.lists(VALID_WINDOW, max_size=2),
    st.lists(st.dates().map(lambda d: d.isoformat()), max_size=5),
)
INSTANTS = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(0, 4.2e9)
    | st.integers(-(2**70), 2**70)
)


@settings(max_examples=300, deadline=None)
@given(VALID_DOCS, st.lists(INSTANTS, max_size=8))
def test_allows_never_raises(valid: dict[str, Any], instants: list[float]) -> None:
    s = Schedules.from_json(valid)
    for t in instants:
        assert s.allows("g", t) in (True, False)
        assert s.allows("other", t) is None


def reference(valid: dict[str, Any], t: float) -> bool:
    """allows() the slow, obvious way: walk yesterday's and today's windows."""
    zone = ZoneInfo(valid["timezone"])
    local = datetime.fromtimestamp(t, zone)
    minute = local.hour * 60 + local.minute
    holidays = set(valid.get("holidays", []))
    group = valid["groups"]["g"]
    names = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]

    def days_of(spec: str) -> set[int]:
        out: set[int] = set()
        for item in spec.split(","):
            if item in ("daily", "all"):
                out |= set(range(7))
            elif "-" in item:
                a, b = (names.index(x) for x in item.split("-"))
                out |= {(a + k) % 7 for k in range(((b - a) % 7) + 1)}
            else:
                out.add(names.index(item))
        return out

    def hm(text: str) -> int:
        return int(text[:2]) * 60 + int(text[3:])

    for offset, here in ((0, minute), (1, minute + 24 * 60)):
        day = local.date() - timedelta(days=offset)
        windows = group["holidays"] if day.isoformat() in holidays else group["windows"]
        for w in windows:
            if day.weekday() not in days_of(w.get("days", "daily")):
                continue
            start, end = hm(w["from"]), hm(w["to"])
            if end <= start:
                end += 24 * 60
            if start <= here < end:
                return True
    return False


@settings(max_examples=300, deadline=None)
@given(VALID_DOCS, st.lists(st.floats(1.5e9, 2.2e9), min_size=1, max_size=8), st.data())
def test_allows_matches_a_plain_reference(
    valid: dict[str, Any], instants: list[float], data: st.DataObject
) -> None:
    if valid.get("holidays"):
        # put a holiday on or next to one instant's local date, so holidays matter
        base = datetime.fromtimestamp(instants[0], UTC).date()
        shift = data.draw(st.integers(-1, 1))
        valid["holidays"].append((base + timedelta(days=shift)).isoformat())
    s = Schedules.from_json(valid)
    for t in instants:
        assert s.allows("g", t) is reference(valid, t), (valid, t)
