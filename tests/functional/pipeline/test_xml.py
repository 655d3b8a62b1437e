"""FHIR XML in and out (fhirserver/fhir/xml_format.py): every HL7 R4 example round-trips through
the XML codec; over HTTP a resource is created, updated and read in XML, searches and errors
answer in XML when asked (`Accept`, `_format`), JSON stays the default, and bad or hostile XML is
a 400 that stores nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from fhirserver.fhir.xml_format import from_xml, to_xml

from .test_examples import INVALID_EXAMPLES
from .test_validation import Unchanged, outcome, post, srv  # noqa: F401 - srv is the module's server fixture

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "fixtures" / "hl7-r4-examples").glob("*.json"))
FHIR = "{http://hl7.org/fhir}"
XML_TYPES = ["application/fhir+xml", "application/xml", "text/xml"]


def _without_div(body: Any) -> tuple[Any, list[bytes]]:
    """The resource with every narrative div taken out, and those divs canonicalized (an XHTML
    character may come back as an entity: the same content)."""
    divs: list[bytes] = []

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "div" and isinstance(v, str):
                    divs.append(etree.tostring(etree.fromstring(v.encode()), method="c14n"))
                else:
                    out[k] = walk(v)
            return out
        if isinstance(node, list):
            return [walk(x) for x in node]
        return node

    return walk(body), divs


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_hl7_example_round_trips_through_xml(path: Path) -> None:
    original = json.loads(path.read_text())
    from fhir.resources.R4B import get_fhir_model_class

    if path.name in INVALID_EXAMPLES and "linkId" in INVALID_EXAMPLES[path.name]:
        assert to_xml(original) is None  # the model refuses it as the server does: answered in JSON
        return

    # what the R4B model holds of it (a dateTime's +00:00 is written Z): the baseline
    held = json.loads(get_fhir_model_class(original["resourceType"]).model_validate(original).model_dump_json())
    xml = to_xml(original)
    assert xml is not None
    root = etree.fromstring(xml)
    assert root.tag == FHIR + original["resourceType"]
    back = from_xml(xml)
    assert _without_div(back) == _without_div(held)


def _xml(resp: Any) -> Any:
    assert resp.headers["Content-Type"].startswith("application/fhir+xml"), resp.headers
    return etree.fromstring(resp.get_data())


def _value(root: Any, path: str) -> str | None:
    node = root.find("/".join(FHIR + p for p in path.split("/")))
    return None if node is None else node.get("value")


@pytest.mark.parametrize("ctype", XML_TYPES)
def test_create_update_and_read_in_xml(srv, ctype: str) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    http, h = srv
    xml = (b'<Patient xmlns="http://hl7.org/fhir"><active value="true"/><name><family value="Xu"/>'
           b'<given value="Mei"/></name><birthDate value="1980-02-03"/></Patient>')
    created = http.post("/fhir/Patient", data=xml, headers={**h, "Content-Type": ctype})
    assert created.status_code == 201, created.get_data(as_text=True)
    body = created.get_json()  # answered in JSON: nothing asked for XML
    pid = body["id"]
    assert body["name"] == [{"family": "Xu", "given": ["Mei"]}] and body["birthDate"] == "1980-02-03"

    read = http.get(f"/fhir/Patient/{pid}", headers={**h, "Accept": ctype})
    assert read.status_code == 200
    root = _xml(read)
    assert root.tag == FHIR + "Patient"
    assert _value(root, "id") == pid and _value(root, "name/family") == "Xu" and _value(root, "active") == "true"
    assert from_xml(read.get_data())["meta"]["versionId"] == "1"

    update = (f'<Patient xmlns="http://hl7.org/fhir"><id value="{pid}"/><active value="false"/>'
              f'<name><family value="Xu"/></name></Patient>').encode()
    put = http.put(f"/fhir/Patient/{pid}", data=update, headers={**h, "Content-Type": ctype, "Accept": ctype})
    assert put.status_code == 200, put.get_data(as_text=True)
    root = _xml(put)
    assert _value(root, "active") == "false" and _value(root, "meta/versionId") == "2"
    # JSON stays the default
    assert http.get(f"/fhir/Patient/{pid}", headers=h).get_json()["active"] is False


@pytest.mark.parametrize("fmt", ["xml", "application/fhir%2Bxml", "application/xml", "text/xml"])
def test_format_parameter_asks_for_xml(srv, fmt: str) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    http, h = srv
    pid = post(http, h, {"resourceType": "Patient", "active": True}).get_json()["id"]
    assert _value(_xml(http.get(f"/fhir/Patient/{pid}?_format={fmt}", headers=h)), "id") == pid
    bundle = _xml(http.get(f"/fhir/Patient?_id={pid}&_format={fmt}", headers=h))
    assert bundle.tag == FHIR + "Bundle" and _value(bundle, "type") == "searchset" and _value(bundle, "total") == "1"
    assert _value(bundle, "entry/resource/Patient/id") == pid
    meta = _xml(http.get(f"/fhir/metadata?_format={fmt}"))
    assert meta.tag == FHIR + "CapabilityStatement"
    assert "application/fhir+xml" in [f.get("value") for f in meta.findall(FHIR + "format")]


def test_errors_answer_in_xml_when_xml_was_asked(srv) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    http, h = srv
    missing = http.get("/fhir/Patient/no-such-id", headers={**h, "Accept": "application/fhir+xml"})
    assert missing.status_code == 404
    root = _xml(missing)
    assert root.tag == FHIR + "OperationOutcome" and _value(root, "issue/code") == "not-found"
    # an unsupported type is still a 406 (in JSON: nothing the caller accepts could carry it)
    outcome(http.get("/fhir/Patient", headers={**h, "Accept": "application/pdf"}), 406, "not-supported")
    # Bulk Data answers in JSON only
    kickoff = http.get("/fhir/$export", headers={**h, "Accept": "application/fhir+xml", "Prefer": "respond-async"})
    assert kickoff.status_code == 406


HOSTILE = {
    "not well-formed": b"<Patient xmlns=\"http://hl7.org/fhir\"><active value=\"true\"></Patient>",
    "wrong namespace": b'<Patient xmlns="urn:other"><active value="true"/></Patient>',
    "unknown type": b'<Nope xmlns="http://hl7.org/fhir"><active value="true"/></Nope>',
    "unknown element": b'<Patient xmlns="http://hl7.org/fhir"><shoeSize value="9"/></Patient>',
    "bad value": b'<Patient xmlns="http://hl7.org/fhir"><birthDate value="yesterday"/></Patient>',
    "external entity": (b'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                        b'<Patient xmlns="http://hl7.org/fhir"><name><family value="&x;"/></name></Patient>'),
    "entity expansion": (b'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;'
                         b'&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
                         b'<Patient xmlns="http://hl7.org/fhir"><name><family value="&c;"/></name></Patient>'),
    "empty": b"",
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_bad_or_hostile_xml_is_a_400_and_stores_nothing(srv, case: str) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    http, h = srv
    with Unchanged(http, h):
        resp = http.post("/fhir/Patient", data=HOSTILE[case], headers={**h, "Content-Type": "application/fhir+xml"})
        assert resp.status_code == 400, resp.get_data(as_text=True)
        text = resp.get_data(as_text=True)
        assert "root:" not in text and "aaaaaaaaaaaaaaaaaaaa" not in text  # no file content, no expansion
        assert resp.get_json()["resourceType"] == "OperationOutcome"


def test_transaction_and_fhirpath_patch_in_xml(srv) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    http, h = srv
    xml_type = {"Content-Type": "application/fhir+xml", "Accept": "application/fhir+xml"}
    bundle = (b'<Bundle xmlns="http://hl7.org/fhir"><type value="transaction"/>'
              b'<entry><fullUrl value="urn:uuid:0b7e3a3a-1111-4d4e-9d0f-6b6c5d4e3f2a"/><resource><Patient>'
              b'<name><family value="Okafor"/></name></Patient></resource>'
              b'<request><method value="POST"/><url value="Patient"/></request></entry>'
              b'<entry><resource><Observation><status value="final"/><code><text value="weight"/></code>'
              b'<subject><reference value="urn:uuid:0b7e3a3a-1111-4d4e-9d0f-6b6c5d4e3f2a"/></subject>'
              b'<valueQuantity><value value="72.5"/><unit value="kg"/></valueQuantity></Observation></resource>'
              b'<request><method value="POST"/><url value="Observation"/></request></entry></Bundle>')
    resp = http.post("/fhir", data=bundle, headers={**h, **xml_type})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    root = _xml(resp)
    assert root.tag == FHIR + "Bundle" and _value(root, "type") == "transaction-response"
    locations = [e.get("value") for e in root.iter(FHIR + "location")]
    assert len(locations) == 2 and "/Patient/" in locations[0] and "/Observation/" in locations[1]
    pid = locations[0].split("/Patient/")[1].split("/")[0]
    oid = locations[1].split("/Observation/")[1].split("/")[0]
    observation = http.get(f"/fhir/Observation/{oid}", headers=h).get_json()
    assert observation["subject"]["reference"] == f"Patient/{pid}"  # the urn:uuid was resolved
    assert observation["valueQuantity"]["value"] == 72.5

    patch = (b'<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="operation"/>'
             b'<part><name value="type"/><valueCode value="replace"/></part>'
             b'<part><name value="path"/><valueString value="Patient.name.family"/></part>'
             b'<part><name value="value"/><valueString value="Okafor-Ade"/></part></parameter></Parameters>')
    patched = http.patch(f"/fhir/Patient/{pid}", data=patch, headers={**h, **xml_type})
    assert patched.status_code == 200, patched.get_data(as_text=True)
    assert _value(_xml(patched), "name/family") == "Okafor-Ade"
    assert http.get(f"/fhir/Patient/{pid}", headers=h).get_json()["name"][0]["family"] == "Okafor-Ade"


def test_a_resource_the_caller_may_not_read_answers_in_xml_as_an_unknown_one(srv) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """A Patient whose Consent denies this client: its read in XML is the 404 of an id that does
    not exist, naming nothing of it."""
    http, h = srv
    pid = post(http, h, {"resourceType": "Patient", "name": [{"family": "Hidden-Xml"}]}).get_json()["id"]
    consent = {"resourceType": "Consent", "status": "active", "patient": {"reference": f"Patient/{pid}"},
               "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                     "code": "patient-privacy"}]},
               "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
               "provision": {"type": "deny"}}
    assert post(http, h, consent, "Consent").status_code == 201
    xml = {**h, "Accept": "application/fhir+xml"}
    hidden = http.get(f"/fhir/Patient/{pid}", headers=xml)
    unknown = http.get("/fhir/Patient/no-such-patient", headers=xml)
    assert hidden.status_code == unknown.status_code == 404
    a, b = _xml(hidden), _xml(unknown)
    assert _value(a, "issue/code") == _value(b, "issue/code") == "not-found"
    assert "Hidden-Xml" not in hidden.get_data(as_text=True)
    # and the same in JSON
    assert http.get(f"/fhir/Patient/{pid}", headers=h).status_code == 404
