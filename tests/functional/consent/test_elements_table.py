"""The per-type consent table (profiles/consent-elements.json) is checked when the server starts:
a parameter name the type does not have (or of the wrong kind) would make a `code` or `dataPeriod`
criterion silently match nothing, so the server refuses to start instead."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.support.apps import fresh_app

PROFILES = Path(__file__).resolve().parents[3] / "profiles"


@pytest.mark.parametrize(("rtype", "kind", "name", "message"), [
    ("Condition", "dates", "onset-dat", "'onset-dat', which is not a date search parameter of Condition"),
    ("Encounter", "codes", "date", "'date', which is not a token search parameter of Encounter"),
])
def test_a_wrong_parameter_stops_the_server(tmp_path: Path, rtype: str, kind: str, name: str, message: str) -> None:
    profiles = tmp_path / "profiles"
    shutil.copytree(PROFILES, profiles)
    table = json.loads((profiles / "consent-elements.json").read_text())
    table["types"][rtype][kind] = [name]
    (profiles / "consent-elements.json").write_text(json.dumps(table))
    settings = make_settings(tmp_path, profiles_dir=str(profiles))
    with pytest.raises(ValueError, match=message):
        fresh_app(settings)


def test_every_compartment_type_with_a_clinical_date_is_in_the_table() -> None:
    """A compartment type whose R4 definition has a clinical date or code but no table row would be
    out of reach of dataPeriod and code criteria; the exceptions are listed and documented."""
    table = json.loads((PROFILES / "consent-elements.json").read_text())["types"]
    served = json.loads((PROFILES / "resource-types.json").read_text())["types"]
    comp = {r["code"] for r in json.loads((PROFILES / "compartmentdefinition-patient.json").read_text())["resource"]
            if r.get("param")}
    comp -= {t for t, spec in served.items() if spec.get("compartmentParams") == []}  # kept out by the registry (Group)
    no_clinical_date = {"Patient", "RelatedPerson", "MolecularSequence", "Coverage",  # docs/consent.md,
                        "AuditEvent"}  # "Criteria across resource types"
    assert set(table) <= set(served) & comp
    assert (set(served) & comp) - set(table) == no_clinical_date
