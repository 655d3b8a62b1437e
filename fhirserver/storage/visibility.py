"""Row-level visibility queries over the resource and compartment tables (predicates come from
the authorize and consent stages)."""

from __future__ import annotations

from sqlalchemy import ColumnElement, Connection, FromClause, and_, or_, select

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


def in_compartment(pid: str, res: FromClause = resource) -> ColumnElement[bool]:
    """The Patient itself or any resource in its compartment."""
    comp = compartment.alias()
    return or_(and_(res.c.type == "Patient", res.c.id == pid),
               res.c.pk.in_(select(comp.c.resource_pk).where(comp.c.patient_id == pid)))


def id_of(conn: Connection, pk: int) -> str:
    """The logical id of the resource row `pk`."""
    return str(conn.execute(select(resource.c.id).where(resource.c.pk == pk)).scalar_one())
