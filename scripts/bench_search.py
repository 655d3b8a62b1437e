"""Search benchmark: 10,000 patients and 100,000 Observations, queried through HTTP, compared
with the same queries as plain SQL against the index tables (the floor).

Data is loaded in-process through fhirserver.exchange.load, the `fhirserver load` path (same
validation, indexing and encryption as the API, checkpointed batches), then a real server
(gunicorn, SQLite, audit on)
answers the HTTP queries. Prints p50/p95 per query, the SQL floor and the ratio.

    python scripts/bench_search.py [--patients 10000] [--observations 10] [--iterations 200]
                                   [--consent-share 0.2]

With --consent-share F the queries run twice: first with no Consents, then after a fraction F of
the patients got restrictive privacy Consents (docs/consent.md), and the p95 ratio is printed
(the consent engine's target: <= 1.5x). With --interleave as well, the Consents go into a copy of
the data and the two servers answer in turn, request by request: two passes one after the other
also measure whatever else the machine was doing meanwhile.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import Client, pct  # noqa: E402
from benchdata import CODES, LOINC, MRN_SYSTEM, observation, patient  # noqa: E402
from benchserver import BenchServer  # noqa: E402

from fhirserver.config import load_settings  # noqa: E402
from fhirserver.crypto.blind_index import normalize  # noqa: E402
from fhirserver.db.migrations import upgrade  # noqa: E402
from fhirserver.exchange.load import load_paths  # noqa: E402
from fhirserver.services import build_services, warm_keys  # noqa: E402


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
    count = load_ndjson(svc, resources(), "bench_search")
    elapsed = time.perf_counter() - t0
    with svc.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")  # what `PRAGMA optimize` in the server also does over time
    svc.engine.dispose()
    return elapsed, count


def full_analyze(data_dir: Path) -> None:
    """Exact planner statistics. The bulk loader samples (analysis_limit), and a resample between
    the two passes can flip a plan (the walk's: type index and sort instead of pk order)."""
    db = sqlite3.connect(data_dir / "fhirserver.sqlite3", timeout=60)
    try:
        db.execute("PRAGMA analysis_limit=0")
        db.execute("ANALYZE")
        db.commit()
    finally:
        db.close()


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


def load_ndjson(svc: Any, resources: Any, name: str) -> int:
    """Load through `fhirserver load`'s own path (validation, indexing, encryption, checkpoints,
    one AuditEvent per file), from an NDJSON file written outside the data directory."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.ndjson"
        with path.open("w") as fh:
            for res in resources:
                fh.write(json.dumps(res) + "\n")
        report = load_paths(svc, [path], batch=1000, workers=1, progress=False, echo=lambda _m: None)
    return report.loaded_total


def add_consents(data_dir: Path, n_patients: int, share: float) -> int:
    settings = load_settings(data_dir=str(data_dir), base_url="http://127.0.0.1/fhir")
    svc = build_services(settings)
    warm_keys(svc)
    count = load_ndjson(svc, restrictive_consents(n_patients, share), "bench-consents")
    svc.engine.dispose()
    return count


def timed(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def getter(client: Client):  # type: ignore[no-untyped-def]
    def get(path: str) -> dict:  # type: ignore[type-arg]
        status, _h, body = client.request("GET", path)
        if status != 200:
            raise RuntimeError(f"{path}: {status} {body[:300]!r}")
        return json.loads(body)

    return get


def search_queries(get, rng: random.Random, n_patients: int) -> dict:  # type: ignore[no-untyped-def, type-arg]
    def pid() -> str:
        return f"p{rng.randrange(n_patients)}"

    return {
        "Observation?patient=X&code=Y&_sort=-date&_count=10":
            lambda: get(f"/Observation?patient={pid()}&code={quote(LOINC + '|' + rng.choice(CODES)[0])}"
                        f"&_sort=-date&_count=10"),
        "Observation?patient=X&category=vital-signs&date=ge2020-01-01":
            lambda: get(f"/Observation?patient={pid()}&category=vital-signs&date=ge2020-01-01"),
        "Patient?name=smi": lambda: get("/Patient?name=smi"),
        "Patient?identifier=sys|val":
            lambda: get(f"/Patient?identifier={quote(MRN_SYSTEM)}|MRN{rng.randrange(n_patients):08d}"),
        "Observation/$lastn?patient=X&category=vital-signs":
            lambda: get(f"/Observation/$lastn?patient={pid()}&category=vital-signs"),
        # protected dates: equality (one digest) against ranges (a union of bucket digests)
        "Patient?birthdate=eqYYYY-MM-DD (equality)":
            lambda: get(f"/Patient?birthdate={rng.randint(1930, 2020)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"),
        "Patient?birthdate=ltYYYY-MM-DD (range, ~1-2% of patients)":
            lambda: get(f"/Patient?birthdate=lt1931-{rng.randint(2, 12):02d}-01"),
        "Patient?birthdate=geYYYY-MM-DD&_count=10 (range, the newest)":
            lambda: get(f"/Patient?birthdate=ge2020-{rng.randint(6, 12):02d}-01&_count=10"),
        "Observation?patient=X&code-value-quantity=Y$gtN (composite)":
            lambda: get(f"/Observation?patient={pid()}&code-value-quantity="
                        f"{quote(LOINC + '|' + rng.choice(CODES)[0])}$gt10"),
    }


def walk_pages(get) -> None:  # type: ignore[no-untyped-def]
    page = get("/Observation?category=laboratory&_count=50")
    for _ in range(9):
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        page = get(nxt[0].split("/fhir", 1)[1])


def alternated(fa, fb, n: int) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    """Time fa and fb n times each, one call of each in turn (the first alternates), so that load
    from other processes on a shared machine falls on both alike."""
    ta: list[float] = []
    tb: list[float] = []
    for i in range(n):
        pairs = [(fa, ta), (fb, tb)]
        for fn, out in (pairs if i % 2 == 0 else pairs[::-1]):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return ta, tb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=10000)
    ap.add_argument("--observations", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--data-dir", help="reuse/keep a data directory (default: temporary)")
    ap.add_argument("--consent-share", type=float, default=0.0,
                    help="also run with this fraction of patients holding restrictive Consents, and compare")
    ap.add_argument("--full-analyze", action="store_true",
                    help="exact planner statistics after loading and after adding the Consents (default: the "
                         "bulk loader's sampled ANALYZE)")
    ap.add_argument("--interleave", action="store_true",
                    help="with --consent-share: add the Consents to a copy of the data (<data-dir>-consents) and "
                         "alternate the requests between a server on each, instead of two passes one after the "
                         "other (on a shared machine, other processes' load then falls on both sides alike)")
    args = ap.parse_args()
    if args.interleave and args.consent_share <= 0:
        ap.error("--interleave needs --consent-share")
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="fhirbench-search-"))
    if not (data_dir / "fhirserver.sqlite3").exists():
        elapsed, count = load(data_dir, args.patients, args.observations)
        print(f"loaded {count} resources in {elapsed:.0f}s ({count / elapsed:.0f}/s, the fhirserver load path: "
              f"validation, indexing, encryption, checkpoints, one AuditEvent per file)")
        if args.full_analyze:
            full_analyze(data_dir)
    server = BenchServer(data_dir=str(data_dir)).start()
    other: BenchServer | None = None
    try:
        get = getter(Client(server.base, server.token("system/*.rs")))
        rng = random.Random(99)

        def pid() -> str:
            return f"p{rng.randrange(args.patients)}"

        queries = search_queries(get, rng, args.patients)
        walk_runs = max(10, args.iterations // 10)
        if args.interleave:
            # the same requests (same random sequence) to two servers, one request each in turn
            with_dir = data_dir.with_name(data_dir.name + "-consents")
            added = None
            if not (with_dir / "fhirserver.sqlite3").exists():
                shutil.copytree(data_dir, with_dir)
                added = add_consents(with_dir, args.patients, args.consent_share)
                if args.full_analyze:
                    full_analyze(with_dir)
            other = BenchServer(data_dir=str(with_dir)).start()
            other_get = getter(Client(other.base, other.token("system/*.rs")))
            other_queries = search_queries(other_get, random.Random(99), args.patients)
            results, with_consents = {}, {}
            for name, fn in queries.items():
                results[name], with_consents[name] = alternated(fn, other_queries[name], args.iterations)
            name = "10-page walk (_count=50), per page"
            none, with_ = alternated(lambda: walk_pages(get), lambda: walk_pages(other_get), walk_runs)
            results[name], with_consents[name] = [t / 10 for t in none], [t / 10 for t in with_]
        else:
            results = {name: timed(fn, args.iterations) for name, fn in queries.items()}
            results["10-page walk (_count=50), per page"] = [t / 10 for t in timed(lambda: walk_pages(get), walk_runs)]
        if args.consent_share > 0:
            if not args.interleave:
                added = add_consents(data_dir, args.patients, args.consent_share)
                if args.full_analyze:
                    full_analyze(data_dir)
                with_consents = {name: timed(fn, args.iterations) for name, fn in queries.items()}
                with_consents["10-page walk (_count=50), per page"] = [
                    t / 10 for t in timed(lambda: walk_pages(get), walk_runs)]
            what = f"{added} restrictive Consents" if added is not None else "restrictive Consents (existing copy)"
            print(f"\nconsent overhead: {what} ({args.consent_share:.0%} of patients)"
                  + (", requests alternating between the two servers" if args.interleave else ""))
            print(f"{'query':62s} {'p95 none':>9s} {'p95 with':>9s} {'ratio':>6s} {'p50 none':>9s} {'p50 with':>9s} "
                  f"{'ratio':>6s}")
            for name, times in results.items():
                before, after = pct(times, 95), pct(with_consents[name], 95)
                mid_before, mid_after = pct(times, 50), pct(with_consents[name], 50)
                print(f"{name:62s} {before:9.2f} {after:9.2f} {after / max(before, 1e-6):6.2f} {mid_before:9.2f} "
                      f"{mid_after:9.2f} {mid_after / max(mid_before, 1e-6):6.2f}")

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
            f = floor_times.get(name)
            if f is None:  # no hand-written SQL for it: compared with the equality query instead (below)
                print(f"{name:62s} {pct(times, 50):8.2f} {pct(times, 95):8.2f} {'-':>8s} {'-':>8s} {'-':>9s}")
                continue
            print(f"{name:62s} {pct(times, 50):8.2f} {pct(times, 95):8.2f} {pct(f, 50):8.2f} {pct(f, 95):8.2f} "
                  f"{pct(times, 95) / max(pct(f, 95), 1e-6):9.1f}")
        equality = [v for k, v in results.items() if k.startswith("Patient?birthdate=eq")]
        if equality:
            base = pct(equality[0], 95)
            print("\np95 against the birth-date equality query (the target for ranges and composites: <= 2x):")
            for name, times in results.items():
                if "(range" in name or "(composite)" in name:
                    print(f"  {name:62s} {pct(times, 95) / base:5.2f}x")
        print(f"\n(HTTP includes token check, decryption of every returned resource, the AuditEvent write and "
              f"commit; mean of all HTTP queries {statistics.mean([t for v in results.values() for t in v]) * 1000:.2f} ms)")
    finally:
        server.stop()
        if other is not None:
            other.stop()


if __name__ == "__main__":
    main()
