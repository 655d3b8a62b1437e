"""`fhirserver audit report` (issue 15, breach report): after a scripted incident, the report for
the compromised client lists exactly the patients it read, searched or changed -- not those
another client touched, not those outside the time window -- with counts per action; the same
for a user by sign-in name; CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
import time
from typing import Any

import pytest
from click.testing import CliRunner

from fhirserver.auth.tokens import issue_token
from fhirserver.cli import main
from fhirserver.clock import now_us
from fhirserver.fhir.dates import instant_text
from fhirserver.users.registry import create_user
from tests.conftest import BackendClient
from tests.functional.exchange.test_load import cli_env


def report(settings: Any, *args: str) -> str:
    result = CliRunner().invoke(main, ["audit", "report", *args], env=cli_env(settings))
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result.stdout


def rows(text: str) -> dict[str, dict[str, str]]:
    return {r["patient"]: r for r in csv.DictReader(io.StringIO(text))}


def test_the_report_lists_exactly_the_patients_the_account_touched(http: Any, admin: BackendClient,
                                                                   make_client: Any, settings: Any, app: Any) -> None:
    h = admin.headers()
    pids = [http.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": f"Breach{i}"}]},
                      headers=h).get_json()["id"] for i in range(6)]
    obs = [http.post("/fhir/Observation", headers=h, json={
        "resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{p}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}}).get_json()["id"] for p in pids]
    thief = make_client("system/Patient.rs system/Observation.rus", default_scope="system/Patient.rs system/Observation.rus")
    other = make_client("system/Patient.rs", default_scope="system/Patient.rs")
    t = thief.headers()
    assert http.get(f"/fhir/Patient/{pids[0]}", headers=t).status_code == 200  # before the window
    time.sleep(0.01)
    window = now_us()
    assert http.get(f"/fhir/Patient/{pids[1]}", headers=t).status_code == 200
    assert http.get("/fhir/Observation", query_string={"patient": pids[2]}, headers=t).status_code == 200
    for _ in range(2):
        assert http.get(f"/fhir/Observation/{obs[3]}", headers=t).status_code == 200
    body = http.get(f"/fhir/Observation/{obs[1]}", headers=t).get_json()
    assert http.put(f"/fhir/Observation/{obs[1]}", json=dict(body, status="amended"), headers=t).status_code == 200
    assert http.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=t).status_code == 403  # denied
    assert http.get(f"/fhir/Patient/{pids[4]}", headers=other.headers()).status_code == 200  # another client

    everything = rows(report(settings, "--client", thief.client_id))
    assert set(everything) == {f"Patient/{p}" for p in pids[:4]}
    since = rows(report(settings, "--client", thief.client_id, "--since", instant_text(window)))
    assert set(since) == {f"Patient/{p}" for p in pids[1:4]}
    p1, p2, p3 = (since[f"Patient/{p}"] for p in pids[1:4])
    assert (p1["R"], p1["U"]) == ("2", "1")  # read the patient and the observation, then changed it
    assert p2["E"] == "1" and p2["R"] == "0"  # a search
    assert p3["R"] == "2"
    assert p1["first"] <= p1["last"] and p1["first"] >= instant_text(window)[:19]
    assert set(rows(report(settings, "--client", other.client_id))) == {f"Patient/{pids[4]}"}
    # nothing after the incident's end
    assert rows(report(settings, "--client", thief.client_id, "--until", "2000-01-01")) == {}
    as_json = json.loads(report(settings, "--client", thief.client_id, "--format", "json"))
    assert as_json["account"] == f"Device/{thief.client_id}"
    assert {p["patient"] for p in as_json["patients"]} == set(everything)

    # a user, by sign-in name: the accesses made with their tokens, through any app
    svc = app.extensions["fhirserver"]
    create_user(svc.engine, svc.keys, "dr.breach", "a long enough passphrase 1", "Practitioner/dr-breach")
    with svc.engine.begin() as conn:
        token, _exp = issue_token(conn, thief.client_id, "user/Patient.rs", 3600, {"fhirUser": "Practitioner/dr-breach"})
    assert http.get(f"/fhir/Patient/{pids[5]}", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert set(rows(report(settings, "--user", "dr.breach"))) == {f"Patient/{pids[5]}"}

    # per patient: every account that touched their data (what the patient is told)
    by_patient = json.loads(report(settings, "--patient", f"Patient/{pids[1]}", "--format", "json"))
    assert by_patient["patient"] == f"Patient/{pids[1]}"
    accounts = {a["account"]: a for a in by_patient["accounts"]}
    assert f"Device/{thief.client_id}" in accounts and f"Device/{other.client_id}" not in accounts
    assert (accounts[f"Device/{thief.client_id}"]["R"], accounts[f"Device/{thief.client_id}"]["U"]) == (2, 1)
    listed = csv.DictReader(io.StringIO(report(settings, "--patient", pids[5])))
    assert {r["account"] for r in listed} >= {"Practitioner/dr-breach", f"Device/{thief.client_id}"}


def test_the_report_needs_exactly_one_account(settings: Any, app: Any) -> None:
    for args in ([], ["--client", "a", "--user", "b"]):
        result = CliRunner().invoke(main, ["audit", "report", *args], env=cli_env(settings))
        assert result.exit_code == 2 and "exactly one account" in result.output
    result = CliRunner().invoke(main, ["audit", "report", "--client", "a", "--patient", "b"], env=cli_env(settings))
    assert result.exit_code == 2
    result = CliRunner().invoke(main, ["audit", "report", "--user", "nobody"], env=cli_env(settings))
    assert result.exit_code == 1 and "no user" in result.output


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_the_hourly_roll_up_gives_the_same_report_as_the_records(app: Any, settings: Any) -> None:
    """Records appended through the real path over the last five hours: the report is the same
    before the sequencer rolled them up (records only), after (whole hours from the roll-up, edges
    from the records), and for windows that cut hours in half."""
    from sqlalchemy import func, select

    from fhirserver.audit.events import AuditRecord
    from fhirserver.audit.report import touched_patients
    from fhirserver.audit.rollup import HOUR_US, watermark
    from fhirserver.db.schema import access_hourly, access_record

    svc = app.extensions["fhirserver"]
    start = (now_us() // HOUR_US - 5) * HOUR_US
    script = [  # (minutes after start, client, interaction, status, patients)
        (5, "roll-a", "read", 200, ["r1"]), (30, "roll-a", "search-type", 200, ["r1", "r2"]),
        (65, "roll-a", "update", 200, ["r2"]), (95, "roll-b", "read", 200, ["r3"]),
        (130, "roll-a", "read", 403, ["r4"]), (190, "roll-a", "read", 200, ["r1"]),
        (250, "roll-a", "read", 200, ["r5"]), (299, "roll-a", "search-type", 200, ["r5", "r1"]),
    ]
    with svc.engine.begin() as conn:
        for n, (minute, client, interaction, status, patients) in enumerate(script):
            svc.audit.append(conn, AuditRecord(
                interaction=interaction, request_id=f"roll{n}", network_address="10.0.0.9",
                recorded_us=start + minute * 60_000_000, status=status, client_id=client, client_name=client,
                resources=[f"Patient/{patients[0]}/_history/1"] if status == 200 else [],
                patients=patients, resource_type="Patient", purpose=["TREAT"]))

    windows = [(start, start + 6 * HOUR_US), (start + 20 * 60_000_000, start + 200 * 60_000_000),
               (start + HOUR_US, start + 3 * HOUR_US), (start + 31 * 60_000_000, start + 35 * 60_000_000)]

    def reports() -> list[list[dict[str, Any]]]:
        with svc.engine.connect() as conn:
            return [[r.to_json() for r in touched_patients(conn, "Device/roll-a", lo, hi)] for lo, hi in windows]

    before = reports()
    svc.sequencer.run_once(checkpoint=False)
    with svc.engine.connect() as conn:
        rolled = conn.execute(select(func.sum(access_hourly.c.n)).where(access_hourly.c.agent_id == "roll-a")).scalar()
        assert watermark(conn) == conn.execute(select(func.count()).select_from(access_record)).scalar()
    assert rolled == 9  # per (record, patient) pair of roll-a's 7 records: 1 + 2 + 1 + 1 + 1 + 1 + 2
    assert reports() == before
    whole = {r["patient"]: r for r in before[0]}
    assert set(whole) == {"Patient/r1", "Patient/r2", "Patient/r4", "Patient/r5"}
    assert (whole["Patient/r1"]["R"], whole["Patient/r1"]["E"]) == (2, 2)
    assert (whole["Patient/r2"]["E"], whole["Patient/r2"]["U"]) == (1, 1)
    assert whole["Patient/r4"]["denied"] == 1 and whole["Patient/r4"]["R"] == 0
    assert whole["Patient/r1"]["first"] == instant_text(start + 5 * 60_000_000)
    assert {r["patient"] for r in before[1]} == {"Patient/r1", "Patient/r2", "Patient/r4"}
    assert {r["patient"] for r in before[3]} == set()
