"""FHIR date/dateTime/instant values as inclusive microsecond ranges (implicit precision).

`2013` covers [2013-01-01T00:00:00Z, 2013-12-31T23:59:59.999999Z]; a time without a zone is
taken as UTC (FHIR leaves it to the server; we document it).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_US = -(2**62)
MAX_US = 2**62


def to_us(dt: datetime) -> int:
    delta = dt - EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def instant_text(us: int) -> str:
    """FHIR instant with millisecond precision in UTC, e.g. 2024-01-02T03:04:05.678Z."""
    dt = from_us(us)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _add_months(dt: datetime, months: int) -> datetime:
    y, m = divmod(dt.month - 1 + months, 12)
    return dt.replace(year=dt.year + y, month=m + 1)


def parse_range(text: str) -> tuple[int, int]:
    """Return the inclusive (low_us, high_us) covered by a FHIR date/dateTime/instant string."""
    m = _RE.match(text.strip())
    if not m:
        raise ValueError(f"not a FHIR date: {text!r}")
    g = m.groupdict()
    tz = UTC
    if g["tz"] and g["tz"] != "Z":
        sign = 1 if g["tz"][0] == "+" else -1
        hh, mm = int(g["tz"][1:3]), int(g["tz"][4:6])
        tz = timezone(sign * timedelta(hours=hh, minutes=mm))
    year = int(g["y"])
    if g["m"] is None:
        start = datetime(year, 1, 1, tzinfo=tz)
        end = start.replace(year=year + 1)
    elif g["d"] is None:
        start = datetime(year, int(g["m"]), 1, tzinfo=tz)
        end = _add_months(start, 1)
    elif g["H"] is None:
        start = datetime(year, int(g["m"]), int(g["d"]), tzinfo=tz)
        end = start + timedelta(days=1)
    elif g["S"] is None:
        start = datetime(year, int(g["m"]), int(g["d"]), int(g["H"]), int(g["M"]), tzinfo=tz)
        end = start + timedelta(minutes=1)
    elif g["f"] is None:
        start = datetime(year, int(g["m"]), int(g["d"]), int(g["H"]), int(g["M"]), int(g["S"]), tzinfo=tz)
        end = start + timedelta(seconds=1)
    else:
        frac = g["f"]
        micro = int((frac + "000000")[:6])
        start = datetime(year, int(g["m"]), int(g["d"]), int(g["H"]), int(g["M"]), int(g["S"]), micro, tzinfo=tz)
        end = start + timedelta(microseconds=10 ** max(0, 6 - len(frac)))
    return to_us(start), to_us(end) - 1
