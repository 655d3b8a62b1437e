"""The Flask application factory: /fhir (the pipeline), /auth (OAuth), /healthz, /livez, /readyz."""

from __future__ import annotations

import atexit
import json
import logging
import threading
from typing import Any

from authlib.oauth2 import OAuth2Error
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .admin_api import build_api
from .bulk.worker import start_worker
from .config import Settings
from .cors import AllowedOrigins
from .cors import install as install_cors
from .db.engine import make_engine, start_checkpointer
from .db.group_commit import GroupCommitEngine
from .db.migrations import upgrade
from .fhir.interaction import FHIR_BASE_PATH, is_fhir_path
from .fhir.xml_format import to_xml
from .health import db_gauges
from .health import install as install_health
from .logs import configure as configure_logs
from .metrics import install as install_metrics
from .notify.dispatcher import start_dispatcher
from .notify.signature import signer
from .notify.websocket import install as install_websocket
from .pipeline.pipeline import Pipeline
from .security_headers import install as install_security_headers
from .services import Services, build_services, current_services, warm_keys
from .smart.install import install as install_smart
from .smart.secrets_store import SIGNING_KEY_FILE, signing_key
from .smart.server import build_authorization_server
from .smart.token_audit import audit_token_request, revoke_issued
from .storage.codec import dump_json, parse_json

FHIR_JSON = "application/fhir+json; charset=utf-8"
FHIR_XML = "application/fhir+xml; charset=utf-8"
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]




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
    query = request.query_string.decode("utf-8", "replace")
    too_long = len(request.path) + len(query) > current_app.extensions["fhirserver"].settings.max_url_bytes
    result, request_id, fmt = pipeline.handle(
        method, path, "" if too_long else query, form,
        dict(request.headers), body, request.remote_addr or "", body_too_large=too_large, url_too_long=too_long,
    )
    headers = {"X-Request-Id": request_id, **result.headers}
    content_type = headers.pop("Content-Type", FHIR_JSON)
    payload = result.body
    if payload is not None and content_type == FHIR_JSON and fmt == "xml":
        xml = to_xml(payload if isinstance(payload, dict) else parse_json(payload))
        if xml is not None:  # else the JSON: the R4B model could not hold it
            payload, content_type = xml, FHIR_XML
    if isinstance(payload, dict):
        payload = dump_json(payload)
    resp = Response(payload if payload is not None else b"", status=result.status, headers=headers)
    if payload is not None:
        resp.headers["Content-Type"] = content_type
    else:
        resp.headers.pop("Content-Type", None)  # 204/304: no body, so no (default text/html) type
    return resp


def _make_auth_blueprint() -> Blueprint:
    bp = Blueprint("auth", __name__, url_prefix="/auth")

    @bp.post("/token")
    def token() -> Response:
        svc = current_services()
        server = current_app.extensions["fhirserver.oauth"]
        resp: Response
        try:
            resp = server.create_token_response()
        except OAuth2Error as err:  # raised before Authlib's own handling, e.g. insecure_transport
            resp = server.handle_error_response(None, err)
        try:
            body = resp.get_json(silent=True) or {}
            rec = audit_token_request(svc, resp.status_code, body)
        except Exception:
            logging.getLogger("fhirserver.auth").exception("could not audit a token request")
            revoke_issued(svc, body)  # fail closed: no token without its audit record
            failed = jsonify(error="server_error", error_description="audit unavailable")
            failed.status_code = 500
            return failed
        warning = svc.penalties.warning(rec.client_id, rec.user) if rec.client_id else None
        if warning:  # an account under a privacy penalty is told so with every token (docs/operations.md)
            resp.set_data(json.dumps({**body, "fhirserver_warning": warning}))
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["Pragma"] = "no-cache"
        return resp

    return bp


def create_app(settings: Settings, migrate: bool = True, svc: Services | None = None) -> Flask:
    configure_logs(settings.log_level)
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
    # The JSON-schema validators, off the request path: loaded from the machine's cache, or generated
    # (all types at once, ~3 s of CPU) and cached for the next process (fhir/schema_cache.py).
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
    if settings.subscription_dispatcher:  # rest-hook bodies signed with the key published at /auth/jwks
        start_dispatcher(svc, signer(signing_key(settings.data_dir)))
    install_websocket(app, svc)  # websocket subscriptions are served by the instance their client reaches
    if settings.audit_sequencer:
        svc.sequencer.start(settings.audit_sequence_seconds)
        atexit.register(svc.sequencer.stop)  # sequence the rest and sign a checkpoint on the way out
    if settings.privacy_jobs:
        from .schedule import PrivacyJobs

        PrivacyJobs(svc).start()
    app.extensions["fhirserver.oauth"] = build_authorization_server(app, svc.engine, settings, svc.types.names())

    app.add_url_rule("/fhir", "fhir_base", _fhir_view, methods=METHODS)
    app.add_url_rule("/fhir/", "fhir_base_slash", _fhir_view, methods=METHODS)
    app.add_url_rule("/fhir/<path:path>", "fhir", _fhir_view, methods=METHODS)
    app.register_blueprint(_make_auth_blueprint())
    api = build_api(app)
    from .admin_alerts import alerts_blp

    api.register_blueprint(alerts_blp)
    install_smart(app)
    if settings.portal:
        from .portal import install as install_portal

        install_portal(app, svc)

    @app.errorhandler(405)
    def _method_not_routed(exc: HTTPException) -> ResponseReturnValue:
        # Methods Flask does not route (TRACE, PROPFIND, ...) still get the FHIR pipeline's
        # 405 OperationOutcome and an AuditEvent.
        if is_fhir_path(request.path):
            return _fhir_view(request.path[len(FHIR_BASE_PATH) + 1:])
        return exc

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    install_health(app, svc, lambda: (settings.data_dir / SIGNING_KEY_FILE).is_file()
                   and svc.sequencer.signer.path.is_file())
    install_metrics(app, db_gauges(svc))
    install_cors(app, AllowedOrigins(svc.engine, settings.cors_origins))
    install_security_headers(app)

    return app
