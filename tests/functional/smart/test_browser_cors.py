"""A browser SMART app on another origin: the npm `fhirclient` library's browser build, served by a
second local web server, runs a standalone patient launch in headless Chromium (Debian's, driven
by Playwright through `executable_path`) against a real fhirserver, and reads the patient. The
discovery fetch, the token POST and the FHIR read are cross-origin requests: without CORS the
browser refuses them. Skipped where Chromium or node/npm is not installed
(scripts/ensure_chromium.sh installs it)."""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.functional.smart.conftest import PASSWORD, seed_live
from tests.support.npm import node_modules

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCRIPT_DIR = Path(__file__).resolve().parents[3] / "scripts" / "interop-js"
pytestmark = pytest.mark.skipif(not (CHROMIUM and shutil.which("npm")), reason="chromium or npm not installed")

LAUNCH = """<!doctype html><meta charset="utf-8"><title>launch</title>
<script src="fhir-client.js"></script>
<script>
FHIR.oauth2.authorize({iss: "%(iss)s", clientId: "%(client_id)s", redirectUri: "callback.html",
                       pkceMode: "required", scope: "openid fhirUser launch/patient patient/*.rs"});
</script>"""
CALLBACK = """<!doctype html><meta charset="utf-8"><title>callback</title>
<script src="fhir-client.js"></script>
<pre id="out"></pre>
<script>
FHIR.oauth2.ready()
  .then(client => client.request("Patient/" + client.patient.id).then(p => ({id: client.patient.id, p})))
  .then(({id, p}) => { document.getElementById("out").textContent = JSON.stringify({patient: id,
                        family: p.name[0].family}); document.title = "done"; })
  .catch(err => { document.getElementById("out").textContent = "ERROR " + err; document.title = "failed"; });
</script>"""


@pytest.fixture(scope="module")
def fhirclient_js() -> Path:
    return node_modules() / "fhirclient" / "build" / "fhir-client.js"


@pytest.fixture
def app_site(tmp_path: Path, fhirclient_js: Path) -> Iterator[tuple[str, Path]]:
    """A static web server on its own port: the app's origin. Yields (origin, its directory)."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(fhirclient_js, site / "fhir-client.js")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{port}", site
    finally:
        server.shutdown()


def test_browser_app_on_another_origin_reads_the_patient(live: tuple[str, Any], app_site: tuple[str, Path],
                                                         tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    base, app = live
    origin, site = app_site
    pid, username, client_id = seed_live(base, app, "openid fhirUser launch/patient patient/*.rs",
                                         f"{origin}/callback.html", family="BrowserCors")
    (site / "launch.html").write_text(LAUNCH % {"iss": base, "client_id": client_id})
    (site / "callback.html").write_text(CALLBACK)
    failures: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.on("console", lambda msg: failures.append(msg.text) if msg.type == "error" else None)
            page.goto(f"{origin}/launch.html")
            page.wait_for_selector("#username", timeout=30_000)  # the server's sign-in page
            page.fill("#username", username)
            page.fill("#password", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_selector("button[name=approve]", timeout=30_000)
            page.click("button[name=approve]")
            page.wait_for_function("document.title === 'done' || document.title === 'failed'", timeout=30_000)
            out = page.text_content("#out") or ""
        finally:
            browser.close()
    assert out == f'{{"patient":"{pid}","family":"BrowserCors"}}', (out, failures)
