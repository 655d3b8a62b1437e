"""Bulk Data export driven exactly as the Bulk Data Access IG's client does it (kick-off with
`Accept: application/fhir+json` and `Prefer: respond-async`, poll the Content-Location, read the
manifest, download each file with `Accept: application/fhir+ndjson`), checking the spec's
kick-off, status and manifest rules one by one (docs/exchange.md has the table)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest

from tests.support.bulk import Server, _app

BULK_KICKOFF = {"Accept": "application/fhir+json", "Prefer": "respond-async"}


@pytest.fixture
def srv(tmp_path: Path) -> Server:
    return Server(_app(tmp_path))


def _local(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def test_spec_client_flow(srv: Server) -> None:
    token = srv.token()
    pid = srv.create(token, {"resourceType": "Patient", "name": [{"family": "Bulkflow"}]})
    srv.create(token, {"resourceType": "Observation", "status": "final", "code": {"text": "hr"},
                       "subject": {"reference": f"Patient/{pid}"}, "valueQuantity": {"value": 60, "unit": "/min"}})
    auth = {"Authorization": f"Bearer {token}"}

    # kick-off: 202 Accepted with Content-Location (the status URL); no body required
    kick = srv.http.get("/fhir/$export?_type=Patient,Observation", headers={**auth, **BULK_KICKOFF})
    assert kick.status_code == 202, kick.get_data(as_text=True)
    status_url = kick.headers["Content-Location"]
    assert status_url.startswith("http")

    # status: 202 with X-Progress and Retry-After while in progress, then 200 with the manifest
    deadline = time.monotonic() + 30
    while True:
        resp = srv.http.get(_local(status_url), headers=auth)
        if resp.status_code != 202:
            break
        assert resp.headers.get("Retry-After") and resp.headers.get("X-Progress")
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers.get("Expires")
    manifest = resp.get_json()
    assert set(manifest) >= {"transactionTime", "request", "requiresAccessToken", "output", "error"}
    assert manifest["requiresAccessToken"] is True and manifest["error"] == []
    assert unquote(manifest["request"]).endswith("$export?_type=Patient,Observation")
    assert {o["type"] for o in manifest["output"]} == {"Patient", "Observation"}

    # downloads with every Accept a Bulk Data client may send, and with none
    for accept in ("application/fhir+ndjson", "application/ndjson", "*/*", None):
        for item in manifest["output"]:
            headers = {**auth, **({"Accept": accept} if accept else {})}
            file = srv.http.get(_local(item["url"]), headers=headers)
            assert file.status_code == 200, (accept, file.get_data(as_text=True)[:200])
            assert file.headers["Content-Type"] == "application/fhir+ndjson"
            lines = [json.loads(line) for line in file.get_data(as_text=True).splitlines()]
            assert len(lines) == item["count"] and all(r["resourceType"] == item["type"] for r in lines)
    # a format the server cannot produce is a 406 OperationOutcome
    refused = srv.http.get(_local(manifest["output"][0]["url"]), headers={**auth, "Accept": "application/fhir+xml"})
    assert refused.status_code == 406 and refused.get_json()["resourceType"] == "OperationOutcome"
    # files need the token (requiresAccessToken)
    assert srv.http.get(_local(manifest["output"][0]["url"])).status_code == 401

    # delete: 202, then the status URL is gone
    assert srv.http.delete(_local(status_url), headers=auth).status_code == 202
    assert srv.http.get(_local(status_url), headers=auth).status_code == 404


def test_kickoff_rules(srv: Server) -> None:
    token = srv.token()
    auth = {"Authorization": f"Bearer {token}"}
    # an unsupported _outputFormat and an XML Accept are refused at kick-off
    bad = srv.http.get("/fhir/$export?_outputFormat=application/fhir+xml", headers={**auth, **BULK_KICKOFF})
    assert bad.status_code == 400 and bad.get_json()["resourceType"] == "OperationOutcome"
    xml = srv.http.get("/fhir/$export", headers={**auth, "Accept": "application/fhir+xml", "Prefer": "respond-async"})
    assert xml.status_code == 406
    # the ndjson output formats the spec lists are accepted
    for fmt in ("application/fhir+ndjson", "application/ndjson", "ndjson"):
        ok = srv.http.get(f"/fhir/$export?_outputFormat={quote(fmt, safe='/')}", headers={**auth, **BULK_KICKOFF})
        assert ok.status_code == 202, (fmt, ok.get_data(as_text=True)[:200])
        # a client that forgot to encode '+' (it arrives as a space) means the same
        ok = srv.http.get(f"/fhir/$export?_outputFormat={fmt}", headers={**auth, **BULK_KICKOFF})
        assert ok.status_code == 202, (fmt, ok.get_data(as_text=True)[:200])
    # _since and _typeFilter narrow what is exported
    r = srv.http.get("/fhir/$export?_type=Observation&_typeFilter=Observation%3Fstatus%3Dfinal"
                     "&_since=2020-01-01T00:00:00Z", headers={**auth, **BULK_KICKOFF})
    assert r.status_code == 202
    bad_filter = srv.http.get("/fhir/$export?_typeFilter=Nonsense", headers={**auth, **BULK_KICKOFF})
    assert bad_filter.status_code == 400
