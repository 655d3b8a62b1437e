"""Snooping detection (issue 15, item 3) and graded penalties (item 4) on scripted traffic.

Sixteen days of a normal clinic are written through the real append path (AuditLog.append), plus,
on the last day, one scripted incident per rule. The detection over the last day names exactly the
scripted accounts with the right rule; over a normal day it finds nothing. The penalty policy then
warns, limits (429 + Retry-After as an OperationOutcome) and suspends, and `reinstate` lifts it --
each step an alert and an AuditEvent."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from fhirserver.audit.events import AuditRecord
from fhirserver.audit.rollup import HOUR_US
from fhirserver.auth.clients import get_client, register_app_client
from fhirserver.cli import main
from fhirserver.clock import now_us
from fhirserver.consent import alerts as alerts_module
from fhirserver.consent.alerts import list_alerts
from fhirserver.db.schema import access_record
from fhirserver.oversight.snooping import DAY_US, NotReady
from fhirserver.schedule import run_snooping
from fhirserver.users.registry import create_user, get_user
from tests.conftest import make_settings
from tests.functional.exchange.test_load import cli_env
from tests.support.apps import fresh_app

ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
STAFF = ["doc1", "doc2", "doc3", "doc4"]
DAYS = 16


class Clinic:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.svc = app.extensions["fhirserver"]
        self.n = 0
        self.today = now_us() // DAY_US * DAY_US
        self.day = self.today - DAY_US  # the examined day: yesterday
        self.pending: list[AuditRecord] = []
        self.viewer = ""  # the interactive app's client id

    @property
    def day_text(self) -> str:
        return day_text(self.day)

    def access(self, when: int, patients: list[str], user: str | None = None, client: str = "ehr",
               interaction: str = "read", status: int = 200) -> None:
        self.n += 1
        rec = AuditRecord(interaction=interaction, request_id=f"s{self.n}", network_address="10.1.1.1",
                          recorded_us=when, status=status, client_id=client, client_name=client,
                          user=f"Practitioner/{user}" if user else None,
                          resources=[f"Patient/{patients[0]}/_history/1"] if status == 200 else [],
                          patients=patients, resource_type="Patient", purpose=["TREAT"])
        self.pending.append(rec)

    def write(self) -> None:
        with self.svc.engine.begin() as conn:
            for rec in self.pending:
                self.svc.audit.append(conn, rec)
        self.pending = []
        self.svc.sequencer.run_once(checkpoint=False)


def normal_day(c: Clinic, day: int) -> None:
    """Each doctor 09:00-17:00, three of their own 20 patients an hour."""
    for d, doc in enumerate(STAFF):
        for hour in range(9, 17):
            for k in range(3):
                c.access(day + hour * HOUR_US + (d * 7 + k) * 60_000_000, [f"{doc}-p{(hour * 3 + k) % 20}"], doc)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def clinic(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    url = ""
    if request.param == "postgres":  # production runs on PostgreSQL: the same rules, the same SQL
        url = request.getfixturevalue("postgres").create_database(f"snoop_{os.getpid()}")
    settings = make_settings(tmp_path_factory.mktemp("snooping"), url, snoop_baseline_days=14,
                             snoop_app_patients_per_hour=50, penalty_policy="warn:2,limit:4,suspend:8",
                             penalty_rate="3/minute")
    app = fresh_app(settings)
    c = Clinic(app)
    http = app.test_client()
    svc = c.svc
    # people and records the rules look at: a VIP, an employee who is doc3's own patient, doc4's relative
    admin_key = _admin(app)
    for body in (
        {"resourceType": "Practitioner", "id": "doc4", "name": [{"family": "Lindqvist", "given": ["Ana"]}],
         "address": [{"line": ["12 Birch Lane"], "city": "Springfield"}]},
        {"resourceType": "Practitioner", "id": "doc3", "name": [{"family": "Okafor"}]},
        {"resourceType": "Patient", "id": "vip1", "meta": {"security": [{"system": ACT, "code": "CEL"}]}},
        {"resourceType": "Patient", "id": "emp1", "meta": {"security": [{"system": ACT, "code": "EMP"}]},
         "generalPractitioner": [{"reference": "Practitioner/doc3"}]},
        {"resourceType": "Patient", "id": "fam1", "name": [{"family": "Lindqvist"}],
         "address": [{"line": ["12 Birch Lane"], "city": "Springfield"}]},
        {"resourceType": "Patient", "id": "fam2", "name": [{"family": "Lindqvist"}],
         "address": [{"line": ["9 Oak Street"], "city": "Springfield"}]},
    ):
        resp = http.put(f"/fhir/{body['resourceType']}/{body['id']}", json=body, headers=admin_key)
        assert resp.status_code in (200, 201), resp.get_data(as_text=True)
    app_rec, _secret = register_app_client(svc.engine, "patient viewer", "user/*.rs", ["https://viewer.example/cb"],
                                           "none")
    c.viewer = app_rec.client_id
    for d in range(DAYS, 0, -1):
        normal_day(c, c.today - d * DAY_US)
    day = c.day
    # the incidents, all on the examined day
    c.access(day + 14 * HOUR_US, [f"x{i}" for i in range(40)], "doc1", interaction="search-type")  # volume
    c.access(day + 3 * HOUR_US + 600_000_000, ["doc2-p1"], "doc2")  # 03:10, never seen before
    c.access(day + 10 * HOUR_US + 1, ["vip1"], "doc2")  # a celebrity, not doc2's patient
    c.access(day + 11 * HOUR_US + 1, ["emp1"], "doc3")  # an employee who is doc3's own patient: quiet
    c.access(day + 12 * HOUR_US + 1, ["fam1"], "doc4")  # same family name and home address
    c.access(day + 12 * HOUR_US + 2, ["fam2"], "doc4")  # same name, another address: quiet
    for i in range(60):  # an interactive app walking through 60 patients in an hour
        c.access(day + 20 * HOUR_US + i * 1000, [f"v{i}"], client=c.viewer)
    c.write()
    original = alerts_module.now_us
    for k in range(4):  # four break-the-glass requests by one client (alerts as the consent stage raises them)
        alerts_module.now_us = lambda k=k: day + (15 + k) * HOUR_US  # type: ignore[misc]
        with svc.engine.begin() as conn:
            alerts_module.raise_alert(conn, "break-glass", "er-desk", f"bg{k}",
                                      {"reason": "unconscious", "target": "Patient/doc1-p1", "user": None})
    alerts_module.now_us = original
    yield c
    svc.engine.dispose()


def _admin(app: Any) -> dict[str, str]:
    from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
    from fhirserver.auth.clients import register_backend_client

    svc = app.extensions["fhirserver"]
    key = generate_key("ES384")
    rec = register_backend_client(svc.engine, "ehr admin", "system/*.cruds", jwks=public_jwks(key))
    resp = app.test_client().post("/auth/token", data=token_request_form(key, rec.client_id,
                                                                         svc.settings.token_url, "system/*.cruds"))
    return {"Authorization": f"Bearer {resp.get_json()['access_token']}"}


def test_a_normal_day_is_quiet(clinic: Clinic) -> None:
    findings = run_snooping(clinic.svc, clinic.day - DAY_US)
    assert findings == []


def test_each_rule_fires_on_its_scripted_incident(clinic: Clinic) -> None:
    findings = run_snooping(clinic.svc, clinic.day)
    assert findings is not None
    got = {(f.rule, f.account) for f in findings}
    viewer = clinic.viewer
    assert got == {("volume", "Practitioner/doc1"), ("off-hours", "Practitioner/doc2"), ("vip", "Practitioner/doc2"),
                   ("family", "Practitioner/doc4"), ("break-glass", "Device/er-desk"), ("app-bulk", f"Device/{viewer}")}
    by_rule = {f.rule: f for f in findings}
    assert by_rule["volume"].evidence["hours"][0]["patients"] == 43  # the 40 searched and 3 of the usual
    assert by_rule["volume"].evidence["own_p95_patients_per_hour"] == 3
    assert by_rule["off-hours"].evidence["hours"][0]["hour"].endswith("T03:00:00.000Z")
    assert [p["patient"] for p in by_rule["vip"].evidence["patients"]] == ["Patient/vip1"]
    assert [p["patient"] for p in by_rule["family"].evidence["patients"]] == ["Patient/fam1"]
    assert by_rule["break-glass"].evidence["uses"] == 4
    assert by_rule["app-bulk"].evidence["hours"][0]["patients"] == 60
    assert {f.severity for f in findings} <= {"low", "medium", "high"}
    # one alert per finding, naming the rule, the evidence and a severity; the run itself is audited
    alerts = [a for a in list_alerts(clinic.svc.engine, kind="snooping") if a.detail.get("day") == clinic.day_text]
    assert sorted((a.detail["rule"], a.detail["account"]) for a in alerts) == sorted(got)
    assert all(a.detail["severity"] and a.detail["evidence"] for a in alerts)
    # the same day is not examined twice (no duplicate alerts) unless forced
    assert run_snooping(clinic.svc, clinic.day) is None


def test_a_day_that_is_not_over_or_not_rolled_up_is_refused(clinic: Clinic) -> None:
    with pytest.raises(NotReady):
        run_snooping(clinic.svc, clinic.today)
    with clinic.svc.engine.begin() as conn:  # a record of an old day that the sequencer has not seen yet
        clinic.svc.audit.append(conn, AuditRecord(interaction="read", request_id="late", network_address="x",
                                                  recorded_us=clinic.day - 5 * DAY_US, status=200, client_id="ehr",
                                                  patients=["late"], resource_type="Patient"))
    with pytest.raises(NotReady):
        run_snooping(clinic.svc, clinic.day - 2 * DAY_US)
    clinic.svc.sequencer.run_once(checkpoint=False)
    assert run_snooping(clinic.svc, clinic.day - 2 * DAY_US) == []


def test_penalties_escalate_and_lift(clinic: Clinic, tmp_path: Path) -> None:
    svc = clinic.svc
    viewer = clinic.viewer
    # the snooping run above gave the viewer app a high finding (4 points: limit) and doc1 a medium (warn)
    run_snooping(svc, clinic.day)  # a no-op after the rules test; the same findings when run alone
    listing = {(p["kind"], p["account"]): p["level"] for p in svc.penalties.listing()}
    assert listing[("client", viewer)] == "limit"
    assert listing[("user", "Practitioner/doc1")] == "warn"
    assert listing[("client", "er-desk")] == "warn"  # break-glass, medium: 2 points
    # limit: a token for the viewer's user works three times a minute, then 429 with Retry-After
    http = clinic.app.test_client()
    create_user(svc.engine, svc.keys, "viewer.user", "a long enough passphrase 9", "Practitioner/doc3")
    from fhirserver.auth.tokens import issue_token

    with svc.engine.begin() as conn:
        token, _exp = issue_token(conn, viewer, "user/*.rs", 3600, {"fhirUser": "Practitioner/doc3"})
    h = {"Authorization": f"Bearer {token}"}
    statuses = [http.get("/fhir/Patient/vip1", headers=h).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429], statuses
    limited = http.get("/fhir/Patient/vip1", headers=h)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.get_json()["issue"][0]["code"] == "throttled"
    with svc.engine.connect() as conn:
        assert conn.execute(select(access_record.c.id)).first() is not None
    # suspend: more alerts push the viewer over 8 points -- but the viewer is an app people sign in
    # to, shared by all of them (issue 29, item 5): it stays limited and an operator is asked
    run_snooping(svc, clinic.day, force=True)
    assert svc.penalties.level_of("client", viewer) == "limit"
    assert not get_client(svc.engine, viewer).disabled  # type: ignore[union-attr]
    alerts = list_alerts(svc.engine, kind="penalty", client_id=viewer)
    assert [a.detail.get("level") for a in alerts][:2] == ["limit", "limit"]
    assert "operator_needed" in alerts[0].detail
    # the operator suspends it: the client is disabled, its token revoked
    env = cli_env(svc.settings)
    out = CliRunner().invoke(main, ["client", "disable", viewer], env=env)
    assert out.exit_code == 0, out.output
    assert http.get("/fhir/Patient/vip1", headers=h).status_code == 401
    # the CLI lists penalties and lifts them; the lift is audited and the client works again
    out = CliRunner().invoke(main, ["penalties", "list", "--json"], env=env)
    assert out.exit_code == 0 and {"kind": "client", "account": viewer, "level": "limit"}.items() <= next(
        p for p in json.loads(out.stdout) if p["account"] == viewer).items()
    out = CliRunner().invoke(main, ["client", "reinstate", viewer], env=env)
    assert out.exit_code == 0 and "limit lifted" in out.stdout
    assert not get_client(svc.engine, viewer).disabled  # type: ignore[union-attr]
    # (this process sees the CLI's change within penalties.CACHE_SECONDS; the table at once)
    assert {(p["account"], p["level"]) for p in svc.penalties.listing()} >= {(viewer, "none")}
    # alerts before the reinstatement no longer count
    with svc.engine.begin() as conn:
        assert svc.penalties.assess(conn, "client", viewer) is None
    # a user: suspension disables the person's accounts, reinstate enables them
    create_user(svc.engine, svc.keys, "dr.one", "a long enough passphrase 8", "Practitioner/doc1")
    with svc.engine.begin() as conn:
        for _ in range(3):
            alerts_module.raise_alert(conn, "snooping", None, None, {"rule": "volume", "severity": "medium",
                                                                     "account": "Practitioner/doc1"})
        change = svc.penalties.assess(conn, "user", "Practitioner/doc1")
    assert change is not None and change.level == "suspend"
    assert get_user(svc.engine, "dr.one").disabled  # type: ignore[union-attr]
    out = CliRunner().invoke(main, ["user", "reinstate", "dr.one"], env=env)
    assert out.exit_code == 0, out.output
    assert not get_user(svc.engine, "dr.one").disabled  # type: ignore[union-attr]
    audit = [json.dumps(a.detail) for a in list_alerts(svc.engine, kind="penalty")]
    assert any('"lifted": "suspend"' in a and "Practitioner/doc1" in a for a in audit)


def test_a_warned_client_is_told_in_its_token_response(clinic: Clinic) -> None:
    from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
    from fhirserver.auth.clients import register_backend_client

    svc = clinic.svc
    key = generate_key("ES384")
    rec = register_backend_client(svc.engine, "abroad", "system/Patient.rs", jwks=public_jwks(key))
    http = clinic.app.test_client()

    def token() -> dict[str, Any]:
        form = token_request_form(key, rec.client_id, svc.settings.token_url, "system/Patient.rs")
        resp = http.post("/auth/token", data=form)
        assert resp.status_code == 200
        return dict(resp.get_json())

    assert "fhirserver_warning" not in token()
    with svc.engine.begin() as conn:
        alerts_module.raise_alert(conn, "cross-border", rec.client_id, "r", {"jurisdiction": "US"})
        change = svc.penalties.assess(conn, "client", rec.client_id)
    assert change is not None and change.level == "warn" and change.points == 2
    assert "privacy penalty (warn)" in token()["fhirserver_warning"]


def test_the_cli_runs_a_day(clinic: Clinic) -> None:
    env = cli_env(clinic.svc.settings)
    day = clinic.day - 3 * DAY_US
    text = day_text(day)
    out = CliRunner().invoke(main, ["audit", "snoop", "--day", text, "--json"], env=env)
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) == []
    again = CliRunner().invoke(main, ["audit", "snoop", "--day", text], env=env)
    assert again.exit_code == 1 and "examined already" in again.output


def day_text(day_us: int) -> str:
    from fhirserver.fhir.dates import instant_text

    return instant_text(day_us)[:10]
