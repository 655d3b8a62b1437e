"""Provenance written with a resource (issue 14), in the same transaction:

- **`X-Provenance`** (FHIR R4 http.html#provenance): a client sends a Provenance as JSON in this
  header on a create, update or patch; the server stores it with `target` set to the version it
  wrote. It needs a scope to create Provenance (else 403) and is validated like any Provenance; a
  `target` the client set must name the resource being written.
- **Patient amendments**: when a patient or their representative changes a clinical record, the
  server writes a Provenance (activity UPDATE, the user as author, the prior version as the
  `revision` entity) next to the `patient-amended` tag, so corrections are traceable the standard way.

Either Provenance joins the compartments of the resource it is about, so the patient's consents,
erasure and export cover it like the resource itself.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection

from ..clock import now_us
from ..fhir.dates import instant_text
from ..fhir.errors import FhirError
from ..storage.repository import Stored
from .context import RequestContext

HEADER = "x-provenance"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"


def wanted(ctx: RequestContext) -> bool:
    return bool((ctx.header(HEADER) or "").strip())


def prepare_provenance(ctx: RequestContext, amended: bool) -> None:
    """Prepare (outside the transaction) the Provenance records of the write in `ctx.write`."""
    p = ctx.write
    assert p is not None
    own = f"{p.type}/{p.id}"
    bodies: list[dict[str, Any]] = []
    text = (ctx.header(HEADER) or "").strip()
    if text:
        try:
            body = json.loads(text)
        except ValueError:
            raise FhirError(400, "structure", "X-Provenance is not valid JSON") from None
        if not isinstance(body, dict) or body.get("resourceType") != "Provenance":
            raise FhirError(400, "invalid", "X-Provenance must hold a Provenance resource")
        for target in body.get("target") or []:
            ref = str((target or {}).get("reference", "")) if isinstance(target, dict) else ""
            if ref.split("/_history")[0] != own:
                raise FhirError(400, "invalid", f"X-Provenance target '{ref[:80]}' is not the resource written ({own})",
                                ["Provenance.target"])
        body.pop("id", None)
        bodies.append({**body, "target": [{"reference": own}]})
    if amended and ctx.principal is not None and ctx.principal.fhir_user:
        bodies.append({
            "resourceType": "Provenance", "target": [{"reference": own}], "recorded": instant_text(now_us()),
            "activity": {"coding": [{"system": DATA_OPERATION, "code": "UPDATE", "display": "revise"}]},
            "reason": [{"text": "Amended by the patient or their representative"}],
            "entity": [{"role": "revision", "what": {"reference": own}}],
            "agent": [{"type": {"coding": [{"system": PARTICIPANT, "code": "author"}]},
                       "who": {"reference": ctx.principal.fhir_user}},
                      {"type": {"coding": [{"system": PARTICIPANT, "code": "assembler"}]},
                       "who": {"reference": f"Device/{ctx.principal.client_id}"}}],
        })
    for body in bodies:
        ctx.services.validator.validate(body, "Provenance")
        ctx.provenance.append(ctx.services.repo.prepare("Provenance", body, also_patients=p.index.patients))


def write_provenance(ctx: RequestContext, conn: Connection, stored: Stored, previous: int | None) -> None:
    """Store the prepared Provenance records, pointing at the version just written."""
    client_sent = wanted(ctx)
    for i, prepared in enumerate(ctx.provenance):
        prepared.body["target"] = [{"reference": f"{stored.type}/{stored.id}/_history/{stored.version}"}]
        amendment = not (client_sent and i == 0)
        if amendment:  # the revision entity is the prior version (none: the amendment created it)
            entity = [{"role": "revision", "what": {"reference": f"{stored.type}/{stored.id}/_history/{previous}"}}]
            prepared.body["entity"] = entity if previous is not None else []
            if not prepared.body["entity"]:
                del prepared.body["entity"]
        written = ctx.services.repo.create(conn, prepared, fresh_id=True)
        if not amendment and not ctx.gate.holds(conn, written.pk, ctx.access.provenance):
            raise FhirError(403, "forbidden", "The access token does not permit creating this Provenance")
        ctx.capture.also_wrote(written)
