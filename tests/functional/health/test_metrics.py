"""/metrics (issue "Production at scale", operations): requests by interaction, type and status and
their latency, summed over gunicorn's workers, with no patient data in any label."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import requests

from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
from tests.conftest import BackendClient
from tests.support.cli import cli, ok
from tests.support.live import free_port, server_env, start_server, stop_server


def samples(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def test_metrics_count_requests_without_patient_data(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    before = samples(http.get("/metrics").get_data(as_text=True), "fhirserver_requests_total")
    pid = http.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Metricsfamily"}]},
                    headers=h).get_json()["id"]
    for _ in range(3):
        assert http.get(f"/fhir/Patient/{pid}", headers=h).status_code == 200
    assert http.get("/fhir/Patient?name=Metricsfamily", headers=h).status_code == 200
    assert http.get("/fhir/Patient/nope", headers=h).status_code == 404
    text = http.get("/metrics").get_data(as_text=True)
    after = samples(text, "fhirserver_requests_total")

    def delta(labels: str) -> float:
        return after.get(labels, 0) - before.get(labels, 0)

    assert delta('{interaction="read",resource_type="Patient",status="200"}') == 3
    assert delta('{interaction="read",resource_type="Patient",status="404"}') == 1
    assert delta('{interaction="create",resource_type="Patient",status="201"}') == 1
    assert delta('{interaction="search-type",resource_type="Patient",status="200"}') == 1
    assert "fhirserver_request_seconds_bucket" in text
    assert "Metricsfamily" not in text and pid not in text


def test_metrics_are_summed_over_gunicorn_workers(tmp_path: Path) -> None:
    data, key = tmp_path / "data", generate_key("ES384")
    (tmp_path / "jwks.json").write_text(json.dumps(public_jwks(key)))
    client_id = ok(cli("client", "register", "--name", "metrics", "--jwks-file", str(tmp_path / "jwks.json"),
                       "--scopes", "system/*.rs", data_dir=data, real=True)).strip()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(["serve", "--port", str(port), "--workers", "2", "--threads", "2"],
                        server_env(tmp_path, data, FHIRSERVER_BASE_URL=f"{base}/fhir"), tmp_path,
                        tmp_path / "serve.log", port)
    try:
        form = token_request_form(key, client_id, f"{base}/auth/token", "system/*.rs")
        h = {"Authorization": f"Bearer {requests.post(f'{base}/auth/token', data=form, timeout=10).json()['access_token']}"}
        for _ in range(40):  # new connections: the two workers share them
            assert requests.get(f"{base}/fhir/Patient", headers=h, timeout=10).status_code == 200
        total = 0.0
        for _ in range(4):  # whichever worker answers the scrape reports both workers' counts
            text = requests.get(f"{base}/metrics", timeout=10).text
            total = samples(text, "fhirserver_requests_total")['{interaction="search-type",resource_type="Patient",status="200"}']
            assert total == 40
    finally:
        stop_server(proc)
    assert total == 40
