"""Data-subject access: a patient's app exports the patient's own record with
`Patient/[id]/$export` (Bulk Data, NDJSON); nothing of other patients, and no cross-patient
export levels."""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

from tests.functional.smart.conftest import Smart

ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}


def _local(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def test_patient_exports_own_record_only(smart: Smart) -> None:
    me, other = smart.patient("Selfexport"), smart.patient("Otherexport")
    mine = {smart.observation(me), smart.observation(me, code="718-7")}
    smart.observation(other)
    user, _ = smart.user(f"Patient/{me}")
    client_id, _ = smart.app_client()
    access = smart.tokens(client_id, "launch/patient patient/*.rs", user)["access_token"]
    h = {"Authorization": f"Bearer {access}", **ASYNC}
    assert smart.http.get("/fhir/$export", headers=h).status_code == 403
    assert smart.http.get("/fhir/Patient/$export", headers=h).status_code == 403
    assert smart.http.get(f"/fhir/Patient/{other}/$export", headers=h).status_code == 404
    kick = smart.http.get(f"/fhir/Patient/{me}/$export", headers=h)
    assert kick.status_code == 202, kick.get_data(as_text=True)
    deadline = time.monotonic() + 30
    while True:
        status = smart.get(_local(kick.headers["Content-Location"]), access)
        if status.status_code != 202 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status.status_code == 200, status.get_data(as_text=True)
    got: dict[str, set[str]] = {}
    for item in status.get_json()["output"]:
        body = smart.get(_local(item["url"]), access).get_data(as_text=True)
        for line in body.splitlines():
            res = json.loads(line)
            got.setdefault(res["resourceType"], set()).add(res["id"])
    assert got == {"Patient": {me}, "Observation": mine}
