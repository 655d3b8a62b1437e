"""EHR launch: an administrator (or the EHR, through the admin API) creates a single-use,
short-lived `launch` id bound to a client, a patient and optionally an encounter and user; the
app receives it on its launch URL together with `iss`, and must send it back with scope `launch`."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode

from ..auth.clients import get_client
from ..auth.grants import create_launch
from ..services import Services
from ..users.registry import get_user


class LaunchError(ValueError):
    pass


@dataclass
class Launch:
    launch: str
    url: str | None
    expires_in: int


def new_launch(svc: Services, client_id: str, patient: str, encounter: str | None = None,
               username: str | None = None) -> Launch:
    record = get_client(svc.engine, client_id)
    if record is None or record.kind != "app" or record.disabled:
        raise LaunchError(f"no enabled app client {client_id}")
    pid = patient.removeprefix("Patient/")
    from ..db.engine import read_connection

    with read_connection(svc.engine) as conn:
        head = svc.repo.current(conn, "Patient", pid) if pid and len(pid) <= 64 else None
    if head is None or head.deleted:
        raise LaunchError(f"no patient {patient}")
    context: dict[str, str] = {"patient": pid}
    if encounter:
        context["encounter"] = encounter.removeprefix("Encounter/")
    if username:
        user = get_user(svc.engine, username)
        if user is None or user.disabled:
            raise LaunchError(f"no enabled user {username}")
        context["user"] = user.username
    lifetime = svc.settings.launch_lifetime
    launch = create_launch(svc.engine, client_id, context, lifetime)
    base = record.settings.get("launch_url")
    url = f"{base}{'&' if '?' in base else '?'}{urlencode({'iss': svc.settings.fhir_base, 'launch': launch})}" \
        if base else None
    return Launch(launch, url, lifetime)
