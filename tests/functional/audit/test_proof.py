"""AuditEvent/[id]/$proof checked by an independent verifier written here from the published
algorithm (RFC 9162 inclusion proofs, Ed25519 over the checkpoint message), with the server's
public key taken from the operator's key file, not from the response. Forged records, paths and
checkpoints fail; who may ask is who may read the event."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from tests.conftest import AUDITOR_SETTINGS


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def independent_verify(proof: dict[str, Any], public_key: Any, content: bytes | None = None) -> None:
    """Raise AssertionError unless the proof shows the record is in the signed checkpoint."""
    p: dict[str, Any] = {}
    for item in proof["parameter"]:
        value = next(v for k, v in item.items() if k.startswith("value"))
        if item["name"] == "auditPath":
            p.setdefault("auditPath", []).append(value)
        else:
            p[item["name"]] = value
    if content is not None:
        assert hashlib.sha256(content).hexdigest() == p["contentSha256"], "content does not match its hash"
    leaf_input = f"fhirserver-access-record:v1:{p['record']}:{p['recordedUs']}:{p['contentSha256']}".encode()
    assert leaf_input.decode() == p["leafContent"]
    # RFC 9162 section 2.1.3.2, written out independently of fhirserver.audit.merkle
    fn, sn = int(p["leafIndex"]), int(p["treeSize"]) - 1
    assert fn <= sn, "leaf index outside the tree"
    r = _h(b"\x00" + leaf_input)
    for sibling in (bytes.fromhex(x) for x in p.get("auditPath", [])):
        assert sn != 0, "path too long"
        if fn % 2 == 1 or fn == sn:
            r = _h(b"\x01" + sibling + r)
            while fn % 2 == 0 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = _h(b"\x01" + r + sibling)
        fn, sn = fn >> 1, sn >> 1
    assert sn == 0, "path too short"
    assert r.hex() == p["root"], "the path does not lead to the signed root"
    message = f"fhirserver-audit-checkpoint/v1\n{p['treeSize']}\n{p['root']}\n{p['checkpointTimeUs']}\n".encode()
    try:
        public_key.verify(base64.b64decode(p["checkpointSignature"]), message)
    except InvalidSignature:
        raise AssertionError("checkpoint signature invalid") from None


def _public_key(settings):  # type: ignore[no-untyped-def]
    """The operator's copy: derived from the signing key file, never from the server's answer."""
    return serialization.load_pem_private_key(settings.signing_key_path.read_bytes(), password=None).public_key()


def _param(proof: dict[str, Any], name: str) -> Any:
    return next(next(v for k, v in i.items() if k.startswith("value")) for i in proof["parameter"] if i["name"] == name)


def _events(http, admin, n: int) -> list[str]:  # type: ignore[no-untyped-def]
    ids = []
    for i in range(n):
        r = http.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": f"Proof{i}"}]},
                      headers=admin.headers())
        assert r.status_code == 201
        ids.append(r.headers["X-Request-Id"])
    return ids


def _event_id(http, auditor, request_id: str) -> str:  # type: ignore[no-untyped-def]
    bundle = http.get("/fhir/AuditEvent?_count=100&subtype=create", headers=auditor).get_json()
    for e in bundle["entry"]:
        for ent in e["resource"]["entity"]:
            if ent.get("what", {}).get("identifier", {}).get("value") == request_id:
                return str(e["resource"]["id"])
    raise AssertionError(request_id)


def test_proof_verifies_independently_for_every_record(http, admin, make_client, settings):
    auditor = make_client("system/AuditEvent.rs", settings=AUDITOR_SETTINGS).headers("system/AuditEvent.rs")
    request_ids = _events(http, admin, 13)  # a tree of odd size, several levels
    key = _public_key(settings)
    for rid in request_ids:
        event_id = _event_id(http, auditor, rid)
        r = http.get(f"/fhir/AuditEvent/{event_id}/$proof", headers=auditor)
        assert r.status_code == 200, r.get_data(as_text=True)[:300]
        proof = r.get_json()
        content = base64.b64decode(_param(proof, "content"))
        independent_verify(proof, key, content)
        record = json.loads(content)
        assert record["id"] == event_id and record["request_id"] == rid  # the content is this access's


@pytest.mark.parametrize("forgery", ["content", "record-id", "time", "path", "index", "root", "signature"])
def test_forged_proofs_fail(http, admin, make_client, settings, forgery):
    auditor = make_client("system/AuditEvent.rs", settings=AUDITOR_SETTINGS).headers("system/AuditEvent.rs")
    request_ids = _events(http, admin, 6)
    event_id = _event_id(http, auditor, request_ids[2])
    proof = http.get(f"/fhir/AuditEvent/{event_id}/$proof", headers=auditor).get_json()
    content = base64.b64decode(_param(proof, "content"))
    key = _public_key(settings)
    independent_verify(proof, key, content)

    def set_param(name: str, value: Any) -> None:
        for item in proof["parameter"]:
            if item["name"] == name:
                item[next(k for k in item if k.startswith("value"))] = value
                return

    if forgery == "content":
        record = json.loads(content)
        record["client_id"] = "someone-else"
        content = json.dumps(record).encode()
    elif forgery == "record-id":
        set_param("record", "00000000-0000-4000-8000-000000000000")
        set_param("leafContent", _param(proof, "leafContent").replace(event_id, "00000000-0000-4000-8000-000000000000"))
    elif forgery == "time":
        set_param("recordedUs", str(int(_param(proof, "recordedUs")) + 1))
        set_param("leafContent", _param(proof, "leafContent").replace(
            f":{int(_param(proof, 'recordedUs')) - 1}:", f":{_param(proof, 'recordedUs')}:"))
    elif forgery == "path":
        path = [i for i in proof["parameter"] if i["name"] == "auditPath"]
        path[0]["valueString"] = hashlib.sha256(b"forged").hexdigest()
    elif forgery == "index":
        set_param("leafIndex", str(int(_param(proof, "leafIndex")) + 1))
    elif forgery == "root":
        set_param("root", hashlib.sha256(b"another tree").hexdigest())
    elif forgery == "signature":
        set_param("checkpointTimeUs", str(int(_param(proof, "checkpointTimeUs")) + 1))
    with pytest.raises(AssertionError):
        independent_verify(proof, key, content)


def test_proof_follows_read_access(http, admin, make_client, settings):
    event_request = _events(http, admin, 1)[0]
    auditor = make_client("system/AuditEvent.rs", settings=AUDITOR_SETTINGS).headers("system/AuditEvent.rs")
    event_id = _event_id(http, auditor, event_request)
    # a wildcard scope never grants AuditEvent: no proof either
    assert http.get(f"/fhir/AuditEvent/{event_id}/$proof", headers=admin.headers()).status_code == 403
    plain = make_client("system/AuditEvent.rs", settings={"auditor": True, "purposes": ["HOPERAT"]}).headers(
        "system/AuditEvent.rs")
    r = http.get(f"/fhir/AuditEvent/{event_id}/$proof", headers=plain)
    assert r.status_code == 200
    names = {i["name"] for i in r.get_json()["parameter"]}
    assert "content" not in names and "contentSha256" in names  # values in clear only for value-seeing auditors
    independent_verify(r.get_json(), _public_key(settings))
    assert http.get("/fhir/AuditEvent/no-such-event/$proof", headers=auditor).status_code == 404
    # an operation that changes nothing may also be invoked with POST (FHIR R4 operations)
    posted = http.post(f"/fhir/AuditEvent/{event_id}/$proof", headers=auditor)
    assert posted.status_code == 200
    independent_verify(posted.get_json(), _public_key(settings))
