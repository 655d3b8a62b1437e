"""The shared machinery of the search tests: a deterministic synthetic data set, a plain-Python
oracle of the FHIR search semantics over it, and the server harness (a real app, real tokens).
Used by tests/functional/search/ (the parameter matrix, results, operations)."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import unicodedata
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from functools import cmp_to_key
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
from fhirserver.auth.clients import register_backend_client
from tests.conftest import BASE, REPO, make_settings
from tests.support.apps import fresh_app

# ================================================================== constants of the data set
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SCT = "http://snomed.info/sct"
CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
LOCAL = "http://example.org/local"
MRN = "http://hospital.example/mrn"
SSN = "http://ssn.example/ssn"
OBS_ID_SYS = "http://hospital.example/obs"
TAGS = "http://example.org/tags"
CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
METHOD = "http://example.org/method"
PROFILE_A = "http://example.org/StructureDefinition/obs-a"
PROFILE_B = "http://example.org/StructureDefinition/obs-b"
# not a profile the server ships: shipped ones are enforced on write (tests/test_profiles.py)
PROFILE_VS = "http://example.org/other/StructureDefinition/vitalsigns"
SOURCES = ["http://example.org/source-a", "http://example.org/source-b"]
QUESTIONNAIRES = ["http://example.org/Questionnaire/phq-9", "http://example.org/Questionnaire/gad-7"]
EXTERNAL_PATIENT = "http://other.example/fhir/Patient/ext-1"

# LOINC codes chosen so that byte order and natural-language collation agree (PostgreSQL may
# run with a non-C collation): no two codes differ only around their hyphen.
VITALS = [("8867-4", "Heart rate", "/min"), ("29463-7", "Body weight", "kg"), ("8310-5", "Body temperature", "Cel")]
BP = ("85354-9", "Blood pressure panel with all children optional")
SYSTOLIC = ("8480-6", "Systolic blood pressure")
DIASTOLIC = ("8462-4", "Diastolic blood pressure")
LABS = [("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL"), ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL")]
POTASSIUM = ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L")
ABO = ("883-9", "ABO group [Type] in Blood")
ABO_VALUES = [("112144000", "Blood group A"), ("112149005", "Blood group B"), ("58460004", "Blood group O")]
COMMENT = ("48767-8", "Annotation comment [Interpretation] Narrative")
PANEL = ("85353-1", "Vital signs, weight, height, head circumference, oxygen saturation and BMI panel")

FAMILIES = ["Müller", "Mueller", "Muller", "MÜLLER-Lüdenscheidt", "Smith", "Smithson", "Smyth", "García",
            "Garcia", "Ångström", "O'Brien", "Nguyen", "Schmidt", "Schmitt", "van der Berg",
            "Wolfeschlegelsteinhausenbergerdorff", "Łukasiewicz", "Zoë"]
GIVENS = ["Jo", "Johann", "Joanna", "Anna", "Ánna", "Ben", "Chloé", "Li", "Mia", "Zoe"]
CITIES = ["Berlin", "Bern", "Zürich", "Zurich", "Boston", "São Paulo"]
BIRTHDATES = ["1950", "1950-12", "1970", "1970-05", "1970-05-17", "1970-05-18", "1970-11-02", "1985-01-31",
              "2001-09-09", "2001-09"]
DATETIMES = ["2019", "2020", "2021", "2020-07", "2021-03", "2021-04", "2021-03-14", "2021-03-15", "2021-03-16",
             "2020-07-04", "2021-03-15T10:30:00Z", "2021-03-15T10:30:00.500Z", "2021-03-15T10:29:59Z",
             "2021-03-15T10:30:01Z", "2021-03-15T00:00:00Z", "2021-03-14T23:59:59Z", "2021-03-15T23:30:00-05:00",
             "2021-03-15T12:30:00+02:00", "2021-03-16T00:00:00+01:00", "2022-01-01T08:00:00Z",
             "2018-06-30T12:00:00Z"]
PERIODS = [{"start": "2021-03-15T08:00:00Z", "end": "2021-03-15T09:00:00Z"},
           {"start": "2021-03-14", "end": "2021-03-16"},
           {"start": "2021-03"},
           {"end": "2021-03-15T10:30:00Z"},
           {"start": "2020-01-01T00:00:00Z", "end": "2021-12-31T23:59:59Z"},
           {"start": "2021-03-15T10:30:00Z", "end": "2021-03-15T10:30:00Z"}]
N_PATIENTS = 30
N_OBS = 140
SEED = 4711


# ================================================================== the data set
@dataclass
class Item:
    rtype: str
    body: dict[str, Any]
    post: bool = False  # POST (server id) instead of PUT with our id


@dataclass
class Dataset:
    items: list[Item]
    # filled by load(): (type, id) -> stored JSON (our body + server id/meta); creation order
    stored: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    order: list[tuple[str, str]] = field(default_factory=list)
    seq: dict[tuple[str, str], int] = field(default_factory=dict)

    def of_type(self, rtype: str) -> list[tuple[str, str]]:
        return [k for k in self.order if k[0] == rtype]

    def get(self, key: tuple[str, str]) -> dict[str, Any] | None:
        return self.stored.get(key)

    def record(self, key: tuple[str, str], body: dict[str, Any]) -> None:
        if key not in self.seq:
            self.seq[key] = len(self.order)
            self.order.append(key)
        self.stored[key] = body

    def forget(self, key: tuple[str, str]) -> None:
        """A deleted resource: no longer searchable (its creation slot stays)."""
        self.stored.pop(key, None)
        if key in self.order:
            self.order.remove(key)


def _det_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _coding(system: str | None, code: str, display: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {}
    if system:
        c["system"] = system
    c["code"] = code
    if display:
        c["display"] = display
    return c


def build_dataset(seed: int = SEED, n_patients: int = N_PATIENTS, n_obs: int = N_OBS) -> Dataset:
    rng = random.Random(seed)
    items: list[Item] = []
    pids = [f"pt-{i:03d}" for i in range(1, n_patients + 1)]
    families = FAMILIES + rng.choices(FAMILIES, k=max(0, n_patients - len(FAMILIES)))
    rng.shuffle(families)
    cities = (CITIES * n_patients)[:n_patients]
    rng.shuffle(cities)

    # ---- Patients
    for i, pid in enumerate(pids, start=1):
        names = [{"use": "official", "family": families[i - 1],
                  "given": rng.sample(GIVENS, rng.choice([1, 1, 2]))}]
        if i % 7 == 0:
            names[0]["prefix"] = ["Dr."]
        if i % 5 == 0:
            names.append({"use": "nickname", "given": [rng.choice(GIVENS)]})
        p: dict[str, Any] = {"resourceType": "Patient", "id": pid, "name": names,
                             "identifier": [{"system": MRN, "value": f"MRN{i:04d}"}]}
        if i % 3 == 0:
            p["identifier"].append({"system": SSN, "value": f"SSN-{i % 4}"})
        if i % 8 == 0:
            p["identifier"].append({"value": f"MRN{(i + 1):04d}"})  # no system, collides with another MRN
        g = rng.choice(["male", "female", "female", "male", "other", "unknown", None])
        if g:
            p["gender"] = g
        if i % 9 != 4:
            p["birthDate"] = rng.choice(BIRTHDATES)
        p["telecom"] = [{"system": "phone", "value": f"555-01{i % 12:02d}", "use": "home"}]
        if i % 2 == 0:
            p["telecom"].append({"system": "email", "value": f"p{i}@mail.example"})
        if i % 6 != 5:
            p["address"] = [{"line": [f"{['Main', 'Hauptstraße', 'Rue Haute'][i % 3]} {rng.randint(1, 99)}"],
                             "city": cities[i - 1], "postalCode": rng.choice(["10115", "3011", "8001", "02108"]),
                             "country": rng.choice(["DE", "CH", "US", "BR"])}]
        a = rng.choice([True, True, False, None])
        if a is not None:
            p["active"] = a
        meta: dict[str, Any] = {}
        if i % 4 == 1:
            meta["tag"] = [{"system": TAGS, "code": rng.choice(["needs-review", "batch-7"])}]
        if i % 10 == 3:
            meta["security"] = [{"system": CONF, "code": "R"}]
        if meta:
            p["meta"] = meta
        if n_patients - 4 <= i < n_patients - 1:  # three patients link to the first three
            target = pids[i - (n_patients - 4)]
            p["link"] = [{"other": {"reference": f"Patient/{target}"}, "type": "seealso"}]
        items.append(Item("Patient", p))

    def ref_to(pid: str) -> dict[str, str]:
        if rng.random() < 0.15:
            return {"reference": f"{BASE}/Patient/{pid}"}
        return {"reference": f"Patient/{pid}"}

    # ---- QuestionnaireResponses
    qr_ids = [f"qr-{i:02d}" for i in range(1, 21)]
    for i, qid in enumerate(qr_ids, start=1):
        pid = rng.choice(pids) if i > 1 else "pt-007"
        qr: dict[str, Any] = {"resourceType": "QuestionnaireResponse", "id": qid,
                              "status": rng.choice(["completed", "completed", "in-progress", "amended"]),
                              "questionnaire": rng.choice(QUESTIONNAIRES), "subject": ref_to(pid),
                              "authored": rng.choice(DATETIMES[10:])}
        author = rng.random() if i > 1 else 0.0
        if author < 0.4:
            qr["author"] = {"reference": f"Patient/{pid}"}
        elif author < 0.7:
            qr["author"] = {"reference": f"Patient/{rng.choice(pids)}"}
        else:
            qr["author"] = {"reference": "Practitioner/dr-1"}
        items.append(Item("QuestionnaireResponse", qr))

    # ---- Consents
    for i in range(1, 11):
        pid = pids[(8 + i) % n_patients]
        items.append(Item("Consent", {
            "resourceType": "Consent", "id": f"cons-{i:02d}",
            "status": rng.choice(["active", "inactive"]),
            "scope": {"coding": [_coding("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy")]},
            "category": [{"coding": [_coding(LOINC, "59284-0", "Patient Consent")]}],
            "patient": ref_to(pid), "dateTime": rng.choice(DATETIMES[10:]),
            "policyRule": {"coding": [_coding("http://terminology.hl7.org/CodeSystem/v3-ActCode", "OPTIN")]},
        }))

    # ---- Observations
    obs_items: list[Item] = []
    referenced: set[str] = set()

    def base_obs(kind_codes: list[dict[str, Any]], text: str | None, category: str | None) -> dict[str, Any]:
        o: dict[str, Any] = {"resourceType": "Observation", "id": _det_id(rng),
                             "status": rng.choice(["final", "final", "final", "preliminary", "amended"])}
        if category:
            cats = [{"coding": [_coding(CAT, category, category.replace("-", " ").title())]}]
            if rng.random() < 0.07:
                cats.append({"coding": [_coding(CAT, "survey", "Survey")]})
            o["category"] = cats
        code: dict[str, Any] = {"coding": kind_codes}
        if text:
            code["text"] = text
        o["code"] = code
        return o

    for i in range(n_obs):
        r = rng.random()
        if r < 0.42:
            kind = "vital"
        elif r < 0.55:
            kind = "bp"
        elif r < 0.78:
            kind = "lab"
        elif r < 0.84:
            kind = "abo"
        elif r < 0.89:
            kind = "comment"
        elif r < 0.95:
            kind = "local"
        else:
            kind = "nosys"
        if kind == "vital":
            code, display, unit = rng.choice(VITALS)
            codings = [_coding(LOINC, code, display)]
            if code == "8867-4" and rng.random() < 0.3:
                codings.append(_coding(LOCAL, "8867-4", "Pulse (local copy)"))
            o = base_obs(codings, display if rng.random() < 0.5 else None,
                         "vital-signs" if rng.random() > 0.05 else None)
            if code == "8867-4":
                o["valueQuantity"] = {"value": rng.randint(45, 130), "unit": "beats/minute", "system": UCUM, "code": unit}
            elif code == "29463-7":
                if rng.random() < 0.2:
                    o["valueQuantity"] = {"value": round(rng.uniform(100, 240), 1), "unit": "lb"}
                else:
                    o["valueQuantity"] = {"value": round(rng.uniform(45, 110), 1), "unit": "kg", "system": UCUM,
                                          "code": "kg"}
            else:
                o["valueQuantity"] = {"value": round(rng.uniform(35.5, 39.9), 1), "unit": "°C", "system": UCUM,
                                      "code": "Cel"}
        elif kind == "bp":
            o = base_obs([_coding(LOINC, BP[0], BP[1])], "Blood pressure", "vital-signs")
            sys_v, dia_v = rng.randint(95, 175), rng.randint(55, 100)
            if rng.random() < 0.15:
                sys_v, dia_v = dia_v, sys_v + 10  # systolic low, diastolic high: tests component pairing
            o["component"] = [
                {"code": {"coding": [_coding(LOINC, SYSTOLIC[0], SYSTOLIC[1])]},
                 "valueQuantity": {"value": sys_v, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}},
                {"code": {"coding": [_coding(LOINC, DIASTOLIC[0], DIASTOLIC[1])]},
                 "valueQuantity": {"value": dia_v, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}},
            ]
        elif kind == "lab":
            code, display, unit = rng.choice(LABS)
            o = base_obs([_coding(LOINC, code, display)], None, "laboratory")
            value = rng.randint(60, 220) if code == "2339-0" else round(rng.uniform(9.0, 18.0), 1)
            o["valueQuantity"] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
        elif kind == "abo":
            o = base_obs([_coding(LOINC, ABO[0], ABO[1])], None, "laboratory")
            v, d = rng.choice(ABO_VALUES)
            o["valueCodeableConcept"] = {"coding": [_coding(SCT, v, d)], "text": d}
        elif kind == "comment":
            o = base_obs([_coding(LOINC, COMMENT[0], COMMENT[1])], None, None)
            o["valueString"] = rng.choice(["Patient tolerated well", "patient refused", "Pätient resting",
                                           "Follow-up in two weeks"])
        elif kind == "local":
            o = base_obs([_coding(LOCAL, "hr-local", "Pulse (local)")], "Pulse", "vital-signs")
            o["valueQuantity"] = {"value": rng.randint(50, 110), "unit": "/min", "system": UCUM, "code": "/min"}
        else:
            o = base_obs([_coding(None, "nosys-1", "Uncoded measurement")], None, None)
            o["valueQuantity"] = {"value": round(rng.uniform(1, 9), 2), "unit": "U"}
        # subject
        s = rng.random()
        if s < 0.06:
            pass  # no subject
        elif s < 0.10:
            o["subject"] = {"reference": f"Group/{rng.choice(pids[:5])}"}  # same ids as patients
        elif s < 0.12:
            o["subject"] = {"reference": EXTERNAL_PATIENT}
        else:
            o["subject"] = ref_to(rng.choice(pids))
        # effective
        e = rng.random()
        if e < 0.08:
            pass
        elif e < 0.28:
            o["effectivePeriod"] = dict(rng.choice(PERIODS))
        else:
            o["effectiveDateTime"] = rng.choice(DATETIMES)
        # meta
        meta: dict[str, Any] = {}
        if rng.random() < 0.2:
            meta["tag"] = [{"system": TAGS, "code": rng.choice(["needs-review", "batch-7"])}]
            if rng.random() < 0.4:
                meta["tag"].append({"system": TAGS, "code": "batch-9"})
        if rng.random() < 0.12:
            meta["security"] = [{"system": CONF, "code": rng.choice(["R", "N"])}]
        if rng.random() < 0.15:
            meta["profile"] = [rng.choice([PROFILE_A, PROFILE_B, PROFILE_VS])]
        if rng.random() < 0.1:
            meta["source"] = rng.choice(SOURCES)
        if meta:
            o["meta"] = meta
        if rng.random() < 0.3:
            o["identifier"] = [{"system": OBS_ID_SYS, "value": f"OBS-{i % 50}"}]
        if rng.random() < 0.4:
            o["method"] = {"coding": [_coding(METHOD, rng.choice(["auto", "manual"]))]}
        if rng.random() < 0.05:
            o["performer"] = [{"reference": f"Patient/{rng.choice(pids)}"}]
        elif rng.random() < 0.05:
            o["performer"] = [{"reference": "Practitioner/dr-1"}]
        if kind == "lab" and rng.random() < 0.35:
            qid = rng.choice(qr_ids)
            o["derivedFrom"] = [{"reference": f"QuestionnaireResponse/{qid}"}]
        obs_items.append(Item("Observation", o))

    # potassium: implicit-precision boundaries around 5.4
    for v in (5.3, 5.35, 5.4, 5.449, 5.45, 5.5, 54):
        o = base_obs([_coding(LOINC, POTASSIUM[0], POTASSIUM[1])], None, "laboratory")
        o["subject"] = ref_to(rng.choice(pids))
        o["effectiveDateTime"] = rng.choice(DATETIMES)
        o["valueQuantity"] = {"value": v, "unit": "mmol/L", "system": UCUM, "code": "mmol/L"}
        obs_items.append(Item("Observation", o))

    # panels with hasMember -> vital observations of the same patient
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for it in obs_items:
        ref = it.body.get("subject", {}).get("reference", "")
        if ref.split("/")[-2:-1] == ["Patient"] and any(c.get("code") in {v[0] for v in VITALS}
                                                         for c in it.body["code"]["coding"]):
            by_patient.setdefault(ref.split("/")[-1], []).append(it.body)
    for pid in sorted(by_patient)[:8]:
        members = by_patient[pid][:3]
        o = base_obs([_coding(LOINC, PANEL[0], PANEL[1])], "Vital signs panel", "vital-signs")
        o["subject"] = {"reference": f"Patient/{pid}"}
        o["effectiveDateTime"] = rng.choice(DATETIMES)
        o["hasMember"] = [{"reference": f"Observation/{m['id']}"} for m in members]
        referenced.update(m["id"] for m in members)
        obs_items.append(Item("Observation", o))

    for n, it in enumerate(obs_items):
        it.post = it.body["id"] not in referenced and n % 3 == 0
    items.extend(obs_items)
    return Dataset(items)


# ================================================================== server harness
_db_counter = itertools.count()


@dataclass
class Server:
    app: Any
    http: Any
    settings: Any
    key: Any
    client_id: str
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def svc(self) -> Any:
        return self.app.extensions["fhirserver"]

    def token(self, scope: str = "system/*.cruds") -> str:
        if scope not in self.tokens:
            r = self.http.post("/auth/token", data=token_request_form(self.key, self.client_id,
                                                                      self.settings.token_url, scope))
            assert r.status_code == 200, r.get_data(as_text=True)
            self.tokens[scope] = r.get_json()["access_token"]
        return self.tokens[scope]

    def headers(self, scope: str = "system/*.cruds", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(scope)}", **extra}

    def other_client(self, scopes: str, settings: dict[str, Any] | None = None) -> Server:
        key = generate_key("ES384")
        rec = register_backend_client(self.svc.engine, f"search test client {next(_db_counter)}", scopes,
                                      jwks=public_jwks(key), settings=settings)
        return Server(self.app, self.http, self.settings, key, rec.client_id)

    # ---- requests
    def get(self, path: str, params: Iterable[tuple[str, str]] = (), headers: dict[str, str] | None = None) -> Any:
        return self.http.get(path, query_string=list(params), headers=headers or self.headers())

    def search(self, rtype: str, params: Iterable[tuple[str, str]], headers: dict[str, str] | None = None,
               expect: int = 200) -> dict[str, Any]:
        r = self.get(f"/fhir/{rtype}", params, headers)
        assert r.status_code == expect, (rtype, list(params), r.status_code, r.get_data(as_text=True)[:2000])
        return r.get_json()

    def follow(self, url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
        parts = urlsplit(url)
        assert url.startswith(BASE), url
        r = self.http.get(parts.path, query_string=parts.query, headers=headers or self.headers())
        assert r.status_code == 200, r.get_data(as_text=True)[:2000]
        return r.get_json()

    def walk(self, rtype: str, params: Iterable[tuple[str, str]], headers: dict[str, str] | None = None,
             path: str | None = None) -> list[dict[str, Any]]:
        """All pages of a search, following `next` links."""
        if path is None:
            first = self.search(rtype, params, headers)
        else:
            r = self.get(path, params, headers)
            assert r.status_code == 200, r.get_data(as_text=True)[:2000]
            first = r.get_json()
        pages = [first]
        while (nxt := link(pages[-1], "next")) is not None:
            pages.append(self.follow(nxt, headers))
            assert len(pages) < 500, "runaway paging"
        return pages

    def put(self, body: dict[str, Any]) -> dict[str, Any]:
        r = self.http.put(f"/fhir/{body['resourceType']}/{body['id']}", json=body, headers=self.headers())
        assert r.status_code in (200, 201), r.get_data(as_text=True)[:2000]
        return r.get_json()

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post(f"/fhir/{body['resourceType']}", json=body, headers=self.headers())
        assert r.status_code == 201, r.get_data(as_text=True)[:2000]
        return r.get_json()

    def delete(self, rtype: str, rid: str) -> None:
        r = self.http.delete(f"/fhir/{rtype}/{rid}", headers=self.headers())
        assert r.status_code == 204, r.get_data(as_text=True)[:2000]

    def close(self) -> None:
        self.svc.engine.dispose()


def start_server(tmp: Path, request: pytest.FixtureRequest, db: str, **settings_kw: Any) -> Server:
    url = ""
    if db == "postgres":
        pg = request.getfixturevalue("postgres")
        url = pg.create_database(f"search_{next(_db_counter)}_{os.getpid()}")
    settings = make_settings(tmp, url, **settings_kw)
    app = fresh_app(settings)
    svc = app.extensions["fhirserver"]
    key = generate_key("ES384")
    rec = register_backend_client(svc.engine, f"search tests {next(_db_counter)}", "system/*.cruds",
                                  jwks=public_jwks(key))
    return Server(app, app.test_client(), settings, key, rec.client_id)


def store(srv: Server, ds: Dataset, item: Item) -> tuple[str, str]:
    """Write one item (POST or PUT) and record what the server stored."""
    body = dict(item.body)
    if item.post:
        body.pop("id", None)
        got = srv.post(body)
    else:
        got = srv.put(body)
    rid = got["id"]
    kept = dict(body)
    kept["id"] = rid
    kept["meta"] = {**(body.get("meta") or {}), "versionId": got["meta"]["versionId"],
                    "lastUpdated": got["meta"]["lastUpdated"]}
    ds.record((item.rtype, rid), kept)
    return item.rtype, rid


def load(srv: Server, ds: Dataset) -> None:
    for item in ds.items:
        store(srv, ds, item)


# ================================================================== bundle helpers
def link(bundle: dict[str, Any], relation: str) -> str | None:
    for lk in bundle.get("link", []):
        if lk.get("relation") == relation:
            return lk["url"]
    return None


def entries(bundle: dict[str, Any], mode: str = "match") -> list[dict[str, Any]]:
    return [e for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode]


def keys_of(bundle: dict[str, Any], mode: str = "match") -> list[tuple[str, str]]:
    return [(e["resource"]["resourceType"], e["resource"]["id"]) for e in entries(bundle, mode)]


def is_outcome(body: dict[str, Any]) -> bool:
    return body.get("resourceType") == "OperationOutcome" and bool(body.get("issue"))


# ================================================================== the oracle: FHIR search in Python
def norm(text: str) -> str:
    """FHIR string matching: case- and accent-insensitive, whitespace collapsed."""
    decomposed = unicodedata.normalize("NFKD", text)
    return " ".join("".join(c for c in decomposed if not unicodedata.combining(c)).casefold().split())


PREFIX_LIMIT = 20  # documented: normalized prefixes are indexed up to 20 characters (README)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY_US = 86_400_000_000
_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})?)?)?)?$")
INF = float("inf")


def _us(dt: datetime) -> int:
    return (dt - EPOCH) // timedelta(microseconds=1)


def date_range(text: str) -> tuple[float, float]:
    """[start, end) in microseconds since the epoch of a FHIR date/dateTime/instant (UTC if no zone)."""
    m = _DATE.match(text)
    assert m, text
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    zone = UTC
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        zone = timezone(sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))
    if mo is None:
        start = datetime(int(y), 1, 1, tzinfo=zone)
        end = datetime(int(y) + 1, 1, 1, tzinfo=zone)
    elif d is None:
        start = datetime(int(y), int(mo), 1, tzinfo=zone)
        end = datetime(int(y) + (int(mo) == 12), int(mo) % 12 + 1, 1, tzinfo=zone)
    elif hh is None:
        start = datetime(int(y), int(mo), int(d), tzinfo=zone)
        end = start + timedelta(days=1)
    else:
        micro = int((frac or "").ljust(6, "0")[:6]) if frac else 0
        start = datetime(int(y), int(mo), int(d), int(hh), int(mi), int(ss), micro, tzinfo=zone)
        end = start + (timedelta(microseconds=10 ** (6 - min(len(frac), 6))) if frac else timedelta(seconds=1))
    return _us(start), _us(end)


def split_prefix(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap") and \
            (value[2].isdigit() or value[2] in "-+."):
        return value[:2], value[2:]
    return "eq", value


def date_match(r: tuple[float, float], prefix: str, q: tuple[float, float], now_us: int) -> bool:
    rs, re_ = r
    qs, qe = q
    eq = qs <= rs and re_ <= qe
    if prefix == "eq":
        return eq
    if prefix == "ne":
        return not eq
    if prefix == "gt":
        return re_ > qe
    if prefix == "lt":
        return rs < qs
    if prefix == "ge":
        return re_ > qe or eq
    if prefix == "le":
        return rs < qs or eq
    if prefix == "sa":
        return rs >= qe
    if prefix == "eb":
        return re_ <= qs
    assert prefix == "ap"
    margin = max(abs(now_us - qs) // 10, DAY_US)  # 10% of the distance from now, at least a day
    return rs < qe + margin and re_ > qs - margin


def number_match(x: Decimal, prefix: str, text: str) -> bool:
    v = Decimal(text)
    exp = v.as_tuple().exponent
    half = Decimal(5) * Decimal(10) ** (exp - 1) if isinstance(exp, int) and exp <= 0 else Decimal("0.5")
    if prefix == "eq":
        return v - half <= x < v + half
    if prefix == "ne":
        return not (v - half <= x < v + half)
    if prefix in ("gt", "sa"):
        return x > v
    if prefix in ("lt", "eb"):
        return x < v
    if prefix == "ge":
        return x >= v
    if prefix == "le":
        return x <= v
    return abs(x - v) <= abs(v) * Decimal("0.1")


def codings(cc: Any) -> list[tuple[str | None, str]]:
    if not isinstance(cc, dict):
        return []
    if "coding" in cc:
        return [(c.get("system"), c["code"]) for c in cc["coding"] if "code" in c]
    if "code" in cc:
        return [(cc.get("system"), cc["code"])]
    return []


def cc_texts(cc: Any) -> list[str]:
    if not isinstance(cc, dict):
        return []
    out = [cc["text"]] if "text" in cc else []
    out += [c["display"] for c in cc.get("coding", []) if "display" in c]
    return out


def token_match(pairs: list[tuple[str | None, str]], q: str) -> bool:
    system, bar, code = q.partition("|")
    for s, c in pairs:
        if not bar:
            if c == q:
                return True
            continue
        if system == "" and s is not None:
            continue
        if system and s != system:
            continue
        if code and c != code:
            continue
        return True
    return False


def string_match(values: list[str], q: str, modifier: str | None) -> bool:
    if modifier == "exact":
        return q in values
    nq = norm(q)
    if len(nq) <= PREFIX_LIMIT:
        return any(norm(v).startswith(nq) for v in values)
    return any(norm(v) == nq for v in values)


def ref_key(ref: str) -> tuple[str | None, str | None, str | None]:
    """(type, id, url): relative and own-base absolute references are local."""
    if ref.startswith(BASE + "/"):
        ref = ref[len(BASE) + 1:]
    if "://" in ref:
        return None, None, ref
    parts = ref.split("/")
    if len(parts) == 2:
        return parts[0], parts[1], None
    return None, None, ref


def ref_match(refs: list[str], q: str, modifier: str | None, targets: tuple[str, ...]) -> bool:
    qt, qi, qu = ref_key(q)
    for ref in refs:
        t, i, u = ref_key(ref)
        if modifier:  # type modifier
            if qt is None and "/" not in q:
                if t == modifier and i == q:
                    return True
            elif qt == modifier and (t, i) == (qt, qi):
                return True
        elif qt is not None:
            if (t, i) == (qt, qi):
                return True
        elif "/" not in q and ":" not in q:
            if i == q and (len(targets) != 1 or t == targets[0]):
                return True
        elif u == q:
            return True
    return False


def _refs(*values: Any) -> list[str]:
    out = []
    for v in values:
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, dict) and isinstance(x.get("reference"), str):
                out.append(x["reference"])
    return out


def _qty(q: Any) -> list[tuple[Decimal, str | None, str | None]]:
    if isinstance(q, dict) and isinstance(q.get("value"), (int, float)):
        return [(Decimal(repr(q["value"])), q.get("system"), q.get("code") or q.get("unit"))]
    return []


def _name_parts(names: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for n in names:
        for part in ("family", "text"):
            if part in n:
                out.append(n[part])
        for part in ("given", "prefix", "suffix"):
            out.extend(n.get(part, []))
    return out


def _address_parts(addresses: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for a in addresses:
        out.extend(a.get("line", []))
        out.extend(a[k] for k in ("city", "district", "state", "postalCode", "country", "text") if k in a)
    return out


def _effective(o: dict[str, Any]) -> list[tuple[float, float]]:
    if "effectiveDateTime" in o:
        return [date_range(o["effectiveDateTime"])]
    if "effectiveInstant" in o:
        return [date_range(o["effectiveInstant"])]
    if "effectivePeriod" in o:
        p = o["effectivePeriod"]
        return [(date_range(p["start"])[0] if "start" in p else -INF, date_range(p["end"])[1] if "end" in p else INF)]
    return []


def _last_updated(r: dict[str, Any]) -> list[tuple[float, float]]:
    return [date_range(r["meta"]["lastUpdated"])]  # millisecond range: exact for ms-precision queries


def _meta_pairs(r: dict[str, Any], element: str) -> list[tuple[str | None, str]]:
    return [(c.get("system"), c["code"]) for c in (r.get("meta") or {}).get(element, [])]


def _obs_nodes(o: dict[str, Any], which: str) -> list[dict[str, Any]]:
    if which == "self":
        return [o]
    if which == "component":
        return list(o.get("component", []))
    return [o, *o.get("component", [])]


@dataclass(frozen=True)
class P:
    """A search parameter as the oracle evaluates it."""

    type: str
    values: Callable[[dict[str, Any]], list[Any]]
    texts: Callable[[dict[str, Any]], list[str]] | None = None  # token :text
    targets: tuple[str, ...] = ()
    protected: bool = False
    second: str = ""  # composite: type of the second component


def _composite(which: str, second: Callable[[dict[str, Any]], list[Any]]) -> Callable:
    def values(o: dict[str, Any]) -> list[Any]:
        return [(codings(n.get("code")), second(n)) for n in _obs_nodes(o, which)]
    return values


def _common() -> dict[str, P]:
    return {
        "_id": P("token", lambda r: [(None, r["id"])]),
        "_lastUpdated": P("date", _last_updated),
        "_tag": P("token", lambda r: _meta_pairs(r, "tag")),
        "_security": P("token", lambda r: _meta_pairs(r, "security")),
        "_profile": P("uri", lambda r: list((r.get("meta") or {}).get("profile", []))),
        "_source": P("uri", lambda r: [r["meta"]["source"]] if "source" in (r.get("meta") or {}) else []),
    }


def _telecom(system: str | None) -> Callable[[dict[str, Any]], list[Any]]:
    return lambda r: [(c.get("system"), c["value"]) for c in r.get("telecom", [])
                      if system is None or c.get("system") == system]


ALL_TARGETS = ("Patient", "Group", "Device", "Location", "Observation", "Practitioner")
PARAMS: dict[str, dict[str, P]] = {
    "Patient": {
        **_common(),
        "name": P("string", lambda r: _name_parts(r.get("name", [])), protected=True),
        "family": P("string", lambda r: [n["family"] for n in r.get("name", []) if "family" in n], protected=True),
        "given": P("string", lambda r: [g for n in r.get("name", []) for g in n.get("given", [])], protected=True),
        "address": P("string", lambda r: _address_parts(r.get("address", [])), protected=True),
        "address-city": P("string", lambda r: [a["city"] for a in r.get("address", []) if "city" in a], protected=True),
        "address-postalcode": P("string", lambda r: [a["postalCode"] for a in r.get("address", [])
                                                     if "postalCode" in a], protected=True),
        "address-country": P("string", lambda r: [a["country"] for a in r.get("address", []) if "country" in a],
                             protected=True),
        "gender": P("token", lambda r: [(None, r["gender"])] if "gender" in r else []),
        "active": P("token", lambda r: [(None, "true" if r["active"] else "false")] if "active" in r else []),
        "identifier": P("token", lambda r: [(i.get("system"), i["value"]) for i in r.get("identifier", [])],
                        protected=True),
        "telecom": P("token", _telecom(None), protected=True),
        "phone": P("token", _telecom("phone"), protected=True),
        "email": P("token", _telecom("email"), protected=True),
        "birthdate": P("date", lambda r: [date_range(r["birthDate"])] if "birthDate" in r else [], protected=True),
        "link": P("reference", lambda r: _refs([lk["other"] for lk in r.get("link", [])]),
                  targets=("Patient", "RelatedPerson")),
    },
    "Observation": {
        **_common(),
        "code": P("token", lambda o: codings(o.get("code")), texts=lambda o: cc_texts(o.get("code"))),
        "category": P("token", lambda o: [p for c in o.get("category", []) for p in codings(c)],
                      texts=lambda o: [t for c in o.get("category", []) for t in cc_texts(c)]),
        "status": P("token", lambda o: [(None, o["status"])]),
        "method": P("token", lambda o: codings(o.get("method"))),
        "identifier": P("token", lambda o: [(i.get("system"), i["value"]) for i in o.get("identifier", [])],
                        protected=True),
        "combo-code": P("token", lambda o: [p for n in _obs_nodes(o, "combo") for p in codings(n.get("code"))],
                        texts=lambda o: [t for n in _obs_nodes(o, "combo") for t in cc_texts(n.get("code"))]),
        "component-code": P("token", lambda o: [p for n in _obs_nodes(o, "component") for p in codings(n.get("code"))]),
        "value-concept": P("token", lambda o: codings(o.get("valueCodeableConcept")),
                           texts=lambda o: cc_texts(o.get("valueCodeableConcept"))),
        "value-string": P("string", lambda o: ([o["valueString"]] if "valueString" in o else [])
                          + ([o["valueCodeableConcept"]["text"]] if "text" in o.get("valueCodeableConcept", {}) else []),
                          protected=True),
        "subject": P("reference", lambda o: _refs(o.get("subject")), targets=("Group", "Device", "Patient", "Location")),
        "patient": P("reference", lambda o: [r for r in _refs(o.get("subject")) if _ref_type(r) == "Patient"],
                     targets=("Patient",)),
        "performer": P("reference", lambda o: _refs(o.get("performer", [])),
                       targets=("Practitioner", "Organization", "CareTeam", "Patient", "PractitionerRole",
                                "RelatedPerson")),
        "derived-from": P("reference", lambda o: _refs(o.get("derivedFrom", [])),
                          targets=("Media", "Observation", "ImagingStudy", "MolecularSequence",
                                   "QuestionnaireResponse", "DocumentReference")),
        "has-member": P("reference", lambda o: _refs(o.get("hasMember", [])),
                        targets=("Observation", "MolecularSequence", "QuestionnaireResponse")),
        "date": P("date", _effective),
        "value-quantity": P("quantity", lambda o: _qty(o.get("valueQuantity"))),
        "component-value-quantity": P("quantity", lambda o: [q for n in _obs_nodes(o, "component")
                                                             for q in _qty(n.get("valueQuantity"))]),
        "combo-value-quantity": P("quantity", lambda o: [q for n in _obs_nodes(o, "combo")
                                                         for q in _qty(n.get("valueQuantity"))]),
        "code-value-quantity": P("composite", _composite("self", lambda n: _qty(n.get("valueQuantity"))),
                                 second="quantity"),
        "component-code-value-quantity": P("composite", _composite("component",
                                                                   lambda n: _qty(n.get("valueQuantity"))),
                                           second="quantity"),
        "combo-code-value-quantity": P("composite", _composite("combo", lambda n: _qty(n.get("valueQuantity"))),
                                       second="quantity"),
        "code-value-concept": P("composite", _composite("self", lambda n: codings(n.get("valueCodeableConcept"))),
                                second="token"),
    },
    "QuestionnaireResponse": {
        **_common(),
        "status": P("token", lambda r: [(None, r["status"])]),
        "subject": P("reference", lambda r: _refs(r.get("subject")), targets=ALL_TARGETS),
        "patient": P("reference", lambda r: [x for x in _refs(r.get("subject")) if _ref_type(x) == "Patient"],
                     targets=("Patient",)),
        "author": P("reference", lambda r: _refs(r.get("author")),
                    targets=("Practitioner", "Organization", "Device", "Patient", "PractitionerRole", "RelatedPerson")),
        "questionnaire": P("reference", lambda r: [r["questionnaire"]] if "questionnaire" in r else [],
                           targets=("Questionnaire",)),
        "authored": P("date", lambda r: [date_range(r["authored"])] if "authored" in r else []),
    },
    "Consent": {
        **_common(),
        "status": P("token", lambda r: [(None, r["status"])]),
        "patient": P("reference", lambda r: _refs(r.get("patient")), targets=("Patient",)),
        "category": P("token", lambda r: [p for c in r.get("category", []) for p in codings(c)]),
        "date": P("date", lambda r: [date_range(r["dateTime"])] if "dateTime" in r else []),
    },
}


def _ref_type(ref: str) -> str | None:
    """The type a reference names (what FHIRPath resolve() is checked against)."""
    parts = ref.split("?")[0].rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return parts[-2] if len(parts) >= 2 else None


def token_text_params() -> set[str]:
    """Token parameters whose display texts are indexed for :text (documented configuration)."""
    doc = json.loads((REPO / "profiles" / "protected-parameters.json").read_text())
    return set(doc.get("tokenText", []))


class OracleError(Exception):
    """The oracle's view: the server must refuse this query (400)."""


# Patient compartment (FHIR R4 CompartmentDefinition): which reference params put a resource
# into a patient's compartment.
COMPARTMENT = {"Observation": ("subject", "performer"), "QuestionnaireResponse": ("subject", "author"),
               "Consent": ("patient",), "Patient": ("link",)}


class Oracle:
    def __init__(self, ds: Dataset, visible: Callable[[tuple[str, str]], bool] | None = None) -> None:
        self.ds = ds
        self.visible = visible or (lambda key: True)
        self.now_us = _us(datetime.now(UTC))

    def keys(self, rtype: str) -> list[tuple[str, str]]:
        return [k for k in self.ds.of_type(rtype) if self.visible(k)]

    def resolve(self, ref: str) -> tuple[str, str] | None:
        t, i, _u = ref_key(ref)
        if t is None or (t, i) not in self.ds.stored or not self.visible((t, i)):  # type: ignore[comparison-overlap]
            return None
        return t, i  # type: ignore[return-value]

    # ---- matching
    def search(self, rtype: str, params: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Matching keys in creation order (result parameters are ignored here)."""
        now = _us(datetime.now(UTC))
        self.now_us = now
        clauses = [(k, v) for k, v in params if not k.startswith("_") or k.split(":")[0] in
                   ("_id", "_lastUpdated", "_tag", "_security", "_profile", "_source", "_has")]
        return [k for k in self.keys(rtype)
                if all(self.match(rtype, self.ds.stored[k], key, value) for key, value in clauses)]

    def match(self, rtype: str, res: dict[str, Any], key: str, value: str) -> bool:
        if key.startswith("_has:"):
            _, source, ref_param, rest = key.split(":", 3)
            for k in self.keys(source):
                src = self.ds.stored[k]
                if any(ref_key(r)[:2] == (rtype, res["id"]) for r in PARAMS[source][ref_param].values(src)) and \
                        self.match(source, src, rest, value):
                    return True
            return False
        head, dot, rest = key.partition(".")
        name, _, modifier = head.partition(":")
        p = PARAMS[rtype][name]
        if dot:  # chain
            target = modifier or None
            for ref in p.values(res):
                hit = self.resolve(ref)
                if hit is None or (target and hit[0] != target):
                    continue
                if self.match(hit[0], self.ds.stored[hit], rest, value):
                    return True
            return False
        if modifier == "text" and f"{rtype}.{name}" not in token_text_params():
            raise OracleError  # :text is only indexed for the tokens the profile lists
        values = p.values(res)
        if modifier == "missing":
            present = bool(values) if p.type != "composite" else any(a and b for a, b in values)
            return (not present) if value == "true" else present
        alternatives = [v.replace("\\,", ",") for v in re.split(r"(?<!\\),", value)]
        if modifier == "not":
            return not any(self._value(p, res, values, None, v) for v in alternatives)
        return any(self._value(p, res, values, modifier, v) for v in alternatives)

    def _value(self, p: P, res: dict[str, Any], values: list[Any], modifier: str | None, v: str) -> bool:
        if p.type == "string":
            if modifier == "contains":
                raise OracleError
            return string_match(values, v, modifier)
        if p.type == "token":
            if modifier == "text":
                assert p.texts is not None
                return string_match(p.texts(res), v, None)
            return token_match(values, v)
        if p.type == "reference":
            return ref_match(values, v, modifier, p.targets)
        if p.type == "date":
            prefix, text = split_prefix(v)  # protected dates too: every prefix (calendar buckets)
            q = date_range(text)
            return any(date_match(r, prefix, q, self.now_us) for r in values)
        if p.type == "quantity":
            prefix, text = split_prefix(v)
            number, _, units = text.partition("|")
            system, _, code = units.partition("|")
            return any(number_match(x, prefix, number) and (not system or s == system) and (not code or c == code)
                       for x, s, c in values)
        if p.type == "number":
            prefix, text = split_prefix(v)
            return any(number_match(Decimal(repr(x)), prefix, text) for x in values)
        if p.type == "uri":
            return (any(u.startswith(v) for u in values) if modifier == "below" else v in values)
        if p.type == "composite":
            first, _, second = v.partition("$")
            for pairs, seconds in values:
                if not token_match(pairs, first):
                    continue
                if p.second == "token" and token_match(seconds, second):
                    return True
                if p.second == "quantity":
                    prefix, text = split_prefix(second)
                    number, _, units = text.partition("|")
                    system, _, code = units.partition("|")
                    if any(number_match(x, prefix, number) and (not system or s == system) and (not code or c == code)
                           for x, s, c in seconds):
                        return True
            return False
        raise AssertionError(p.type)

    # ---- sorting (ties: creation order)
    def sort(self, rtype: str, keys: list[tuple[str, str]], spec: str) -> list[tuple[str, str]]:
        fields = []
        for raw in spec.split(","):
            desc = raw.startswith("-")
            fields.append((raw.lstrip("-"), desc))

        def sort_value(res: dict[str, Any], code: str, desc: bool) -> Any:
            if code == "_id":
                return res["id"]
            if code == "_lastUpdated":
                return date_range(res["meta"]["lastUpdated"])[0]
            p = PARAMS[rtype][code]
            vals = p.values(res)
            if not vals:
                return None
            if p.type == "date":
                return max(v[1] for v in vals) if desc else min(v[0] for v in vals)
            if p.type == "quantity":
                return max(v[0] for v in vals) if desc else min(v[0] for v in vals)
            if p.type == "number":
                return max(vals) if desc else min(vals)
            if p.type == "token":
                return max(c for _s, c in vals) if desc else min(c for _s, c in vals)
            raise AssertionError(p.type)

        def cmp(a: tuple[str, str], b: tuple[str, str]) -> int:
            ra, rb = self.ds.stored[a], self.ds.stored[b]
            for code, desc in fields:
                va, vb = sort_value(ra, code, desc), sort_value(rb, code, desc)
                if va == vb:
                    continue
                if va is None:
                    return 1  # missing values last, either direction
                if vb is None:
                    return -1
                less = va < vb
                return (1 if less else -1) if desc else (-1 if less else 1)
            return self.ds.seq[a] - self.ds.seq[b]

        return sorted(keys, key=cmp_to_key(cmp))

    # ---- includes
    def include(self, matches: list[tuple[str, str]], source_type: str, param: str,
                target: str | None = None) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for k in matches:
            if k[0] != source_type:
                continue
            for ref in PARAMS[source_type][param].values(self.ds.stored[k]):
                hit = self.resolve(ref)
                if hit and (target is None or hit[0] == target) and hit not in out:
                    out.append(hit)
        return out

    def revinclude(self, matches: list[tuple[str, str]], source_type: str, param: str) -> list[tuple[str, str]]:
        wanted = set(matches)
        out = []
        for k in self.keys(source_type):
            refs = PARAMS[source_type][param].values(self.ds.stored[k])
            if any(ref_key(r)[:2] in wanted for r in refs):
                out.append(k)
        return out

    # ---- compartments
    def patients_of(self, key: tuple[str, str]) -> set[str]:
        res = self.ds.stored[key]
        out = {res["id"]} if key[0] == "Patient" else set()
        for pname in COMPARTMENT.get(key[0], ()):
            for ref in PARAMS[key[0]][pname].values(res):
                t, i, _u = ref_key(ref)
                if t == "Patient" and i:
                    out.add(i)
        return out

    def compartment(self, pid: str) -> set[tuple[str, str]]:
        return {k for k in self.ds.order if k[0] in COMPARTMENT and self.visible(k) and pid in self.patients_of(k)}


# ================================================================== fixture
