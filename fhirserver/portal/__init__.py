"""The patient privacy portal at /portal/ (issue 16; docs/portal.md): a SMART app of this server
-- a public client with PKCE that signs the user in through /auth/authorize and then uses only the
FHIR API with the user's token -- where patients see their record and who accessed it, make and
withdraw their sharing choices, and download their data.

Owns: its pages, templates and static files. May import: anything below the pipeline, and calls
the server's own HTTP endpoints (in process) for everything that touches data.
"""

from __future__ import annotations

from flask import Flask

from ..services import Services
from .api import CLIENT_ID, ensure_client
from .views import make_portal_blueprint


def install(app: Flask, svc: Services) -> None:
    """Serve /portal/ (when `portal` is on, and in demo mode) and register its client."""
    ensure_client(svc)
    app.register_blueprint(make_portal_blueprint())


__all__ = ["CLIENT_ID", "ensure_client", "install"]
