"""Exchange benchmark: `fhirserver load` import rate, 100-entry transaction latency, and Bulk
export throughput (plain and de-identified) over a real server -- SQLite, encryption, indexing
and audit on. Prints figures; it asserts only that the work was done.

    python scripts/bench_exchange.py                 # 100,000 resources (the issue's size)
    python scripts/bench_exchange.py --resources 20000 --transactions 20
    python scripts/bench_exchange.py --carebundle 1100   # ~50,000 US Core resources of 8 types
                                                         # (carebundle, test extras), the whole record
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from benchdata import observation, patient  # noqa: E402
from benchserver import BenchServer  # noqa: E402


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] * 1000


def write_input(folder: Path, resources: int, per_patient: int, per_file: int = 20_000) -> int:
    """Synthetic NDJSON (ids kept, like an export from another server); returns resources written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    patients = max(1, resources // (1 + per_patient))
    written, file_no, lines = 0, 0, 0
    out = None
    pat = (folder / "Patient.ndjson").open("w")
    for i in range(patients):
        body = patient(i, rng)
        body["id"] = f"bx-{i}"
        pat.write(json.dumps(body) + "\n")
        written += 1
        for j in range(per_patient):
            if out is None or lines >= per_file:
                if out is not None:
                    out.close()
                file_no, lines = file_no + 1, 0
                out = (folder / f"Observation-{file_no}.ndjson").open("w")
            obs = observation(body["id"], rng)
            obs["id"] = f"bx-{i}-{j}"
            out.write(json.dumps(obs) + "\n")
            lines += 1
            written += 1
    pat.close()
    if out is not None:
        out.close()
    return written


def transaction_bundle(rng: random.Random, entries: int) -> dict:
    pid = f"urn:uuid:{uuid.uuid4()}"
    body = patient(rng.randint(10**7, 10**8), rng)
    items = [{"fullUrl": pid, "resource": body, "request": {"method": "POST", "url": "Patient"}}]
    for _ in range(entries - 1):
        obs = observation("placeholder", rng)
        obs["subject"] = {"reference": pid}
        items.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": obs,
                      "request": {"method": "POST", "url": "Observation"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": items}


def export(server: BenchServer, path: str = "$export", **params: str) -> tuple[int, float]:
    """Kick off an export (system-level unless `path` says otherwise) and wait for it; returns
    (resources, seconds)."""
    headers = {"Authorization": f"Bearer {server.token()}", "Prefer": "respond-async",
               "Accept": "application/fhir+json"}
    t0 = time.perf_counter()
    kick = requests.get(f"{server.base}/{path}", params=params, headers=headers, timeout=60)
    if kick.status_code != 202:
        raise RuntimeError(f"export kick-off failed: {kick.status_code} {kick.text[:300]}")
    status_url = kick.headers["Content-Location"]
    while True:
        resp = requests.get(status_url, headers={"Authorization": f"Bearer {server.token()}"}, timeout=60)
        if resp.status_code == 200:
            elapsed = time.perf_counter() - t0
            return sum(item["count"] for item in resp.json()["output"]), elapsed
        if resp.status_code != 202:
            raise RuntimeError(f"export failed: {resp.status_code} {resp.text[:300]}")
        time.sleep(0.25)


def carebundle_input(folder: Path, patients: int) -> int:
    """carebundle's NDJSON (one file per type, ids minted, references rewritten); returns resources."""
    tool = Path(sys.executable).parent / "carebundle"
    subprocess.run([str(tool), "generate", "--profile", "mixed", "--count", str(patients), "--sex", "mixed",
                    "--format", "ndjson", "--out", str(folder)], check=True, capture_output=True)
    counts = {p.stem: sum(1 for _ in p.open()) for p in sorted(folder.glob("*.ndjson"))}
    print("input    carebundle mixed profile:", ", ".join(f"{t} {n}" for t, n in counts.items()))
    return sum(counts.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resources", type=int, default=100_000, help="resources to import and export")
    ap.add_argument("--observations", type=int, default=20, help="Observations per Patient")
    ap.add_argument("--transactions", type=int, default=30, help="100-entry transactions to time")
    ap.add_argument("--entries", type=int, default=100)
    ap.add_argument("--export-rounds", type=int, default=2, help="alternated system / Group exports (each)")
    ap.add_argument("--carebundle", type=int, default=0, metavar="PATIENTS",
                    help="import carebundle's mixed-profile US Core data for this many patients instead")
    args = ap.parse_args()

    server = BenchServer(workers=2, threads=4)
    folder = Path(tempfile.mkdtemp(prefix="fhirbench-input-"))  # not in the data dir: load skips that
    if args.carebundle:
        written = carebundle_input(folder, args.carebundle)
    else:
        written = write_input(folder, args.resources, args.observations)
    server.cli("db", "upgrade")
    t0 = time.perf_counter()
    summary = subprocess.run([sys.executable, "-m", "fhirserver", "load", str(folder), "--quiet"], env=server.env,
                             check=True, capture_output=True, text=True).stdout
    elapsed = time.perf_counter() - t0
    print(summary.strip().splitlines()[-1] if summary.strip() else "(no summary)")
    print(f"import   {written} resources in {elapsed:.1f} s wall clock (process start included): "
          f"{written / elapsed:.0f} resources/s  [fhirserver load, SQLite, validation+indexing+encryption on]")

    server.start()
    try:
        rng = random.Random(11)
        latencies: list[float] = []
        session = requests.Session()
        for _ in range(args.transactions):
            bundle = json.dumps(transaction_bundle(rng, args.entries))
            session.headers["Authorization"] = f"Bearer {server.token()}"
            t = time.perf_counter()
            resp = session.post(server.base, data=bundle, headers={"Content-Type": "application/fhir+json"}, timeout=120)
            latencies.append(time.perf_counter() - t)
            if resp.status_code != 200:
                raise RuntimeError(f"transaction failed: {resp.status_code} {resp.text[:300]}")
        print(f"transaction ({args.entries} entries)  p50 {pct(latencies, 50):.0f} ms  p95 {pct(latencies, 95):.0f} ms  "
              f"mean {statistics.mean(latencies) * 1000:.0f} ms  (n={len(latencies)}, sequential, HTTP)")

        count, seconds = export(server)
        print(f"export   {count} resources in {seconds:.1f} s: {count / seconds:.0f} resources/s  "
              f"[system $export, NDJSON encrypted at rest, kick-off to manifest]")
        count, seconds = export(server, _deidentify="safe-harbor")
        print(f"export   {count} resources in {seconds:.1f} s: {count / seconds:.0f} resources/s  "
              f"[_deidentify=safe-harbor]")
        # a Group of every patient (a member-filter `Patient`): its export against the system
        # export of the same data, alternating, --export-rounds of each
        group = {"resourceType": "Group", "type": "person", "actual": False, "modifierExtension": [{
            "url": "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/member-filter",
            "valueExpression": {"language": "application/x-fhir-query", "expression": "Patient"}}]}
        made = requests.post(f"{server.base}/Group", json=group, timeout=60,
                             headers={"Authorization": f"Bearer {server.token()}", "Content-Type": "application/fhir+json"})
        made.raise_for_status()
        gid = made.json()["id"]
        rates: dict[str, list[float]] = {"system": [], "group": []}
        for _ in range(args.export_rounds):
            for label, path in (("system", "$export"), ("group", f"Group/{gid}/$export")):
                count, seconds = export(server, path)
                rates[label].append(count / seconds)
                print(f"export   {count} resources in {seconds:.1f} s: {count / seconds:.0f} resources/s  [{path}]")
        g, sy = statistics.median(rates["group"]), statistics.median(rates["system"])
        print(f"Group export {g:.0f} resources/s = {100 * g / sy:.0f}% of the system export ({sy:.0f}/s), same run")
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
