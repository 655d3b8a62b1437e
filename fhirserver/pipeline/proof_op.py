"""AuditEvent/[id]/$proof: the inclusion proof of one access record in a signed checkpoint, for
whoever may read that AuditEvent (an auditor; a patient for the events about them alone).

A record not yet in a checkpoint is sequenced and a checkpoint signed first (what the server
does every audit_checkpoint_seconds anyway). The record's content (the JSON its hash covers) is
included only for an auditor who sees audit query values, since it holds them in clear; anyone
else checks the leaf from the id, time and content hash. docs/audit.md shows the check.
"""

from __future__ import annotations

import base64
from typing import Any

from sqlalchemy import Connection

from ..audit.proof import covering_checkpoint, prove, sequenced
from ..db import guard
from ..db.engine import read_connection
from ..fhir.errors import FhirError
from .context import RequestContext, Result
from .handler import Handler


def _param(name: str, value: object, kind: str = "valueString") -> dict[str, Any]:
    return {"name": name, kind: value}


class Proof(Handler):
    reads_only = True

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        it = ctx.interaction
        svc = ctx.services
        stored = ctx.gate.record(conn, it.id or "", ctx.access.search)
        ctx.capture.touched(stored)
        seq = sequenced(conn, stored.id)
        if seq is None or covering_checkpoint(conn, seq) is None:
            done = svc.sequencer.run_once(force_checkpoint=True)
            if done is None:
                raise FhirError(503, "transient", "The audit log is being sequenced by another instance; retry",
                                headers={"Retry-After": "1"})
        with read_connection(svc.engine) as fresh, guard.system_path("$proof"):  # the record the gate let through
            proof = prove(fresh, stored.id)
            raw = svc.audit.read_content(fresh, stored.id) if ctx.principal and ctx.principal.sees_audit_values else None
        if proof is None:
            raise FhirError(503, "transient", "The record is not in a signed checkpoint yet; retry",
                            headers={"Retry-After": "1"})
        cp = proof.checkpoint
        params = [
            _param("record", stored.id), _param("recordedUs", str(proof.recorded_us)),
            _param("contentSha256", proof.content_hash), _param("leafContent", proof.leaf_content),
            _param("leafHash", proof.leaf_hash), _param("leafIndex", str(proof.leaf_index)),
            _param("treeSize", str(cp.tree_size)), *[_param("auditPath", h) for h in proof.path],
            _param("root", cp.root), _param("checkpointTimeUs", str(cp.time_us)),
            _param("checkpointKeyId", cp.key_id), _param("checkpointSignature", cp.signature),
            _param("publicKey", svc.sequencer.signer.public_pem()),
            _param("redacted", proof.redacted, "valueBoolean"),
        ]
        if raw is not None and not proof.redacted:
            params.append(_param("content", base64.b64encode(raw).decode(), "valueBase64Binary"))
        return Result(200, {"resourceType": "Parameters", "parameter": params})
