"""Search benchmark: 10,000 patients and 100,000 Observations, queried through HTTP, compared
with the same queries as plain SQL against the index tables (the floor).

Data is loaded in-process through fhirserver.storage.bulk (same validation, indexing and
encryption as the API, batched transactions), then a real server (gunicorn, SQLite, audit on)
answers the HTTP queries. Prints p50/p95 per query, the SQL floor and the ratio.

    python scripts/bench_search.py [--patients 10000] [--observations 10] [--iterations 200]
                                   [--consent-share 0.2]

With --consent-share F the queries run twice: first with no Consents, then after a fraction F of
the patients got restrictive privacy Consents (docs/consent.md), and the p95 ratio is printed
(the consent engine's target: <= 1.5x).
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import Client, pct  # noqa: E402
from benchdata import CODES, LOINC, MRN_SYSTEM, observation, patient  # noqa: E402
from benchserver import BenchServer  # noqa: E402

from fhirserver.config import load_settings  # noqa: E402
from fhirserver.crypto.blind_index import normalize  # noqa: E402
from fhirserver.db.migrations import upgrade  # noqa: E402
from fhirserver.services import build_services, warm_keys  # noqa: E402
from fhirserver.storage.bulk import load_resources  # noqa: E402


def load(data_dir: Path, n_patients: int, n_obs: int) -> tuple[float, int]:
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = load_settings(data_dir=str(data_dir), base_url="http://127.0.0.1/fhir")
    upgrade(settings.effective_database_url)
    svc = build_services(settings)
    warm_keys(svc)

    def resources():  # type: ignore[no-untyped-def]
        for i in range(n_patients):
            rng = random.Random(i)
            p = patient(i, rng)
            p["id"] = f"p{i}"
            yield p
            for _ in range(n_obs):
                yield observation(p["id"], rng)

    t0 = time.perf_counter()
    count = load_resources(svc, resources(), batch=1000, source="bench_search load")
    elapsed = time.perf_counter() - t0
    with svc.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")  # what `PRAGMA optimize` in the server also does over time
    svc.engine.dispose()
    return elapsed, count


def restrictive_consents(n_patients: int, share: float, seed: int = 7):  # type: ignore[no-untyped-def]
    """Privacy Consents for `share` of the patients, of four kinds that apply to the bench client
    (purpose TREAT) or at least have rules the engine must evaluate for every row of theirs."""
    rng = random.Random(seed)
    reason = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
    kinds = [
        {"type": "deny", "purpose": [{"system": reason, "code": "TREAT"}],
         "dataPeriod": {"end": "2021-12-31"}},
        {"type": "deny", "code": [{"coding": [{"system": LOINC, "code": rng.choice(CODES)[0]}]}]},
        {"type": "deny", "provision": [{"type": "permit", "purpose": [{"system": reason, "code": "TREAT"}],
                                        "class": [{"system": "http://hl7.org/fhir/resource-types",
                                                   "code": "Observation"}]}]},
        {"type": "deny", "purpose": [{"system": reason, "code": "HMARKT"}]},
    ]
    for i in rng.sample(range(n_patients), int(n_patients * share)):
        yield {"resourceType": "Consent", "id": f"bench-consent-{i}", "status": "active",
               "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                     "code": "patient-privacy"}]},
               "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
               "patient": {"reference": f"Patient/p{i}"}, "provision": kinds[i % len(kinds)]}


def add_consents(data_dir: Path, n_patients: int, share: float) -> int:
    settings = load_settings(data_dir=str(data_dir), base_url="http://127.0.0.1/fhir")
    svc = build_services(settings)
    warm_keys(svc)
    count = load_resources(svc, restrictive_consents(n_patients, share), batch=500, source="bench consents")
    svc.engine.dispose()
    return count


def timed(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=10000)
    ap.add_argument("--observations", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--data-dir", help="reuse/keep a data directory (default: temporary)")
    ap.add_argument("--consent-share", type=float, default=0.0,
                    help="also run with this fraction of patients holding restrictive Consents, and compare")
    args = ap.parse_args()
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="fhirbench-search-"))
    if not (data_dir / "fhirserver.sqlite3").exists():
        elapsed, count = load(data_dir, args.patients, args.observations)
        print(f"loaded {count} resources in {elapsed:.0f}s ({count / elapsed:.0f}/s, bulk path: validation, "
              f"indexing, encryption, one AuditEvent per 1000)")
    server = BenchServer(data_dir=str(data_dir)).start()
    try:
        token = server.token("system/*.rs")
        client = Client(server.base, token)
        rng = random.Random(99)

        def get(path: str) -> dict:
            status, _h, body = client.request("GET", path)
            if status != 200:
                raise RuntimeError(f"{path}: {status} {body[:300]!r}")
            return json.loads(body)

        def pid() -> str:
            return f"p{rng.randrange(args.patients)}"

        queries = {
            "Observation?patient=X&code=Y&_sort=-date&_count=10":
                lambda: get(f"/Observation?patient={pid()}&code={quote(LOINC + '|' + rng.choice(CODES)[0])}"
                            f"&_sort=-date&_count=10"),
            "Observation?patient=X&category=vital-signs&date=ge2020-01-01":
                lambda: get(f"/Observation?patient={pid()}&category=vital-signs&date=ge2020-01-01"),
            "Patient?name=smi": lambda: get("/Patient?name=smi"),
            "Patient?identifier=sys|val":
                lambda: get(f"/Patient?identifier={quote(MRN_SYSTEM)}|MRN{rng.randrange(args.patients):08d}"),
            "Observation/$lastn?patient=X&category=vital-signs":
                lambda: get(f"/Observation/$lastn?patient={pid()}&category=vital-signs"),
        }

        def walk() -> None:
            page = get("/Observation?category=laboratory&_count=50")
            for _ in range(9):
                nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
                page = get(nxt[0].split("/fhir", 1)[1])

        results = {name: timed(fn, args.iterations) for name, fn in queries.items()}
        results["10-page walk (_count=50), per page"] = [t / 10 for t in timed(walk, max(10, args.iterations // 10))]
        if args.consent_share > 0:
            added = add_consents(data_dir, args.patients, args.consent_share)
            with_consents = {name: timed(fn, args.iterations) for name, fn in queries.items()}
            with_consents["10-page walk (_count=50), per page"] = [
                t / 10 for t in timed(walk, max(10, args.iterations // 10))]
            print(f"\nconsent overhead: {added} restrictive Consents ({args.consent_share:.0%} of patients)")
            print(f"{'query':62s} {'p95 none':>9s} {'p95 with':>9s} {'ratio':>6s}")
            for name, times in results.items():
                before, after = pct(times, 95), pct(with_consents[name], 95)
                print(f"{name:62s} {before:9.2f} {after:9.2f} {after / max(before, 1e-6):6.2f}")

        # ---- the floor: the same filters as hand-written SQL against the index tables
        db = sqlite3.connect(data_dir / "fhirserver.sqlite3")
        from fhirserver.services import build_services as _bs

        svc = _bs(load_settings(data_dir=str(data_dir), base_url=server.base))
        blind = svc.blind

        def sql(q: str, params: tuple) -> None:  # type: ignore[type-arg]
            db.execute(q, params).fetchall()

        floors = {
            "Observation?patient=X&code=Y&_sort=-date&_count=10": lambda: sql(
                "SELECT r.pk FROM resource r WHERE r.type='Observation' AND r.deleted=0 AND r.pk IN "
                "(SELECT resource_pk FROM idx_reference WHERE param='patient' AND target_type='Patient' AND target_id=?) "
                "AND EXISTS (SELECT 1 FROM idx_token t WHERE t.resource_pk=r.pk AND param='code' AND code=? AND system=?) "
                "ORDER BY (SELECT max(high_us) FROM idx_date d WHERE d.resource_pk=r.pk AND d.param='date') DESC LIMIT 10",
                (pid(), rng.choice(CODES)[0], LOINC)),
            "Observation?patient=X&category=vital-signs&date=ge2020-01-01": lambda: sql(
                "SELECT r.pk FROM resource r WHERE r.type='Observation' AND r.deleted=0 AND r.pk IN "
                "(SELECT resource_pk FROM idx_reference WHERE param='patient' AND target_type='Patient' AND target_id=?) "
                "AND EXISTS (SELECT 1 FROM idx_token t WHERE t.resource_pk=r.pk AND param='category' AND code='vital-signs') "
                "AND EXISTS (SELECT 1 FROM idx_date d WHERE d.resource_pk=r.pk AND param='date' AND high_us >= ?) "
                "ORDER BY r.pk LIMIT 21", (pid(), 1577836800000000)),
            "Patient?name=smi": lambda: sql(
                "SELECT r.pk FROM resource r WHERE r.type='Patient' AND r.deleted=0 AND r.pk IN "
                "(SELECT resource_pk FROM idx_string WHERE param='name' AND kind='p' AND value=?) "
                "ORDER BY r.pk LIMIT 21", (blind.digest("name", "p", normalize("smi")),)),
            "Patient?identifier=sys|val": lambda: sql(
                "SELECT r.pk FROM resource r WHERE r.type='Patient' AND r.deleted=0 AND r.pk IN "
                "(SELECT resource_pk FROM idx_token WHERE param='identifier' AND system=? AND code=?) LIMIT 21",
                (MRN_SYSTEM, blind.digest("identifier", "t", f"MRN{rng.randrange(args.patients):08d}"))),
            "Observation/$lastn?patient=X&category=vital-signs": lambda: sql(
                "SELECT pk FROM (SELECT r.pk, row_number() OVER (PARTITION BY "
                "(SELECT min(t.code) FROM idx_token t WHERE t.resource_pk=r.pk AND t.param='code') ORDER BY "
                "(SELECT max(d.high_us) FROM idx_date d WHERE d.resource_pk=r.pk AND d.param='date') DESC) rn "
                "FROM resource r WHERE r.type='Observation' AND r.deleted=0 AND r.pk IN "
                "(SELECT resource_pk FROM idx_reference WHERE param='patient' AND target_id=?) AND EXISTS "
                "(SELECT 1 FROM idx_token t WHERE t.resource_pk=r.pk AND param='category' AND code='vital-signs')) "
                "WHERE rn <= 1",
                (pid(),)),
            "10-page walk (_count=50), per page": lambda: sql(
                "SELECT r.pk FROM resource r WHERE r.type='Observation' AND r.deleted=0 AND r.pk > ? AND EXISTS "
                "(SELECT 1 FROM idx_token t WHERE t.resource_pk=r.pk AND param='category' AND code='laboratory') "
                "ORDER BY r.pk LIMIT 51", (rng.randrange(100000),)),
        }
        floor_times = {name: timed(fn, args.iterations) for name, fn in floors.items()}
        print(f"\n{'query':62s} {'p50 ms':>8s} {'p95 ms':>8s} {'SQL p50':>8s} {'SQL p95':>8s} {'ratio p95':>9s}")
        for name, times in results.items():
            f = floor_times[name]
            print(f"{name:62s} {pct(times, 50):8.2f} {pct(times, 95):8.2f} {pct(f, 50):8.2f} {pct(f, 95):8.2f} "
                  f"{pct(times, 95) / max(pct(f, 95), 1e-6):9.1f}")
        print(f"\n(HTTP includes token check, decryption of every returned resource, the AuditEvent write and "
              f"commit; mean of all HTTP queries {statistics.mean([t for v in results.values() for t in v]) * 1000:.2f} ms)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
