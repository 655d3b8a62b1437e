"""Token-endpoint helpers: client-credentials forms, posting them, and what a refusal must look like."""

from __future__ import annotations

from typing import Any

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SCOPE = "system/*.cruds"
# RFC 6749 section 5.2: a failed client authentication is `invalid_client`.
OAUTH_CLIENT_ERRORS = {"invalid_client"}



def form(assertion: str | None, scope: str = SCOPE, **extra: str) -> dict[str, str]:
    data = {"grant_type": "client_credentials", "scope": scope, "client_assertion_type": ASSERTION_TYPE}
    if assertion is not None:
        data["client_assertion"] = assertion
    data.update(extra)
    return data


def post_token(http: Any, data: dict[str, str]) -> Any:
    return http.post("/auth/token", data=data)


def assert_refused(resp: Any, errors: set[str] = OAUTH_CLIENT_ERRORS) -> dict[str, Any]:
    """A refused token request: 400/401, an OAuth error JSON, and no token anywhere."""
    assert resp.status_code in (400, 401), resp.get_data(as_text=True)
    body = resp.get_json()
    assert isinstance(body, dict), resp.get_data(as_text=True)
    assert body.get("error") in errors, body
    assert "access_token" not in body
    assert resp.headers.get("Cache-Control") == "no-store"
    return body
