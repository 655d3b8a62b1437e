"""Range search on protected dates through HTTP (issue "Interoperability", item 3): every FHIR
prefix on `birthdate` and `death-date`, for stored dates of year, month and day precision, gives
exactly the patients the FHIR rules select (a Python oracle), totals and pages included; the
database never holds a birth year in the clear; `_sort` on a protected date is a clear 400."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from fhirserver.fhir.dates import parse_range
from fhirserver.search.types.protected_date import matches
from tests.conftest import BackendClient, db_path

BIRTHS = ["1931", "1944-02", "1944-02-29", "1959-12-31", "1960-01-01", "1960-06", "1975", "1975-07-14",
          "1988-03-03", "2001-11", "2012-05-20"]
DEATHS = {"1931": "1999-05-01T12:00:00Z", "1944-02": "2020-02", "1959-12-31": "2020-02-10"}
QUERIES = ["eq1960", "ne1960", "gt1960", "lt1960", "ge1960-01-01", "le1959-12", "sa1975", "eb1944-02-29",
           "ap1975", "gt1944-02-29", "lt2000-01-01T00:00:00Z", "ge1988-03-03", "le1931", "eb1931", "ne1944-02"]


@pytest.fixture
def people(http: Any, admin: BackendClient) -> dict[str, str]:
    h = admin.headers()
    out = {}
    for birth in BIRTHS:
        body: dict[str, Any] = {"resourceType": "Patient", "name": [{"family": "Rangefam"}], "birthDate": birth}
        if birth in DEATHS:
            body["deceasedDateTime"] = DEATHS[birth]
        r = http.post("/fhir/Patient", json=body, headers=h)
        assert r.status_code == 201, r.get_data(as_text=True)
        out[r.get_json()["id"]] = birth
    return out


def _ids(http: Any, h: dict[str, str], query: str) -> set[str]:
    found: set[str] = set()
    url = f"/fhir/Patient?family=Rangefam&{query}&_count=4"
    total = None
    while url:
        r = http.get(url, headers=h)
        assert r.status_code == 200, r.get_data(as_text=True)
        bundle = r.get_json()
        total = bundle.get("total", total)
        found |= {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"}
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        url = "/fhir" + nxt[0].split("/fhir", 1)[1] if nxt else ""
    assert total == len(found)  # the total counts exactly what the pages return
    return found


def _expected(values: dict[str, str], query: str) -> set[str]:
    prefix, text = query[:2], query[2:]
    ql, qh = parse_range(text)
    import time

    margin = max(abs(int(time.time() * 1e6) - ql) // 10, 86_400_000_000) if prefix == "ap" else 0
    return {pid for pid, v in values.items() if matches(prefix, ql, qh, *parse_range(v), margin=margin)}


@pytest.mark.parametrize("query", QUERIES)
def test_birthdate_prefixes(http: Any, admin: BackendClient, people: dict[str, str], query: str) -> None:
    assert _ids(http, admin.headers(), f"birthdate={query}") == _expected(people, query)


@pytest.mark.parametrize("query", ["lt2020", "ge2020-02", "eq2020-02", "sa1999-05-01", "ne2020-02-10"])
def test_death_date_prefixes(http: Any, admin: BackendClient, people: dict[str, str], query: str) -> None:
    deaths = {pid: DEATHS[b] for pid, b in people.items() if b in DEATHS}
    assert _ids(http, admin.headers(), f"death-date={query}") == _expected(deaths, query)


def test_ranges_combine_and_stay_blind(http: Any, admin: BackendClient, people: dict[str, str], settings: Any) -> None:
    both = _ids(http, admin.headers(), "birthdate=ge1944&birthdate=lt1975")
    assert both == _expected(people, "ge1944") & _expected(people, "lt1975")
    r = http.get("/fhir/Patient?_sort=birthdate", headers={**admin.headers(), "Prefer": "handling=strict"})
    assert r.status_code == 400 and "cannot be sorted" in r.get_json()["issue"][0]["diagnostics"]
    cx = sqlite3.connect(db_path(settings))
    try:
        values = [v for (v,) in cx.execute("SELECT value FROM idx_string WHERE param IN ('birthdate', 'death-date')")]
        assert values and not [v for v in values if any(y in v for y in ("1944", "1960", "1975", "2020"))]
        assert not cx.execute("SELECT count(*) FROM idx_date WHERE param IN ('birthdate', 'death-date')").fetchone()[0]
    finally:
        cx.close()
