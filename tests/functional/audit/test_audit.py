"""The audit trail: one AuditEvent (IHE BALP) per request, its content, its search, the hash chain
and `fhirserver audit verify` against direct tampering with the database, and fail-closed
behaviour when the audit record cannot be written."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from click.testing import CliRunner

from fhirserver.cli import main
from tests.conftest import AUDITOR_SETTINGS
from tests.conftest import raw_db as db

REST_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
FAMILY = "Auditfamilyxq"


# ----------------------------------------------------------------------------- helpers




def records(settings) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    """(pk, id) of every access record, in the order they were written."""
    with db(settings) as cx:
        return [(r[0], r[1]) for r in cx.execute("SELECT pk, id FROM access_record ORDER BY pk")]


def chain(settings) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    """(position in the Merkle tree, id) of every sequenced record."""
    with db(settings) as cx:
        return [(r[0], r[1]) for r in cx.execute(
            "SELECT seq, id FROM access_record WHERE seq IS NOT NULL ORDER BY seq")]


def counts(settings) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    """(access records, distinct record ids, highest record pk); AuditEvents are never resource rows."""
    with db(settings) as cx:
        rows = cx.execute("SELECT count(*) FROM access_record").fetchone()[0]
        ids = cx.execute("SELECT count(DISTINCT id) FROM access_record").fetchone()[0]
        top = cx.execute("SELECT coalesce(max(pk), 0) FROM access_record").fetchone()[0]
        assert cx.execute("SELECT count(*) FROM resource WHERE type='AuditEvent'").fetchone()[0] == 0
    return rows, ids, top


def audited(settings, send: Callable[[], Any]) -> tuple[Any, str]:  # type: ignore[no-untyped-def]
    """Send one request; assert it added exactly one audit record; return (response, event id)."""
    before = counts(settings)
    resp = send()
    after = counts(settings)
    assert after[:2] == (before[0] + 1, before[1] + 1) and after[2] > before[2], (before, after, resp.status_code)
    new = [(pk, e) for pk, e in records(settings) if pk > before[2]]
    assert len(new) == 1
    return resp, new[0][1]


def patient(family: str = FAMILY, given: str = "Ann") -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family, "given": [given]}], "birthDate": "1961-06-01"}


def observation(pid: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": f"Patient/{pid}"}, "valueQuantity": {"value": 61, "unit": "/min"}}


def get_event(http, h, event_id: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    r = http.get(f"/fhir/AuditEvent/{event_id}", headers=h)
    assert r.status_code == 200, r.get_data(as_text=True)[:300]
    ev = r.get_json()
    assert ev["resourceType"] == "AuditEvent" and ev["id"] == event_id
    return ev


def search_events(http, h, query: str) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    r = http.get(f"/fhir/AuditEvent?{query}&_count=1000", headers=h)
    assert r.status_code == 200, r.get_data(as_text=True)[:300]
    bundle = r.get_json()
    assert not any(link["relation"] == "next" for link in bundle.get("link", []))
    return [e["resource"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] == "AuditEvent"]


def request_id_of(ev: dict[str, Any]) -> str | None:
    for ent in ev.get("entity", []):
        if ent.get("type", {}).get("code") == "XrequestId":
            return ent["what"]["identifier"]["value"]
    return None


def references(ev: dict[str, Any]) -> list[str]:
    return [e["what"]["reference"] for e in ev.get("entity", []) if "reference" in e.get("what", {})]


def patient_entities(ev: dict[str, Any]) -> set[str]:
    return {e["what"]["reference"] for e in ev.get("entity", [])
            if e.get("role", {}).get("code") == "1" and e.get("type", {}).get("code") == "1"}


def cli_env(settings) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    return {"FHIRSERVER_DATA_DIR": str(settings.data_dir), "FHIRSERVER_BASE_URL": settings.base_url,
            "FHIRSERVER_DATABASE_URL": None, "FHIRSERVER_CONFIG": None, "FHIRSERVER_MASTER_KEY": None}


def verify(settings):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, ["audit", "verify"], env=cli_env(settings))


def checkpoint(settings) -> None:  # type: ignore[no-untyped-def]
    """What the server does every audit_checkpoint_seconds and at shutdown."""
    result = CliRunner().invoke(main, ["audit", "checkpoint"], env=cli_env(settings))
    assert result.exit_code == 0 and result.output.startswith("checkpoint: "), result.output


def build_chain(http, h, n_patients: int = 3) -> list[str]:  # type: ignore[no-untyped-def]
    """A few ordinary requests so the chain has a middle. Returns the patient ids."""
    ids = []
    for i in range(n_patients):
        r = http.post("/fhir/Patient", json=patient(given=f"G{i}"), headers=h)
        assert r.status_code == 201
        ids.append(r.get_json()["id"])
        assert http.get(f"/fhir/Patient/{ids[-1]}", headers=h).status_code == 200
    assert http.get(f"/fhir/Patient?family={FAMILY}", headers=h).status_code == 200
    return ids


# ----------------------------------------------------------------------------- one event per request
def test_exactly_one_audit_event_per_request(http, admin, make_client, settings):
    h = admin.headers()
    h_obs = make_client("system/Observation.rs").headers()  # tokens are fetched (and audited) up front
    auditor = make_client("system/AuditEvent.rs", settings=AUDITOR_SETTINGS).headers("system/AuditEvent.rs")
    seen: list[tuple[str, int, str, str]] = []  # (label, status, expected subtype, event id)

    def step(label: str, subtype: str, status: int, send: Callable[[], Any]) -> Any:
        resp, event_id = audited(settings, send)
        assert resp.status_code == status, (label, resp.status_code, resp.get_data(as_text=True)[:300])
        seen.append((label, status, subtype, event_id))
        return resp

    r = step("create", "create", 201, lambda: http.post("/fhir/Patient", json=patient(), headers=h))
    pid = r.get_json()["id"]
    step("read", "read", 200, lambda: http.get(f"/fhir/Patient/{pid}", headers=h))
    step("vread", "vread", 200, lambda: http.get(f"/fhir/Patient/{pid}/_history/1", headers=h))
    step("search", "search-type", 200, lambda: http.get(f"/fhir/Patient?family={FAMILY}", headers=h))
    step("search-post", "search-type", 200, lambda: http.post(
        "/fhir/Patient/_search", data={"family": FAMILY}, headers=h))
    body = {**patient(), "id": pid, "gender": "female"}
    step("update", "update", 200, lambda: http.put(f"/fhir/Patient/{pid}", json=body, headers=h))
    step("history", "history-instance", 200, lambda: http.get(f"/fhir/Patient/{pid}/_history", headers=h))
    step("history-type", "history-type", 200, lambda: http.get("/fhir/Patient/_history", headers=h))
    step("delete", "delete", 204, lambda: http.delete(f"/fhir/Patient/{pid}", headers=h))
    step("read-deleted", "read", 410, lambda: http.get(f"/fhir/Patient/{pid}", headers=h))
    step("no-token", "read", 401, lambda: http.get(f"/fhir/Patient/{pid}"))
    step("bad-token", "read", 401, lambda: http.get(f"/fhir/Patient/{pid}",
                                                   headers={"Authorization": "Bearer not-a-real-token"}))
    step("wrong-scope", "read", 403, lambda: http.get(f"/fhir/Patient/{pid}", headers=h_obs))
    step("unknown-id", "read", 404, lambda: http.get("/fhir/Patient/no-such-patient", headers=h))
    step("invalid", "create", 400, lambda: http.post(
        "/fhir/Patient", json={"resourceType": "Patient", "birthDate": "not-a-date"}, headers=h))
    step("method", "unknown", 405, lambda: http.delete("/fhir/Patient", headers=h))
    step("metadata", "capabilities", 200, lambda: http.get("/fhir/metadata"))
    step("audit-search", "search-type", 200, lambda: http.get("/fhir/AuditEvent?_count=1", headers=auditor))

    assert len({e for *_x, e in seen}) == len(seen)
    for label, status, subtype, event_id in seen:
        ev = get_event(http, auditor, event_id)
        assert ev["subtype"][0]["code"] == subtype, label
        assert ev["outcome"] == ("0" if status < 400 else "4"), label
        assert ev["type"]["code"] == "rest", label


# ----------------------------------------------------------------------------- content
def _common_checks(ev: dict[str, Any], resp, client_id: str | None, settings) -> None:  # type: ignore[no-untyped-def]
    assert ev["type"] == {"system": REST_TYPE, "code": "rest", "display": "Restful Operation"}
    assert ev["recorded"]
    assert any("IHE.BasicAudit" in p for p in ev["meta"]["profile"])
    requestor = [a for a in ev["agent"] if a.get("requestor")]
    assert requestor, ev["agent"]
    if client_id:
        assert requestor[0]["who"]["reference"] == f"Device/{client_id}"
    assert requestor[0]["network"]["address"] == "127.0.0.1"
    assert ev["source"]["observer"]
    assert ev["source"]["site"] == settings.fhir_base
    assert request_id_of(ev) == resp.headers["X-Request-Id"]


def test_audit_event_content(http, admin, make_client, settings):
    h = admin.headers()
    auditor = make_client("system/AuditEvent.rs", settings=AUDITOR_SETTINGS).headers("system/AuditEvent.rs")
    cid = admin.client_id

    def check(send, subtype: str, action: str, status: int, what: list[str] | None, patients: set[str]) -> dict:  # type: ignore[no-untyped-def]
        resp, event_id = audited(settings, send)
        assert resp.status_code == status, resp.get_data(as_text=True)[:300]
        ev = get_event(http, auditor, event_id)
        _common_checks(ev, resp, cid, settings)
        assert ev["subtype"][0]["code"] == subtype
        assert ev["subtype"][0]["system"] == "http://hl7.org/fhir/restful-interaction"
        assert ev["action"] == action
        assert ev["outcome"] == "0"
        domain = [e["what"]["reference"] for e in ev["entity"] if e.get("role", {}).get("code") == "4"]
        if what is not None:
            assert sorted(domain) == sorted(what), (subtype, domain)
        assert patient_entities(ev) == {f"Patient/{p}" for p in patients}, subtype
        return ev

    rid = "audit-test-req-0001"
    r = http.post("/fhir/Patient", json=patient(), headers=h)
    pid = r.get_json()["id"]
    q = http.post("/fhir/Patient", json=patient(given="Bea"), headers=h).get_json()["id"]
    check(lambda: http.get(f"/fhir/Patient/{pid}", headers={**h, "X-Request-Id": rid}), "read", "R", 200,
          [f"Patient/{pid}/_history/1"], {pid})
    resp, event_id = audited(settings, lambda: http.get(f"/fhir/Patient/{pid}", headers={**h, "X-Request-Id": rid}))
    assert resp.headers["X-Request-Id"] == rid
    assert request_id_of(get_event(http, auditor, event_id)) == rid

    ev = check(lambda: http.post("/fhir/Observation", json=observation(pid), headers=h), "create", "C", 201,
               None, {pid})
    oid = [ref for ref in references(ev) if ref.startswith("Observation/")]
    assert len(oid) == 1 and oid[0].endswith("/_history/1")
    oid = oid[0].split("/")[1]
    assert f"Observation/{oid}/_history/1" in [e["what"]["reference"] for e in ev["entity"]
                                               if e.get("role", {}).get("code") == "4"]

    body = {**patient(), "id": pid, "gender": "female"}
    check(lambda: http.put(f"/fhir/Patient/{pid}", json=body, headers=h), "update", "U", 200,
          [f"Patient/{pid}/_history/2"], {pid})
    check(lambda: http.get(f"/fhir/Patient/{pid}/_history/1", headers=h), "vread", "R", 200,
          [f"Patient/{pid}/_history/1"], {pid})
    check(lambda: http.get(f"/fhir/Patient/{pid}/_history", headers=h), "history-instance", "R", 200,
          [f"Patient/{pid}/_history/2", f"Patient/{pid}/_history/1"], {pid})
    check(lambda: http.delete(f"/fhir/Observation/{oid}", headers=h), "delete", "D", 204,
          [f"Observation/{oid}/_history/2"], {pid})

    query = f"family={FAMILY}&_count=5"
    ev = check(lambda: http.get(f"/fhir/Patient?{query}", headers=h), "search-type", "E", 200,
               [f"Patient/{pid}/_history/2", f"Patient/{q}/_history/1"], {pid, q})
    queries = [e for e in ev["entity"] if e.get("role", {}).get("code") == "24"]
    assert len(queries) == 1
    assert queries[0]["role"]["system"] == OBJECT_ROLE
    assert parse_qsl(base64.b64decode(queries[0]["query"]).decode()) == parse_qsl(query)

    # a search that finds nothing still records its query, and no patients
    ev = check(lambda: http.get("/fhir/Patient?family=Nobodyhere", headers=h), "search-type", "E", 200, [], set())
    assert [base64.b64decode(e["query"]).decode() for e in ev["entity"] if "query" in e] == ["family=Nobodyhere"]


def test_audit_event_outcomes_and_unauthenticated_agent(http, admin, make_client, settings):
    h = admin.headers()
    auditor = make_client("system/AuditEvent.rs", settings=AUDITOR_SETTINGS).headers("system/AuditEvent.rs")
    pid = http.post("/fhir/Patient", json=patient(), headers=h).get_json()["id"]

    resp, event_id = audited(settings, lambda: http.get(f"/fhir/Patient/{pid}"))
    assert resp.status_code == 401
    ev = get_event(http, auditor, event_id)
    assert ev["outcome"] == "4"
    assert ev["outcomeDesc"]
    requestor = [a for a in ev["agent"] if a.get("requestor")][0]
    assert "reference" not in requestor["who"]  # nobody to name
    assert requestor["network"]["address"] == "127.0.0.1"
    assert request_id_of(ev) == resp.headers["X-Request-Id"]

    # 5xx: the stored ciphertext of the patient was damaged
    with db(settings) as cx:
        vpk, blob = cx.execute("SELECT v.pk, v.body FROM resource_version v JOIN resource r ON r.pk = v.resource_pk "
                               "WHERE r.type='Patient' AND r.id=?", (pid,)).fetchone()
        blob = bytearray(blob)
        blob[-1] ^= 0xFF
        cx.execute("UPDATE resource_version SET body=? WHERE pk=?", (bytes(blob), vpk))
    resp, event_id = audited(settings, lambda: http.get(f"/fhir/Patient/{pid}", headers=h))
    assert resp.status_code == 500
    ev = get_event(http, auditor, event_id)
    assert ev["outcome"] == "8"
    assert requestor_ref(ev) == f"Device/{admin.client_id}"


def requestor_ref(ev: dict[str, Any]) -> str | None:
    return [a for a in ev["agent"] if a.get("requestor")][0]["who"].get("reference")


@pytest.mark.parametrize("case", ["not-found", "gone", "version-conflict", "integrity-failure", "forbidden-scope"])
def test_failed_instance_access_names_its_target(http, admin, make_client, settings, case):
    """An AuditEvent of a refused or failed access to one resource must say which resource was
    asked for: those are the events an investigation looks for."""
    h = admin.headers()
    auditor = make_client("system/AuditEvent.rs", settings=AUDITOR_SETTINGS).headers("system/AuditEvent.rs")
    h_obs = make_client("system/Observation.rs").headers()
    pid = http.post("/fhir/Patient", json=patient(), headers=h).get_json()["id"]
    target = f"Patient/{pid}"
    if case == "not-found":
        target = "Patient/never-existed-123"
        send = lambda: http.get(f"/fhir/{target}", headers=h)  # noqa: E731
        status = 404
    elif case == "gone":
        assert http.delete(f"/fhir/Patient/{pid}", headers=h).status_code == 204
        send = lambda: http.get(f"/fhir/Patient/{pid}", headers=h)  # noqa: E731
        status = 410
    elif case == "version-conflict":
        body = {**patient(), "id": pid}
        send = lambda: http.put(f"/fhir/Patient/{pid}", json=body, headers={**h, "If-Match": 'W/"7"'})  # noqa: E731
        status = 412
    elif case == "integrity-failure":
        with db(settings) as cx:
            cx.execute("UPDATE resource_version SET body = zeroblob(length(body)) WHERE resource_pk = "
                       "(SELECT pk FROM resource WHERE type='Patient' AND id=?)", (pid,))
        send = lambda: http.get(f"/fhir/Patient/{pid}", headers=h)  # noqa: E731
        status = 500
    else:
        send = lambda: http.get(f"/fhir/Patient/{pid}", headers=h_obs)  # noqa: E731
        status = 403
    resp, event_id = audited(settings, send)
    assert resp.status_code == status
    ev = get_event(http, auditor, event_id)
    assert ev["outcome"] == ("8" if status >= 500 else "4")
    refs = references(ev)
    assert any(ref == target or ref.startswith(target + "/_history/") for ref in refs), \
        f"the AuditEvent of a {status} on {target} does not name it: entities {refs}"


# ----------------------------------------------------------------------------- search
def test_audit_event_search(http, admin, make_client, settings):
    h = admin.headers()
    auditor = make_client("system/AuditEvent.rs", settings=AUDITOR_SETTINGS).headers("system/AuditEvent.rs")
    p1 = http.post("/fhir/Patient", json=patient(), headers=h)
    pid = p1.get_json()["id"]
    other = http.post("/fhir/Patient", json=patient(family="Otherfamilyzz"), headers=h).get_json()["id"]
    touched = {p1.headers["X-Request-Id"]}
    for send in (lambda: http.get(f"/fhir/Patient/{pid}", headers=h),
                 lambda: http.post("/fhir/Observation", json=observation(pid), headers=h),
                 lambda: http.get(f"/fhir/Patient/{pid}/_history", headers=h)):
        r = send()
        assert r.status_code in (200, 201)
        touched.add(r.headers["X-Request-Id"])
    untouched = {http.get(f"/fhir/Patient/{other}", headers=h).headers["X-Request-Id"]}
    failed = set()
    for send in (lambda: http.get("/fhir/Patient/does-not-exist", headers=h),
                 lambda: http.get("/fhir/Observation/nope-nope", headers=h),
                 lambda: http.get(f"/fhir/Patient/{pid}")):
        r = send()
        assert 400 <= r.status_code < 500
        failed.add(r.headers["X-Request-Id"])

    for query in (f"entity=Patient/{pid}", f"patient={pid}", f"patient=Patient/{pid}"):
        events = search_events(http, auditor, query)
        ids = {request_id_of(ev) for ev in events}
        assert touched <= ids, (query, touched - ids)
        assert not (untouched & ids), query
        for ev in events:
            assert any(ref == f"Patient/{pid}" or ref.startswith(f"Patient/{pid}/") for ref in references(ev)), query

    events = search_events(http, auditor, "outcome=4")
    ids = {request_id_of(ev) for ev in events}
    assert failed <= ids
    assert not ((touched | untouched) & ids)
    assert all(ev["outcome"] == "4" for ev in events)
    with db(settings) as cx:
        assert len(events) == len(failed)  # nothing else in this fresh server failed
        assert cx.execute("SELECT count(*) FROM access_record").fetchone()[0] > len(events)

    events = search_events(http, auditor, f"agent=Device/{admin.client_id}&subtype=read")
    assert events and all(ev["subtype"][0]["code"] == "read" and requestor_ref(ev) == f"Device/{admin.client_id}"
                          for ev in events)


# ----------------------------------------------------------------------------- audit verify
def test_verify_ok_on_untouched_chain(http, admin, settings):
    build_chain(http, admin.headers())
    result = verify(settings)
    assert result.exit_code == 0, result.output
    n = counts(settings)[0]
    assert f"OK: {n} audit records verified" in result.output


def _fhirserver_executable() -> list[str]:
    exe = Path(sys.executable).parent / "fhirserver"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fhirserver"]


def test_verify_cli_subprocess_exit_codes(http, admin, settings):
    build_chain(http, admin.headers())
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRSERVER_")}
    env.update(FHIRSERVER_DATA_DIR=str(settings.data_dir), FHIRSERVER_BASE_URL=settings.base_url)
    cmd = [*_fhirserver_executable(), "audit", "verify"]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"OK: {counts(settings)[0]} audit records verified")

    seq, event_id = chain(settings)[2]
    with db(settings) as cx:
        cx.execute("UPDATE access_record SET content_hash=? WHERE seq=?", ("0" * 64, seq))
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1, (bad.stdout, bad.stderr)
    assert f"seq={seq} event={event_id}" in bad.stderr
    assert "OK" not in bad.stdout


def _copy_record(cx, event_id: str, new_id: str, seq: int | None) -> None:  # type: ignore[no-untyped-def]
    cx.execute("INSERT INTO access_record (id, recorded_us, seq, terms, key_id, detail, content_hash) "
               "SELECT ?, recorded_us, ?, terms, key_id, detail, content_hash FROM access_record WHERE id=?",
               (new_id, seq, event_id))


def _tamper(settings, how: str) -> tuple[list[str], str]:  # type: ignore[no-untyped-def]
    """Tamper with the log; return (texts one of which the report must contain, description)."""
    rows = chain(settings)
    assert len(rows) >= 8
    k = len(rows) // 2
    seq, event_id = rows[k]
    with db(settings) as cx:
        if how == "content-hash":
            cx.execute("UPDATE access_record SET content_hash=? WHERE seq=?", (hashlib.sha256(b"x").hexdigest(), seq))
            return [f"seq={seq} event={event_id}"], "modified record hash"
        if how == "delete-middle":
            cx.execute("DELETE FROM access_record WHERE seq=?", (seq,))
            return [f"seq={seq} event={rows[k + 1][1]}"], "deleted record"
        if how == "reorder":
            nxt_seq, nxt_event = rows[k + 1]
            cx.execute("BEGIN")
            cx.execute("UPDATE access_record SET seq=-1 WHERE seq=?", (seq,))
            cx.execute("UPDATE access_record SET seq=? WHERE seq=?", (seq, nxt_seq))
            cx.execute("UPDATE access_record SET seq=? WHERE seq=-1", (nxt_seq,))
            cx.execute("COMMIT")
            return [f"event={event_id}", f"event={nxt_event}"], "swapped records"
        if how == "event-body":
            blob = bytearray(cx.execute("SELECT detail FROM access_record WHERE seq=?", (seq,)).fetchone()[0])
            blob[len(blob) // 2] ^= 0x20
            cx.execute("UPDATE access_record SET detail=? WHERE seq=?", (bytes(blob), seq))
            return [f"seq={seq} event={event_id}"], "flipped a byte of the record"
        if how == "search-rows":
            cx.execute("UPDATE access_subject SET target_id='someone-else' WHERE param='agent' AND record_pk="
                       "(SELECT pk FROM access_record WHERE seq=?)", (seq,))
            return [f"seq={seq} event={event_id}"], "record hidden from agent searches"
        if how == "truncate-tail":
            last_seq, _last_event = rows[-1]
            cx.execute("DELETE FROM access_record WHERE seq=?", (last_seq,))
            return [f"seq={last_seq} event=None"], "removed the newest record"
        if how == "orphan":
            orphan = "forged-audit-event-0001"
            _copy_record(cx, event_id, orphan, None)
            return [f"event={orphan}: access record ciphertext"], "inserted a forged record"
        if how == "orphan-in-tree":
            orphan = "forged-audit-event-0002"
            _copy_record(cx, event_id, orphan, len(rows))
            return [f"seq={len(rows)} event={orphan}"], "appended a forged record to the tree"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["content-hash", "delete-middle", "reorder", "event-body", "search-rows",
                                 "truncate-tail", "orphan", "orphan-in-tree"])
def test_verify_detects_tampering(http, admin, settings, how):
    build_chain(http, admin.headers())
    checkpoint(settings)  # the server signs one every audit_checkpoint_seconds and at shutdown
    assert verify(settings).exit_code == 0
    expected, what = _tamper(settings, how)
    result = verify(settings)
    assert result.exit_code != 0, f"{what} went unnoticed: {result.output}"
    assert "FAILED" in result.output
    assert any(e in result.output for e in expected), f"{what}: report names none of {expected}: {result.output}"


def _relink_without(cx, victim_seq: int) -> None:  # type: ignore[no-untyped-def]
    """Delete one record and rebuild the tree from what the database holds: renumber the rest and
    recompute every stored node, exactly as the sequencer would have."""
    from fhirserver.audit.merkle import CompactRange
    from fhirserver.audit.records import record_leaf

    cx.execute("DELETE FROM access_record WHERE seq=?", (victim_seq,))
    cx.execute("UPDATE access_record SET seq = seq - 1 WHERE seq > ?", (victim_seq,))
    cr = CompactRange()
    for rid, recorded_us, content_hash in cx.execute(
            "SELECT id, recorded_us, content_hash FROM access_record ORDER BY seq").fetchall():
        cr.append(record_leaf(rid, recorded_us, content_hash))
    cx.execute("DELETE FROM audit_node")
    cx.executemany("INSERT INTO audit_node (level, idx, hash) VALUES (?, ?, ?)", cr.completed)


def test_verify_detects_deletion_with_relinked_tree(http, admin, settings):
    """The attacker who removes the record of their access does not stop at one row: they delete
    it, renumber the rest, recompute the whole tree and delete the database's checkpoints too.
    Everything but the signing key is in the database; the checkpoint file outside it remains."""
    build_chain(http, admin.headers())
    checkpoint(settings)
    signed = len(chain(settings))
    build_chain(http, admin.headers(), n_patients=2)  # later records keep the tree larger than the checkpoint
    checkpoint(settings)
    with db(settings) as cx:
        cx.execute("BEGIN")
        _relink_without(cx, signed // 2)
        cx.execute("DELETE FROM audit_checkpoint")
        cx.execute("COMMIT")
    result = verify(settings)
    assert result.exit_code != 0, (
        "a record was deleted and the tree rebuilt from data in the database alone, and "
        f"`audit verify` still reports: {result.output.strip()}")
    assert "do not match the signed checkpoint" in result.output


def test_verify_detects_rollback_to_a_backup(http, admin, settings):
    """Restoring the database file to an earlier copy removes the newest records *and* the
    checkpoints that named them; the checkpoint file outside the database still names them."""
    import shutil

    from tests.conftest import db_path

    h = admin.headers()
    build_chain(http, h)
    checkpoint(settings)
    with db(settings) as cx:
        cx.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    saved = settings.data_dir.parent / "earlier.sqlite3"
    shutil.copy(db_path(settings), saved)
    build_chain(http, h, n_patients=2)
    checkpoint(settings)
    assert verify(settings).exit_code == 0
    with db(settings) as cx:  # roll back: the earlier copy's content replaces the database's
        cx.execute("ATTACH DATABASE ? AS earlier", (str(saved),))
        cx.execute("BEGIN")
        for table in ("access_record", "access_subject", "audit_node", "audit_checkpoint"):
            cx.execute(f"DELETE FROM {table}")
            cx.execute(f"INSERT INTO {table} SELECT * FROM earlier.{table}")
        cx.execute("COMMIT")
    result = verify(settings)
    assert result.exit_code != 0, f"a rollback went unnoticed: {result.output}"
    assert "the checkpoint file signed" in result.output and "rolled back" in result.output


# ----------------------------------------------------------------------------- fail closed
def _break_audit(settings, how: str) -> None:  # type: ignore[no-untyped-def]
    with db(settings) as cx:
        if how == "trigger":
            cx.execute("CREATE TRIGGER no_audit BEFORE INSERT ON access_record BEGIN SELECT RAISE(ABORT, 'no'); END;")
        else:
            cx.execute("DROP TABLE access_record")


def _patient_rows(settings) -> int:  # type: ignore[no-untyped-def]
    with db(settings) as cx:
        return cx.execute("SELECT count(*) FROM resource WHERE type='Patient'").fetchone()[0]


@pytest.mark.parametrize("how", ["trigger", "drop-table"])
def test_no_access_without_audit_record(http, admin, settings, how):
    h = admin.headers()
    existing = http.post("/fhir/Patient", json=patient(family="Existingfam", given="Visible"), headers=h).get_json()
    n_patients = _patient_rows(settings)
    _break_audit(settings, how)

    r = http.post("/fhir/Patient", json=patient(family="Neverstoredfam"), headers=h)
    assert r.status_code == 500, r.get_data(as_text=True)[:300]
    assert r.get_json()["resourceType"] == "OperationOutcome"
    assert "Location" not in r.headers

    r = http.get(f"/fhir/Patient/{existing['id']}", headers=h)
    assert r.status_code == 500
    assert r.get_json()["resourceType"] == "OperationOutcome"
    text = r.get_data(as_text=True)
    assert "Existingfam" not in text and "Visible" not in text and "1961-06-01" not in text

    r = http.get("/fhir/Patient?family=Existingfam", headers=h)
    assert r.status_code == 500 and "Existingfam" not in r.get_data(as_text=True)
    r = http.get(f"/fhir/Patient/{existing['id']}")  # even a refusal needs its record
    assert r.status_code == 500

    # the refused create left nothing behind
    assert _patient_rows(settings) == n_patients
    if how == "trigger":
        with db(settings) as cx:
            cx.execute("DROP TRIGGER no_audit")
        r = http.get("/fhir/Patient?family=Neverstoredfam", headers=h)
        assert r.status_code == 200 and not r.get_json().get("entry")
        r = http.get(f"/fhir/Patient/{existing['id']}", headers=h)
        assert r.status_code == 200 and r.get_json()["name"][0]["family"] == "Existingfam"
        result = verify(settings)
        assert result.exit_code == 0, result.output


def test_no_token_without_audit_record(http, make_client, settings):  # type: ignore[no-untyped-def]
    """A token request whose AuditEvent cannot be written gets a 500, and the token the grant
    produced before the failure is revoked: it never works."""
    from fhirserver.auth.assertion import token_request_form

    client = make_client("system/*.rs")
    _break_audit(settings, "trigger")
    r = http.post("/auth/token", data=token_request_form(client.key, client.client_id, settings.token_url,
                                                         "system/*.rs"))
    assert r.status_code == 500 and "access_token" not in r.get_json()
    with db(settings) as cx:
        issued = cx.execute("SELECT count(*), sum(revoked) FROM access_token WHERE client_id = ?",
                            (client.client_id,)).fetchone()
        cx.execute("DROP TRIGGER no_audit")
    assert issued[0] == 1 and issued[1] == 1  # stored by the grant, then revoked
