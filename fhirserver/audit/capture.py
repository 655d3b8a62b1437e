"""What one request disclosed or changed, captured as it happens (docs/audit.md).

The pipeline owns one `AuditCapture` per request. Handlers report the rows they returned or
wrote (`touched`, `disclosed`), the consent stage the policies and Consents that decided
(`entity`); `AuditLog.build` turns the captured `AuditRecord` into one access record. Nothing
else writes the record's resources and patients, so what the record names is what the handler
handed back.

A write may also say in advance what it expects to touch (`expect`): the pipeline then builds
and encrypts that record before taking the write lock and keeps it if the capture matches it
after the write (otherwise it builds again from what was captured).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..storage.repository import Stored
from .events import AuditRecord

# access records are not rows of the resource table: no Consent decides over them
_NOT_RESOURCE_ROWS = frozenset({"AuditEvent"})


def version_ref(stored: Stored) -> str:
    return f"{stored.type}/{stored.id}/_history/{stored.version}"


@dataclass
class AuditCapture:
    record: AuditRecord
    pks: list[int] = field(default_factory=list)  # resource-table pks touched (the consent basis)
    _expected: dict[str, Any] | None = None

    def touched(self, stored: Stored, patients: Iterable[str] | None = None) -> None:
        """One resource version read or written, with its patients (a write's from its index;
        a read's as the access gate returned them with the row)."""
        self.record.resources.append(version_ref(stored))
        self.record.patients = list(patients if patients is not None else stored.patients)
        if stored.type not in _NOT_RESOURCE_ROWS:
            self.pks.append(stored.pk)

    def also_wrote(self, stored: Stored) -> None:
        """A resource written beside the main one (an X-Provenance): named, patients unchanged."""
        self.record.resources.append(version_ref(stored))

    def disclosed(self, rows: Sequence[Stored], patients: Iterable[str] | None = None) -> None:
        """The rows a page, a history or a document returned: the record names each of them and
        the union of their patients (or `patients`, when the handler knows them better)."""
        self.record.resources = [version_ref(st) for st in rows]
        self.record.patients = sorted(set(patients) if patients is not None
                                      else {p for st in rows for p in st.patients})
        self.pks = [st.pk for st in rows if st.type not in _NOT_RESOURCE_ROWS]

    def entity(self, entity: dict[str, Any]) -> None:
        """A policy, Consent or other entity the record names besides the data (consent stage)."""
        self.record.extra_entities.append(entity)

    # ---- a write's record, built ahead
    def expect(self, status: int, stored_as: str, patients: Iterable[str]) -> None:
        """What the write will most likely capture: its status, the version it will write and
        that version's patients."""
        self._expected = {"status": status, "resources": [stored_as], "patients": list(patients),
                          "outcome_desc": ""}

    def expectation(self) -> AuditRecord | None:
        """The record as it will be if the write goes as expected (None: nothing expected)."""
        return replace(self.record, **self._expected) if self._expected is not None else None

    def as_expected(self) -> bool:
        """The captured record equals the expectation (so the record built ahead is the one)."""
        return self._expected is not None and all(getattr(self.record, k) == v for k, v in self._expected.items())
