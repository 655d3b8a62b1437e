"""Row-level visibility queries over each type's rows and compartment (predicates come from the
authorize and consent stages; search/sources.py says where a type's rows live)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import ColumnElement, Connection, FromClause, and_, or_, select

from ..db.schema import compartment, resource
from ..search.sources import source_of
from .repository import Stored


def visible(conn: Connection, pk: int, preds: list[ColumnElement[bool]], rtype: str | None = None) -> bool:
    """Does row `pk` (of `rtype`'s table; `resource` by default) pass the predicates?"""
    if not preds:
        return True
    res = source_of(rtype).res if rtype else resource
    return conn.execute(select(res.c.pk).where(res.c.pk == pk, *preds)).first() is not None


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


def in_compartment(pid: str, res: FromClause = resource) -> ColumnElement[bool]:
    """The Patient itself or any resource in its compartment."""
    comp = compartment.alias()
    return or_(and_(res.c.type == "Patient", res.c.id == pid),
               res.c.pk.in_(select(comp.c.resource_pk).where(comp.c.patient_id == pid)))


def id_of(conn: Connection, pk: int) -> str:
    """The logical id of the resource row `pk`."""
    return str(conn.execute(select(resource.c.id).where(resource.c.pk == pk)).scalar_one())


def compartments_of(conn: Connection, refs: Sequence[str]) -> dict[str, set[str]]:
    """`Type/id` -> the patient ids whose compartments hold that (current) resource."""
    pairs = {tuple(r.split("/", 1)) for r in refs if "/" in r}
    if not pairs:
        return {}
    cond = or_(*[and_(resource.c.type == t, resource.c.id == i) for t, i in pairs])
    out: dict[str, set[str]] = {}
    for rtype, rid, pid in conn.execute(select(resource.c.type, resource.c.id, compartment.c.patient_id)
                                        .join(compartment, compartment.c.resource_pk == resource.c.pk)
                                        .where(cond)).all():
        out.setdefault(f"{rtype}/{rid}", set()).add(pid)
    return out
