"""Interoperability with `fhirpy` (a widely used Python FHIR client) against a real HTTP server:
search paging through its iterator (following the server's `next` links), PATCH as fhirpy sends
it (a partial resource: JSON Merge Patch), and a conditional update by search."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
from fhirserver.auth.clients import register_backend_client

fhirpy = pytest.importorskip("fhirpy")


def test_fhirpy_paging_patch_and_conditional_update(live: tuple[str, Any]) -> None:
    base, app = live
    svc = app.extensions["fhirserver"]
    key = generate_key("ES384")
    client_id = register_backend_client(svc.engine, "fhirpy", "system/*.cruds", jwks=public_jwks(key)).client_id
    token_url = f"{base.removesuffix('/fhir')}/auth/token"
    token = requests.post(token_url, data=token_request_form(key, client_id, token_url, "system/*.cruds"),
                          timeout=10).json()["access_token"]
    client = fhirpy.SyncFHIRClient(base, authorization=f"Bearer {token}")

    for i in range(7):
        client.resource("Patient", name=[{"family": "Fhirpyfam", "given": [f"G{i}"]}],
                        identifier=[{"system": "urn:fhirpy", "value": f"id-{i}"}]).save()
    search = client.resources("Patient").search(family="Fhirpyfam").limit(3)
    everyone = search.fetch_all()  # three pages of at most 3
    assert sorted(p["name"][0]["given"][0] for p in everyone) == [f"G{i}" for i in range(7)]
    assert client.resources("Patient").search(family="Fhirpyfam").count() == 7

    patient = client.resources("Patient").search(identifier="urn:fhirpy|id-3").get()
    patient.patch(gender="female")  # PATCH with {"gender": "female"}: a merge patch
    again = client.reference("Patient", patient.id).to_resource()
    assert again["gender"] == "female" and again["meta"]["versionId"] == "2"
    assert again["name"][0]["given"] == ["G3"]  # untouched elements stay

    updated, created = client.resources("Patient").search(identifier="urn:fhirpy|id-5").update(
        client.resource("Patient", name=[{"family": "Fhirpyfam", "given": ["Renamed"]}],
                        identifier=[{"system": "urn:fhirpy", "value": "id-5"}]))
    assert not created and updated["name"][0]["given"] == ["Renamed"]
    assert client.resources("Patient").search(family="Fhirpyfam").count() == 7  # no duplicate
