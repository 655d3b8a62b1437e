"""Per-request state shared by the pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement

from ..audit.events import AuditRecord
from ..services import Services
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
    # row predicates per interaction kind (read/search visibility, create, update, delete)
    access: dict[str, list[ColumnElement[bool]]] = field(default_factory=dict)
    access_fn: Any = None  # (type, table alias) -> predicates | None, for chains/_has/includes
    prepared: Any = None
    prefer: dict[str, str] = field(default_factory=dict)
    pipeline: Any = None  # the Pipeline running this request (a Bundle runs its entries through it)
    assigned_id: str | None = None  # a create's id fixed in advance (transaction urn:uuid resolution)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())
