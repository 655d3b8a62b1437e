"""A partner institution's US Core data, as the issue "The whole patient record" tried it: 200
synthetic US Core 6.1 patients from the `carebundle` generator (mixed profile; Patient,
Practitioner, Encounter, Condition, DiagnosticReport, MedicationRequest, AllergyIntolerance,
Observation) load through `fhirserver load` with nothing skipped and nothing invalid, and its
bundles commit as transactions over HTTP with every internal reference resolved."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BackendClient

from .test_load import load, query

PATIENTS = 200


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("carebundle")
    subprocess.run([str(Path(sys.executable).parent / "carebundle"), "generate", "--profile", "mixed", "--count", str(PATIENTS),
                    "--sex", "mixed", "--out", str(out)], check=True, capture_output=True, timeout=120)
    files = sorted(out.glob("*.json"))
    assert len(files) == PATIENTS
    return files


def test_load_stores_every_resource(settings: Any, bundles: list[Path]) -> None:
    want: Counter[str] = Counter()
    for path in bundles:
        want.update(e["resource"]["resourceType"] for e in json.loads(path.read_text())["entry"])
    assert {"Condition", "DiagnosticReport", "Encounter", "MedicationRequest", "Practitioner"} <= set(want)
    stdout, _err = load(settings, bundles[0].parent)
    assert "skipped (type not stored): none" in stdout and "invalid: 0" in stdout, stdout
    loaded = dict(re.findall(r"(\w+) (\d+)", stdout.split("loaded:", 1)[1].split("\n", 1)[0]))
    assert {t: int(n) for t, n in loaded.items() if t != "total"} == dict(want)
    stored = dict(query(settings, "SELECT type, COUNT(*) FROM resource GROUP BY type"))
    assert {t: stored.get(t) for t in want} == dict(want)


def test_bundles_commit_as_transactions_with_references_resolved(http: Any, admin: BackendClient,
                                                                  bundles: list[Path]) -> None:
    h = admin.headers()
    for path in bundles[:3]:
        bundle = json.loads(path.read_text())
        internal = {e["fullUrl"] for e in bundle["entry"]}
        resp = http.post("/fhir", data=path.read_bytes(), headers={**h, "Content-Type": "application/fhir+json"})
        assert resp.status_code == 200, resp.get_data(as_text=True)
        answer = resp.get_json()
        assert answer["type"] == "transaction-response"
        assert all(e["response"]["status"].startswith("201") for e in answer["entry"])
        locations = [e["response"]["location"].split("/fhir/")[1].split("/_history")[0] for e in answer["entry"]]
        new_ref = {e["fullUrl"]: loc for e, loc in zip(bundle["entry"], locations, strict=True)}
        for entry, loc in zip(bundle["entry"], locations, strict=True):
            stored = http.get(f"/fhir/{loc}", headers=h).get_json()
            text = json.dumps(stored)
            assert '"reference": "urn:uuid:' not in text  # (identifier systems may be urn:uuid)
            # every reference the sender made to another entry now names that entry's stored resource
            sent = [m for m in re.findall(r'"reference": "([^"]+)"', json.dumps(entry["resource"])) if m in internal]
            got = re.findall(r'"reference": "([^"]+)"', text)
            assert sorted(new_ref[s] for s in sent) == sorted(g for g in got if g in new_ref.values()), loc
            for ref in got:
                assert http.get(f"/fhir/{ref}", headers=h).status_code == 200, ref
