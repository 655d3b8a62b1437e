"""The Flask application factory: /fhir (the pipeline), /auth (OAuth), /healthz."""

from __future__ import annotations

import logging
import threading
from typing import Any

from authlib.oauth2 import OAuth2Error
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from joserfc import jws
from werkzeug.exceptions import RequestEntityTooLarge

from .admin_api import build_api
from .audit.events import AuditRecord
from .auth.tokens import token_hash
from .bulk.worker import start_worker
from .clock import now_us
from .config import Settings
from .db.engine import make_engine, read_connection, start_checkpointer
from .db.group_commit import GroupCommitEngine
from .db.migrations import upgrade
from .pipeline.pipeline import Pipeline
from .services import Services, build_services, warm_keys
from .smart.install import install as install_smart
from .smart.server import build_authorization_server
from .storage.codec import dump_json, parse_json

FHIR_JSON = "application/fhir+json; charset=utf-8"
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def services() -> Services:
    return current_app.extensions["fhirserver"]


DRAIN_FACTOR = 4  # an oversized chunked body is read and dropped up to this many times the limit


def _read_body(limit: int) -> tuple[bytes, bool]:
    """(body, too large). A body with Content-Length is refused up front by werkzeug; a chunked
    one is counted while it is read (werkzeug would silently cut it at the limit) and refused
    once past the limit. Its rest is read and dropped (up to DRAIN_FACTOR times the limit), so
    the next request on a keep-alive connection starts where it should; gunicorn discards
    whatever a client sends beyond that before it reads the next request."""
    if request.content_length is not None or "wsgi.input_terminated" not in request.environ:
        try:
            return request.get_data(cache=False), False
        except RequestEntityTooLarge:
            return b"", True
    stream = request.environ["wsgi.input"]
    chunks: list[bytes] = []
    total = 0
    while chunk := stream.read(65536):
        total += len(chunk)
        if total > limit:
            while total <= DRAIN_FACTOR * limit and (chunk := stream.read(65536)):
                total += len(chunk)
            return b"", True
        chunks.append(chunk)
    return b"".join(chunks), False


def _fhir_view(path: str = "") -> Response:
    pipeline: Pipeline = current_app.extensions["fhirserver.pipeline"]
    body, too_large = b"", False
    if request.method in ("POST", "PUT", "PATCH"):
        body, too_large = _read_body(current_app.config["MAX_CONTENT_LENGTH"])
    form = None
    if (path.endswith("/_search") or "/$" in "/" + path) and request.mimetype == "application/x-www-form-urlencoded" and not too_large:
        from urllib.parse import parse_qsl

        form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        body = b""
    # HEAD is GET without a body (werkzeug drops the body); it is audited as the GET it is.
    method = "GET" if request.method == "HEAD" else request.method
    result, request_id = pipeline.handle(
        method, path, request.query_string.decode("utf-8", "replace"), form,
        dict(request.headers), body, request.remote_addr or "", body_too_large=too_large,
    )
    headers = {"X-Request-Id": request_id, **result.headers}
    content_type = headers.pop("Content-Type", FHIR_JSON)
    payload = result.body
    if isinstance(payload, dict):
        payload = dump_json(payload)
    resp = Response(payload if payload is not None else b"", status=result.status, headers=headers)
    if payload is not None:
        resp.headers["Content-Type"] = content_type
    else:
        resp.headers.pop("Content-Type", None)  # 204/304: no body, so no (default text/html) type
    return resp


def _audit_token_request(svc: Services, status: int, body: dict[str, Any]) -> None:
    """Record every token request (issued or refused) as an AuditEvent (DICOM 110114)."""
    rec = AuditRecord(interaction="login", request_id=request.headers.get("X-Request-Id", "")[:64] or "token",
                      network_address=request.remote_addr or "", recorded_us=now_us(), status=status)
    rec.type_code = ("http://dicom.nema.org/resources/ontology/DCM", "110114", "User Authentication")
    rec.subtype_code = ("http://dicom.nema.org/resources/ontology/DCM", "110122", "Login")
    token = body.get("access_token")
    if token:
        from sqlalchemy import select

        from .db.schema import access_token, client

        with read_connection(svc.engine) as conn:
            row = conn.execute(select(client.c.client_id, client.c.name).join(
                access_token, access_token.c.client_id == client.c.client_id)
                .where(access_token.c.token_hash == token_hash(token))).first()
            ctx = conn.execute(select(access_token.c.context).where(
                access_token.c.token_hash == token_hash(token))).scalar()
        if row:
            rec.client_id, rec.client_name = row.client_id, row.name
        if ctx:
            rec.user = parse_json(ctx.encode()).get("fhirUser")
        grant = request.form.get("grant_type", "")
        rec.outcome_desc = f"token issued ({grant}); scope: {body.get('scope', '')}"
    else:
        claimed = request.form.get("client_id") or (request.authorization.username if request.authorization else None)
        assertion = request.form.get("client_assertion")
        if assertion:
            try:
                claimed = parse_json(jws.extract_compact(assertion.encode()).payload).get("sub")
            except Exception:  # noqa: BLE001 - anything unparsable is simply "unknown"
                claimed = None
        rec.outcome_desc = f"token refused: {body.get('error', 'error')}" + (
            f" (claimed client {str(claimed)[:64]})" if claimed else "")
    with svc.engine.begin() as conn:
        svc.audit.append(conn, rec)


def _revoke_issued(svc: Services, body: dict[str, Any]) -> None:
    from sqlalchemy import update

    from .db.schema import access_token, refresh_token

    hashes = {k: token_hash(body[k]) for k in ("access_token", "refresh_token") if isinstance(body.get(k), str)}
    if not hashes:
        return
    try:
        with svc.engine.begin() as conn:
            if "access_token" in hashes:
                conn.execute(update(access_token).where(access_token.c.token_hash == hashes["access_token"])
                             .values(revoked=True))
            if "refresh_token" in hashes:
                conn.execute(update(refresh_token).where(refresh_token.c.token_hash == hashes["refresh_token"])
                             .values(revoked=True))
    except Exception:
        logging.getLogger("fhirserver.auth").exception("could not revoke a token whose issuance was not audited")


def _make_auth_blueprint() -> Blueprint:
    bp = Blueprint("auth", __name__, url_prefix="/auth")

    @bp.post("/token")
    def token() -> Response:
        svc = services()
        server = current_app.extensions["fhirserver.oauth"]
        try:
            resp = server.create_token_response()
        except OAuth2Error as err:  # raised before Authlib's own handling, e.g. insecure_transport
            resp = server.handle_error_response(None, err)
        try:
            body = resp.get_json(silent=True) or {}
            _audit_token_request(svc, resp.status_code, body)
        except Exception:
            logging.getLogger("fhirserver.auth").exception("could not audit a token request")
            _revoke_issued(svc, body)  # fail closed: no token without its audit record
            failed = jsonify(error="server_error", error_description="audit unavailable")
            failed.status_code = 500
            return failed
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["Pragma"] = "no-cache"
        return resp

    return bp


def create_app(settings: Settings, migrate: bool = True, svc: Services | None = None) -> Flask:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if migrate:
        upgrade(settings.effective_database_url)
    if svc is None:
        engine: Any = make_engine(settings.effective_database_url, background_checkpoint=True)
        if settings.group_commit:
            engine = GroupCommitEngine(engine)
        svc = build_services(settings, engine)
    start_checkpointer(svc.engine)
    warm_keys(svc)
    # Compile the JSON-schema validators off the request path (about 1.5 s in total).
    writable = [t.name for t in svc.types if not t.server_written]
    threading.Thread(target=svc.validator.warm, args=(writable,), daemon=True, name="schema-warmup").start()
    app = Flask("fhirserver")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    hops = settings.proxy_hops
    if hops:  # behind TLS-terminating proxies: request URLs (OAuth checks them) use the forwarded scheme/host
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)  # type: ignore[method-assign]
    app.extensions["fhirserver"] = svc
    app.extensions["fhirserver.pipeline"] = Pipeline(svc)
    if settings.bulk_worker:
        start_worker(svc)
    app.extensions["fhirserver.oauth"] = build_authorization_server(app, svc.engine, settings, svc.types.names())

    app.add_url_rule("/fhir", "fhir_base", _fhir_view, methods=METHODS)
    app.add_url_rule("/fhir/", "fhir_base_slash", _fhir_view, methods=METHODS)
    app.add_url_rule("/fhir/<path:path>", "fhir", _fhir_view, methods=METHODS)
    app.register_blueprint(_make_auth_blueprint())
    api = build_api(app)
    from .admin_alerts import alerts_blp

    api.register_blueprint(alerts_blp)
    install_smart(app)

    @app.errorhandler(405)
    def _method_not_routed(exc: Exception) -> Any:
        # Methods Flask does not route (TRACE, PROPFIND, ...) still get the FHIR pipeline's
        # 405 OperationOutcome and an AuditEvent.
        if request.path == "/fhir" or request.path.startswith("/fhir/"):
            return _fhir_view(request.path[len("/fhir/"):] if request.path.startswith("/fhir/") else "")
        return exc

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    return app
