"""Synthetic, deterministic FHIR data for the benchmarks (shared by bench.py and bench_search.py)."""

from __future__ import annotations

import random
from typing import Any

FAMILIES = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
            "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore",
            "Jackson", "Martin", "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark", "Ramirez",
            "Lewis", "Robinson", "Walker", "Young", "Allen", "King", "Wright", "Scott", "Torres", "Nguyen",
            "Hill", "Flores", "Green", "Adams", "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell"]
GIVEN = ["James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "William", "Elizabeth",
         "David", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah", "Charles", "Karen",
         "Wei", "Li", "Fatima", "Ahmed", "Sofia", "Mateo", "Aiko", "Hiroshi", "Olga", "Ivan"]
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.19.5"
LOINC = "http://loinc.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
# (code, display, unit, low, high, category)
CODES = [
    ("8867-4", "Heart rate", "/min", 50, 110, "vital-signs"),
    ("8310-5", "Body temperature", "Cel", 35.5, 39.5, "vital-signs"),
    ("9279-1", "Respiratory rate", "/min", 10, 24, "vital-signs"),
    ("29463-7", "Body weight", "kg", 40, 130, "vital-signs"),
    ("8302-2", "Body height", "cm", 140, 200, "vital-signs"),
    ("59408-5", "Oxygen saturation", "%", 88, 100, "vital-signs"),
    ("2339-0", "Glucose", "mg/dL", 60, 250, "laboratory"),
    ("2093-3", "Cholesterol", "mg/dL", 120, 300, "laboratory"),
    ("4548-4", "Hemoglobin A1c", "%", 4, 12, "laboratory"),
    ("718-7", "Hemoglobin", "g/dL", 9, 18, "laboratory"),
]


def patient(i: int, rng: random.Random) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": MRN_SYSTEM, "value": f"MRN{i:08d}"}],
        "name": [{"family": rng.choice(FAMILIES), "given": [rng.choice(GIVEN), rng.choice(GIVEN)]}],
        "gender": rng.choice(["male", "female", "other", "unknown"]),
        "birthDate": f"{rng.randint(1930, 2020)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "telecom": [{"system": "phone", "value": f"+1-555-{rng.randint(1000000, 9999999)}"}],
        "address": [{"line": [f"{rng.randint(1, 9999)} Main St"], "city": "Springfield", "state": "IL",
                     "postalCode": f"62{rng.randint(100, 999)}"}],
    }


def observation(patient_id: str, rng: random.Random) -> dict[str, Any]:
    code, display, unit, low, high, category = rng.choice(CODES)
    year = rng.randint(2015, 2025)
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": CATEGORY, "code": category}]}],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": f"{year}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
                             f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z",
        "valueQuantity": {"value": round(rng.uniform(low, high), 1), "unit": unit,
                          "system": "http://unitsofmeasure.org", "code": unit},
    }
