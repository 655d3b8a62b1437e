"""User accounts for SMART App Launch: the `fhirserver user` commands and the login checks.

CLI tests run the real command in-process (click's CliRunner) against a data directory under
tmp_path; login tests call the module API on services built from the same settings, so what the
CLI stored is what the login code reads. Every login leaves exactly one AuditEvent, counted in
the audit log and decrypted to check its codes.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher
from click.testing import CliRunner

from fhirserver.cli import main
from fhirserver.cli.root import _services
from fhirserver.clock import now_us
from fhirserver.db.engine import read_connection
from fhirserver.db.schema import access_record, app_user
from fhirserver.users import (
    LoginPolicy,
    UserError,
    authenticate_user,
    create_user,
    get_user,
    link_patient,
    list_users,
    patient_links,
    reset_mfa,
    set_disabled,
    unlink_patient,
    verify_login,
)
from fhirserver.users import login as login_module
from tests.conftest import BASE, make_settings
from tests.support.audit import verify_audit

GOOD = "violet-Harbor-7-tangerine"
OTHER_GOOD = "quiet Meadow lantern 42"
DCM = "http://dicom.nema.org/resources/ontology/DCM"


# ------------------------------------------------------------------ helpers
def run(data_dir: Path, *args: str, input: str | None = None) -> tuple[int, str, str]:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("FHIRSERVER_")}
    env.update(FHIRSERVER_DATA_DIR=str(data_dir), FHIRSERVER_BASE_URL=BASE)
    result = CliRunner().invoke(main, list(args), env=env, input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def ok(data_dir: Path, *args: str, input: str | None = None) -> str:
    code, out, err = run(data_dir, *args, input=input)
    assert code == 0, f"exit {code}\nstdout: {out}\nstderr: {err}"
    return out


def refused(data_dir: Path, *args: str, input: str | None = None) -> str:
    """The command fails with a non-zero exit and a one-line error (no traceback)."""
    code, out, err = run(data_dir, *args, input=input)
    assert code != 0, out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


def add(data_dir: Path, username: str, fhir_user: str = "Practitioner/p1", password: str = GOOD,
        *extra: str) -> str:
    return ok(data_dir, "user", "add", "--username", username, "--fhir-user", fhir_user, *extra, input=password + "\n")


def otp_secret(output: str) -> str:
    uri = next(line for line in output.splitlines() if line.startswith("otpauth://"))
    return pyotp.parse_uri(uri).secret


def users_json(data_dir: Path) -> list[dict[str, Any]]:
    return json.loads(ok(data_dir, "user", "list", "--json"))


def audit_count(svc: Any) -> int:
    with read_connection(svc.engine) as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(access_record)).scalar_one()


def audit_events_after(svc: Any, seq: int) -> list[dict[str, Any]]:
    with read_connection(svc.engine) as conn:
        ids = conn.execute(sa.select(access_record.c.id).where(access_record.c.pk > seq)
                           .order_by(access_record.c.pk)).scalars().all()
        return [json.loads(svc.audit.read(conn, i).body) for i in ids]


def user_row(svc: Any, username: str) -> Any:
    with read_connection(svc.engine) as conn:
        return conn.execute(sa.select(app_user).where(app_user.c.username == username)).one()


def set_row(svc: Any, username: str, **values: Any) -> None:
    with svc.engine.begin() as conn:
        conn.execute(sa.update(app_user).where(app_user.c.username == username).values(**values))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def services(tmp_path: Path, db_url: str) -> Iterator[Any]:
    """Services on the same data directory (and database) the CLI helpers use."""
    svc = _services(make_settings(tmp_path, db_url))
    yield svc
    svc.engine.dispose()


class Login:
    """authenticate_user that also asserts: exactly one new AuditEvent, with the right codes."""

    def __init__(self, svc: Any, policy: LoginPolicy | None = None) -> None:
        self.svc, self.policy = svc, policy

    def __call__(self, username: str, password: str, totp: str | None = None, at_us: int | None = None) -> Any:
        before = audit_count(self.svc)
        result = authenticate_user(self.svc, username, password, totp, "198.51.100.7", policy=self.policy,
                                   now_us=at_us, request_id="login-test-request")
        events = audit_events_after(self.svc, before)
        assert len(events) == 1, events
        event = events[0]
        assert event["type"]["code"] == "110114" and event["type"]["system"] == DCM
        assert event["subtype"][0]["code"] == "110122" and event["subtype"][0]["display"] == "Login"
        assert event["outcome"] == ("0" if result.ok else "4"), (result, event)
        assert result.reason in event["outcomeDesc"]
        assert event["agent"][0]["network"]["address"] == "198.51.100.7"
        text = json.dumps(event)
        assert not password or password not in text
        assert not totp or totp not in event["outcomeDesc"]
        if result.fhir_user:
            assert {"reference": result.fhir_user} in [a.get("who") for a in event["agent"]]
        self.last_event = event
        return result


# ------------------------------------------------------------------ CLI
def test_cli_add_list_link_and_state_changes(data_dir: Path) -> None:
    out = add(data_dir, "Alice", "Practitioner/p1")
    assert out.strip() == "created user alice (Practitioner/p1)"
    add(data_dir, "grace", "RelatedPerson/rp-9")
    ok(data_dir, "user", "link", "grace", "--patient", "Patient/child-1", "--relationship", "guardian")
    ok(data_dir, "user", "link", "grace", "--patient", "child-2", "--relationship", "guardian")
    ok(data_dir, "user", "link", "grace", "--patient", "Patient/elder", "--relationship", "proxy")

    users = {u["username"]: u for u in users_json(data_dir)}
    assert set(users) == {"alice", "grace"}
    assert users["alice"]["fhir_user"] == "Practitioner/p1" and users["alice"]["links"] == []
    assert users["alice"]["totp"] is False and users["alice"]["disabled"] is False
    assert users["grace"]["links"] == [
        {"patient": "Patient/child-1", "relationship": "guardian"},
        {"patient": "Patient/child-2", "relationship": "guardian"},
        {"patient": "Patient/elder", "relationship": "proxy"},
    ]
    # relinking changes the relationship; unlinking removes; unlinking again is an error
    ok(data_dir, "user", "link", "grace", "--patient", "Patient/elder", "--relationship", "guardian")
    assert ok(data_dir, "user", "unlink", "grace", "--patient", "Patient/child-2").startswith("unlinked")
    assert "not linked" in refused(data_dir, "user", "unlink", "grace", "--patient", "Patient/child-2")
    grace = next(u for u in users_json(data_dir) if u["username"] == "grace")
    assert grace["links"] == [{"patient": "Patient/child-1", "relationship": "guardian"},
                              {"patient": "Patient/elder", "relationship": "guardian"}]

    assert ok(data_dir, "user", "disable", "ALICE").strip() == "disabled alice"
    assert next(u for u in users_json(data_dir) if u["username"] == "alice")["disabled"] is True
    text = ok(data_dir, "user", "list")
    assert "alice\tPractitioner/p1\tno-totp\tdisabled" in text
    assert "grace\tRelatedPerson/rp-9\tno-totp\tenabled\tPatient/child-1(guardian) Patient/elder(guardian)" in text
    assert ok(data_dir, "user", "enable", "alice").strip() == "enabled alice"
    assert next(u for u in users_json(data_dir) if u["username"] == "alice")["disabled"] is False


def test_cli_password_comes_from_stdin_only(data_dir: Path) -> None:
    code, _out, err = run(data_dir, "user", "add", "--username", "a", "--fhir-user", "Patient/1", "--password", GOOD)
    assert code == 2 and "--password" in err  # there is no such option
    assert "standard input" in refused(data_dir, "user", "add", "--username", "a", "--fhir-user", "Patient/1",
                                       input="")
    assert users_json(data_dir) == []


@pytest.mark.parametrize("password, why", [
    ("Sh0rt-pass!", "at least 12 characters"),
    ("password1234", "too weak"),
    ("qwertyuiop123", "too weak"),
    ("iloveyou12345", "too weak"),
    ("aaaaaaaaaaaaaaaa", "too weak"),
    ("123456789012", "too weak"),
    ("dorothea.gale!!", "too weak"),  # the username and some punctuation
    ("x" * 300, "at most 256"),
])
def test_cli_weak_or_common_password_is_refused(data_dir: Path, password: str, why: str) -> None:
    line = refused(data_dir, "user", "add", "--username", "dorothea.gale", "--fhir-user", "Patient/d1",
                   input=password + "\n")
    assert why in line
    assert password[:12] not in line  # the message never echoes the password
    assert users_json(data_dir) == []


def test_cli_duplicates_bad_syntax_and_unknown_users(data_dir: Path) -> None:
    add(data_dir, "alice")
    assert "already exists" in refused(data_dir, "user", "add", "--username", "alice", "--fhir-user",
                                       "Practitioner/p2", input=OTHER_GOOD + "\n")
    assert "already exists" in refused(data_dir, "user", "add", "--username", "ALICE", "--fhir-user",
                                       "Practitioner/p2", input=OTHER_GOOD + "\n")
    for bad in ("Practitioner", "Practitioner/", "Organization/o1", "Patient/a/b", "patient/1", "Patient/a b",
                "https://x.example/fhir/Patient/1"):
        assert "fhir-user must be" in refused(data_dir, "user", "add", "--username", "bob", "--fhir-user", bad,
                                              input=OTHER_GOOD + "\n")
    for bad_name in ("", "with space", "-dash", "x" * 129, "semi;colon"):
        assert "username" in refused(data_dir, "user", "add", "--username", bad_name, "--fhir-user", "Patient/1",
                                     input=OTHER_GOOD + "\n")
    for args in (("disable", "nobody"), ("enable", "nobody"), ("reset-mfa", "nobody"),
                 ("link", "nobody", "--patient", "Patient/1", "--relationship", "proxy"),
                 ("unlink", "nobody", "--patient", "Patient/1")):
        assert refused(data_dir, "user", *args) == "Error: no user nobody"
    assert "patient must be" in refused(data_dir, "user", "link", "alice", "--patient", "Observation/1",
                                        "--relationship", "proxy")
    code, _out, err = run(data_dir, "user", "link", "alice", "--patient", "Patient/1", "--relationship", "friend")
    assert code == 2 and "friend" in err
    assert [u["username"] for u in users_json(data_dir)] == ["alice"]


def test_cli_totp_uri_printed_once_and_nothing_secret_stored_or_listed(data_dir: Path, tmp_path: Path) -> None:
    out = add(data_dir, "carol", "Patient/c1", GOOD, "--totp")
    assert out.count("otpauth://") == 1
    secret = otp_secret(out)
    totp = pyotp.parse_uri(next(line for line in out.splitlines() if line.startswith("otpauth://")))
    assert totp.issuer == "fhirserver" and totp.name == "carol" and totp.interval == 30 and totp.digits == 6
    listed = ok(data_dir, "user", "list", "--json") + ok(data_dir, "user", "list")
    assert secret not in listed and "argon2" not in listed and "hash" not in listed and "secret" not in listed
    assert next(u for u in users_json(data_dir) if u["username"] == "carol")["totp"] is True

    reset = ok(data_dir, "user", "reset-mfa", "carol")
    new_secret = otp_secret(reset)
    assert new_secret != secret and reset.count("otpauth://") == 1

    svc = _services(make_settings(tmp_path))
    try:
        row = user_row(svc, "carol")
        assert row.password_hash.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
        assert row.totp_secret is not None and new_secret.encode() not in row.totp_secret
        # a real login with the new secret works, the old one does not
        now = now_us()
        assert not Login(svc)("carol", GOOD, pyotp.TOTP(secret).at(now / 1e6), at_us=now).ok
        assert Login(svc)("carol", GOOD, pyotp.TOTP(new_secret).at(now / 1e6), at_us=now).ok
    finally:
        svc.engine.dispose()

    raw = b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file())
    for needle in (GOOD, secret, new_secret):
        assert needle.encode() not in raw, needle
        assert needle.encode("utf-16-le") not in raw
    for value in (secret, new_secret):
        assert base64.b32decode(value) not in raw


# ------------------------------------------------------------------ module API
@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_login_ok_wrong_password_unknown_user(services: Any) -> None:
    record, secret = create_user(services.engine, services.keys, "dave", GOOD, "Practitioner/d1")
    assert secret is None and record.fhir_user == "Practitioner/d1" and not record.totp
    login = Login(services)

    good = login("dave", GOOD)
    assert good.ok and good.reason == "ok" and good.fhir_user == "Practitioner/d1" and good.user_id == record.id
    assert {"what": {"identifier": {"system": "urn:fhirserver:user", "value": "dave"}},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2",
                     "display": "System Object"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "11",
                     "display": "Security User Entity"}} in login.last_event["entity"]
    assert login("DAVE", GOOD).ok  # usernames are case-insensitive
    assert get_user(services.engine, "dave").last_login_us is not None

    bad = login("dave", GOOD + "x")
    assert not bad.ok and bad.reason == "bad-password"
    assert get_user(services.engine, "dave").failed_logins == 1
    assert login("dave", GOOD).ok
    assert get_user(services.engine, "dave").failed_logins == 0  # success resets the count

    unknown = login("mallory-typed-her-password-here", GOOD)
    assert not unknown.ok and unknown.reason == "unknown-user" and unknown.fhir_user is None
    assert "mallory" not in json.dumps(login.last_event)  # unknown usernames are not recorded
    assert login("not a valid name!", GOOD).reason == "unknown-user"
    assert login("", "").reason == "unknown-user"
    assert verify_audit(services).ok


def test_unknown_users_cost_one_hash_like_known_ones(services: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    create_user(services.engine, services.keys, "erin", GOOD, "Patient/e1")
    burned: list[str] = []
    real_burn = login_module.burn
    monkeypatch.setattr(login_module, "burn", lambda pw: (burned.append(pw), real_burn(pw))[1])
    verify_login(services.engine, "erin", "wrong password here")
    assert burned == []
    verify_login(services.engine, "nobody", "wrong password here")
    assert burned == ["wrong password here"]

    def timed(name: str) -> float:
        started = time.perf_counter()
        verify_login(services.engine, name, "another wrong password")
        return time.perf_counter() - started

    known = min(timed("erin") for _ in range(2))
    unknown = min(timed("nobody") for _ in range(2))
    assert unknown > 0.5 * known and known > 0.5 * unknown, (known, unknown)


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_lockout_after_five_failures_then_success_after_the_period(services: Any) -> None:
    create_user(services.engine, services.keys, "frank", GOOD, "Practitioner/f1")
    login = Login(services)
    t0 = now_us()
    for i in range(1, 5):
        r = login("frank", f"wrong password {i}!", at_us=t0 + i)
        assert r.reason == "bad-password" and r.locked_until_us is None
        assert get_user(services.engine, "frank").failed_logins == i
    fifth = login("frank", "wrong password 5!", at_us=t0 + 5)
    assert fifth.reason == "bad-password" and fifth.locked_until_us == t0 + 5 + 15 * 60 * 1_000_000
    assert "locked" in login.last_event["outcomeDesc"]
    record = get_user(services.engine, "frank")
    assert record.locked(t0 + 6) and record.locked_until_us == fifth.locked_until_us

    # locked: even the right password is refused, and refusals do not extend the lock
    r = login("frank", GOOD, at_us=t0 + 60 * 1_000_000)
    assert not r.ok and r.reason == "locked"
    r = login("frank", "wrong password 6!", at_us=t0 + 14 * 60 * 1_000_000)
    assert r.reason == "locked"
    assert get_user(services.engine, "frank").locked_until_us == fifth.locked_until_us

    # after the period the right password works and clears the lock
    assert login("frank", GOOD, at_us=fifth.locked_until_us + 1).ok
    after = get_user(services.engine, "frank")
    assert after.failed_logins == 0 and after.locked_until_us is None
    assert verify_audit(services).ok


def test_lockout_policy_from_configuration_and_admin_unlock(tmp_path: Path, data_dir: Path) -> None:
    config = tmp_path / "fhirserver.toml"
    # long enough that the CLI calls below (seconds each on a loaded machine) run inside the lock
    config.write_text("[fhirserver]\nlogin_max_failures = 2\nlogin_lockout_seconds = 4\n")
    from fhirserver.config import load_settings

    svc = _services(load_settings(config, data_dir=str(data_dir), base_url=BASE))
    try:
        assert LoginPolicy.from_settings(svc.settings) == LoginPolicy(max_failures=2, lockout_seconds=4)
        create_user(svc.engine, svc.keys, "gina", GOOD, "Patient/g1")
        login = Login(svc)
        assert login("gina", "wrong password one").locked_until_us is None
        until = login("gina", "wrong password two").locked_until_us
        assert until is not None and 0 < until - now_us() <= 4_000_000
        assert login("gina", GOOD).reason == "locked"
        assert next(u for u in users_json(data_dir) if u["username"] == "gina")["locked"] is True
        assert "gina\tPatient/g1\tno-totp\tlocked" in ok(data_dir, "user", "list")
        time.sleep(max(0.0, (until - now_us()) / 1e6) + 0.1)  # the real clock: the lock has passed
        assert login("gina", GOOD).ok

        # an administrator lifts a lock with `user enable`; a lock set directly in the DB also counts
        login("gina", "wrong password one")
        login("gina", "wrong password two")
        assert login("gina", GOOD).reason == "locked"
        ok(data_dir, "user", "enable", "gina")
        assert login("gina", GOOD).ok
        set_row(svc, "gina", locked_until_us=now_us() + 3_600_000_000)
        assert login("gina", GOOD).reason == "locked"
        set_row(svc, "gina", locked_until_us=now_us() - 1)
        assert login("gina", GOOD).ok
    finally:
        svc.engine.dispose()


def test_disabled_user_is_refused_even_with_the_right_password(services: Any) -> None:
    create_user(services.engine, services.keys, "henry", GOOD, "Practitioner/h1")
    login = Login(services)
    set_disabled(services.engine, "henry", True)
    r = login("henry", GOOD)
    assert not r.ok and r.reason == "disabled" and r.fhir_user == "Practitioner/h1"
    assert login("henry", "wrong password here").reason == "disabled"
    assert get_user(services.engine, "henry").failed_logins == 0
    set_disabled(services.engine, "henry", False)
    assert login("henry", GOOD).ok


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_totp_required_ok_wrong_replayed_and_drift(services: Any) -> None:
    record, secret = create_user(services.engine, services.keys, "iris", GOOD, "Patient/i1", totp=True)
    assert record.totp and secret
    totp = pyotp.TOTP(secret)
    login = Login(services)
    t = (now_us() // 30_000_000) * 30_000_000 + 10_000_000  # 10 s into a step
    code = totp.at(t / 1e6)

    r = login("iris", GOOD, at_us=t)
    assert not r.ok and r.reason == "totp-required"
    assert get_user(services.engine, "iris").failed_logins == 0  # being asked for the code is no failure
    assert login("iris", "wrong password here", code, at_us=t).reason == "bad-password"
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    assert login("iris", GOOD, wrong, at_us=t).reason == "bad-totp"
    assert login("iris", GOOD, "12345", at_us=t).reason == "bad-totp"
    assert get_user(services.engine, "iris").failed_logins == 3

    ok_result = login("iris", GOOD, code, at_us=t)
    assert ok_result.ok and get_user(services.engine, "iris").failed_logins == 0
    replay = login("iris", GOOD, code, at_us=t + 5_000_000)
    assert replay.reason == "bad-totp" and "already used" in replay.detail
    assert "already used" in login.last_event["outcomeDesc"]
    older = totp.at(t / 1e6 - 30)  # the previous step: within drift, but older than the one used
    assert login("iris", GOOD, older, at_us=t + 5_000_000).reason == "bad-totp"

    t2 = t + 60_000_000
    ahead = totp.at(t2 / 1e6 + 30)  # one step ahead of the server's clock: allowed drift
    assert login("iris", GOOD, ahead, at_us=t2).ok
    t3 = t2 + 120_000_000
    assert login("iris", GOOD, totp.at(t3 / 1e6 + 60), at_us=t3).reason == "bad-totp"  # two steps: too far
    assert login("iris", GOOD, totp.at(t3 / 1e6 - 60), at_us=t3).reason == "bad-totp"
    behind = totp.at(t3 / 1e6 - 30)
    assert login("iris", GOOD, f"{behind[:3]} {behind[3:]}", at_us=t3).ok  # spaces are ignored

    # a TOTP failure counts toward the lockout like a wrong password
    t4 = t3 + 300_000_000
    for i in range(5):
        last = login("iris", GOOD, "000000" if totp.at(t4 / 1e6) != "000000" else "111111", at_us=t4 + i)
    assert last.reason == "bad-totp" and last.locked_until_us is not None
    assert login("iris", GOOD, totp.at(t4 / 1e6 + 30), at_us=t4 + 30_000_000).reason == "locked"


def test_totp_secret_is_bound_to_its_user(services: Any) -> None:
    create_user(services.engine, services.keys, "jack", GOOD, "Patient/j1", totp=True)
    _rec, kim_secret = create_user(services.engine, services.keys, "kim", OTHER_GOOD, "Patient/k1", totp=True)
    kim = user_row(services, "kim")
    # an attacker with database access copies kim's sealed secret (whose code they know) onto jack
    set_row(services, "jack", totp_secret=kim.totp_secret, totp_key_id=kim.totp_key_id)
    t = now_us()
    r = Login(services)("jack", GOOD, pyotp.TOTP(kim_secret).at(t / 1e6), at_us=t)
    assert not r.ok and r.reason == "bad-totp" and "failed authentication" in r.detail


def test_reset_mfa_enables_totp_and_replaces_the_secret(services: Any) -> None:
    create_user(services.engine, services.keys, "lena", GOOD, "Practitioner/l1")
    login = Login(services)
    assert login("lena", GOOD).ok
    secret = reset_mfa(services.engine, services.keys, "lena")
    assert get_user(services.engine, "lena").totp
    t = now_us()
    assert login("lena", GOOD, at_us=t).reason == "totp-required"
    assert login("lena", GOOD, pyotp.TOTP(secret).at(t / 1e6), at_us=t).ok
    with pytest.raises(UserError):
        reset_mfa(services.engine, services.keys, "nobody")


def test_outdated_hash_parameters_are_upgraded_at_login(services: Any) -> None:
    create_user(services.engine, services.keys, "mona", GOOD, "Patient/m1")
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(GOOD)
    set_row(services, "mona", password_hash=weak)
    r = Login(services)("mona", GOOD)
    assert r.ok and "re-hashed" in r.detail
    stored = user_row(services, "mona").password_hash
    assert stored != weak and stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert Login(services)("mona", GOOD).ok


def test_login_fails_closed_when_the_audit_cannot_be_written(services: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    create_user(services.engine, services.keys, "nina", GOOD, "Patient/n1")
    before = audit_count(services)

    def broken(conn: Any, rec: Any) -> None:
        raise RuntimeError("audit store unavailable")

    monkeypatch.setattr(services.audit, "append", broken)
    with pytest.raises(RuntimeError):
        authenticate_user(services, "nina", "wrong password here", None, "127.0.0.1")
    with pytest.raises(RuntimeError):
        authenticate_user(services, "nina", GOOD, None, "127.0.0.1")
    row = user_row(services, "nina")
    assert row.failed_logins == 0 and row.last_login_us is None  # nothing committed
    assert audit_count(services) == before
    monkeypatch.undo()
    assert authenticate_user(services, "nina", GOOD, None, "127.0.0.1").ok
    assert audit_count(services) == before + 1


def test_links_through_the_module_api(services: Any) -> None:
    create_user(services.engine, services.keys, "olga", GOOD, "RelatedPerson/o1")
    create_user(services.engine, services.keys, "pat", OTHER_GOOD, "Patient/pat-1")
    link_patient(services.engine, "olga", "Patient/kid-a", "guardian")
    link_patient(services.engine, "olga", "kid-b", "guardian")
    link_patient(services.engine, "olga", "Patient/mother", "proxy")
    assert [(x.reference, x.relationship) for x in patient_links(services.engine, "olga")] == [
        ("Patient/kid-a", "guardian"), ("Patient/kid-b", "guardian"), ("Patient/mother", "proxy")]
    with pytest.raises(UserError, match="relationship"):
        link_patient(services.engine, "olga", "Patient/x", "friend")
    with pytest.raises(UserError, match="themselves"):
        link_patient(services.engine, "pat", "Patient/pat-1", "proxy")
    assert unlink_patient(services.engine, "olga", "Patient/kid-b")
    assert not unlink_patient(services.engine, "olga", "Patient/kid-b")
    assert {u.username: len(u.links) for u in list_users(services.engine)} == {"olga": 2, "pat": 0}
    with pytest.raises(UserError, match="already exists"):
        create_user(services.engine, services.keys, "OLGA", OTHER_GOOD, "Patient/x")
