"""The demo SMART app of `serve --demo`: a browser launches it, signs in as a demo user with the
generated password, approves, and the app shows the token response and the patient it read."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fhirserver.app import create_app
from fhirserver.demo import load_demo
from fhirserver.smart.demo import ensure_demo_smart
from tests.conftest import make_settings
from tests.functional.smart.browser import Browser, page_of


@pytest.fixture
def demo(tmp_path: Path) -> Any:
    settings = make_settings(tmp_path)
    app = create_app(replace(settings, demo_app=True))
    svc = app.extensions["fhirserver"]
    load_demo(svc)
    passwords = ensure_demo_smart(svc)
    yield app, passwords
    svc.engine.dispose()


def _follow_launch(http: Any, path: str) -> Browser:
    resp = http.get(path)
    assert resp.status_code == 302
    location = resp.headers["Location"]
    assert "/auth/authorize?" in location and "code_challenge_method=S256" in location
    browser = Browser(http)
    browser.page = page_of(http.get(location[location.index("/auth/"):]))
    return browser


def test_demo_patient_launch_shows_own_record(demo: Any) -> None:
    app, passwords = demo
    http = app.test_client()
    browser = _follow_launch(http, "/demo-app/launch")
    page = browser.login("alice", passwords["alice"])
    assert "approve" in page.names(), page.html
    page = browser.approve()
    assert page.status == 302 and "/demo-app/callback?" in (page.location or "")
    result = http.get(page.location[page.location.index("/demo-app/"):])
    html = result.get_data(as_text=True)
    assert result.status_code == 200
    assert "&#34;patient&#34;: &#34;demo-alice&#34;" in html or '"patient": "demo-alice"' in html
    assert "Anders" in html  # the demo app read Alice's record with its token


def test_demo_passwords_are_generated_and_stable(demo: Any, tmp_path: Path) -> None:
    app, passwords = demo
    svc = app.extensions["fhirserver"]
    assert set(passwords) == {"alice", "dr-demo", "guardian-chen"}
    assert len(set(passwords.values())) == 3 and all(len(p) > 16 for p in passwords.values())
    path = svc.settings.data_dir / "demo-users.txt"
    assert path.stat().st_mode & 0o077 == 0
    assert ensure_demo_smart(svc) == passwords  # a restart keeps the same accounts


def test_demo_guardian_sees_only_the_child(demo: Any) -> None:
    app, passwords = demo
    http = app.test_client()
    browser = _follow_launch(http, "/demo-app/launch")
    page = browser.login("guardian-chen", passwords["guardian-chen"])
    assert page.options("patient") == ["demo-chloe"]
    page = browser.approve()
    result = http.get(page.location[page.location.index("/demo-app/"):]).get_data(as_text=True)
    assert "demo-chloe" in result and "Chen" in result
