"""/metrics (issue "Production at scale", operations): requests by interaction, type and status and
their latency, summed over gunicorn's workers, with no patient data in any label."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import requests

from tests.conftest import BackendClient
from tests.support.live import served_with_client


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
    with served_with_client(tmp_path, "system/*.rs", "--workers", "2", "--threads", "2") as (base, h, _log):
        for _ in range(40):  # new connections: the two workers share them
            assert requests.get(f"{base}/fhir/Patient", headers=h, timeout=10).status_code == 200
        total = 0.0
        for _ in range(4):  # whichever worker answers the scrape reports both workers' counts
            text = requests.get(f"{base}/metrics", timeout=10).text
            total = samples(text, "fhirserver_requests_total")['{interaction="search-type",resource_type="Patient",status="200"}']
            assert total == 40
    assert total == 40


def test_audit_export_and_login_metrics(http: Any, admin: BackendClient, settings: Any) -> None:
    """Audit append latency, checkpoint age, unsequenced records and tree size, export jobs by
    state, login failures -- all moving with what the server did, none carrying patient data."""
    from click.testing import CliRunner

    from fhirserver.cli import main
    from fhirserver.users import authenticate_user, create_user

    h = admin.headers()
    text = http.get("/metrics").get_data(as_text=True)
    assert samples(text, "fhirserver_audit_checkpoint_age_seconds") == {"": -1.0}  # none signed yet
    pending_before = samples(text, "fhirserver_audit_unsequenced_records")[""]
    appends_before = samples(text, "fhirserver_audit_append_seconds_count").get("", 0)
    pid = http.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Gaugefamily"}]},
                    headers=h).get_json()["id"]
    kick = http.get("/fhir/Patient/$export", headers={**h, "Accept": "application/fhir+json",
                                                      "Prefer": "respond-async"})
    assert kick.status_code == 202
    text = http.get("/metrics").get_data(as_text=True)
    assert samples(text, "fhirserver_audit_unsequenced_records")[""] >= pending_before + 2
    assert samples(text, "fhirserver_audit_append_seconds_count")[""] >= appends_before + 2
    jobs = samples(text, "fhirserver_export_jobs")
    assert sum(jobs.values()) == 1 and set(jobs) >= {'{state="queued"}', '{state="running"}', '{state="complete"}'}

    env = {"FHIRSERVER_DATA_DIR": str(settings.data_dir), "FHIRSERVER_BASE_URL": settings.base_url}
    assert CliRunner().invoke(main, ["audit", "checkpoint"], env=env).exit_code == 0
    text = http.get("/metrics").get_data(as_text=True)
    assert 0 <= samples(text, "fhirserver_audit_checkpoint_age_seconds")[""] < 60
    assert samples(text, "fhirserver_audit_unsequenced_records")[""] == 0
    assert samples(text, "fhirserver_audit_tree_size")[""] >= 3

    svc = http.application.extensions["fhirserver"]
    create_user(svc.engine, svc.keys, "metrics-user", "correct-Horse-battery-9", f"Patient/{pid}")
    before = samples(text, "fhirserver_login_failures_total").get('{reason="bad-password"}', 0)
    assert not authenticate_user(svc, "metrics-user", "wrong-password-entirely", None, "127.0.0.1").ok
    text = http.get("/metrics").get_data(as_text=True)
    assert samples(text, "fhirserver_login_failures_total")['{reason="bad-password"}'] == before + 1
    assert "Gaugefamily" not in text and pid not in text and "metrics-user" not in text
