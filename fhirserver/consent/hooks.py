"""The consent stage's contract with the request pipeline (docs/architecture.md).

The pipeline calls every method at a fixed point of every request; `NoConsentFiltering` is the
no-op base (tests and consent-free deployments subclass it), `consent.stage.ConsentStage` the
real one (docs/consent.md):

- `begin(ctx)`: at the start of authorize -- purpose of use, break-the-glass, exemption (may
  raise a 403 FhirError before any data is read); returns the request's decision (or None), which
  the pipeline attaches to a request-scoped copy of the principal -- the stage changes nothing;
- `predicates(principal, type, interaction, table)`: SQL predicates over `table` (the resource
  table or an alias) ANDed into every read and search, so hidden rows never count toward totals,
  pages, includes, chains or `_has`;
- `transfer_rule(principal)`: the cross-border rule's predicate (a function of the table) and the
  403 text of a row it hides, when the rule applies to this caller; the access gate evaluates it
  with the row (access/gate.py);
- `export_decision(principal, deidentified)`: the decision an export job applies when it runs;
- `check_write(ctx)`: after a write was prepared (e.g. 422 for a minor's Consent without a guardian);
- `annotate(ctx, conn)`: after a reading handler ran, before its audit record is built;
- `finish(ctx, conn)`: inside the audit transaction, also for failed requests (alerts).

`ctx` is the pipeline's RequestContext, seen through StageContext: the pipeline sits above this
package (dependencies run one way), so the stage names only what it reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from sqlalchemy import ColumnElement, Connection, FromClause

from ..audit.capture import AuditCapture
from ..audit.events import AuditRecord
from ..auth.principal import Decision, Principal
from ..fhir.interaction import Interaction
from ..storage.repository import PreparedWrite


class StageContext(Protocol):
    """What the consent stage reads of a request (pipeline.context.RequestContext satisfies it);
    the stage's own services (engine, repository, audit log) are its constructor's."""

    headers: dict[str, str]
    record: AuditRecord
    capture: AuditCapture  # what the handler touched; the stage reports its entities here
    write: PreparedWrite | None  # the resource a create or update will store
    principal: Principal | None
    interaction: Interaction

    def reading(self) -> Connection:
        """The request's read transaction (authentication, consent state and a read's data)."""
        ...


class ConsentHook(Protocol):
    def begin(self, ctx: StageContext) -> Decision | None: ...

    def predicates(self, principal: Principal, resource_type: str, interaction: str,
                   res: FromClause) -> list[ColumnElement[bool]]: ...

    def transfer_rule(self, principal: Principal) -> tuple[Callable[[FromClause], ColumnElement[bool]] | None, str]: ...

    def export_decision(self, principal: Principal, deidentified: bool) -> Decision | None: ...

    def check_write(self, ctx: StageContext) -> None: ...

    def annotate(self, ctx: StageContext, conn: Connection) -> None: ...

    def finish(self, ctx: StageContext, conn: Connection) -> None: ...


class NoConsentFiltering:
    """Every stage a no-op: nothing is hidden, nothing is recorded beyond the audit record."""

    def begin(self, ctx: StageContext) -> Decision | None:
        return None

    def predicates(self, principal: Principal, resource_type: str, interaction: str,
                   res: FromClause) -> list[ColumnElement[bool]]:
        return []

    def transfer_rule(self, principal: Principal) -> tuple[Callable[[FromClause], ColumnElement[bool]] | None, str]:
        return None, ""

    def export_decision(self, principal: Principal, deidentified: bool) -> Decision | None:
        return None

    def check_write(self, ctx: StageContext) -> None:
        return None

    def annotate(self, ctx: StageContext, conn: Connection) -> None:
        return None

    def finish(self, ctx: StageContext, conn: Connection) -> None:
        return None
