"""Types whose rows belong to the client (and signed-in user) that wrote them (`ownedByClient` in
the registry; Subscription): a subscription names an endpoint and the secret header the server
sends to it, which no other client may read, change or learn exists, whatever its scopes.

The server stamps the owner on every write as a `meta.tag` in its own code system (a tag a client
sends in that system is replaced), and the authorize stage ANDs "tagged with the caller's owner
code" into every predicate on the type instead of a patient compartment, so the rule sits in the
same SELECT as every other access rule (access/gate.py).
"""

from __future__ import annotations

from typing import Any

OWNER_SYSTEM = "http://fhirserver.dev/CodeSystem/owner"


def owner_code(client_id: str, fhir_user: str | None, patient: str | None) -> str:
    """The client, and the user or patient context it acts for: one patient app used by many
    patients gives each of them their own subscriptions."""
    who = fhir_user or (f"Patient/{patient}" if patient else "")
    return f"{client_id}/{who}" if who else client_id


def stamp_owner(body: dict[str, Any], code: str) -> dict[str, Any]:
    """A copy of `body` whose only owner tag is `code`."""
    meta = dict(body.get("meta") or {})
    tags = [t for t in meta.get("tag") or [] if not (isinstance(t, dict) and t.get("system") == OWNER_SYSTEM)]
    meta["tag"] = [*tags, {"system": OWNER_SYSTEM, "code": code}]
    return {**body, "meta": meta}


def owner_query(code: str) -> str:
    """The search restriction that confines a caller to rows it owns."""
    escaped = code.replace("\\", "\\\\").replace(",", "\\,").replace("$", "\\$").replace("|", "\\|")
    return f"_tag={OWNER_SYSTEM}|{escaped}"
