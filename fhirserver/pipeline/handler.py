"""The handler contract: every FHIR interaction and operation is one Handler in the route table
(routes.py).

A handler has `prepare(ctx)` (outside the transaction: parse and validate the body, assign ids,
index, fetch data keys) and `execute(ctx, conn)` (inside the request's transaction, which also
writes the AuditEvent). Handlers never check scopes or write audit records themselves: they use
`ctx.access` predicates (context.Access) computed by the authorize and consent stages, and fill
`ctx.record` for the audit stage.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from .context import RequestContext, Result


# ---------------------------------------------------------------- handlers
class Handler:
    def prepare(self, ctx: RequestContext) -> None:
        return None

    reads_only = False

    def read_only(self, ctx: RequestContext) -> bool:
        """True when execute() only reads: it then runs without the write lock, and only the
        AuditEvent append takes it (briefly)."""
        return self.reads_only

    def expected_audit(self, ctx: RequestContext) -> dict[str, Any] | None:
        """The audit fields execute() will most likely set (None: unknown). The pipeline builds
        and encrypts that AuditEvent before taking the write lock, and uses it if it matched."""
        return None

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        raise NotImplementedError
