"""The handler contract: every FHIR interaction and operation is one Handler in the route table
(routes.py).

A handler has `prepare(ctx)` (outside the transaction: parse and validate the body, assign ids,
index, fetch data keys) and `execute(ctx, conn)` (inside the request's transaction, which also
writes the AuditEvent). Handlers never check scopes or write audit records themselves: they
declare what they need (`needs`, `role`), the authorize and consent stages grant it as
`ctx.access` predicates (access.Access) or refuse with a 403, and handlers fill `ctx.record` for
the audit stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sqlalchemy import Connection

from .context import RequestContext, Result


@dataclass(frozen=True)
class Need:
    """One access a handler needs on the request's resource type: the scope interaction checked
    (`read`, `search-type`, `delete`, ...) and the `Access` field its predicates fill; without a
    required one, the request is refused (403) before the handler runs."""

    field: str
    scope: str
    required: bool = True


# ---------------------------------------------------------------- handlers
class Handler:
    # what the authorize stage grants before prepare(); None: the interaction kind's defaults
    # (pipeline.ACCESS_NEEDS)
    needs: ClassVar[tuple[Need, ...] | None] = None
    # a role the caller's client must hold (checked with the scopes): "admin-backend" is an
    # administrator's backend client acting without a user or patient context
    role: ClassVar[str | None] = None

    def prepare(self, ctx: RequestContext) -> None:
        return None

    reads_only = False

    def read_only(self, ctx: RequestContext) -> bool:
        """True when execute() only reads: it then runs without the write lock, and only the
        AuditEvent append takes it (briefly)."""
        return self.reads_only

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        raise NotImplementedError
