"""The patient portal in a real browser (Debian's Chromium driven by Playwright) against a real
`fhirserver serve --demo`: the demo patient signs in through the server's own pages, sees her
record with a trend chart and the accesses of a demo client (also a multi-patient search, shown
as her own part only), opts in to research -- and the research client then sees her data through
the FHIR API -- withdraws with one click -- and it sees nothing again -- downloads her record
(hers and nobody else's), and signs out (the token is revoked). Security checks: the session
cookie's flags, CSRF on the forms, a CSP without inline script. Screenshots of every page are
saved into a temporary folder named in the test output."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from pypdf import PdfReader
from sqlalchemy import create_engine, select

from fhirserver.db.schema import access_token
from tests.functional.cli.test_live_server import LiveServer
from tests.support.cli import CLI
from tests.support.live import server_env
from tests.support.npm import node_modules

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="chromium not installed (scripts/ensure_chromium.sh)")
ALICE = "demo-alice"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("portal"))
    server.start()
    yield server
    server.stop()


def password(server: LiveServer, user: str) -> str:
    for line in (server.data_dir / "demo-users.txt").read_text().splitlines():
        name, _, pw = line.partition(" ")
        if name == user:
            return pw
    raise AssertionError(f"no demo user {user}")


def research_sees_alice(server: LiveServer) -> int:
    token = server.token("system/*.rs", client_id="demo-research")
    resp = requests.get(f"{server.base}/Observation", params={"subject": f"Patient/{ALICE}", "_summary": "count"},
                        headers={"Authorization": f"Bearer {token}", "Connection": "close"}, timeout=30)
    assert resp.status_code == 200, resp.text
    return int(resp.json()["total"])


def test_the_demo_patient_uses_her_rights(demo: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> None:
    from playwright.sync_api import sync_playwright

    shots = tmp_path_factory.mktemp("portal-screenshots")
    print(f"portal screenshots: {shots}")
    # a demo client reads Alice's record, and searches across patients (a multi-patient access)
    token = demo.token("system/*.rs")
    h = {"Authorization": f"Bearer {token}", "Connection": "close"}
    assert requests.get(f"{demo.base}/Patient/{ALICE}", headers=h, timeout=30).status_code == 200
    assert requests.get(f"{demo.base}/Patient?_count=50", headers=h, timeout=30).status_code == 200
    assert research_sees_alice(demo) == 0  # Alice has not opted in to research

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            context = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 900})
            page = context.new_page()
            page.goto(f"{demo.root_url}/portal/")
            page.screenshot(path=str(shots / "0-landing.png"), full_page=True)
            sign_in(page, demo.root_url, "alice", password(demo, "alice"))  # the server's own sign-in pages
            assert "Alice" in (page.text_content("#patient-name") or "")
            assert page.locator("svg.chart polyline").count() >= 1  # a trend chart of repeated vitals
            assert "Heart rate" in (page.text_content("#trends ~ figure, main") or "")
            page.screenshot(path=str(shots / "1-record.png"), full_page=True)

            # the session cookie: HttpOnly, SameSite (Secure is asserted behind TLS in the unit test)
            cookie = next(c for c in context.cookies() if c["name"] == "fhirserver_session")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"

            page.goto(f"{demo.root_url}/portal/access")
            table = page.text_content("#accesses") or ""
            assert "Demo backend service" in table  # the app's registered name, not a raw client id
            assert "demo-bob" not in page.content() and "Bob" not in table  # the search's other patients
            assert "others are not shown" in table
            page.screenshot(path=str(shots / "2-access.png"), full_page=True)

            # research: opt in, review the effect in words, save -- the research client sees her
            page.goto(f"{demo.root_url}/portal/sharing")
            page.check("#purpose-HRESCH-allow")
            page.click("#review")
            assert "Researchers (only de-identified data) will receive your data." in (page.text_content("#effects") or "")
            page.screenshot(path=str(shots / "3-review.png"), full_page=True)
            page.click("#save")
            page.wait_for_selector("#done")
            page.screenshot(path=str(shots / "4-sharing.png"), full_page=True)
            assert research_sees_alice(demo) > 0
            # withdraw: one click, effective on the research client's very next request
            page.click("#withdraw-purpose-HRESCH")
            page.wait_for_selector("#done")
            assert "Withdrawn" in (page.text_content("#done") or "")
            assert research_sees_alice(demo) == 0

            page.goto(f"{demo.root_url}/portal/download")
            page.screenshot(path=str(shots / "5-download.png"), full_page=True)
            with page.expect_download() as info:
                page.click("#download-json")
            bundle = json.loads(Path(info.value.path()).read_text())
            assert bundle["resourceType"] == "Bundle" and len(bundle["entry"]) > 5
            for entry in bundle["entry"]:
                assert_alices(entry["resource"])

            # the printable health summary, as a page and as a PDF holding her name
            page.click("#summary")
            page.wait_for_selector("#patient-name")
            assert "Alice" in (page.text_content("#patient-name") or "") and "Vital signs" in page.content()
            page.screenshot(path=str(shots / "6-summary.png"), full_page=True)
            with page.expect_download() as info:
                page.click("#summary-pdf")
            pdf = Path(info.value.path()).read_bytes()
            assert pdf.startswith(b"%PDF") and len(pdf) > 2000
            text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages)
            assert "Alice Anders" in text and "Vital signs" in text and "demo-bob" not in text

            # a crafted URL naming another patient shows nothing of theirs
            page.goto(f"{demo.root_url}/portal/record?patient=demo-bob")
            assert "Alice" in (page.text_content("#patient-name") or "")

            # CSRF: the same session without the form's token is refused; CSP has no inline script
            cookies = {c["name"]: c["value"] for c in context.cookies()}
            forged = requests.post(f"{demo.root_url}/portal/sharing/withdraw", data={"key": "purpose-TREAT"},
                                   cookies=cookies, allow_redirects=False, timeout=30)
            assert forged.status_code == 400 and "CSRF" in forged.text
            csp = requests.get(f"{demo.root_url}/portal/record", cookies=cookies, timeout=30).headers[
                "Content-Security-Policy"]
            assert "unsafe-inline" not in csp and "script-src" not in csp.replace("default-src 'none'", "")

            page.click("button:has-text('Sign out')")
            page.wait_for_selector("#sign-in")
            stale = requests.get(f"{demo.root_url}/portal/record", cookies=cookies, allow_redirects=False, timeout=30)
            assert stale.status_code == 302 and "/portal/" in stale.headers["Location"]
        finally:
            browser.close()
    engine = create_engine(f"sqlite:///{demo.data_dir / 'fhirserver.sqlite3'}")
    with engine.connect() as conn:
        revoked = conn.execute(select(access_token.c.revoked).where(access_token.c.client_id == "fhirserver-portal")).all()
    engine.dispose()
    assert revoked and all(r.revoked for r in revoked)  # signing out revoked the portal's token


def sign_in(page: Any, root: str, username: str, pw: str, patient: str | None = None) -> None:
    page.goto(f"{root}/portal/")
    page.click("#sign-in")
    page.wait_for_selector("#username", timeout=30_000)
    page.fill("#username", username)
    page.fill("#password", pw)
    page.click("button[type=submit]")
    page.wait_for_selector("button[name=approve]", timeout=30_000)
    if patient is not None:
        page.check(f"input[name=patient][value='{patient}']")
    page.click("button[name=approve]")
    page.wait_for_selector("#patient-name", timeout=30_000)


def test_a_guardian_switches_child_and_the_minor_sees_the_guardians_choice(
        demo: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> None:
    from playwright.sync_api import sync_playwright

    shots = tmp_path_factory.mktemp("portal-guardian-screenshots")
    print(f"portal guardian screenshots: {shots}")
    assert demo.cli("user", "link", "guardian-chen", "--patient", "Patient/demo-bob",
                    "--relationship", "proxy").returncode == 0
    chloe_pw = "chloe's own long passphrase 7"
    added = subprocess.run([*CLI, "user", "add", "--username", "chloe", "--fhir-user", "Patient/demo-chloe"],
                           input=chloe_pw + "\n", env=server_env(demo.root, demo.data_dir), cwd=demo.root,
                           capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_context().new_page()
            sign_in(page, demo.root_url, "guardian-chen", password(demo, "guardian-chen"), patient="demo-chloe")
            assert "Chloe" in (page.text_content("#patient-name") or "")
            options = page.locator("#patient option").all_text_contents()
            assert len(options) == 2 and any("Chloe" in o for o in options)
            page.screenshot(path=str(shots / "1-guardian-chloe.png"), full_page=True)
            page.select_option("#patient", "demo-bob")
            page.click("#switch")
            page.wait_for_selector("#patient-name")
            assert "Chloe" not in (page.text_content("#patient-name") or "")
            page.screenshot(path=str(shots / "2-guardian-switched.png"), full_page=True)
            # switch back and make a choice for the minor
            page.select_option("#patient", "demo-chloe")
            page.click("#switch")
            page.wait_for_selector("#patient-name")
            page.goto(f"{demo.root_url}/portal/sharing")
            page.check("#purpose-HPAYMT-deny")
            page.click("#review")
            page.click("#save")
            page.wait_for_selector("#done")
            page.click("button:has-text('Sign out')")
            page.wait_for_selector("#sign-in")
            # the minor's own account sees what her guardian set
            sign_in(page, demo.root_url, "chloe", chloe_pw)
            assert "Chloe" in (page.text_content("#patient-name") or "")
            assert page.locator("#patient").count() == 0  # only herself: no switcher
            page.goto(f"{demo.root_url}/portal/sharing")
            assert (page.text_content("#choice-purpose-HPAYMT .state") or "") == "not allowed"
            page.screenshot(path=str(shots / "3-minor-sharing.png"), full_page=True)
        finally:
            browser.close()


def test_the_pages_pass_an_accessibility_check(demo: LiveServer) -> None:
    """axe-core (npm, installed by the project's own package.json) finds no serious violation."""
    from playwright.sync_api import sync_playwright

    axe = node_modules() / "axe-core" / "axe.min.js"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(bypass_csp=True)  # lets the checker's script in; the pages have none
            page = context.new_page()
            page.goto(f"{demo.root_url}/portal/")
            problems = {"landing": _axe(page, axe)}
            sign_in(page, demo.root_url, "alice", password(demo, "alice"))
            for name in ("record", "access", "sharing", "corrections", "download", "summary", "security", "erasure"):
                page.goto(f"{demo.root_url}/portal/{name}")
                problems[name] = _axe(page, axe)
        finally:
            browser.close()
    assert problems == {name: [] for name in problems}, problems


def _axe(page: Any, axe: Path) -> list[str]:
    page.add_script_tag(path=str(axe))
    result = page.evaluate("async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
                           ".filter(v => v.impact === 'serious' || v.impact === 'critical')"
                           ".map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', '))")
    return list(result)


def assert_alices(resource: dict[str, Any]) -> None:
    text = json.dumps(resource)
    assert "demo-bob" not in text and "demo-dev" not in text and "demo-chloe" not in text, text[:300]
    if resource["resourceType"] == "Patient":
        assert resource["id"] == ALICE
    else:
        assert f"Patient/{ALICE}" in text


def test_two_step_sign_in_enrolment_then_sign_in_with_a_code(demo: LiveServer,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    import time

    import pyotp
    from playwright.sync_api import sync_playwright

    shots = tmp_path_factory.mktemp("portal-security-screenshots")
    print(f"portal security screenshots: {shots}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_context().new_page()
            sign_in(page, demo.root_url, "alice", password(demo, "alice"))
            page.goto(f"{demo.root_url}/portal/security")
            assert "Off" in (page.text_content("#totp-state") or "")
            page.click("#totp-start")
            assert page.locator(".qr svg").count() == 1  # the QR code, drawn by the server
            secret = (page.text_content("#totp-secret") or "").strip()
            page.screenshot(path=str(shots / "1-totp-setup.png"), full_page=True)
            page.fill("#code", "000000" if pyotp.TOTP(secret).now() != "000000" else "111111")
            page.click("#totp-confirm")
            assert "does not match" in (page.text_content("#error") or "")  # a wrong code keeps it off
            page.click("#totp-start")
            secret = (page.text_content("#totp-secret") or "").strip()
            page.fill("#code", pyotp.TOTP(secret).now())
            page.click("#totp-confirm")
            page.wait_for_selector("#done")
            assert "On" in (page.text_content("#totp-state") or "")
            assert "Patient privacy portal" in (page.text_content("#authorizations") or "")
            page.screenshot(path=str(shots / "2-security.png"), full_page=True)
            page.click("button:has-text('Sign out')")
            page.wait_for_selector("#sign-in")
            # signing in now asks for a code (the next one: the code used to enrol cannot be replayed)
            page.click("#sign-in")
            page.fill("#username", "alice")
            page.fill("#password", password(demo, "alice"))
            page.click("button[type=submit]")
            page.wait_for_selector("#totp", timeout=30_000)
            page.fill("#totp", pyotp.TOTP(secret).at(time.time() + 30))
            page.click("button[type=submit]")
            page.wait_for_selector("button[name=approve]", timeout=30_000)
            page.click("button[name=approve]")
            page.wait_for_selector("#patient-name", timeout=30_000)
            assert "Alice" in (page.text_content("#patient-name") or "")
        finally:
            browser.close()
