"""Structured logs carry no patient data (issue "Production at scale", operations): a real
`fhirserver serve` receives names, birth dates and identifiers in queries and bodies; its whole
log -- the JSON lines and gunicorn's access log -- holds none of them, and every /fhir request has
one JSON access line with its request id."""

from __future__ import annotations

import json
from pathlib import Path

import requests

from tests.support.live import served_with_client

SECRETS = ("Devendra", "Okonkwo-Shah", "1961-07-14", "123-45-6789", "555-0199")


def test_no_name_identifier_or_birth_date_reaches_the_log(tmp_path: Path) -> None:
    with served_with_client(tmp_path, "system/*.cruds", "--workers", "1") as (base, h, log):
        patient = {"resourceType": "Patient", "name": [{"family": "Okonkwo-Shah", "given": ["Devendra"]}],
                   "birthDate": "1961-07-14", "identifier": [{"system": "urn:ssn", "value": "123-45-6789"}],
                   "telecom": [{"system": "phone", "value": "555-0199"}]}
        created = requests.post(f"{base}/fhir/Patient", json=patient, headers=h, timeout=10)
        assert created.status_code == 201
        ids = [created.headers["X-Request-Id"]]
        for query in ("name=Devendra&birthdate=1961-07-14", "identifier=urn:ssn|123-45-6789", "family=Okonkwo-Shah",
                      "telecom=555-0199", "name:contains=Devendra"):
            resp = requests.get(f"{base}/fhir/Patient?{query}", headers=h, timeout=10)
            ids.append(resp.headers["X-Request-Id"])
        bad = requests.post(f"{base}/fhir/Patient", json={**patient, "birthDate": "Devendra"}, headers=h, timeout=10)
        assert bad.status_code == 400
        ids.append(bad.headers["X-Request-Id"])
    text = log.read_text()
    assert not [s for s in SECRETS if s in text], [s for s in SECRETS if s in text]
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    access = [entry for entry in lines if entry.get("logger") == "fhirserver.access"]
    assert {entry["request_id"] for entry in access} >= set(ids)
    assert all({"method", "interaction", "status", "duration_ms", "client_id"} <= set(entry) for entry in access)
    assert any(entry["status"] == 400 and entry["interaction"] == "create" for entry in access)
    # gunicorn's own error log is JSON through the same formatter (its tracebacks lose their messages)
    assert any(entry.get("logger") == "gunicorn.error" and "Booting worker" in entry["message"] for entry in lines)
