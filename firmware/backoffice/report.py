"""Entries, exits, granted and denied scans per door and per hour or day.

Counting: only ``kind == "scan"`` events. A granted scan at a reader whose direction is "in"
or "both" is an entry, at an "out" reader an exit; a denied scan is neither (nobody went
through). ``granted`` and ``denied`` count every scan by its decision. Periods are local
hours or days in the report's time zone, labelled ``2025-03-03T08:00+07:00`` (the offset
keeps the two 01:00 hours of a DST change apart) or ``2025-03-03``. Times are the readers'
wall clocks (``wall_ns``); a reader whose clock was not synced may place scans wrongly.

The store counts per quarter hour in UTC (every time zone's offset is a multiple of 15
minutes), so only a few rows leave the database whatever the number of events.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rich.table import Table

from firmware.backoffice.store import Store

PERIODS = ("hour", "day")
BUCKET_NS = 15 * 60 * 10**9
CSV_HEADER = ("period", "site", "door", "entries", "exits", "granted", "denied")
CHART_MAX_PERIODS = 2000
"""Past this many periods in the range the chart shows only the periods with scans."""

_ENTRY_DIRECTIONS = ("in", "both")
_EXIT_DIRECTIONS = ("out",)


@dataclass(frozen=True, slots=True)
class ReportRow:
    """Counts of one door (``site``, ``door``) in one period (``period`` label, ``start``
    its local start)."""

    period: str
    start: dt.datetime
    site: str
    door: str
    entries: int
    exits: int
    granted: int
    denied: int


@dataclass(frozen=True, slots=True)
class ReaderRow:
    """What the store holds of one reader, for the completeness check: ``events`` stored,
    ``ack_seq`` (every seq up to it stored or covered by a gap record), ``max_seq`` (the
    highest seq seen), ``missing`` (seqs below ``max_seq`` neither stored nor covered: not
    arrived yet, or lost without a record), ``dropped`` (rows the reader's gap records say it
    dropped, by reason; a count of 0 means unknown: a damaged journal), ``last_ns`` (its last
    message, ns since the epoch)."""

    device: str
    site: str
    events: int
    ack_seq: int
    max_seq: int
    missing: int
    dropped: dict[str, int]
    last_ns: int


@dataclass(frozen=True, slots=True)
class Report:
    """Rows for every (period, door) with at least one scan, by period start then site and
    door; ``periods``: every period label from ``since`` up to ``until`` (exclusive), in
    order, for the chart (only those with rows when there are more than
    ``CHART_MAX_PERIODS``)."""

    by: str
    since: dt.datetime
    until: dt.datetime
    rows: tuple[ReportRow, ...]
    periods: tuple[str, ...]
    readers: tuple[ReaderRow, ...] = ()

    def totals(self) -> tuple[int, int, int, int]:
        """(entries, exits, granted, denied) over all rows."""
        return (
            sum(r.entries for r in self.rows),
            sum(r.exits for r in self.rows),
            sum(r.granted for r in self.rows),
            sum(r.denied for r in self.rows),
        )


def local_zone() -> dt.tzinfo:
    """This machine's time zone: ``$TZ`` if it names one, else /etc/localtime, else the
    current fixed UTC offset (no DST rules)."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return dt.datetime.now().astimezone().tzinfo or dt.UTC


def zone(name: str | None) -> dt.tzinfo:
    """The IANA zone ``name`` (``"UTC"``, ``"Asia/Ho_Chi_Minh"``), or :func:`local_zone` for
    None. Raises ValueError for an unknown name."""
    if name is None:
        return local_zone()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r} (use an IANA name like Europe/Paris)"
        ) from None


def parse_when(text: str, tz: dt.tzinfo) -> dt.datetime:
    """An aware datetime from ISO 8601 ``text``: a date (its local midnight), or a date and
    time, in ``tz`` unless it carries an offset. Raises ValueError for other text."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is no ISO date or date-time (e.g. 2025-03-03 or 2025-03-03T08:00)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=tz)


def build_report(
    store: Store, since: dt.datetime, until: dt.datetime, by: str, tz: dt.tzinfo
) -> Report:
    """Count scans with ``since <= wall time < until`` (aware datetimes) per ``by`` ("hour"
    or "day") in ``tz``, per door. Raises ValueError for another ``by``, naive datetimes or
    ``until`` not after ``since``; StoreError from the store."""
    if by not in PERIODS:
        raise ValueError(f"by must be one of {PERIODS}, found {by!r}")
    if since.tzinfo is None or until.tzinfo is None:
        raise ValueError("since and until must carry a time zone")
    if until <= since:
        raise ValueError(f"until ({until.isoformat()}) must be after since ({since.isoformat()})")
    # Keyed by the period's start in UTC: aware datetimes of one zone compare by wall time,
    # which would merge the two 01:00 hours of a DST change.
    counts: dict[tuple[dt.datetime, str, str], list[int]] = {}
    starts: dict[dt.datetime, dt.datetime] = {}
    for c in store.scan_counts(_ns(since), _ns(until), BUCKET_NS):
        bucket_start = dt.datetime.fromtimestamp(c.bucket * BUCKET_NS / 1e9, dt.UTC)
        start = _period_start(bucket_start.astimezone(tz), by)
        key = start.astimezone(dt.UTC)
        starts[key] = start
        values = counts.setdefault((key, c.site, c.door), [0, 0, 0, 0])  # in, out, ok, no
        if c.decision == "granted":
            values[2] += c.count
            if c.direction in _ENTRY_DIRECTIONS:
                values[0] += c.count
            elif c.direction in _EXIT_DIRECTIONS:
                values[1] += c.count
        elif c.decision == "denied":
            values[3] += c.count
    rows = tuple(
        ReportRow(_label(starts[key], by), starts[key], site, door, *values)
        for (key, site, door), values in sorted(counts.items())
        if any(values)
    )
    periods: list[str] = []
    for start in _periods(since.astimezone(tz), until.astimezone(tz), by):
        periods.append(_label(start, by))
        if len(periods) > CHART_MAX_PERIODS:
            periods = list(dict.fromkeys(r.period for r in rows))
            break
    return Report(by, since, until, rows, tuple(periods), reader_rows(store))


def reader_rows(store: Store) -> tuple[ReaderRow, ...]:
    """One :class:`ReaderRow` per device in the store, by site then device. Raises
    StoreError."""
    missing: dict[str, int] = {}
    for m in store.missing():
        missing[m.device] = missing.get(m.device, 0) + m.to_seq - m.from_seq + 1
    out = []
    for d in store.devices():
        dropped: dict[str, int] = {}
        for g in store.reader_gaps(d.device):
            dropped[g.reason] = dropped.get(g.reason, 0) + g.count
        out.append(
            ReaderRow(
                d.device,
                d.site,
                d.events,
                d.ack_seq,
                d.max_seq,
                missing.get(d.device, 0),
                dropped,
                d.last_ns,
            )
        )
    return tuple(sorted(out, key=lambda r: (r.site, r.device)))


def readers_table(report: Report, tz: dt.tzinfo) -> Table:
    """A rich table of :attr:`Report.readers`: is everything in?"""
    table = Table(title="Readers: is every scan in?")
    table.add_column("Site")
    table.add_column("Device")
    for name in ("Events", "Acked seq", "Last seq", "Missing"):
        table.add_column(name, justify="right")
    table.add_column("Dropped by the reader")
    table.add_column("Last message")
    for r in report.readers:
        dropped = ", ".join(
            f"{n if n else 'unknown'} ({reason})" for reason, n in sorted(r.dropped.items())
        )
        last = dt.datetime.fromtimestamp(r.last_ns / 1e9, tz).isoformat(timespec="seconds")
        table.add_row(
            r.site,
            r.device,
            str(r.events),
            str(r.ack_seq),
            str(r.max_seq),
            str(r.missing),
            dropped or "none",
            last,
            style="red" if r.missing else None,
        )
    return table


def csv_text(report: Report) -> str:
    """The rows as CSV text: a ``CSV_HEADER`` line, then one line per row, ``\\n`` endings."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for r in report.rows:
        writer.writerow((r.period, r.site, r.door, r.entries, r.exits, r.granted, r.denied))
    return out.getvalue()


def write_csv(report: Report, path: Path) -> None:
    """Write :func:`csv_text` to ``path`` (UTF-8). Raises OSError."""
    Path(path).write_text(csv_text(report), encoding="utf-8")


def report_table(report: Report) -> Table:
    """A rich table of the rows with a totals line."""
    table = Table(
        title=f"Scans per {report.by}, {report.since.isoformat(timespec='minutes')} "
        f"to {report.until.isoformat(timespec='minutes')}"
    )
    table.add_column("Period")
    table.add_column("Site")
    table.add_column("Door")
    for name in ("Entries", "Exits", "Granted", "Denied"):
        table.add_column(name, justify="right")
    for r in report.rows:
        table.add_row(
            r.period, r.site, r.door, str(r.entries), str(r.exits), str(r.granted), str(r.denied)
        )
    table.add_section()
    table.add_row("total", "", "", *(str(v) for v in report.totals()), style="bold")
    return table


def write_png(report: Report, path: Path) -> None:
    """A PNG bar chart at ``path``: entries (up) and exits (down) per period stacked by door,
    and granted/denied per period below. Raises OSError when it cannot be written;
    ImportError when matplotlib is missing."""
    # The object API with the Agg canvas: no pyplot, so no global figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    periods = list(report.periods)
    index = {p: i for i, p in enumerate(periods)}
    doors = sorted({(r.site, r.door) for r in report.rows})
    n = len(periods)
    xs = list(range(n))
    fig = Figure(figsize=(min(max(6.0, 0.3 * n + 2), 40.0), 7.0), layout="constrained")
    FigureCanvasAgg(fig)
    flow, verdicts = fig.subplots(2, 1, sharex=True)
    up = [0.0] * n
    down = [0.0] * n
    palette = [f"C{i % 10}" for i in range(len(doors))]
    for (site, door), colour in zip(doors, palette, strict=True):
        entries = [0.0] * n
        exits = [0.0] * n
        for r in report.rows:
            if (r.site, r.door) == (site, door) and r.period in index:
                entries[index[r.period]] += r.entries
                exits[index[r.period]] -= r.exits
        flow.bar(xs, entries, bottom=up, color=colour, label=f"{site} / {door}")
        flow.bar(xs, exits, bottom=down, color=colour, alpha=0.55)
        up = [a + b for a, b in zip(up, entries, strict=True)]
        down = [a + b for a, b in zip(down, exits, strict=True)]
    flow.axhline(0, color="black", linewidth=0.8)
    flow.yaxis.set_major_locator(MaxNLocator(integer=True))
    flow.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{abs(v):g}"))
    flow.set_ylabel("entries ↑   exits ↓")
    flow.set_title(f"Entries and exits per {report.by}")
    if doors:
        flow.legend(loc="upper left", fontsize="small")
    granted = [0.0] * n
    denied = [0.0] * n
    for r in report.rows:
        if r.period in index:
            granted[index[r.period]] += r.granted
            denied[index[r.period]] += r.denied
    verdicts.bar(xs, granted, color="tab:green", label="granted")
    verdicts.bar(xs, denied, bottom=granted, color="tab:red", label="denied")
    verdicts.yaxis.set_major_locator(MaxNLocator(integer=True))
    verdicts.set_ylabel("scans")
    verdicts.set_title("Granted and denied scans")
    verdicts.legend(loc="upper left", fontsize="small")
    step = max(1, n // 40)
    # "03-03 15:00" under the bars; the CSV and the table keep the full label with its offset.
    short = [p[5:10] + " " + p[11:16] if report.by == "hour" else p for p in periods]
    verdicts.set_xticks(xs[::step], short[::step], rotation=60, ha="right",
                        rotation_mode="anchor", fontsize="small")  # fmt: skip
    fig.savefig(path, format="png", dpi=100)


def _ns(when: dt.datetime) -> int:
    delta = when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000


def _period_start(local: dt.datetime, by: str) -> dt.datetime:
    if by == "hour":
        return local.replace(minute=0, second=0, microsecond=0)
    midnight = dt.datetime.combine(local.date(), dt.time(0), tzinfo=local.tzinfo)
    # Re-attach the zone so the offset is midnight's, not the scan's (DST days).
    return midnight.astimezone(dt.UTC).astimezone(local.tzinfo)


def _label(start: dt.datetime, by: str) -> str:
    return start.isoformat(timespec="minutes") if by == "hour" else start.date().isoformat()


def _periods(since: dt.datetime, until: dt.datetime, by: str) -> Iterator[dt.datetime]:
    tz = since.tzinfo
    start = _period_start(since, by)
    seen: set[str] = set()
    if by == "hour":
        # Step in UTC: local hours repeat or vanish at DST changes.
        t = start.astimezone(dt.UTC)
        end = until.astimezone(dt.UTC)
        while t < end:
            local = _period_start(t.astimezone(tz), by)
            label = _label(local, by)
            if label not in seen:
                seen.add(label)
                yield local
            t += dt.timedelta(hours=1)
        return
    day = start.date()
    while True:
        local = dt.datetime.combine(day, dt.time(0), tzinfo=tz)
        if local >= until:
            return
        yield local
        day += dt.timedelta(days=1)
