"""Encryption at rest, seen from the outside: what an attacker with the database file sees, what
survives tampering, key rotation and lost/wrong master keys.

The attacker model is someone who can read or write the SQLite file (and its WAL) but has no
master key. Everything else goes through HTTP and the `fhirserver` CLI.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from fhirserver.app import create_app
from fhirserver.auth.assertion import generate_key, public_jwks
from fhirserver.auth.clients import register_backend_client
from fhirserver.cli import main
from tests.conftest import AUDITOR_SETTINGS, BackendClient, db_path, example_files, make_settings
from tests.conftest import raw_db as db

EXAMPLE_TYPES = ("Patient", "Observation", "QuestionnaireResponse", "Consent")

DEMO_FAMILY = "Zyxwvutsrq"
DEMO_GIVEN = "Qwertyuiopa"
DEMO_MRN = "MRN-98765-UNIQUE"
DEMO_MRN_SYSTEM = "urn:oid:1.2.3.4.5.98765"
DEMO_BIRTH = "1933-03-17"
DEMO_PHONE = "+1-555-0199-8877"
DEMO_EMAIL = "zyx.unique.canary@example.org"
DEMO_LINE = "4242 Qqqxxzzy Boulevard"
DEMO_CITY = "Vwxyzopolis"
DEMO_DIV_WORD = "Xylophonisticallycanary"
DEMO_OBS_VALUE = "Plaintextcanary finding for Zyxwvutsrq"
DEMO_OBS_NOTE = "Notecanary: patient disclosed Vwxyzopolis trip"
DEMO_QR_ANSWER = "Answercanary Quixotically Jabberwocky"


# ----------------------------------------------------------------------------- helpers
def demo_patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "text": {"status": "generated",
                 "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{DEMO_GIVEN} {DEMO_FAMILY} {DEMO_DIV_WORD}</div>'},
        "identifier": [{"system": DEMO_MRN_SYSTEM, "value": DEMO_MRN}],
        "name": [{"family": DEMO_FAMILY, "given": [DEMO_GIVEN]}],
        "telecom": [{"system": "phone", "value": DEMO_PHONE}, {"system": "email", "value": DEMO_EMAIL}],
        "gender": "female",
        "birthDate": DEMO_BIRTH,
        "address": [{"line": [DEMO_LINE], "city": DEMO_CITY, "postalCode": "99999"}],
    }


def demo_observation(pid: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "valueString": DEMO_OBS_VALUE,
        "note": [{"text": DEMO_OBS_NOTE}],
    }


def demo_qr(pid: str) -> dict[str, Any]:
    return {
        "resourceType": "QuestionnaireResponse",
        "status": "completed",
        "subject": {"reference": f"Patient/{pid}"},
        "item": [{"linkId": "1", "answer": [{"valueString": DEMO_QR_ANSWER}]}],
    }




def raw_database_bytes(settings) -> bytes:  # type: ignore[no-untyped-def]
    """Everything on disk: checkpoint the WAL (best effort), then the main file, -wal and -journal."""
    path = db_path(settings)
    cx = sqlite3.connect(path)
    try:
        cx.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        cx.close()
    data = path.read_bytes()
    for suffix in ("-wal", "-journal"):
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            data += b"\n" + extra.read_bytes()
    return data




def walk(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, path + (k,))
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, path)
    else:
        yield path, node


def identifying_values(res: dict[str, Any]) -> set[str]:
    """Names, birth dates, identifiers, telecom and address values of one resource."""
    out: set[str] = set()
    is_patient = res.get("resourceType") == "Patient"
    for path, v in walk(res):
        if not isinstance(v, str):
            continue
        wanted = (
            (is_patient and path[:1] == ("name",) and path[-1] in ("family", "given") and len(v) >= 4)
            or path == ("birthDate",)
            or (path[-2:] == ("identifier", "value") and len(v) >= 4)
            or path[-2:] == ("telecom", "value")
            or (len(path) >= 2 and path[-2] == "address" and path[-1] in ("line", "city"))
        )
        if wanted:
            out.add(v)
    return out


def free_text_values(res: dict[str, Any]) -> set[str]:
    """Observation valueString / note texts, QuestionnaireResponse answer valueStrings."""
    out: set[str] = set()
    rtype = res.get("resourceType")
    for path, v in walk(res):
        if not isinstance(v, str) or len(v) < 4:
            continue
        obs = rtype == "Observation" and (path[-1] == "valueString" or path[-2:] == ("note", "text"))
        qr = rtype == "QuestionnaireResponse" and path[-2:] == ("answer", "valueString")
        if obs or qr:
            out.add(v)
    return out


def div_words(res: dict[str, Any]) -> set[str]:
    div = (res.get("text") or {}).get("div") or ""
    text = html.unescape(re.sub(r"<[^>]+>", " ", div))
    return set(re.findall(r"[A-Za-z]{6,}", text))


def clear_by_design(settings) -> str:  # type: ignore[no-untyped-def]
    """Text the schema stores in clear on purpose (schema SQL, type names, ids, references, codes of
    non-protected tokens, URIs, client registry), lower-cased. Free-text words that also occur here
    can't be told apart from a leak, so they're left out of the free-text checks."""
    protected_tokens = ("identifier", "telecom", "phone", "email", "altid")
    parts: list[str] = []
    with db(settings) as cx:
        parts += [r[0] or "" for r in cx.execute("SELECT sql FROM sqlite_master")]
        queries = [
            "SELECT type || ' ' || id FROM resource",
            "SELECT patient_id FROM compartment",
            "SELECT DISTINCT param FROM idx_string",
            "SELECT DISTINCT param || ' ' || coalesce(system, '') FROM idx_token",
            "SELECT DISTINCT code FROM idx_token WHERE code IS NOT NULL AND param NOT IN ({})".format(
                ",".join(f"'{p}'" for p in protected_tokens)),
            "SELECT DISTINCT param || ' ' || coalesce(target_type, '') || ' ' || coalesce(target_id, '') || ' '"
            " || coalesce(url, '') FROM idx_reference",
            "SELECT DISTINCT param || ' ' || value FROM idx_uri",
            "SELECT DISTINCT param || ' ' || coalesce(system, '') || ' ' || coalesce(code, '') FROM idx_quantity",
            "SELECT DISTINCT param FROM idx_date", "SELECT DISTINCT param FROM idx_number",
            "SELECT name || ' ' || scopes || ' ' || client_id FROM client",
            "SELECT scope FROM access_token",
            "SELECT scope FROM data_key",
        ]
        for q in queries:
            parts += [str(r[0]) for r in cx.execute(q)]
    return "\n".join(parts).lower()


_HEX_RUN = re.compile(rb"[0-9a-fA-F]{32,}")
_B64_RUN = re.compile(rb"[A-Za-z0-9_\-]{22,}")


def occurs(value: str, raw: bytes, masked: bytes) -> bool:
    """Does the value occur in the raw bytes? Values shorter than 8 characters are looked up with
    hex hashes (audit chain) and base64url digests (blind indexes, tokens) masked out: there are
    millions of random characters in those, where a 4-digit identifier or a 6-letter word would
    otherwise turn up by pure chance. (A real leak sits in JSON or in its own cell, bounded by
    quotes, spaces or record-header bytes, so masking long random-looking runs does not hide it.)"""
    needle = value.encode("utf-8")
    return needle in (masked if len(value) < 8 else raw)


def context(values: list[str], raw: bytes) -> list[bytes]:
    """The bytes around each leaked value (which table or page it sits in), for the failure message."""
    out = []
    for v in values[:5]:
        i = raw.find(v.encode())
        out.append(raw[max(0, i - 120):i + 60] if i >= 0 else b"(only in the masked form)")
    return out


def mask_random_runs(raw: bytes) -> bytes:
    raw = _HEX_RUN.sub(lambda m: b"\x00" * len(m.group()), raw)
    return _B64_RUN.sub(lambda m: b"\x00" * len(m.group()), raw)


def strip_meta(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if k != "meta"}


def client_for(app, settings, scopes: str = "system/*.cruds") -> BackendClient:  # type: ignore[no-untyped-def]
    svc = app.extensions["fhirserver"]
    key = generate_key("ES384")
    rec = register_backend_client(svc.engine, "encryption test client", scopes, jwks=public_jwks(key))
    return BackendClient(app.test_client(), rec.client_id, key, settings.token_url)


def cli_env(settings, **extra: str | None) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    env: dict[str, str | None] = {
        "FHIRSERVER_DATA_DIR": str(settings.data_dir),
        "FHIRSERVER_BASE_URL": settings.base_url,
        "FHIRSERVER_DATABASE_URL": None,
        "FHIRSERVER_CONFIG": None,
        "FHIRSERVER_MASTER_KEY": None,
    }
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str | None]):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def audit_rows(settings) -> int:  # type: ignore[no-untyped-def]
    with db(settings) as cx:
        return cx.execute("SELECT count(*) FROM access_record").fetchone()[0]


def version_row(settings, rtype: str, rid: str, version: int | None = None) -> tuple[int, int, bytes]:  # type: ignore[no-untyped-def]
    """(resource_version.pk, key_id, body) of the current (or given) version."""
    with db(settings) as cx:
        pk, current = cx.execute("SELECT pk, version FROM resource WHERE type=? AND id=?", (rtype, rid)).fetchone()
        row = cx.execute("SELECT pk, key_id, body FROM resource_version WHERE resource_pk=? AND version=?",
                         (pk, version or current)).fetchone()
    return row[0], row[1], bytes(row[2])


def write_version(settings, vpk: int, body: bytes, key_id: int | None = None) -> None:  # type: ignore[no-untyped-def]
    with db(settings) as cx:
        if key_id is None:
            cx.execute("UPDATE resource_version SET body=? WHERE pk=?", (body, vpk))
        else:
            cx.execute("UPDATE resource_version SET body=?, key_id=? WHERE pk=?", (body, key_id, vpk))


def assert_integrity_500(resp, *forbidden: str) -> None:  # type: ignore[no-untyped-def]
    assert resp.status_code == 500, (resp.status_code, resp.get_data(as_text=True)[:300])
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome"
    text = resp.get_data(as_text=True)
    for value in forbidden:
        assert value not in text, f"{value!r} leaked in an error response"


def post(http, h, res: dict[str, Any]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    r = http.post(f"/fhir/{res['resourceType']}", json=res, headers=h)
    assert r.status_code == 201, r.get_data(as_text=True)
    return r.get_json()


# ----------------------------------------------------------------------------- at rest
def test_no_identifying_plaintext_in_database_file(http, admin, settings):
    files = [f for t in EXAMPLE_TYPES for f in example_files(f"{t}-")]
    if not files:
        pytest.skip("HL7 R4 examples are not available")
    h = admin.headers()
    stored: list[dict[str, Any]] = []
    for f in files:
        res = json.loads(f.read_text())
        assert res["resourceType"] in EXAMPLE_TYPES, f.name
        r = http.put(f"/fhir/{res['resourceType']}/{res['id']}", json=res, headers=h)
        assert r.status_code in (200, 201), (f.name, r.get_data(as_text=True)[:300])
        stored.append(res)
    patient = post(http, h, demo_patient())
    for extra in (demo_observation(patient["id"]), demo_qr(patient["id"])):
        stored.append({**extra, "id": post(http, h, extra)["id"]})
    stored.append(patient)

    # The same values come back through the API, unchanged (so the checks below can fail).
    served_text = []
    for res in stored:
        r = http.get(f"/fhir/{res['resourceType']}/{res['id']}", headers=h)
        assert r.status_code == 200
        assert strip_meta(r.get_json()) == strip_meta(res)
        served_text.append(json.dumps(r.get_json(), ensure_ascii=False))
    served = "\n".join(served_text)

    identifying = set().union(*(identifying_values(r) for r in stored))
    free_text = set().union(*(free_text_values(r) for r in stored))
    words = set().union(*(div_words(r) for r in stored))
    demo_values = {DEMO_FAMILY, DEMO_GIVEN, DEMO_MRN, DEMO_BIRTH, DEMO_PHONE, DEMO_EMAIL, DEMO_LINE, DEMO_CITY}
    assert demo_values <= identifying
    assert {DEMO_OBS_VALUE, DEMO_OBS_NOTE, DEMO_QR_ANSWER} <= free_text
    assert DEMO_DIV_WORD in words
    for value in identifying | free_text | words:
        assert value in served, f"{value!r} is not served back through the API"

    raw = raw_database_bytes(settings)
    masked = mask_random_runs(raw)
    clear = clear_by_design(settings)

    # The demo values are unmistakable: none of them may occur anywhere, in any form we can think of.
    for value in demo_values | {DEMO_OBS_VALUE, DEMO_OBS_NOTE, DEMO_QR_ANSWER, DEMO_DIV_WORD}:
        for form in {value, value.lower(), value.upper(), value.casefold()}:
            assert form.encode() not in raw, f"demo value {form!r} is stored in clear"
            assert form.encode("utf-16-le") not in raw
    assert b"MRN-98765" not in raw and b"98765-UNIQUE" not in raw and b"1933-03-17" not in raw

    leaks = sorted(v for v in identifying if occurs(v, raw, masked))
    assert not leaks, f"identifying values stored in clear: {leaks} {context(leaks, raw)}"

    free_checked = {v for v in free_text if v.lower() not in clear}
    assert len(free_checked) >= 20, free_checked
    leaks = sorted(v for v in free_checked if occurs(v, raw, masked))
    assert not leaks, f"free-text values stored in clear: {leaks} {context(leaks, raw)}"

    words_checked = {w for w in words if w.lower() not in clear}
    assert len(words_checked) >= 200, len(words_checked)
    leaks = sorted(w for w in words_checked if occurs(w, raw, masked))
    assert not leaks, f"narrative (text.div) words stored in clear: {leaks} {context(leaks, raw)}"
    assert len(identifying) >= 80, len(identifying)


def test_blind_index_search_still_works(http, admin):
    h = admin.headers()
    pid = post(http, h, demo_patient())["id"]
    other = post(http, h, {"resourceType": "Patient", "name": [{"family": "Zyxwvutsra", "given": ["Bob"]}],
                           "identifier": [{"system": DEMO_MRN_SYSTEM, "value": "MRN-98765-OTHER"}],
                           "birthDate": "1933-03-18"})["id"]

    def ids(query: str) -> set[str]:
        key, _, value = query.partition("=")
        r = http.get("/fhir/Patient", query_string=[(key, value)], headers=h)
        assert r.status_code == 200, (query, r.get_data(as_text=True)[:300])
        return {e["resource"]["id"] for e in r.get_json().get("entry", []) if e["resource"]["resourceType"] == "Patient"}

    assert ids(f"family={DEMO_FAMILY}") == {pid}
    assert ids(f"family={DEMO_FAMILY.lower()}") == {pid}  # string search is case-insensitive
    assert ids(f"family:exact={DEMO_FAMILY}") == {pid}
    assert ids(f"family:exact={DEMO_FAMILY.lower()}") == set()
    assert ids(f"name={DEMO_FAMILY[:3]}") == {pid, other}
    assert ids(f"name={DEMO_GIVEN[:3]}") == {pid}
    assert ids("family=Zyxwvutsr") == {pid, other}
    assert ids(f"identifier={DEMO_MRN_SYSTEM}|{DEMO_MRN}") == {pid}
    assert ids(f"identifier={DEMO_MRN}") == {pid}
    assert ids(f"identifier=urn:oid:9.9.9|{DEMO_MRN}") == set()
    assert ids("identifier=MRN-98765") == set()  # tokens match exactly, no prefixes
    assert ids(f"birthdate={DEMO_BIRTH}") == {pid}
    assert ids("birthdate=1933-03") == {pid, other}
    assert ids("birthdate=1933-03-18") == {other}
    assert ids(f"telecom={DEMO_PHONE}") == {pid}
    assert ids(f"address-city={DEMO_CITY}") == {pid}

    r = http.get("/fhir/Patient?family:contains=yxwv", headers=h)
    assert r.status_code == 400
    assert r.get_json()["resourceType"] == "OperationOutcome"
    # ranges over the keyed calendar buckets (search/types/protected_date.py)
    assert ids("birthdate=gt1930-01-01") == {pid, other}
    assert ids("birthdate=lt1933-03") == set() and ids("birthdate=ge1933-03") == {pid, other}
    assert ids("birthdate=ne1933-03-18") == {pid} and ids("birthdate=sa1934") == set()


# ----------------------------------------------------------------------------- tampering
def test_tampered_ciphertext_is_refused_and_audited(http, admin, settings, make_client):
    h = admin.headers()
    auditor = make_client("system/AuditEvent.rs", settings=AUDITOR_SETTINGS).headers("system/AuditEvent.rs")
    a = post(http, h, demo_patient())
    b = post(http, h, {"resourceType": "Patient", "name": [{"family": "Untouched", "given": ["Bea"]}]})
    obs = post(http, h, demo_observation(a["id"]))

    vpk, _key, body = version_row(settings, "Patient", a["id"])
    flipped = bytearray(body)
    flipped[len(flipped) // 2] ^= 0x01
    write_version(settings, vpk, bytes(flipped))

    before = audit_rows(settings)
    r = http.get(f"/fhir/Patient/{a['id']}", headers=h)
    assert_integrity_500(r, DEMO_FAMILY, DEMO_MRN, DEMO_BIRTH, DEMO_GIVEN)
    assert audit_rows(settings) == before + 1, "the failed read was not audited"
    request_id = r.headers["X-Request-Id"]

    # the AuditEvent of that request says "serious failure" and carries the request id
    # (that it also names the resource is checked in test_audit.py)
    with db(settings) as cx:
        event_id = cx.execute("SELECT id FROM access_record ORDER BY pk DESC LIMIT 1").fetchone()[0]
    ev = http.get(f"/fhir/AuditEvent/{event_id}", headers=auditor).get_json()
    assert ev["outcome"] == "8"
    assert ev["subtype"][0]["code"] == "read"
    assert any(e.get("what", {}).get("identifier", {}).get("value") == request_id for e in ev["entity"])

    for url in (f"/fhir/Patient/{a['id']}/_history/1", f"/fhir/Patient/{a['id']}/_history",
                f"/fhir/Patient?family={DEMO_FAMILY}"):
        assert_integrity_500(http.get(url, headers=h), DEMO_FAMILY, DEMO_MRN, DEMO_BIRTH)

    # everything else is intact and readable
    r = http.get(f"/fhir/Patient/{b['id']}", headers=h)
    assert r.status_code == 200 and strip_meta(r.get_json()) == strip_meta(b)
    r = http.get(f"/fhir/Observation/{obs['id']}", headers=h)
    assert r.status_code == 200 and r.get_json()["valueString"] == DEMO_OBS_VALUE


def test_ciphertext_moved_to_another_row_is_refused(http, admin, settings):
    h = admin.headers()
    a = post(http, h, demo_patient())
    b = post(http, h, {"resourceType": "Patient", "name": [{"family": "Bravo", "given": ["Bea"]}]})

    # Patient A's ciphertext *and* key id into Patient B's row: same key, so only the AAD differs
    _avpk, a_key, a_body = version_row(settings, "Patient", a["id"])
    bvpk, _bkey, _bbody = version_row(settings, "Patient", b["id"])
    write_version(settings, bvpk, a_body, a_key)
    assert_integrity_500(http.get(f"/fhir/Patient/{b['id']}", headers=h), DEMO_FAMILY, DEMO_MRN)
    r = http.get(f"/fhir/Patient/{a['id']}", headers=h)
    assert r.status_code == 200 and r.get_json()["name"][0]["family"] == DEMO_FAMILY

    # another version of the same resource (same key, same type and id): version 1 into version 2
    body = r.get_json()
    body["gender"] = "male"
    assert http.put(f"/fhir/Patient/{a['id']}", json=body, headers=h).status_code == 200
    _v1pk, _k, v1_body = version_row(settings, "Patient", a["id"], 1)
    v2pk, _k2, _v2 = version_row(settings, "Patient", a["id"], 2)
    write_version(settings, v2pk, v1_body)
    assert_integrity_500(http.get(f"/fhir/Patient/{a['id']}", headers=h), DEMO_FAMILY, DEMO_MRN)
    r = http.get(f"/fhir/Patient/{a['id']}/_history/1", headers=h)
    assert r.status_code == 200 and r.get_json()["gender"] == "female"

    # another resource type in the same compartment (same data key): Patient ciphertext into an Observation
    a2 = post(http, h, demo_patient())
    obs = post(http, h, demo_observation(a2["id"]))
    _p, p_key, p_body = version_row(settings, "Patient", a2["id"])
    ovpk, o_key, _o = version_row(settings, "Observation", obs["id"])
    assert p_key == o_key, "a patient's resources should share the compartment key"
    write_version(settings, ovpk, p_body)
    assert_integrity_500(http.get(f"/fhir/Observation/{obs['id']}", headers=h), DEMO_FAMILY, DEMO_OBS_VALUE)

    # two resources outside any patient compartment (both under the `shared` key)
    free1 = post(http, h, {"resourceType": "Observation", "status": "final", "code": {"text": "qc"},
                           "valueString": "Secretqcvalue One"})
    free2 = post(http, h, {"resourceType": "Observation", "status": "final", "code": {"text": "qc"},
                           "valueString": "Other qc value Two"})
    _f1, k1, body1 = version_row(settings, "Observation", free1["id"])
    f2pk, k2, _b2 = version_row(settings, "Observation", free2["id"])
    assert k1 == k2 and k1 != o_key
    write_version(settings, f2pk, body1)
    assert_integrity_500(http.get(f"/fhir/Observation/{free2['id']}", headers=h), "Secretqcvalue")
    assert http.get(f"/fhir/Observation/{free1['id']}", headers=h).status_code == 200


# ----------------------------------------------------------------------------- key rotation
def _snapshot(http, h, refs: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:  # type: ignore[no-untyped-def]
    out = {}
    for rtype, rid in refs:
        r = http.get(f"/fhir/{rtype}/{rid}", headers=h)
        assert r.status_code == 200, (rtype, rid, r.get_data(as_text=True)[:300])
        out[(rtype, rid)] = r.get_json()
    return out


def _make_data(http, h) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    p1 = post(http, h, demo_patient())["id"]
    p2 = post(http, h, {"resourceType": "Patient", "name": [{"family": "Second", "given": ["Sam"]}]})["id"]
    o1 = post(http, h, demo_observation(p1))["id"]
    q1 = post(http, h, demo_qr(p2))["id"]
    free = post(http, h, {"resourceType": "Observation", "status": "final", "code": {"text": "device qc"},
                          "valueString": "Rotationcanary shared value"})["id"]  # no patient: `shared` key
    return [("Patient", p1), ("Patient", p2), ("Observation", o1), ("QuestionnaireResponse", q1),
            ("Observation", free)]


def _data_keys(settings) -> list[tuple[str, str, bytes]]:  # type: ignore[no-untyped-def]
    with db(settings) as cx:
        return [(r[0], r[1], bytes(r[2])) for r in cx.execute("SELECT scope, master_kid, wrapped FROM data_key ORDER BY id")]


def test_key_rotation_with_key_file(http, admin, settings):
    h = admin.headers()
    refs = _make_data(http, h)
    before = _snapshot(http, h, refs)
    key_file = settings.data_dir / "master-keys.json"
    old_doc = json.loads(key_file.read_text())
    old_kid = old_doc["active"]
    keys_before = _data_keys(settings)
    assert {kid for _s, kid, _w in keys_before} == {old_kid}

    result = run_cli(["keys", "rotate"], cli_env(settings))
    assert result.exit_code == 0, result.output
    assert f"re-wrapped {len(keys_before)} data keys" in result.output

    doc = json.loads(key_file.read_text())
    new_kid = doc["active"]
    assert new_kid != old_kid
    assert old_kid not in doc["keys"], "the old master key was not retired"
    assert list(doc["keys"]) == [new_kid]
    assert new_kid in result.output
    assert (key_file.stat().st_mode & 0o777) == 0o600
    keys_after = _data_keys(settings)
    assert [s for s, _k, _w in keys_after] == [s for s, _k, _w in keys_before]
    assert {kid for _s, kid, _w in keys_after} == {new_kid}
    assert all(wa != wb for (_s, _k, wa), (_s2, _k2, wb) in zip(keys_after, keys_before, strict=True))

    status = run_cli(["keys", "status"], cli_env(settings))
    assert status.exit_code == 0 and new_kid in status.output and old_kid not in status.output

    # the running server still reads everything, and writes new compartments under the new key
    assert _snapshot(http, h, refs) == before
    late = post(http, h, {"resourceType": "Patient", "name": [{"family": "Afterrotation"}]})
    refs.append(("Patient", late["id"]))
    assert {kid for _s, kid, _w in _data_keys(settings)} == {new_kid}
    before = _snapshot(http, h, refs)

    # a brand-new server instance with the same settings (only the new key on disk) reads it all
    app2 = create_app(settings)
    try:
        assert _snapshot(app2.test_client(), h, refs) == before
    finally:
        app2.extensions["fhirserver"].engine.dispose()


def test_key_rotation_with_environment_keys(tmp_path):
    old, new = (base64.b64encode(os.urandom(32)).decode() for _ in range(2))
    s_old = make_settings(tmp_path / "envkeys", master_key=old)
    app = create_app(s_old)
    try:
        c = client_for(app, s_old)
        h = c.headers()
        refs = _make_data(c.http, h)
        before = _snapshot(c.http, h, refs)
    finally:
        app.extensions["fhirserver"].engine.dispose()
    assert not (s_old.data_dir / "master-keys.json").exists(), "env keys must not be written to disk"

    status = run_cli(["keys", "status"], cli_env(s_old, FHIRSERVER_MASTER_KEY=old))
    assert status.exit_code == 0, status.output
    old_kid = re.search(r"active master key: (\w+) \(environment\)", status.output).group(1)

    result = run_cli(["keys", "rotate"], cli_env(s_old, FHIRSERVER_MASTER_KEY=f"{new},{old}"))
    assert result.exit_code == 0, result.output
    status = run_cli(["keys", "status"], cli_env(s_old, FHIRSERVER_MASTER_KEY=new))
    assert status.exit_code == 0, status.output
    new_kid = re.search(r"active master key: (\w+) \(environment\)", status.output).group(1)
    assert new_kid != old_kid and old_kid not in status.output
    assert {kid for _s, kid, _w in _data_keys(s_old)} == {new_kid}
    assert not (s_old.data_dir / "master-keys.json").exists()

    s_new = make_settings(tmp_path / "envkeys", master_key=new)
    app2 = create_app(s_new)
    try:
        assert _snapshot(app2.test_client(), h, refs) == before
    finally:
        app2.extensions["fhirserver"].engine.dispose()

    # and the retired key alone no longer opens anything
    assert_fails_closed(make_settings(tmp_path / "envkeys", master_key=old), h, refs, before)


# ----------------------------------------------------------------------------- lost / wrong master key
def assert_fails_closed(settings, h, refs, snapshot) -> str:  # type: ignore[no-untyped-def]
    """A server on these settings must not serve the stored resources: either it refuses to start,
    or every read fails without resource data. Returns which of the two happened."""
    try:
        app = create_app(settings)
    except Exception:  # noqa: BLE001 - refusing to start is a correct outcome
        return "startup"
    try:
        http = app.test_client()
        for ref in refs:
            r = http.get(f"/fhir/{ref[0]}/{ref[1]}", headers=h)
            text = r.get_data(as_text=True)
            assert r.status_code != 200, f"{ref} served with the wrong master key"
            for _path, v in walk(strip_meta(snapshot[ref])):
                if isinstance(v, str) and len(v) >= 6 and v not in (ref[0], ref[1]):
                    assert v not in text, f"{v!r} leaked with the wrong master key"
        r = http.get(f"/fhir/Patient?family={DEMO_FAMILY}", headers=h)
        assert r.status_code != 200 or DEMO_MRN not in r.get_data(as_text=True)
        return "request"
    finally:
        app.extensions["fhirserver"].engine.dispose()


def test_wrong_master_key_fails_closed(http, admin, settings, tmp_path):
    h = admin.headers()
    refs = _make_data(http, h)
    snapshot = _snapshot(http, h, refs)
    other = base64.b64encode(os.urandom(32)).decode()
    wrong = make_settings(tmp_path, master_key=other)  # same data dir and database, different key
    assert wrong.effective_database_url == settings.effective_database_url
    assert_fails_closed(wrong, h, refs, snapshot)
    # the data itself is fine: the right key still reads it
    assert _snapshot(http, h, refs) == snapshot


def test_deleted_key_file_fails_closed(http, admin, settings):
    h = admin.headers()
    refs = _make_data(http, h)
    snapshot = _snapshot(http, h, refs)
    key_file = settings.data_dir / "master-keys.json"
    saved = key_file.read_bytes()
    key_file.unlink()

    assert_fails_closed(settings, h, refs, snapshot)
    # a freshly generated key file (if any) must not have replaced the data keys' wrapping
    assert {kid for _s, kid, _w in _data_keys(settings)} == {json.loads(saved)["active"]}

    # restoring the file restores service: the failure was the missing key, not damage
    key_file.write_bytes(saved)
    os.chmod(key_file, 0o600)
    app2 = create_app(settings)
    try:
        assert _snapshot(app2.test_client(), h, refs) == snapshot
    finally:
        app2.extensions["fhirserver"].engine.dispose()
