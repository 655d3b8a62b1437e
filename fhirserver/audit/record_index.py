"""An access record's search index -- its interned term set and its subjects -- from its AuditRecord.

Every request writes a record, so this runs on every request's path. The general route builds the
BALP event and indexes it (`AuditIndexer`), then splits the rows: token, uri and string rows form
the term set, references the subjects, and the date row is dropped (it is the record's time).

The event's structure is fixed by `build_audit_event`, and its term rows -- codes, the client
address's keyed digests, the profile, the entity types, roles and names -- depend only on the
record's *shape*: interaction, outcome, address, codes, purposes, how many entities of each
kind it names, and its extra entities (the consent stage's policies and Consents) apart from
what they point at. The term set is therefore kept per shape (the first record of a shape
takes the general route), and the subjects -- the client, user, resources, patients and the
extra entities' targets -- are parsed from the record directly, with the same navigation,
`parse_reference` and `resolves_to` the indexer uses. This skips building and walking the
event (~0.15 ms of a 1.2 ms read). tests/functional/audit/test_audit_index.py checks that both
routes agree for any record.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ..fhir.fhirpath import child_nodes, resolves_to
from ..search.values import IndexRows, parse_reference
from ..storage.codec import dump_json
from .events import AuditIndexer, AuditRecord, build_audit_event, outcome_code

TERM_TABLES = ("token", "uri", "string")
_SHAPES_MAX = 4096  # kept term sets (one per record shape); cleared when full

Terms = list[tuple[Any, ...]]  # (tbl, param, system, code, kind, value)
Subjects = list[tuple[Any, ...]]  # (param, target_type, target_id, url)


def _canonical(row: tuple[Any, ...]) -> tuple[str, ...]:
    """The sort key of term and subject rows (None sorts as the empty string)."""
    return tuple("" if v is None else str(v) for v in row)


def subject_rows(rows: IndexRows) -> Subjects:
    """The distinct (param, target type, target id, url) references of an event's index rows (a
    read names its patient twice -- as the resource's and as the patient entity -- one row does)."""
    return sorted({(r["param"], r["target_type"], r["target_id"], r["url"]) for r in rows.rows.get("reference", [])},
                  key=_canonical)


def term_set(rows: IndexRows) -> tuple[str, Terms]:
    """The interned part of an event's index rows: (set id = SHA-256 of the rows, the rows as
    (tbl, param, system, code, kind, value) in a canonical order)."""
    terms = sorted(((tbl, r["param"], r.get("system"), r.get("code"), r.get("kind"), r.get("value"))
                    for tbl in TERM_TABLES for r in rows.rows.get(tbl, [])), key=_canonical)
    return hashlib.sha256(dump_json(terms)).hexdigest(), terms


class RecordIndex:
    """(term set id, term rows, subjects) of access records; see the module docstring."""

    def __init__(self, indexer: AuditIndexer, server_url: str) -> None:
        self.indexer = indexer
        self.server_url = server_url
        self.base_url = indexer.indexer.base_url
        # the shortcut knows where build_audit_event puts references, and that none of them makes
        # a term row: both hold only for the standard parameters without `:identifier` digests
        self.shortcut = indexer.direct and not any(p.identifier_index for p in indexer.params
                                                   if p.type == "reference")
        self._shapes: dict[tuple[Any, ...], tuple[str, Terms]] = {}

    def index(self, rec: AuditRecord, record_id: str) -> tuple[str, Terms, Subjects]:
        if not self.shortcut:
            return self._general(rec, record_id)
        shape = self._shape(rec)
        kept = self._shapes.get(shape)
        if kept is None:
            set_id, terms, subjects = self._general(rec, record_id)
            if len(self._shapes) >= _SHAPES_MAX:
                self._shapes.clear()
            self._shapes[shape] = (set_id, terms)
            return set_id, terms, subjects
        return kept[0], kept[1], self._subjects(rec)

    def _general(self, rec: AuditRecord, record_id: str) -> tuple[str, Terms, Subjects]:
        rows = self.indexer.index(build_audit_event(rec, self.server_url, record_id))
        set_id, terms = term_set(rows)
        return set_id, terms, subject_rows(rows)

    @staticmethod
    def _shape(rec: AuditRecord) -> tuple[Any, ...]:
        """Everything of a record its term rows depend on (not its id, time, references, query
        text, outcome text or client name: none of those makes a token, uri or string row)."""
        extra = tuple(dump_json({k: v for k, v in e.items() if k != "what"}) for e in rec.extra_entities)
        return (rec.interaction, outcome_code(rec.status), rec.network_address, rec.type_code, rec.subtype_code,
                tuple(rec.purpose), len(rec.named()), len(rec.patients), rec.query is not None, extra)

    def _subjects(self, rec: AuditRecord) -> Subjects:
        """The references build_audit_event writes -- agent.who (client, user) and entity.what
        (resources or the target, patients, extra entities) -- as `agent`, `entity` and `patient` rows."""
        agents = ([f"Device/{rec.client_id}"] if rec.client_id else []) + ([rec.user] if rec.user else [])
        whats = rec.named() + [f"Patient/{p}" for p in rec.patients]
        found: set[tuple[Any, ...]] = set()
        for param, refs in (("agent", agents), ("entity", whats)):
            for ref in refs:
                parsed = parse_reference(ref, self.base_url)
                found.add((param, *parsed))
                if resolves_to({"reference": ref}, "Patient"):
                    found.add(("patient", *parsed))
        for value, _t in child_nodes([(e, None) for e in rec.extra_entities], "what"):
            target = value.get("reference") if isinstance(value, dict) else value
            if isinstance(target, str):
                parsed = parse_reference(target, self.base_url)
                found.add(("entity", *parsed))
                if resolves_to(value, "Patient"):
                    found.add(("patient", *parsed))
        return sorted(found, key=_canonical)
