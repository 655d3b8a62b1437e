"""Protected-date buckets against the FHIR prefix rules: for any stored date (year, month or day
precision) and any search (every prefix, year/month/day/dateTime precision), the stored digests
meet the search's bucket set exactly when the prefix matches the date's range."""

from __future__ import annotations

import datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from fhirserver.fhir.dates import parse_range
from fhirserver.search.types.protected_date import SPAN, buckets, matches

PREFIXES = ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"]
dates = st.dates(min_value=datetime.date(SPAN[0], 1, 1), max_value=datetime.date(SPAN[1], 12, 31))


def text_at(d: datetime.date, precision: str) -> str:
    return {"y": f"{d.year:04d}", "m": f"{d.year:04d}-{d.month:02d}", "d": d.isoformat(),
            "t": f"{d.isoformat()}T10:30:00Z"}[precision]


def stored(text: str) -> set[tuple[str, str]]:
    """The (kind, bucket) digests index() writes for a value (the same rules, stated here)."""
    y, m, d = text[:4], text[5:7], text[8:10]
    if d:
        return {("D", f"d:{y}-{m}-{d}"), ("P", f"dd:{y[:3]}"), ("P", f"dy:{y}"), ("P", f"dm:{y}-{m}")}
    if m:
        return {("D", f"m:{y}-{m}"), ("P", f"md:{y[:3]}"), ("P", f"my:{y}")}
    return {("D", f"y:{y}"), ("P", f"yd:{y[:3]}")}


@settings(max_examples=600, deadline=None)
@given(target=dates, tprec=st.sampled_from(["y", "m", "d"]), query=dates, qprec=st.sampled_from(["y", "m", "d", "t"]),
       prefix=st.sampled_from(PREFIXES), margin_days=st.integers(min_value=1, max_value=4000))
def test_buckets_match_the_fhir_prefix_rules(target: datetime.date, tprec: str, query: datetime.date, qprec: str,
                                             prefix: str, margin_days: int) -> None:
    ttext, qtext = text_at(target, tprec), text_at(query, qprec)
    low, high = parse_range(ttext)
    ql, qh = parse_range(qtext)
    margin = margin_days * 86_400_000_000 if prefix == "ap" else 0
    expected = matches(prefix, ql, qh, low, high, margin)
    found = bool(stored(ttext) & set(buckets(prefix, ql, qh, margin)))
    assert found == expected, (prefix, qtext, ttext)


def test_bucket_sets_stay_small() -> None:
    for prefix in PREFIXES:
        ql, qh = parse_range("1975-06-15")
        decades = (SPAN[1] - SPAN[0]) // 10 + 1
        assert len(buckets(prefix, ql, qh, 400 * 86_400_000_000)) <= 3 * decades + 2 * (3 * 9 + 2 * 11 + 30) + 6
