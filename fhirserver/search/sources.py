"""Where a resource type's rows and search index live, as the compiler sees them.

Most types are stored as `resource` rows with index tables (`idx_*`) and a `compartment` table.
AuditEvents are access records (audit/records.py): here the same shapes are presented as
sub-selects over `access_record`, `access_subject` and `audit_term`, so the compiler, the
executor, includes, `_has`, chains and the access predicates work on them unchanged. Which store
a type uses is data (`"store"` in profiles/resource-types.json).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import FromClause, false, literal, null, select

from ..db.schema import (
    access_record,
    access_subject,
    audit_term,
    compartment,
    idx_composite,
    idx_date,
    idx_number,
    idx_quantity,
    idx_reference,
    idx_string,
    idx_token,
    idx_uri,
    resource,
)

RESOURCE_STORE = "resources"
ACCESS_RECORD_STORE = "access-records"


@dataclass(frozen=True)
class SearchSource:
    store: str
    res: FromClause  # pk, type, id, version, last_updated_us, deleted
    tables: Mapping[str, FromClause]  # index "tables" by parameter type, plus "composite"
    compartment: FromClause  # resource_pk, patient_id


RESOURCES = SearchSource(
    RESOURCE_STORE, resource,
    {"token": idx_token, "string": idx_string, "date": idx_date, "reference": idx_reference,
     "quantity": idx_quantity, "number": idx_number, "uri": idx_uri, "composite": idx_composite},
    compartment)


def _access_records() -> SearchSource:
    rec, term, subj = access_record, audit_term, access_subject
    res = select(rec.c.pk, literal("AuditEvent").label("type"), rec.c.id, literal(1).label("version"),
                 rec.c.recorded_us.label("last_updated_us"), literal(False).label("deleted")).subquery("audit_res")
    joined = rec.join(term, term.c.set_id == rec.c.terms)

    def terms(tbl: str, *cols: str) -> FromClause:
        return (select(rec.c.pk.label("resource_pk"), term.c.param, *[term.c[c] for c in cols])
                .select_from(joined).where(term.c.tbl == tbl).subquery(f"audit_{tbl}"))

    reference = select(subj.c.record_pk.label("resource_pk"), subj.c.param, subj.c.target_type, subj.c.target_id,
                       subj.c.url).subquery("audit_reference")
    # an instant: its range is the recorded time itself (the indexed column, so ranges use the index)
    date = select(rec.c.pk.label("resource_pk"), literal("date").label("param"), rec.c.recorded_us.label("low_us"),
                  rec.c.recorded_us.label("high_us")).subquery("audit_date")

    def empty(name: str, table: FromClause) -> FromClause:
        return select(*[null().label(c.name) for c in table.c if c.name != "id"]).where(false()).subquery(name)

    patients = select(subj.c.record_pk.label("resource_pk"), subj.c.target_id.label("patient_id")) \
        .where(subj.c.param == "patient", subj.c.target_type == "Patient").subquery("audit_compartment")
    return SearchSource(
        ACCESS_RECORD_STORE, res,
        {"token": terms("token", "system", "code"), "uri": terms("uri", "value"),
         "string": terms("string", "kind", "value"), "reference": reference, "date": date,
         "quantity": empty("audit_quantity", idx_quantity), "number": empty("audit_number", idx_number),
         "composite": empty("audit_composite", idx_composite)},
        patients)


ACCESS_RECORDS = _access_records()
_STORES = {RESOURCE_STORE: RESOURCES, ACCESS_RECORD_STORE: ACCESS_RECORDS}
_by_type: dict[str, SearchSource] = {}


def use_stores(stores: Mapping[str, str]) -> None:
    """Record each type's store (from the type registry); unknown store names are an error."""
    for rtype, store in stores.items():
        if store not in _STORES:
            raise ValueError(f"resource type {rtype}: unknown store '{store}'")
        _by_type[rtype] = _STORES[store]


def source_of(rtype: str) -> SearchSource:
    return _by_type.get(rtype, RESOURCES)


def is_access_records(rtype: str | None) -> bool:
    return rtype is not None and source_of(rtype) is ACCESS_RECORDS
