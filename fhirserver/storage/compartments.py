"""The patients whose compartments hold stored resources (system paths such as retention name them
in their access records; a request's rows carry them from the access gate)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, FromClause, select

from ..search.sources import source_of
from .repository import Stored


def patients_of(conn: Connection, stored: Sequence[Stored]) -> list[str]:
    """The patients whose compartments hold these resources (for the audit record)."""
    by_store: dict[str, tuple[FromClause, list[int]]] = {}
    for st in stored:
        src = source_of(st.type)
        by_store.setdefault(src.store, (src.compartment, []))[1].append(st.pk)
    found: set[str] = set()
    for comp, pks in by_store.values():
        found.update(conn.execute(select(comp.c.patient_id).where(comp.c.resource_pk.in_(pks)).distinct()).scalars())
    return sorted(found)
