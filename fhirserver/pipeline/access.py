"""What a request touched, for its access record (the rows come from the access gate with their
patients)."""

from __future__ import annotations

from ..storage.repository import Stored
from .context import RequestContext


def record_touch(ctx: RequestContext, stored: Stored, patients: list[str] | None = None) -> None:
    """Note the resource (and its patients: given for writes, else those the gate returned with
    the row) for the audit."""
    ctx.record.resources.append(f"{stored.type}/{stored.id}/_history/{stored.version}")
    ctx.record.patients = patients if patients is not None else list(stored.patients)
