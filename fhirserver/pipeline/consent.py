"""The consent stage of the pipeline.

It returns extra SQL predicates over the `resource` table that are ANDed into every read and
search the request performs, so hidden resources never count toward totals or pages. The default
hook filters nothing; the consent engine replaces it.
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
