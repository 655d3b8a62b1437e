"""The patient picker of the approval page: which patients a signed-in user may choose (themselves,
the children linked to them, or -- for a practitioner -- any existing patient), and their labels."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from ..db.engine import read_connection
from ..db.schema import resource
from ..services import Services
from ..storage.codec import parse_json
from ..users.registry import UserRecord


def _patient_label(svc: Services, pid: str) -> str:
    try:
        with read_connection(svc.engine) as conn:
            stored = svc.repo.read(conn, "Patient", pid)
        body = parse_json(stored.body or b"{}")
        name = (body.get("name") or [{}])[0]
        text = name.get("text") or " ".join([*name.get("given", []), name.get("family", "")]).strip()
        return f"{text} (Patient/{pid})" if text else f"Patient/{pid}"
    except Exception:  # noqa: BLE001 - a label is cosmetic; an unreadable record shows its id
        return f"Patient/{pid}"


def _needs_patient(scopes: list[str]) -> bool:
    return "launch/patient" in scopes or any(s.startswith("patient/") for s in scopes)


def _patient_choices(svc: Services, user: UserRecord, launch_ctx: dict[str, Any] | None,
                     scopes: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """How the patient context is set: none | fixed (EHR launch) | choose (own/linked records) |
    search (a practitioner names any patient)."""
    if launch_ctx and launch_ctx.get("patient"):
        pid = launch_ctx["patient"]
        return "fixed", [(pid, _patient_label(svc, pid))]
    if not _needs_patient(scopes):
        return "none", []
    ids = _own_patients(user)
    if user.fhir_user.startswith(("Practitioner/", "PractitionerRole/")):
        with read_connection(svc.engine) as conn:
            recent = conn.execute(select(resource.c.id).where(
                resource.c.type == "Patient", resource.c.deleted.is_(False))
                .order_by(resource.c.last_updated_us.desc()).limit(20)).scalars().all()
        return "search", [(pid, _patient_label(svc, pid)) for pid in recent]
    return "choose", [(pid, _patient_label(svc, pid)) for pid in ids]


def _own_patients(user: UserRecord) -> list[str]:
    ids = [user.fhir_user.split("/", 1)[1]] if user.fhir_user.startswith("Patient/") else []
    return list(dict.fromkeys([*ids, *(link.patient_id for link in user.links)]))


def _patient_exists(svc: Services, pid: str) -> bool:
    if not pid or len(pid) > 64:
        return False
    with read_connection(svc.engine) as conn:
        head = svc.repo.current(conn, "Patient", pid)
    return head is not None and not head.deleted
