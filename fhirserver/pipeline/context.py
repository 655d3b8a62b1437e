"""Per-request state shared by the pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from ..access import Access, AccessGate
from ..audit.events import AuditRecord
from ..db.engine import Snapshot
from ..services import Services
from ..storage.repository import PreparedWrite
from .interaction import Interaction
from .principal import Principal


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
    access: Access = field(default_factory=Access)  # what the authorize and consent stages granted
    bound: AccessGate | None = None  # set by the authorize stage; read it as `gate`
    write: PreparedWrite | None = None  # the resource a create or update will store (prepared)
    plan: Any = None  # a handler's own plan from prepare() for execute(); each handler types its own
    prefer: dict[str, str] = field(default_factory=dict)
    pipeline: Any = None  # the Pipeline running this request (a Bundle runs its entries through it)
    assigned_id: str | None = None  # a create's id fixed in advance (transaction urn:uuid resolution)
    provenance: list[PreparedWrite] = field(default_factory=list)  # written with the resource (provenance.py)
    bundle_patients: frozenset[str] = frozenset()  # Patients a transaction creates in its other entries
    snapshot: Snapshot | None = None  # the request's read transaction (a Bundle's entries share it)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def reading(self) -> Connection:
        """The request's read connection (db/engine.Snapshot), opened on first use."""
        if self.snapshot is None:
            self.snapshot = Snapshot(self.services.engine)
        return self.snapshot.connection()

    def release_reading(self) -> None:
        """End the read transaction (before the write transaction opens; at the request's end)."""
        if self.snapshot is not None:
            self.snapshot.close()

    @property
    def gate(self) -> AccessGate:
        """The request's access gate: the only way it reads stored rows (access/gate.py)."""
        assert self.bound is not None, "the authorize stage binds the gate before any handler runs"
        return self.bound
