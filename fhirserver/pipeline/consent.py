"""The consent stage of the pipeline.

It returns extra SQL predicates over the `resource` table that are ANDed into every read and
search the request performs, so hidden resources never count toward totals or pages. The
services' default is the consent engine (`fhirserver/consent/`, see docs/consent.md); a hook
with only `predicates` (as tests inject) works too: the other stage methods are optional and the
pipeline calls them only when present:

- `begin(ctx)`: at the start of authorize (purpose of use; may raise a 403 FhirError),
- `check_write(ctx)`: after the handler's prepare (may raise, e.g. 422 for a minor's Consent),
- `annotate(ctx, conn)`: after a handler ran, before its AuditEvent is built,
- `finish(ctx, conn)`: inside the audit transaction (alerts), also for failed requests.
"""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy import ColumnElement, FromClause


class ConsentHook(Protocol):
    def predicates(self, principal: Any, resource_type: str, interaction: str,
                   res: FromClause) -> list[ColumnElement[bool]]:
        """Predicates over `res` (the resource table or an alias of it) that hide denied rows."""
        ...


class NoConsentFiltering:
    def predicates(self, principal: Any, resource_type: str, interaction: str,
                   res: FromClause) -> list[ColumnElement[bool]]:
        return []
