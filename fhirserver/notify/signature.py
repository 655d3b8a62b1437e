"""The signature on every rest-hook notification: a detached JWS (RFC 7515 Appendix F, RS256)
over the exact body, made with the server's published signing key (the id_token key, public half at
`/auth/jwks`, advertised in smart-configuration as `jwks_uri`). A receiver checks that a
notification comes from this server and was not altered with no secret shared in advance; joserfc
makes and checks it (no hand-rolled JOSE). Header: `X-Fhirserver-Signature`.
"""

from __future__ import annotations

from collections.abc import Callable

from joserfc import jws
from joserfc.jwk import RSAKey

HEADER = "X-Fhirserver-Signature"
Signer = Callable[[bytes], str]


def signer(key: RSAKey) -> Signer:
    protected = {"alg": "RS256", "kid": key.kid}

    def sign(body: bytes) -> str:
        signed: str = jws.detach_content(jws.serialize_compact(protected, body, key))  # header..signature
        return signed

    return sign
