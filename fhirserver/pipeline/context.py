"""Per-request state shared by the pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sqlalchemy import Connection

from ..access import Access, AccessGate
from ..audit.capture import AuditCapture
from ..audit.events import AuditRecord
from ..auth.principal import Principal
from ..db.engine import Snapshot
from ..fhir.interaction import Interaction
from ..services import Services
from ..storage.repository import PreparedWrite

if TYPE_CHECKING:
    from ..fhir.errors import Issue
    from .handler import Handler

P = TypeVar("P")


@dataclass
class Result:
    status: int
    body: bytes | dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    database_unavailable: bool = False  # nothing was served: the database could not be reached


class EntryRunner(Protocol):
    """What a Bundle asks of the pipeline that runs it: each entry passes the same stages as a
    request (authorize, prepare; execute and audit inside the Bundle's transaction)."""

    def prepare_entry(self, ctx: RequestContext) -> Handler: ...

    def execute_entry(self, ctx: RequestContext, handler: Handler, conn: Connection) -> Result: ...

    def audit_entry_failure(self, ctx: RequestContext, conn: Connection, status: int, issues: list[Issue]) -> None: ...


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
    plan: object = None  # a handler's own plan from prepare() for execute(), read with plan_as
    prefer: dict[str, str] = field(default_factory=dict)
    response_format: str = "json"  # "xml" once the request negotiated XML (fhir/interaction.py)
    pipeline: EntryRunner | None = None  # the pipeline running this request (a Bundle runs its entries through it)
    assigned_id: str | None = None  # a create's id fixed in advance (transaction urn:uuid resolution)
    provenance: list[PreparedWrite] = field(default_factory=list)  # written with the resource (provenance.py)
    bundle_patients: frozenset[str] = frozenset()  # Patients a transaction creates in its other entries
    snapshot: Snapshot | None = None  # the request's read transaction (a Bundle's entries share it)
    capture: AuditCapture = field(init=False)  # what the handler touched, for `record` (audit/capture.py)

    def __post_init__(self) -> None:
        self.capture = AuditCapture(self.record)

    def plan_as(self, kind: type[P]) -> P:
        """The plan this request's handler made in prepare(), as the type it made."""
        if not isinstance(self.plan, kind):
            raise TypeError(f"the handler's plan is a {type(self.plan).__name__}, not a {kind.__name__}")
        return self.plan

    @property
    def runner(self) -> EntryRunner:
        """The pipeline running this request, for a Bundle's entries."""
        if self.pipeline is None:
            raise RuntimeError("this request context has no pipeline")
        return self.pipeline

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def reading(self) -> Connection:
        """The request's read connection (db/engine.Snapshot), opened on first use."""
        if self.snapshot is None:
            self.snapshot = Snapshot(self.services.engine)
        return self.snapshot.connection()

    def hand_over_reading(self) -> Connection | None:
        """End the read transaction and lend its connection to the write transaction, or None
        (db/engine.Snapshot.hand_over); `release_reading` returns it to the pool."""
        return self.snapshot.hand_over() if self.snapshot is not None else None

    def release_reading(self) -> None:
        """End the read transaction (before the write transaction opens; at the request's end)."""
        if self.snapshot is not None:
            self.snapshot.close()

    @property
    def gate(self) -> AccessGate:
        """The request's access gate: the only way it reads stored rows (access/gate.py)."""
        assert self.bound is not None, "the authorize stage binds the gate before any handler runs"
        return self.bound
