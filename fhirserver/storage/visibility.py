"""Row-level visibility queries over the resource and compartment tables (predicates come from
the authorize and consent stages)."""

from __future__ import annotations

from sqlalchemy import ColumnElement, Connection, select

from ..db.schema import compartment, resource


def visible(conn: Connection, pk: int, preds: list[ColumnElement[bool]]) -> bool:
    if not preds:
        return True
    return conn.execute(select(resource.c.pk).where(resource.c.pk == pk, *preds)).first() is not None


def patients_of(conn: Connection, pks: list[int]) -> list[str]:
    if not pks:
        return []
    rows = conn.execute(select(compartment.c.patient_id).where(compartment.c.resource_pk.in_(pks)).distinct()).all()
    return sorted({r[0] for r in rows})
