"""Protected dates (a birth date): every FHIR date prefix, exactly, inside SQL, without the date
in the clear (docs/consent.md, "What the database reveals").

A value is indexed as keyed digests (blind indexes) of calendar buckets, never as a number:
- `D`: the value at its own precision -- `y:1980`, `m:1980-05` or `d:1980-05-12`;
- `P`: the buckets a value lies in -- its decade for every precision (`dd:198` for a day, `md:198`
  for a month, `yd:198` for a year), and `dy:1980`, `dm:1980-05` for a day, `my:1980` for a month
  (a dateTime counts by its day).
A search range is answered as the union of the buckets whose every member satisfies the prefix:
whole decades, whole years, then whole months and single days at its edges -- a bounded set
(3 per decade of the searchable span, and per edge at most 3 x 9 years, 2 x 11 months and 30
days), looked up with one IN. The prefix semantics are the
same function of (low, high) as for plain dates (`date.date_cond`), evaluated per bucket here.
Searchable span: years SPAN (1850 to next year: dates of people); an open-ended prefix (ge, gt,
sa, ...) covers the span.
A database reader learns which values share a bucket (equal years, months, days), as with any
blind index, and nothing about order or distance.
"""

from __future__ import annotations

import calendar
import datetime
from collections.abc import Callable

from sqlalchemy import ColumnElement, FromClause, and_

from ...clock import now_us
from ...fhir.dates import parse_range
from ..params import SearchParam
from ..values import IndexRows
from .common import Keys, checked_date, prefix_of

# Birth and death dates of people: from 1850 to next year (a range reaching outside is clamped;
# dates outside stay searchable by equality). Each further year costs up to 3 digests per query.
SPAN = (1850, datetime.date.today().year + 1)
_EPOCH = datetime.date(1970, 1, 1)


def _us(day: datetime.date) -> int:
    return (day - _EPOCH).days * 86_400_000_000


def _bounds(year: int, month: int | None = None, day: int | None = None) -> tuple[int, int]:
    """[first µs, last µs] of a year, month or day."""
    if day is not None:
        start = datetime.date(year, month or 1, day)
        return _us(start), _us(start) + 86_400_000_000 - 1
    if month is not None:
        last = calendar.monthrange(year, month)[1]
        return _us(datetime.date(year, month, 1)), _us(datetime.date(year, month, last)) + 86_400_000_000 - 1
    return _us(datetime.date(year, 1, 1)), _us(datetime.date(year, 12, 31)) + 86_400_000_000 - 1


def matches(prefix: str, ql: int, qh: int, low: int, high: int, margin: int = 0) -> bool:
    """FHIR date prefix semantics for a target range [low, high] (the same rules as date_cond)."""
    eq = low >= ql and high <= qh
    return {"eq": eq, "ne": not eq, "gt": high > qh, "lt": low < ql, "ge": high > qh or eq,
            "le": low < ql or eq, "sa": low > qh, "eb": high < ql,
            "ap": low <= qh + margin and high >= ql - margin}[prefix]


def index(keys: Keys, out: IndexRows, p: SearchParam, value: object) -> None:
    if not isinstance(value, str) or len(value) < 4:
        return
    try:
        parse_range(value)
    except ValueError:
        return
    year, month, day = value[:4], value[5:7] if len(value) >= 7 else "", value[8:10] if len(value) >= 10 else ""
    decade = year[:3]
    if day:
        exact, inside = f"d:{year}-{month}-{day}", [f"dd:{decade}", f"dy:{year}", f"dm:{year}-{month}"]
    elif month:
        exact, inside = f"m:{year}-{month}", [f"md:{decade}", f"my:{year}"]
    else:
        exact, inside = f"y:{year}", [f"yd:{decade}"]
    out.add("string", param=p.code, kind="D", value=keys.blind.digest(p.code, "D", exact))
    for bucket in inside:
        out.add("string", param=p.code, kind="P", value=keys.blind.digest(p.code, "P", bucket))


def _runs(first: int, last: int, ok: Callable[[int], bool], edges: list[int]) -> list[tuple[int, int]]:
    """Maximal runs [a, b] of consecutive units in [first, last] where ok(unit) holds. `ok` can
    change only next to an edge unit, so units are tested around the edges and once per gap."""
    points = sorted({first, last, *[e + d for e in edges for d in (-1, 0, 1) if first <= e + d <= last]})
    runs: list[tuple[int, int]] = []

    def add(a: int, b: int) -> None:
        if runs and runs[-1][1] == a - 1:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))

    for i, pt in enumerate(points):
        if ok(pt):
            add(pt, pt)
        nxt = points[i + 1] if i + 1 < len(points) else None
        if nxt is not None and nxt > pt + 1 and ok(pt + 1):  # the gap is uniform
            add(pt + 1, nxt - 1)
    return runs


def _ordinal(us: int, lo: int, hi: int) -> int:
    """The day (ordinal) holding instant `us`, clamped to [lo, hi]."""
    days = us // 86_400_000_000
    return min(max(_EPOCH.toordinal() + days, lo), hi)


def buckets(prefix: str, ql: int, qh: int, margin: int = 0) -> list[tuple[str, str]]:
    """(kind, bucket) of the stored digests whose values all satisfy the prefix: the qualifying
    days, months and years (each at most two runs), days and months covered by whole months and
    years where they can be."""
    def test(bounds: tuple[int, int]) -> bool:
        return matches(prefix, ql, qh, *bounds, margin=margin)

    first, last = datetime.date(SPAN[0], 1, 1).toordinal(), datetime.date(SPAN[1], 12, 31).toordinal()
    edge_days = [_ordinal(t, first, last) for t in (ql, qh, ql - margin, qh + margin)]

    def day_bounds(o: int) -> tuple[int, int]:
        d = datetime.date.fromordinal(o)
        return _bounds(d.year, d.month, d.day)

    out: list[tuple[str, str]] = []
    for a, b in _runs(first, last, lambda o: test(day_bounds(o)), edge_days):
        out.extend(_cover_days(a, b))
    edge_months = [datetime.date.fromordinal(o).year * 12 + datetime.date.fromordinal(o).month - 1 for o in edge_days]
    for a, b in _runs(SPAN[0] * 12, SPAN[1] * 12 + 11, lambda i: test(_bounds(i // 12, i % 12 + 1)), edge_months):
        out.extend(_cover_months(a, b))
    for a, b in _runs(SPAN[0], SPAN[1], lambda y: test(_bounds(y)), [m // 12 for m in edge_months]):
        y = a
        while y <= b:
            if y % 10 == 0 and y + 9 <= b:
                out.append(("P", f"yd:{y // 10}"))
                y += 10
            else:
                out.append(("D", f"y:{y}"))
                y += 1
    return out


def _cover_days(a: int, b: int) -> list[tuple[str, str]]:
    """Days [a, b] (ordinals) as whole years (dy), whole months (dm) and single days (d)."""
    out: list[tuple[str, str]] = []
    o = a
    while o <= b:
        d = datetime.date.fromordinal(o)
        year_end = datetime.date(d.year, 12, 31).toordinal()
        month_end = datetime.date(d.year, d.month, calendar.monthrange(d.year, d.month)[1]).toordinal()
        decade_end = datetime.date(d.year - d.year % 10 + 9, 12, 31).toordinal()
        if d.year % 10 == 0 and d.month == 1 and d.day == 1 and decade_end <= b:
            out.append(("P", f"dd:{d.year // 10}"))
            o = decade_end + 1
        elif d.month == 1 and d.day == 1 and year_end <= b:
            out.append(("P", f"dy:{d.year}"))
            o = year_end + 1
        elif d.day == 1 and month_end <= b:
            out.append(("P", f"dm:{d.year}-{d.month:02d}"))
            o = month_end + 1
        else:
            out.append(("D", f"d:{d.isoformat()}"))
            o += 1
    return out


def _cover_months(a: int, b: int) -> list[tuple[str, str]]:
    """Months [a, b] (year*12 + month-1) as whole years (my) and single months (m)."""
    out: list[tuple[str, str]] = []
    i = a
    while i <= b:
        year, month = divmod(i, 12)
        if month == 0 and year % 10 == 0 and i + 119 <= b:
            out.append(("P", f"md:{year // 10}"))
            i += 120
        elif month == 0 and i + 11 <= b:
            out.append(("P", f"my:{year}"))
            i += 12
        else:
            out.append(("D", f"m:{year}-{month + 1:02d}"))
            i += 1
    return out




def condition(keys: Keys, p: SearchParam, t: FromClause, value: str, key: str) -> ColumnElement[bool]:
    prefix, text = prefix_of(value)
    ql, qh = checked_date(text, key)
    margin = max(abs(now_us() - ql) // 10, 86_400_000_000) if prefix == "ap" else 0
    # keyed per deployment (the blind-index key), so never cached across apps; ~0.1 ms per query
    digests = [keys.blind.digest(p.code, kind, bucket) for kind, bucket in buckets(prefix, ql, qh, margin)]
    return and_(t.c.kind.in_(("D", "P")), t.c.value.in_(digests or ["-"]))
