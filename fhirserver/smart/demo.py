"""Demo users and the demo SMART app for `fhirserver serve --demo`.

Passwords are generated at first start and written to `demo-users.txt` (0600) in the data
directory; nothing secret is in the repository.
"""

from __future__ import annotations

import os
import secrets

from ..auth.clients import get_client, register_app_client
from ..services import Services
from ..users.registry import create_user, get_user, link_patient
from .demo_app import DEMO_APP_ID, DEMO_APP_SCOPES

DEMO_USERS = [  # username, fhirUser, links
    ("alice", "Patient/demo-alice", []),
    ("dr-demo", "Practitioner/demo-practitioner", []),
    ("guardian-chen", "RelatedPerson/demo-chen-parent", [("Patient/demo-chloe", "guardian")]),
]


def ensure_demo_smart(svc: Services) -> dict[str, str]:
    """Create the demo users (once) and the demo app; returns username -> password (from the
    0600 file when the users already exist)."""
    path = svc.settings.data_dir / "demo-users.txt"
    passwords: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, pw = line.partition(" ")
            passwords[name] = pw
    for name, fhir_user, links in DEMO_USERS:
        if get_user(svc.engine, name) is None:
            passwords[name] = f"demo-{secrets.token_urlsafe(12)}"
            create_user(svc.engine, svc.keys, name, passwords[name], fhir_user)
            for patient, rel in links:
                link_patient(svc.engine, name, patient, rel)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(f"{n} {p}\n" for n, p in passwords.items()))
    if get_client(svc.engine, DEMO_APP_ID) is None:
        root = svc.settings.public_root
        register_app_client(svc.engine, "Demo SMART app", DEMO_APP_SCOPES, [f"{root}/demo-app/callback"], "none",
                            launch_url=f"{root}/demo-app/launch", client_id=DEMO_APP_ID)
    return passwords
