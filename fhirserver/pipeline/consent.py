"""The consent stage of the pipeline.

It returns extra SQL predicates over the `resource` table that are ANDed into every read and
search the request performs, so hidden resources never count toward totals or pages. The default
hook filters nothing; the consent engine replaces it.
"""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy import ColumnElement


class ConsentHook(Protocol):
    def predicates(self, principal: Any, resource_type: str, interaction: str) -> list[ColumnElement[bool]]:
        ...


class NoConsentFiltering:
    def predicates(self, principal: Any, resource_type: str, interaction: str) -> list[ColumnElement[bool]]:
        return []
