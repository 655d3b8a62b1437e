"""`fhirserver load`: Bundles and NDJSON through the CLI, checked over the REST API and in the
database: the HL7 examples round-trip, Bundle references are rewritten to Type/id, other types
are skipped and counted, invalid resources are reported and never stored, an interrupted load
(an exception inside a batch's transaction, or a SIGKILL of the process) resumes without
duplicates or losses, finished files are not loaded twice unless --force, and every file gets
exactly one import AuditEvent."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from fhirserver.cli import main
from fhirserver.exchange.load import load_paths
from fhirserver.services import build_services
from tests.conftest import AUDITOR_SETTINGS, EXAMPLES, db_path, example_files

TYPES = ("Patient", "Observation", "QuestionnaireResponse", "Consent")
LOINC = "http://loinc.org"


# ---------------------------------------------------------------- helpers
CONSENT = {
    "resourceType": "Consent", "id": "cs1", "status": "active",
    "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
    "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}], "patient": {"reference": "Patient/mx1"},
    "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
    "provision": {"type": "permit", "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                                                 "code": "HRESCH"}]}}


def cli_env(settings: Any) -> dict[str, str | None]:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("FHIRSERVER_")}
    env.update(FHIRSERVER_DATA_DIR=str(settings.data_dir), FHIRSERVER_BASE_URL=settings.base_url,
               FHIRSERVER_DATABASE_URL=settings.database_url or None)
    return env


def load(settings: Any, *args: str | Path, expect: int = 0) -> tuple[str, str]:
    """Run `fhirserver load` in-process; returns (stdout, stderr)."""
    result = CliRunner().invoke(main, ["load", "--quiet", *map(str, args)], env=cli_env(settings))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == expect, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    return result.stdout, result.stderr


def query(settings: Any, sql: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(settings.effective_database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params).all())
    finally:
        engine.dispose()


def stored_types(settings: Any) -> dict[str, int]:
    return {t: n for t, n in query(settings, "SELECT type, count(*) FROM resource GROUP BY type")}


def reader(make_client: Any) -> dict[str, str]:
    """Read everything, AuditEvents included; consent-exempt so the examples' Consents hide nothing."""
    scopes = "system/*.rs system/AuditEvent.rs"  # the audit trail needs its own scope and an auditor client
    return make_client(scopes, settings={"consent_exempt": True, **AUDITOR_SETTINGS}).headers(scopes)


def get(http: Any, h: dict[str, str], ref: str) -> dict[str, Any]:
    resp = http.get(f"/fhir/{ref}", headers=h)
    assert resp.status_code == 200, (ref, resp.status_code, resp.get_data(as_text=True)[:300])
    return json.loads(resp.get_data(as_text=True), parse_float=Decimal)


def search(http: Any, h: dict[str, str], query_string: str) -> list[dict[str, Any]]:
    resp = http.get(f"/fhir/{query_string}&_count=1000", headers=h)
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    bundle = json.loads(resp.get_data(as_text=True), parse_float=Decimal)
    assert not any(link["relation"] == "next" for link in bundle.get("link", []))
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") != "outcome"]


def import_events(http: Any, h: dict[str, str]) -> list[dict[str, Any]]:
    events = search(http, h, "AuditEvent?subtype=create")
    return [e for e in events if e["subtype"][0].get("display") == "import"]


def event_file(ev: dict[str, Any]) -> str:
    (entity,) = [e for e in ev["entity"] if e.get("description") == "imported file"]
    return next(d["valueString"] for d in entity["detail"] if d["type"] == "path")


def event_patients(ev: dict[str, Any]) -> set[str]:
    return {e["what"]["reference"] for e in ev["entity"] if e.get("role", {}).get("code") == "1"}


def without_meta(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if k != "meta"}


def references(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return own + [r for v in node.values() for r in references(v)]
    if isinstance(node, list):
        return [r for v in node for r in references(v)]
    return []


def with_references(node: Any, mapping: dict[str, str]) -> Any:
    """A copy of `node` with every reference found in `mapping` replaced."""
    if isinstance(node, dict):
        return {k: mapping.get(v, v) if k == "reference" and isinstance(v, str) else with_references(v, mapping)
                for k, v in node.items()}
    if isinstance(node, list):
        return [with_references(v, mapping) for v in node]
    return node


def write_ndjson(path: Path, lines: list[Any]) -> Path:
    text = "".join((line if isinstance(line, str) else dumps(line)) + "\n" for line in lines)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def patient(pid: str, family: str = "Loadtest") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "name": [{"family": family, "given": ["Ann"]}],
            "gender": "female", "birthDate": "1970-01-02"}


def observation(oid: str | None, subject: str, value: str = "72.50") -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": subject}, "effectiveDateTime": "2024-03-01T10:00:00Z",
        "valueQuantity": {"value": Decimal(value), "unit": "/min"}}
    if oid:
        obs["id"] = oid
    return obs


def dumps(obj: Any) -> str:
    """JSON with Decimals written as the literal they hold (1.50 stays 1.50)."""
    return re.sub(r'"@dec:([^"]+)"', r"\1", json.dumps(obj, default=lambda d: f"@dec:{d}"))


def cohort(n_patients: int, per_patient: int) -> list[str]:
    lines = []
    for i in range(n_patients):
        lines.append(dumps(patient(f"cp{i}")))
        lines.extend(dumps(observation(f"co{i}-{j}", f"Patient/cp{i}", f"{60 + j}.0")) for j in range(per_patient))
    return lines


# ---------------------------------------------------------------- the HL7 examples
def test_hl7_examples_directory_round_trips_and_bundle_references_resolve(settings, http, make_client) -> None:
    if not EXAMPLES.is_dir() or not example_files():
        pytest.skip(f"HL7 examples not available in {EXAMPLES}")
    out, _err = load(settings, EXAMPLES)
    singles = [p for t in TYPES for p in example_files(f"{t}-")]
    bundles = sorted((EXAMPLES / "bundles").glob("*.json"))
    assert f"files: {len(singles) + len(bundles)} loaded" in out
    assert "invalid: 0" in out
    # every resource of a served type is loaded; Parameters (not served) is counted
    assert re.search(r"loaded: Binary 1, .*MolecularSequence 12", out), out
    assert re.search(r"skipped \(type not stored\): .*Parameters 1$", out, re.M), out
    h = reader(make_client)

    for path in singles:
        original = json.loads(path.read_text(), parse_float=Decimal)
        got = get(http, h, f"{original['resourceType']}/{original['id']}")
        assert without_meta(got) == without_meta(original), path.name
        assert got["meta"]["versionId"] == "1"

    for path in bundles:
        bundle = json.loads(path.read_text(), parse_float=Decimal)
        full_urls: dict[str, str] = {}
        kept = []
        for entry in bundle["entry"]:
            res = entry.get("resource")
            if not res:
                continue
            full_url = entry.get("fullUrl", "")
            rid = res.get("id") or (full_url[len("urn:uuid:"):] if full_url.startswith("urn:uuid:") else None)
            assert rid, (path.name, full_url)
            full_urls[full_url] = f"{res['resourceType']}/{rid}"
            if res["resourceType"] in TYPES:
                kept.append((res, f"{res['resourceType']}/{rid}"))
        assert kept, path.name
        for original, ref in kept:
            got = get(http, h, ref)
            assert got["meta"]["versionId"] == "1"
            for reference in references(got):
                assert not reference.startswith("urn:uuid:"), (ref, reference)
            # equal to the entry once its references to fullUrls are rewritten to Type/id
            expected = {**with_references(original, full_urls), "id": ref.split("/")[1]}
            assert without_meta(got) == without_meta(expected), ref
            # references to stored types resolve to resources that exist
            for reference in references(got):
                if reference in full_urls.values() and reference.split("/")[0] in TYPES:
                    get(http, h, reference)

    # exactly one import AuditEvent per file
    events = import_events(http, h)
    assert sorted(event_file(e) for e in events) == sorted(str(p.resolve()) for p in [*singles, *bundles])
    assert query(settings, "SELECT count(*) FROM import_file WHERE done")[0][0] == len(singles) + len(bundles)


def test_synthea_style_bundle_references_become_type_id(settings, http, make_client, tmp_path: Path) -> None:
    pid, eid = str(uuid.uuid4()), str(uuid.uuid4())
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{pid}", "resource": {k: v for k, v in patient("x").items() if k != "id"},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": f"urn:uuid:{eid}", "resource": {"resourceType": "Encounter", "status": "finished",
                                                    "class": {"code": "AMB"}, "subject": {"reference": f"urn:uuid:{pid}"}},
         "request": {"method": "POST", "url": "Encounter"}},
        {"fullUrl": "urn:uuid:" + str(uuid.uuid4()),
         "resource": {**observation(None, f"urn:uuid:{pid}"), "encounter": {"reference": f"urn:uuid:{eid}"}},
         "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": "http://other.example/fhir/Patient/abs-1", "resource": patient("abs-1")},
        {"fullUrl": "urn:uuid:" + str(uuid.uuid4()), "resource": observation("abs-obs", "http://other.example/fhir/Patient/abs-1")},
    ]}
    (tmp_path / "synthea.json").write_text(dumps(bundle))
    out, _ = load(settings, tmp_path / "synthea.json")
    assert "loaded: Encounter 1, Observation 2, Patient 2 (total 5)" in out  # Encounters are stored too
    assert "skipped (type not stored): none" in out
    h = reader(make_client)
    assert get(http, h, f"Patient/{pid}")["name"][0]["family"] == "Loadtest"  # the urn:uuid became the id
    (obs,) = search(http, h, f"Observation?subject=Patient/{pid}")
    assert obs["subject"] == {"reference": f"Patient/{pid}"}
    assert obs["encounter"] == {"reference": f"Encounter/{eid}"}  # the urn:uuid became the Encounter's id
    assert obs["valueQuantity"]["value"] == Decimal("72.50")
    assert str(obs["valueQuantity"]["value"]) == "72.50"
    assert get(http, h, "Observation/abs-obs")["subject"] == {"reference": "Patient/abs-1"}
    assert [o["id"] for o in search(http, h, "Observation?subject=Patient/abs-1")] == ["abs-obs"]


# ---------------------------------------------------------------- NDJSON: skipped types, invalid lines
def test_ndjson_mixed_types_keeps_ours_and_counts_the_rest(settings, http, make_client, tmp_path: Path) -> None:
    path = write_ndjson(tmp_path / "synthea.ndjson", [
        patient("mx1"),
        {"resourceType": "Basic", "id": "e1", "code": {"text": "x"}},  # types this server does not store
        dumps(observation("mxo1", "Patient/mx1")),
        "",
        {"resourceType": "Claim", "id": "c1", "patient": {"reference": "Patient/mx1"}},
        {"resourceType": "Basic", "id": "e2", "code": {"text": "y"}},
        {"resourceType": "AuditEvent", "id": "forged", "recorded": "2024-01-01T00:00:00Z"},
        {"resourceType": "QuestionnaireResponse", "id": "qr1", "status": "completed", "subject": {"reference": "Patient/mx1"}},
        CONSENT,
    ])
    out, _ = load(settings, path)
    assert "loaded: Consent 1, Observation 1, Patient 1, QuestionnaireResponse 1 (total 4)" in out
    assert "skipped (type not stored): AuditEvent 1, Basic 2, Claim 1" in out
    assert "invalid: 0" in out
    types = stored_types(settings)
    assert {t: n for t, n in types.items() if t != "AuditEvent"} == \
        {"Patient": 1, "Observation": 1, "QuestionnaireResponse": 1, "Consent": 1}
    assert not query(settings, "SELECT id FROM resource WHERE id IN ('e1', 'e2', 'c1', 'forged')")
    h = reader(make_client)
    assert get(http, h, "QuestionnaireResponse/qr1")["status"] == "completed"
    assert get(http, h, "Consent/cs1")["patient"] == {"reference": "Patient/mx1"}


def test_invalid_lines_are_reported_not_stored_and_fail_the_exit_code(settings, http, make_client, tmp_path: Path) -> None:
    path = write_ndjson(tmp_path / "obs.ndjson", [
        patient("iv1"),
        {**observation("bad-status", "Patient/iv-orphan"), "status": "nonsense"},
        '{"resourceType": "Observation", "id": "truncated", "status": "fin',
        {"resourceType": "Observation", "id": "dup", "id ": "x", "status": "final", "code": {"text": "x"},
         "unknownElement": 1, "subject": {"reference": "Patient/iv-orphan2"}},
        dumps(observation("good", "Patient/iv1")),
    ])
    out, err = load(settings, path, expect=1)
    assert "loaded: Observation 1, Patient 1 (total 2)" in out
    assert "invalid: 3" in out
    assert f"{path}: line 2: Observation: " in err and "status" in err
    assert f"{path}: line 3: not valid JSON" in err
    assert f"{path}: line 4: Observation: " in err
    h = reader(make_client)
    assert get(http, h, "Observation/good")["subject"] == {"reference": "Patient/iv1"}
    for rid in ("bad-status", "truncated", "dup"):
        assert http.get(f"/fhir/Observation/{rid}", headers=h).status_code == 404
    # nothing partial: no row, no index entry, no data key for the patients only invalid lines name
    assert not query(settings, "SELECT pk FROM resource WHERE id IN ('bad-status', 'truncated', 'dup')")
    assert not query(settings, "SELECT * FROM compartment WHERE patient_id LIKE 'iv-orphan%'")
    assert not query(settings, "SELECT * FROM data_key WHERE scope LIKE 'patient:iv-orphan%'")
    assert query(settings, "SELECT count(*) FROM resource WHERE type != 'AuditEvent'")[0][0] == 2
    (ev,) = import_events(http, h)
    assert ev["outcome"] == "4" and "invalid 3" in ev["outcomeDesc"]


# ---------------------------------------------------------------- resume
def test_interrupted_load_resumes_without_duplicates_or_losses(settings, http, make_client, tmp_path: Path) -> None:
    lines = cohort(6, 9)  # 60 resources
    path = write_ndjson(tmp_path / "cohort.ndjson", lines)
    commits: list[int] = []

    def crash_in_third_batch(_path: Path, position: int) -> None:
        commits.append(position)
        if len(commits) == 3:
            raise KeyboardInterrupt  # inside the transaction: the third batch rolls back with its checkpoint

    svc = build_services(settings)
    try:
        with pytest.raises(KeyboardInterrupt):
            load_paths(svc, [path], batch=10, progress=False, on_batch=crash_in_third_batch)
    finally:
        svc.engine.dispose()
    assert commits == [10, 20, 30]
    assert query(settings, "SELECT count(*) FROM resource WHERE type != 'AuditEvent'")[0][0] == 20
    assert query(settings, "SELECT position, done FROM import_file") == [(20, False)]
    h = reader(make_client)
    assert import_events(http, h) == []  # audited when the file completes

    result = CliRunner().invoke(main, ["load", "--quiet", "--batch", "10", str(path)], env=cli_env(settings))
    assert result.exit_code == 0, result.output
    assert f"resumed: {path} at item 20" in result.stdout
    assert "loaded: Observation 54, Patient 6 (total 60)" in result.stdout  # the whole file, both runs
    rows = query(settings, "SELECT type, id, version FROM resource WHERE type != 'AuditEvent'")
    assert len(rows) == 60 and {r.version for r in rows} == {1}
    assert query(settings, "SELECT count(*) FROM resource_version rv JOIN resource r ON r.pk = rv.resource_pk "
                           "WHERE r.type != 'AuditEvent'")[0][0] == 60
    observations = search(http, h, "Observation?code=8867-4")
    assert len(observations) == 54 and {o["meta"]["versionId"] for o in observations} == {"1"}
    (ev,) = import_events(http, h)
    assert event_patients(ev) == {f"Patient/cp{i}" for i in range(6)}  # including those of the first run
    assert "loaded Observation 54, Patient 6" in ev["outcomeDesc"]
    assert query(settings, "SELECT count(*) FROM import_patient")[0][0] == 0


def test_killed_process_resumes(settings, http, make_client, tmp_path: Path) -> None:
    lines = cohort(40, 49)  # 2000 resources
    path = write_ndjson(tmp_path / "big.ndjson", lines)
    db_file = db_path(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRSERVER_")}
    env.update(FHIRSERVER_DATA_DIR=str(settings.data_dir), FHIRSERVER_BASE_URL=settings.base_url)
    proc = subprocess.Popen([sys.executable, "-m", "fhirserver", "load", "--quiet", "--workers", "0", "--batch", "25",
                             str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    position = 0
    deadline = time.time() + 60
    try:
        while time.time() < deadline and proc.poll() is None:
            with sqlite3.connect(db_file, timeout=30) as cx:
                row = cx.execute("SELECT position FROM import_file WHERE path = ?", (str(path),)).fetchone()
            if row and row[0] >= 100:
                position = row[0]
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the load finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert position >= 100
    done = query(settings, "SELECT position, done FROM import_file WHERE path = :p", p=str(path))[0]
    assert not done.done and done.position < 2000
    stored = query(settings, "SELECT count(*) FROM resource WHERE type != 'AuditEvent'")[0][0]
    assert stored == done.position  # every committed batch has its checkpoint, and nothing else

    out, _ = load(settings, path, "--batch", "25")
    assert f"resumed: {path} at item {done.position}" in out
    rows = query(settings, "SELECT version, count(*) FROM resource WHERE type != 'AuditEvent' GROUP BY version")
    assert rows == [(1, 2000)]
    h = reader(make_client)
    assert len([e for e in import_events(http, h) if event_file(e) == str(path)]) == 1


# ---------------------------------------------------------------- already loaded, --force
def test_finished_files_are_skipped_unless_forced(settings, http, make_client, tmp_path: Path) -> None:
    path = write_ndjson(tmp_path / "small.ndjson", [patient("f1"), dumps(observation("fo1", "Patient/f1"))])
    load(settings, path)
    h = reader(make_client)
    assert len(import_events(http, h)) == 1

    out, _ = load(settings, tmp_path)
    assert f"already loaded: {path}" in out
    assert "files: 0 loaded, 1 already loaded" in out and "loaded: none (total 0)" in out
    assert len(import_events(http, h)) == 1
    assert get(http, h, "Observation/fo1")["meta"]["versionId"] == "1"

    out, _ = load(settings, path, "--force")
    assert "files: 1 loaded" in out and "2 as new versions of existing resources" in out
    assert get(http, h, "Observation/fo1")["meta"]["versionId"] == "2"
    assert get(http, h, "Patient/f1")["meta"]["versionId"] == "2"
    assert len(import_events(http, h)) == 2

    # a changed file is a new file: loaded again without --force
    write_ndjson(path, [patient("f1", "Changed")])
    out, _ = load(settings, path)
    assert "files: 1 loaded" in out
    assert get(http, h, "Patient/f1")["name"][0]["family"] == "Changed"


# ---------------------------------------------------------------- audit
def test_one_audit_event_per_file(settings, http, make_client, tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    files = [
        write_ndjson(src / "a.ndjson", [patient("au1"), dumps(observation("auo1", "Patient/au1")),
                                        {"resourceType": "Basic", "id": "x", "code": {"text": "not stored"}}]),
        write_ndjson(src / "sub" / "b.ndjson.gz", [patient("au2"), dumps(observation("auo2", "Patient/au2"))]),
        src / "c.json",
        src / "sub" / "d.json.gz",
        src / "e.json",
    ]
    files[2].write_text(dumps({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": patient("au3")}, {"resource": observation("auo3", "Patient/au3")}]}))
    files[3].write_bytes(gzip.compress(dumps(observation("auo4", "Patient/au1")).encode()))
    files[4].write_text('{"resourceType": "Bundle", ')  # not JSON: still one (failed) import event
    (src / "README.md").write_text("not loaded")
    out, err = load(settings, src, expect=1)
    assert "files: 5 loaded" in out and "loaded: Observation 4, Patient 3 (total 7)" in out
    assert f"invalid: {files[4]}: file: the file is not valid JSON" in err

    h = reader(make_client)
    events = import_events(http, h)
    by_file = {event_file(e): e for e in events}
    assert len(events) == 5 and set(by_file) == {str(f) for f in files}
    expect_patients = {"a.ndjson": {"au1"}, "b.ndjson.gz": {"au2"}, "c.json": {"au3"}, "d.json.gz": {"au1"}, "e.json": set()}
    for f in files:
        ev = by_file[str(f)]
        assert ev["type"]["code"] == "rest" and ev["action"] == "C"
        assert ev["subtype"][0]["code"] == "create"
        assert event_patients(ev) == {f"Patient/{p}" for p in expect_patients[f.name]}
        assert ev["outcome"] == ("4" if f.name == "e.json" else "0")
    assert "skipped Basic 1" in by_file[str(files[0])]["outcomeDesc"]
    # the chain still verifies with the import events in it
    result = CliRunner().invoke(main, ["audit", "verify"], env=cli_env(settings))
    assert result.exit_code == 0 and result.stdout.startswith("OK:"), result.output


# ---------------------------------------------------------------- worker processes
def test_worker_processes_store_the_same_as_in_process(settings, http, make_client, tmp_path: Path) -> None:
    path = write_ndjson(tmp_path / "pool.ndjson", cohort(5, 7))
    svc = build_services(settings)
    try:
        report = load_paths(svc, [path], batch=16, workers=2, progress=False, min_parallel_bytes=0)
    finally:
        svc.engine.dispose()
    assert report.total("loaded") == {"Patient": 5, "Observation": 35} and report.invalid == 0
    h = reader(make_client)
    obs = search(http, h, "Observation?subject=Patient/cp3")
    assert sorted(o["id"] for o in obs) == [f"co3-{j}" for j in range(7)]
    assert {str(o["valueQuantity"]["value"]) for o in obs} == {f"{60 + j}.0" for j in range(7)}
    # each resource is encrypted under its patient's data key, assigned by the writer
    keyed = query(settings, "SELECT r.id, k.scope FROM resource r JOIN resource_version v ON v.resource_pk = r.pk "
                            "JOIN data_key k ON k.id = v.key_id WHERE r.type != 'AuditEvent'")
    assert len(keyed) == 40
    for rid, scope in keyed:
        assert scope == f"patient:cp{rid[2:].split('-')[0]}", (rid, scope)


# ---------------------------------------------------------------- PostgreSQL
@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_load_on_postgres(settings, http, make_client, tmp_path: Path) -> None:
    pid = str(uuid.uuid4())
    write_ndjson(tmp_path / "a.ndjson", [*cohort(3, 4), {"resourceType": "Basic", "id": "pg-e"}])
    (tmp_path / "b.json").write_text(dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{pid}", "resource": {k: v for k, v in patient("x").items() if k != "id"}},
        {"fullUrl": "urn:uuid:" + str(uuid.uuid4()), "resource": observation("pg-o", f"urn:uuid:{pid}")}]}))
    out, _ = load(settings, tmp_path, "--batch", "5")
    assert "files: 2 loaded" in out and "loaded: Observation 13, Patient 4 (total 17)" in out
    assert "skipped (type not stored): Basic 1" in out
    h = reader(make_client)
    assert get(http, h, "Observation/pg-o")["subject"] == {"reference": f"Patient/{pid}"}
    assert len(search(http, h, "Observation?subject=Patient/cp1")) == 4
    assert len(import_events(http, h)) == 2
    out, _ = load(settings, tmp_path)
    assert "files: 0 loaded, 2 already loaded" in out
    # --force: every resource gets a second version; a Consent's rules are rebuilt with it
    write_ndjson(tmp_path / "c.ndjson", [CONSENT])
    load(settings, tmp_path / "c.ndjson")
    rules = query(settings, "SELECT count(*) FROM consent_rule")[0][0]
    assert rules > 0
    out, _ = load(settings, tmp_path, "--force", "--batch", "5")
    assert "files: 3 loaded" in out and "18 as new versions of existing resources" in out
    assert query(settings, "SELECT version, count(*) FROM resource WHERE type != 'AuditEvent' GROUP BY version") \
        == [(2, 18)]
    assert query(settings, "SELECT count(*) FROM consent_rule")[0][0] == rules
    assert get(http, h, "Observation/pg-o")["meta"]["versionId"] == "2"
    assert len(import_events(http, h)) == 6
