"""The SQL the access gate runs: each statement carries the caller's predicates and returns, with
every row, the patients whose compartments hold it (what the row's access record must name)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    FromClause,
    Select,
    and_,
    bindparam,
    case,
    func,
    literal,
    literal_column,
    or_,
    select,
)

from ..db.schema import compartment, resource, resource_version

Predicates = Sequence[ColumnElement[bool]]
VERSION_COLUMNS = ("version", "last_updated_us", "deleted", "method", "key_id", "body")


def flag(preds: Predicates) -> ColumnElement[Any]:
    """1 where every predicate holds for the row, else 0 (1 when there are none)."""
    return case((and_(*preds), 1), else_=0) if preds else literal(1)


def patient_list(dialect: str, comp: FromClause, pk: ColumnElement[Any]) -> ColumnElement[Any]:
    """The comma-separated patient ids of `comp` rows for `pk` (ids never hold a comma)."""
    agg = func.group_concat(comp.c.patient_id) if dialect == "sqlite" else \
        func.string_agg(comp.c.patient_id, literal_column("','"))
    return select(agg).where(comp.c.resource_pk == pk).correlate_except(comp).scalar_subquery()


def split_patients(text: str | None) -> tuple[str, ...]:
    return tuple(sorted(set(text.split(",")))) if text else ()


def read_row(dialect: str, preds: Predicates, transfer: ColumnElement[bool] | None, versioned: bool) -> Select[Any]:
    """One resource by type and id (`:t`, `:id`; `:v` when `versioned`), the current or given
    version joined, with `shown` (the predicates hold for the row), `transfer_ok` (the
    cross-border rule lets it through) and `patients`. The part that does not depend on the
    caller is built once per dialect and version flag; the caller's flags are added to it."""
    return _read_base(dialect, versioned).add_columns(
        flag(preds).label("shown"), flag([transfer] if transfer is not None else []).label("transfer_ok"))


@functools.cache
def _read_base(dialect: str, versioned: bool) -> Select[Any]:
    version = bindparam("v") if versioned else resource.c.version
    joined = resource.outerjoin(resource_version, and_(resource_version.c.resource_pk == resource.c.pk,
                                                       resource_version.c.version == version))
    return (select(resource.c.pk, resource.c.version.label("current"), resource.c.deleted.label("head_deleted"),
                   *[resource_version.c[c] for c in VERSION_COLUMNS],
                   patient_list(dialect, compartment, resource.c.pk).label("patients"))
            .select_from(joined).where(resource.c.type == bindparam("t"), resource.c.id == bindparam("id")))


def current_rows(dialect: str, pks: list[int]) -> Select[Any]:
    """The current versions of resource rows `pks` with their patients."""
    return (select(resource.c.pk, resource.c.type, resource.c.id, *[resource_version.c[c] for c in VERSION_COLUMNS],
                   patient_list(dialect, compartment, resource.c.pk).label("patients"))
            .join(resource_version, and_(resource_version.c.resource_pk == resource.c.pk,
                                         resource_version.c.version == resource.c.version))
            .where(resource.c.pk.in_(pks)))


def shown(preds: Predicates, res: FromClause = resource) -> Select[Any]:
    """Whether row `:pk` of `res` passes the predicates (one row when it does)."""
    return select(res.c.pk).where(res.c.pk == bindparam("pk"), *preds)


def live_patient_shown(preds: Predicates) -> Select[Any]:
    """The live Patient `:pid`: its pk and `shown` (the predicates hold for it)."""
    return select(resource.c.pk, flag(preds).label("shown")).where(
        resource.c.type == "Patient", resource.c.id == bindparam("pid"), resource.c.deleted.is_(False))


def in_compartment(pid: str, res: FromClause = resource) -> ColumnElement[bool]:
    """The Patient itself or any resource in its compartment."""
    comp = compartment.alias()
    return or_(and_(res.c.type == "Patient", res.c.id == pid),
               res.c.pk.in_(select(comp.c.resource_pk).where(comp.c.patient_id == pid)))


def compartment_rows(refs: Sequence[str], live_only: bool = False) -> Select[Any] | None:
    """(type, id, patient) of the resources `refs` (`Type/id`; `live_only`: not deleted) and
    their compartments."""
    pairs = {tuple(r.split("/", 1)) for r in refs if "/" in r}
    if not pairs:
        return None
    cond = or_(*[and_(resource.c.type == t, resource.c.id == i) for t, i in pairs])
    if live_only:
        cond = and_(cond, resource.c.deleted.is_(False))
    return (select(resource.c.type, resource.c.id, compartment.c.patient_id)
            .join(compartment, compartment.c.resource_pk == resource.c.pk).where(cond))
