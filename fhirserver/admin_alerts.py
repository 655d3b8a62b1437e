"""GET /api/admin/alerts: the privacy alert feed (flask-smorest, in the server's OpenAPI document
at /api/openapi.json). Needs a bearer token of a client registered with `--admin`; every call is
audited (AuditEvent subtype `alerts-list`)."""

from __future__ import annotations

from typing import Any

from flask import current_app, request
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from .admin_api import require_admin
from .audit.events import AuditRecord
from .clock import now_us
from .consent.alerts import KINDS, list_alerts
from .fhir.dates import parse_range

alerts_blp = Blueprint("consent-alerts", __name__, url_prefix="/api/admin/alerts",
                       description="Privacy alerts: break-the-glass, consent-exempt access, denial bursts, "
                                   "automatic client suspensions (admin clients only).")


class AlertQuery(Schema):
    kind = fields.String(validate=validate.OneOf(KINDS))
    client_id = fields.String()
    since = fields.String(metadata={"description": "FHIR instant/date: only alerts raised since then"})
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))


class AlertOut(Schema):
    id = fields.Integer(required=True)
    created = fields.String(required=True)
    kind = fields.String(required=True)
    client_id = fields.String(allow_none=True)
    request_id = fields.String(allow_none=True)
    detail = fields.Dict(required=True)


@alerts_blp.route("")
class Alerts(MethodView):
    @alerts_blp.arguments(AlertQuery, location="query")
    @alerts_blp.response(200, AlertOut(many=True))
    @alerts_blp.doc(security=[{"bearer": []}])
    def get(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        """The newest alerts first."""
        info = require_admin()
        svc = current_app.extensions["fhirserver"]
        since = None
        if args.get("since"):
            try:
                since = parse_range(args["since"])[0]
            except ValueError:
                from flask_smorest import abort

                abort(400, message="since must be a FHIR date or instant")
        alerts = list_alerts(svc.engine, args.get("kind"), args.get("client_id"), since, args["limit"])
        rec = AuditRecord(interaction="search-type", request_id=request.headers.get("X-Request-Id", "")[:64]
                          or "alerts", network_address=request.remote_addr or "", recorded_us=now_us(), status=200,
                          client_id=info.client_id, client_name=info.client_name,
                          outcome_desc=f"alert feed read: {len(alerts)} alerts")
        rec.subtype_code = ("urn:fhirserver:admin", "alerts-list", "Privacy alert feed read")
        with svc.engine.begin() as conn:
            svc.audit.append(conn, rec)
        return [a.to_json() for a in alerts]
