"""/auth/jwks: the public half of the OpenID signing key in the data directory, and only that.
The imported key is kept between requests (importing checks the RSA key: ~40 ms of CPU each
time); a replaced key file is the published key from the next request on."""

from __future__ import annotations

import json
from typing import Any

from joserfc.jwk import RSAKey

from fhirserver.config import Settings
from fhirserver.smart.secrets_store import SIGNING_KEY_FILE

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi"}


def _published(http: Any) -> dict[str, Any]:
    resp = http.get("/auth/jwks")
    assert resp.status_code == 200
    keys = resp.get_json()["keys"]
    assert len(keys) == 1
    assert not PRIVATE_MEMBERS & set(keys[0])  # never the private half
    return dict(keys[0])


def test_jwks_publishes_the_key_file_and_follows_its_replacement(http: Any, settings: Settings) -> None:
    path = settings.data_dir / SIGNING_KEY_FILE
    stored = json.loads(path.read_text())
    first = _published(http)
    assert first["kid"] == stored["kid"] and first["n"] == stored["n"]
    assert _published(http) == first  # the same key on the next request

    new = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"}, private=True)
    new.ensure_kid()
    path.write_text(json.dumps(new.as_dict(private=True)))
    replaced = _published(http)
    assert replaced["kid"] == new.kid != first["kid"]
    assert replaced["n"] == new.as_dict(private=False)["n"]
