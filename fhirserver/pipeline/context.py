"""Per-request state shared by the pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, false

from ..audit.events import AuditRecord
from ..services import Services
from ..storage.repository import PreparedWrite
from .interaction import Interaction
from .principal import Principal

Predicates = list[ColumnElement[bool]]


def _deny() -> Predicates:
    return [false()]


@dataclass
class Access:
    """The row predicates the authorize and consent stages granted this request, per permission.

    A permission the stages did not grant matches no row (fail closed): a handler can only ever
    see, count or change rows through one of these. An empty list means unrestricted."""

    read: Predicates = field(default_factory=_deny)  # read, vread, history
    search: Predicates = field(default_factory=_deny)  # search and operations, conditional matches
    create: Predicates = field(default_factory=_deny)
    update: Predicates = field(default_factory=_deny)
    delete: Predicates = field(default_factory=_deny)
    may_create: bool = False  # an update may create (update-as-create needs create permission)
    consent_read: Predicates = field(default_factory=_deny)  # a writer's consent view of the type's rows
    provenance: Predicates = field(default_factory=_deny)  # an X-Provenance the writer sends
    patient_rows: Predicates = field(default_factory=_deny)  # the Patient rows a writer's consent lets it see
    patient_ids: list[str] | None = field(default_factory=list)  # the scopes' compartments (None: not confined)


@dataclass
class Result:
    status: int
    body: bytes | dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class RequestContext:
    services: Services
    interaction: Interaction
    record: AuditRecord
    headers: dict[str, str]
    body: bytes
    principal: Principal | None = None
    access: Access = field(default_factory=Access)
    access_fn: Any = None  # (type, table alias) -> predicates | None, for chains/_has/includes
    write: PreparedWrite | None = None  # the resource a create or update will store (prepared)
    plan: Any = None  # a handler's own plan from prepare() for execute(); each handler types its own
    prefer: dict[str, str] = field(default_factory=dict)
    pipeline: Any = None  # the Pipeline running this request (a Bundle runs its entries through it)
    assigned_id: str | None = None  # a create's id fixed in advance (transaction urn:uuid resolution)
    provenance: list[PreparedWrite] = field(default_factory=list)  # written with the resource (provenance.py)
    bundle_patients: frozenset[str] = frozenset()  # Patients a transaction creates in its other entries

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())
