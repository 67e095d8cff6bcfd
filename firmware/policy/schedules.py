"""Access schedules: weekly windows per group, with holidays, in local wall time of one zone.

A signed pass may name a schedule group (claim -65539); the reader lets it in only while
:meth:`Schedules.allows` says so. Schedule document (JSON object, UTF-8)::

    {"timezone": "Europe/Berlin",
     "holidays": ["2026-12-25", "2026-12-26"],
     "groups": {
       "staff": {"windows": [{"days": "mon-fri", "from": "07:00", "to": "19:00"},
                             {"days": "sat", "from": "22:00", "to": "06:00"}],
                 "holidays": [{"from": "10:00", "to": "14:00"}]},
       "cleaning": {"windows": [{"days": "daily", "from": "05:00", "to": "07:00"}]}}}

- ``timezone`` (required): an IANA zone name that ``zoneinfo.available_timezones()`` lists
  (the system tz database, else the tzdata package), not ``localtime``.
- ``holidays`` (optional, at most MAX_HOLIDAYS): dates ``"YYYY-MM-DD"`` in that zone.
- ``groups`` (required, at most MAX_GROUPS): group name (1..MAX_NAME_CHARS characters) to
  ``{"windows": [...], "holidays": [...]}``. ``windows`` (required, at most MAX_WINDOWS) apply
  on ordinary days; ``holidays`` (optional, at most MAX_WINDOWS) are used on a holiday instead;
  absent or ``[]``: the group is shut all holiday.
- A window: ``days``, ``from``, ``to``. ``days`` is required in ``windows`` and optional in
  ``holidays`` (default every day): comma-separated items, each a day ``mon`` .. ``sun``, a
  range ``"mon-fri"`` (a range may wrap: ``"fri-mon"`` is fri, sat, sun, mon) or ``"daily"``
  / ``"all"``; case and spaces around items do not matter. ``from`` is ``"HH:MM"`` (00:00 ..
  23:59), ``to`` is ``"HH:MM"`` or ``"24:00"``. The window is [from, to): ``to`` itself is out.
- A window whose ``to`` is at or before its ``from`` runs past midnight to ``to`` on the next
  day (``from`` = ``to``: 24 hours) and belongs to the day it starts: ``days`` and holidays are
  judged on that day. So Saturday 22:00-06:00 lets in on Sunday 03:00; a holiday on Sunday does
  not cut it short, while a holiday on Saturday replaces it by the holiday windows. (A night
  shift that started is not ended by the calendar.)
- Unknown keys are refused: a typo (``"holiday"``, ``"form"``) never silently changes who may
  enter.

Times are local wall-clock times, converted from the instant with zoneinfo, so windows follow
daylight saving time: a 09:00-17:00 window is 09:00-17:00 local on both sides of a change (8
hours of real time, not shifted by an hour); on a spring-forward day local times that do not
exist never occur, so a 02:00-03:00 window in Europe/Berlin is empty that day; on a fall-back
day the repeated hour is inside a window covering it both times (a 01:00-02:00 window in
America/New_York then lasts two hours of real time).

Errors: :meth:`Schedules.from_json` raises ScheduleError naming the place
(``groups["staff"].windows[1].from``) and what was found; nothing else escapes it.
"""

from __future__ import annotations

import functools
import re
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, NamedTuple

from firmware.exceptions import ScheduleError

MAX_GROUPS = 256
"""Most groups in one document."""

MAX_WINDOWS = 64
"""Most windows in one group's ``windows`` (and, separately, in its ``holidays``)."""

MAX_HOLIDAYS = 1000
"""Most holiday dates in one document (decades of public holidays)."""

MAX_NAME_CHARS = 64
"""Longest group name, characters."""

MAX_TEXT_CHARS = 64
"""Longest ``timezone`` or ``days`` string, characters."""

MIN_UNIX_S = 0.0
"""Earliest instant :meth:`Schedules.allows` judges, seconds since the epoch (1970-01-01)."""

MAX_UNIX_S = 253_402_128_000.0
"""Latest instant :meth:`Schedules.allows` judges, seconds since the epoch (9999-12-30 UTC,
so that every local date stays within the calendar)."""

MINUTES_PER_DAY = 24 * 60
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
"""Day names in ``days``, Monday first: index = ``date.weekday()``."""

_DAY_INDEX = {name: i for i, name in enumerate(DAY_NAMES)}
_EVERY_DAY = frozenset(range(7))
_WHOLE_DAY = (1 << MINUTES_PER_DAY) - 1
_HHMM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_TOP_KEYS = frozenset({"timezone", "holidays", "groups"})
_GROUP_KEYS = frozenset({"windows", "holidays"})
_WINDOW_KEYS = frozenset({"days", "from", "to"})


@dataclass(frozen=True, slots=True)
class Window:
    """One weekly window. ``days``: weekdays it starts on (0 = Monday). ``start``: minutes
    after local midnight, 0..1439. ``end``: 0..1440; ``end <= start`` runs past midnight into
    the next day (``end == start``: 24 hours)."""

    days: frozenset[int]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Group:
    """A schedule group: ``windows`` on ordinary days, ``holiday_windows`` on holidays (none:
    shut)."""

    name: str
    windows: tuple[Window, ...]
    holiday_windows: tuple[Window, ...] = ()


class _Masks(NamedTuple):
    """Precomputed minutes, bit m = minute m after local midnight. ``own[d]``: minutes on
    weekday d of windows that start on d; ``spill[d]``: minutes on the day after d of windows
    that start on d and run past midnight."""

    own: tuple[int, ...]
    spill: tuple[int, ...]


def _masks(windows: Iterable[Window]) -> _Masks:
    own, spill = [0] * 7, [0] * 7
    for w in windows:
        from_start = _WHOLE_DAY & ~((1 << w.start) - 1)
        if w.end > w.start:
            today, tomorrow = from_start & ((1 << w.end) - 1), 0
        else:
            today, tomorrow = from_start, (1 << w.end) - 1
        for day in w.days:
            own[day] |= today
            spill[day] |= tomorrow
    return _Masks(tuple(own), tuple(spill))


@functools.cache
def _zone_names() -> frozenset[str]:
    # scanned once (about 20 ms); excludes the leap-second "right/" and the "posix/" copies
    return frozenset(zoneinfo.available_timezones()) - {"localtime", "posixrules"}


def _show(value: object) -> str:
    """A short, safe rendering of a found value for an error message."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
    if value is None or isinstance(value, bool | float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**30 else "a very large int"
    return f"a {type(value).__name__}"


def _zone_error(name: object) -> ScheduleError:
    return ScheduleError(
        f'timezone: expected an IANA time zone name such as "Europe/Berlin", found {_show(name)}'
    )


def _load_zone(name: str) -> zoneinfo.ZoneInfo:
    if len(name) > MAX_TEXT_CHARS or name not in _zone_names():
        raise _zone_error(name)
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as e:
        raise ScheduleError(f"timezone: {name!r} cannot be loaded: {e}") from None


def _object(value: object, where: str, allowed: frozenset[str]) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ScheduleError(f"{where}: expected a JSON object, found {_show(value)}")
    for key in value:
        if key not in allowed:
            raise ScheduleError(
                f"{where}: unknown key {_show(key)}; allowed: {', '.join(sorted(allowed))}"
            )
    return value


def _list(value: object, where: str, cap: int) -> list[object] | tuple[object, ...]:
    if not isinstance(value, list | tuple):
        raise ScheduleError(f"{where}: expected a list, found {_show(value)}")
    if len(value) > cap:
        raise ScheduleError(f"{where}: {len(value)} entries, at most {cap}")
    return value


def _parse_days(value: object, where: str) -> frozenset[int]:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT_CHARS:
        raise ScheduleError(
            f'{where}: expected days such as "mon-fri", "sat,sun" or "daily", found {_show(value)}'
        )
    days: set[int] = set()
    for raw in value.lower().split(","):
        item = raw.strip()
        first, dash, last = (part.strip() for part in item.partition("-"))
        if item in ("daily", "all"):
            days |= _EVERY_DAY
        elif not dash and first in _DAY_INDEX:
            days.add(_DAY_INDEX[first])
        elif dash and first in _DAY_INDEX and last in _DAY_INDEX:
            i, stop = _DAY_INDEX[first], _DAY_INDEX[last]
            days.add(i)
            while i != stop:
                i = (i + 1) % 7
                days.add(i)
        else:
            raise ScheduleError(
                f"{where}: unknown day {_show(item)} in {_show(value)}; use mon, tue, wed, "
                'thu, fri, sat, sun, ranges such as "mon-fri", or "daily"'
            )
    return frozenset(days)


def _parse_minute(value: object, where: str, *, is_end: bool) -> int:
    if is_end and value == "24:00":
        return MINUTES_PER_DAY
    match = _HHMM.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        span = "00:00..23:59" + (" or 24:00" if is_end else "")
        raise ScheduleError(f'{where}: expected "HH:MM" ({span}), found {_show(value)}')
    return int(match[1]) * 60 + int(match[2])


def _parse_window(value: object, where: str, *, days_required: bool) -> Window:
    doc = _object(value, where, _WINDOW_KEYS)
    for key in ("from", "to", *(("days",) if days_required else ())):
        if key not in doc:
            raise ScheduleError(f'{where}: "{key}" is missing')
    days = _parse_days(doc["days"], f"{where}.days") if "days" in doc else _EVERY_DAY
    start = _parse_minute(doc["from"], f"{where}.from", is_end=False)
    end = _parse_minute(doc["to"], f"{where}.to", is_end=True)
    return Window(days, start, end)


def _parse_date(value: object, where: str) -> date:
    if isinstance(value, str) and _DATE.fullmatch(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise ScheduleError(f'{where}: expected a date "YYYY-MM-DD", found {_show(value)}')


def _parse_group(name: object, value: object) -> Group:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise ScheduleError(
            f"groups: a group name must be 1..{MAX_NAME_CHARS} characters, found {_show(name)}"
        )
    where = f"groups[{name!r}]"
    doc = _object(value, where, _GROUP_KEYS)
    if "windows" not in doc:
        raise ScheduleError(f'{where}: "windows" is missing (use [] for a group never let in)')
    windows = tuple(
        _parse_window(w, f"{where}.windows[{i}]", days_required=True)
        for i, w in enumerate(_list(doc["windows"], f"{where}.windows", MAX_WINDOWS))
    )
    holiday_windows = tuple(
        _parse_window(w, f"{where}.holidays[{i}]", days_required=False)
        for i, w in enumerate(_list(doc.get("holidays", []), f"{where}.holidays", MAX_WINDOWS))
    )
    return Group(name, windows, holiday_windows)


def _format_days(days: frozenset[int]) -> str:
    if days == _EVERY_DAY:
        return "daily"
    parts: list[str] = []
    ordered = sorted(days)
    run_start = 0
    for k in range(1, len(ordered) + 1):
        if k == len(ordered) or ordered[k] != ordered[k - 1] + 1:
            run = ordered[run_start:k]
            if len(run) >= 3:
                parts.append(f"{DAY_NAMES[run[0]]}-{DAY_NAMES[run[-1]]}")
            else:
                parts.extend(DAY_NAMES[d] for d in run)
            run_start = k
    return ",".join(parts)


def _format_minute(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _window_json(w: Window) -> dict[str, str]:
    return {
        "days": _format_days(w.days),
        "from": _format_minute(w.start),
        "to": _format_minute(w.end),
    }


class Schedules:
    """Immutable schedules of one site: see the module text for the document and the rules.

    ``allows(group, unix_s)`` answers in a few microseconds (the zone is loaded once, each
    group's windows are precomputed as minute bitmasks per weekday).
    """

    __slots__ = ("_groups", "_holiday_days", "_holidays", "_masks", "_timezone", "_zone")

    def __init__(
        self, timezone: str, groups: Iterable[Group] = (), holidays: Iterable[date] = ()
    ) -> None:
        """Schedules in zone ``timezone`` (IANA name). Raises ScheduleError for an unknown
        zone, or for more than MAX_GROUPS groups or MAX_HOLIDAYS holidays. Documents go
        through :meth:`from_json`."""
        if not isinstance(timezone, str):
            raise _zone_error(timezone)
        self._zone = _load_zone(timezone)
        self._timezone = timezone
        self._holidays = frozenset(holidays)
        self._groups = {g.name: g for g in groups}
        if len(self._groups) > MAX_GROUPS or len(self._holidays) > MAX_HOLIDAYS:
            raise ScheduleError(
                f"schedules: {len(self._groups)} groups and {len(self._holidays)} holidays, "
                f"at most {MAX_GROUPS} and {MAX_HOLIDAYS}"
            )
        self._holiday_days = frozenset(d.toordinal() for d in self._holidays)
        self._masks = {
            name: (_masks(g.windows), _masks(g.holiday_windows)) for name, g in self._groups.items()
        }

    @classmethod
    def empty(cls, tz: str = "UTC") -> Schedules:
        """No groups (every group unknown) in zone ``tz``. Raises ScheduleError for an
        unknown zone."""
        return cls(tz)

    @classmethod
    def from_json(cls, doc: object) -> Schedules:
        """Schedules from a parsed JSON document (see the module text). Raises ScheduleError
        naming the place and the value for anything else: unknown zone or key, bad day name,
        bad "HH:MM", bad date, a missing key, too many groups, windows or holidays."""
        top = _object(doc, "schedules", _TOP_KEYS)
        for key in ("timezone", "groups"):
            if key not in top:
                raise ScheduleError(f'schedules: "{key}" is missing')
        timezone = top["timezone"]
        if not isinstance(timezone, str):
            raise _zone_error(timezone)
        holidays = [
            _parse_date(d, f"holidays[{i}]")
            for i, d in enumerate(_list(top.get("holidays", []), "holidays", MAX_HOLIDAYS))
        ]
        groups_doc = top["groups"]
        if not isinstance(groups_doc, dict):
            raise ScheduleError(f"groups: expected a JSON object, found {_show(groups_doc)}")
        if len(groups_doc) > MAX_GROUPS:
            raise ScheduleError(f"groups: {len(groups_doc)} groups, at most {MAX_GROUPS}")
        groups = [_parse_group(name, value) for name, value in groups_doc.items()]
        return cls(timezone, groups, holidays)

    def to_json(self) -> dict[str, Any]:
        """The document (see the module text) in normal form: holidays sorted, days as
        "daily" or runs such as "mon-fri" and lists such as "sat,sun". ``from_json`` of it
        gives equal schedules."""
        return {
            "timezone": self._timezone,
            "holidays": [d.isoformat() for d in sorted(self._holidays)],
            "groups": {
                name: {
                    "windows": [_window_json(w) for w in g.windows],
                    "holidays": [_window_json(w) for w in g.holiday_windows],
                }
                for name, g in self._groups.items()
            },
        }

    def allows(self, group: str, unix_s: float) -> bool | None:
        """Whether ``group`` may enter at instant ``unix_s`` (seconds since the epoch, UTC).

        None when the group is unknown (the caller denies with its own reason). False for an
        instant that is not a finite number in [MIN_UNIX_S, MAX_UNIX_S] (NaN, infinity, a
        clock far off): an untrustworthy time never opens a door. Never raises.
        """
        masks = self._masks.get(group) if isinstance(group, str) else None
        if masks is None:
            return None
        # `not (a <= x <= b)` is also true for NaN
        if not isinstance(unix_s, int | float) or not MIN_UNIX_S <= unix_s <= MAX_UNIX_S:
            return False
        local = datetime.fromtimestamp(unix_s, self._zone)
        day = local.toordinal()
        weekday = local.weekday()
        minute = local.hour * 60 + local.minute
        # a window belongs to the day it starts: yesterday's holiday status decides its tail
        today = masks[1] if day in self._holiday_days else masks[0]
        yesterday = masks[1] if day - 1 in self._holiday_days else masks[0]
        return bool((today.own[weekday] | yesterday.spill[weekday - 1]) >> minute & 1)

    @property
    def groups(self) -> tuple[str, ...]:
        """Names of the groups, sorted."""
        return tuple(sorted(self._groups))

    @property
    def timezone(self) -> str:
        """The IANA zone name the windows are in."""
        return self._timezone

    @property
    def holidays(self) -> frozenset[date]:
        """Holiday dates (local)."""
        return self._holidays

    def group(self, name: str) -> Group | None:
        """The group called ``name``, or None."""
        return self._groups.get(name)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedules):
            return NotImplemented
        return (self._timezone, self._holidays, self._groups) == (
            other._timezone,
            other._holidays,
            other._groups,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Schedules({self._timezone}, {len(self._groups)} groups, "
            f"{len(self._holidays)} holidays)"
        )
