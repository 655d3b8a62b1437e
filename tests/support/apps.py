"""Apps on a fresh data directory without paying for migrations and key generation every time.

The first app of a test process is built for real (migrations, master key ring, data keys,
OpenID signing key, session secret) into a template directory; every later fresh SQLite data
directory starts as a copy of it (the database copied with SQLite's backup API, so the copy is
consistent), and its app is created without re-running the migrations. A data directory that
already holds data, or a PostgreSQL URL, gets the ordinary create_app.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from fhirserver.app import create_app
from fhirserver.config import Settings, load_settings

DB_FILE = "fhirserver.sqlite3"
_lock = threading.Lock()
_template: Path | None = None


def _build_template() -> Path:
    root = Path(tempfile.mkdtemp(prefix="fhirserver-template-"))
    settings = load_settings(data_dir=str(root / "live"), bulk_worker=False, audit_sequencer=False)
    app = create_app(settings)
    app.extensions["fhirserver"].engine.dispose()
    final = root / "data"
    final.mkdir()
    for item in settings.data_dir.iterdir():
        if item.is_file() and not item.name.startswith(DB_FILE):
            shutil.copy2(item, final / item.name)
    src = sqlite3.connect(settings.data_dir / DB_FILE)
    dst = sqlite3.connect(final / DB_FILE)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=WAL")
    finally:
        dst.close()
        src.close()
    return final


def template_dir() -> Path:
    global _template
    with _lock:
        if _template is None:
            _template = _build_template()
        return _template


def fresh_app(settings: Settings, **overrides: Any) -> Any:
    """create_app for `settings` (with `overrides` applied), from the template when it can."""
    if overrides:
        settings = replace(settings, **overrides)
    data = settings.data_dir
    if settings.database_url or (data.exists() and any(data.iterdir())):
        return create_app(settings)
    data.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(template_dir(), data, dirs_exist_ok=True)
    return create_app(settings, migrate=False)


def app_with_client(settings: Settings, scope: str = "system/*.cruds", name: str = "test client",
                    client_settings: dict[str, Any] | None = None) -> tuple[Any, Any, dict[str, str]]:
    """A fresh app with its own registered backend client: (app, test client, auth headers for `scope`).
    `client_settings`: the client's own settings (`consent_exempt`, `purposes`, ...)."""
    from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
    from fhirserver.auth.clients import register_backend_client

    app = fresh_app(settings)
    key = generate_key()
    rec = register_backend_client(app.extensions["fhirserver"].engine, name, scope, jwks=public_jwks(key),
                                  **({"settings": client_settings} if client_settings else {}))
    client = app.test_client()
    resp = client.post("/auth/token", data=token_request_form(key, rec.client_id, settings.token_url, scope))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return app, client, {"Authorization": f"Bearer {resp.get_json()['access_token']}"}
