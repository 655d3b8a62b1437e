"""A QuestionnaireResponse whose `questionnaire` names a stored Questionnaire is checked against
it on every write (create, update, patch, transaction) and in `$validate`: linkIds, answer types,
repeats, required items (once completed), enableWhen, answerOption, a local answerValueSet and
maxLength. A refused write stores nothing."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.conftest import BackendClient

URL = "http://example.org/q/intake"
SCT = "http://snomed.info/sct"
SMOKER = {"system": SCT, "code": "77176002"}
NON_SMOKER = {"system": SCT, "code": "8392000"}

QUESTIONNAIRE: dict[str, Any] = {
    "resourceType": "Questionnaire", "url": URL, "version": "2", "status": "active",
    "contained": [{"resourceType": "ValueSet", "id": "yn", "status": "active", "compose": {"include": [
        {"system": "http://terminology.hl7.org/CodeSystem/v2-0136", "concept": [{"code": "Y"}, {"code": "N"}]}]}}],
    "item": [
        {"linkId": "name", "type": "string", "required": True, "maxLength": 20},
        {"linkId": "age", "type": "integer", "required": True},
        {"linkId": "smoking", "type": "choice", "answerOption": [{"valueCoding": SMOKER}, {"valueCoding": NON_SMOKER}]},
        {"linkId": "packs", "type": "decimal", "required": True,
         "enableWhen": [{"question": "smoking", "operator": "=", "answerCoding": SMOKER}]},
        {"linkId": "allergies", "type": "open-choice", "repeats": True,
         "answerOption": [{"valueCoding": {"system": SCT, "code": "91936005"}}]},
        {"linkId": "consent", "type": "choice", "answerValueSet": "#yn"},
        {"linkId": "visit", "type": "group", "item": [
            {"linkId": "visit.date", "type": "date", "required": True},
            {"linkId": "visit.adult-only", "type": "boolean",
             "enableWhen": [{"question": "age", "operator": ">=", "answerInteger": 18}]},
        ]},
    ],
}


def answer(link: str, **value: Any) -> dict[str, Any]:
    return {"linkId": link, "answer": [value]}


VALID: dict[str, Any] = {
    "resourceType": "QuestionnaireResponse", "status": "completed", "questionnaire": URL,
    "subject": {"reference": "Patient/q1"},
    "item": [
        answer("name", valueString="Ada"), answer("age", valueInteger=40),
        answer("smoking", valueCoding=SMOKER), answer("packs", valueDecimal=0.5),
        {"linkId": "allergies", "answer": [{"valueCoding": {"system": SCT, "code": "91936005"}},
                                           {"valueString": "cat hair"}]},
        answer("consent", valueCoding={"system": "http://terminology.hl7.org/CodeSystem/v2-0136", "code": "Y"}),
        {"linkId": "visit", "item": [answer("visit.date", valueDate="2024-05-01"),
                                     answer("visit.adult-only", valueBoolean=True)]},
    ],
}


def changed(fn: Any) -> dict[str, Any]:
    body = copy.deepcopy(VALID)
    fn(body)
    return body


def item(body: dict[str, Any], link: str) -> dict[str, Any]:
    return next(i for i in body["item"] if i["linkId"] == link)


def drop(body: dict[str, Any], link: str) -> None:
    body["item"] = [i for i in body["item"] if i["linkId"] != link]


# (name, response, the expression of the violation, words of its diagnostics)
INVALID = [
    ("unknown-link", changed(lambda b: b["item"].append(answer("shoe-size", valueInteger=42))),
     "QuestionnaireResponse.item[7].linkId", "not an item"),
    ("wrong-type", changed(lambda b: item(b, "age").update(answer("age", valueString="forty"))),
     "QuestionnaireResponse.item[1].answer[0]", "must be valueInteger"),
    ("not-repeating", changed(lambda b: item(b, "age")["answer"].append({"valueInteger": 41})),
     "QuestionnaireResponse.item[1].answer", "does not repeat"),
    ("required-missing", changed(lambda b: drop(b, "age")), "QuestionnaireResponse.item", "'age' is required"),
    ("enabled-required-missing", changed(lambda b: drop(b, "packs")), "QuestionnaireResponse.item",
     "'packs' is required"),
    ("answered-while-disabled", changed(lambda b: item(b, "smoking").update(answer("smoking", valueCoding=NON_SMOKER))),
     "QuestionnaireResponse.item[3].answer", "enableWhen"),
    ("not-an-option", changed(lambda b: item(b, "smoking").update(
        answer("smoking", valueCoding={"system": SCT, "code": "1"}))), "QuestionnaireResponse.item[2].answer[0]",
     "answerOption"),
    ("not-in-local-value-set", changed(lambda b: item(b, "consent").update(
        answer("consent", valueCoding={"system": "http://terminology.hl7.org/CodeSystem/v2-0136", "code": "X"}))),
     "QuestionnaireResponse.item[5].answer[0]", "value set #yn"),
    ("too-long", changed(lambda b: item(b, "name").update(answer("name", valueString="A" * 21))),
     "QuestionnaireResponse.item[0].answer[0]", "at most 20"),
    ("nested-required-missing", changed(lambda b: item(b, "visit").update(
        {"item": [answer("visit.adult-only", valueBoolean=True)]})), "QuestionnaireResponse.item[6].item",
     "'visit.date' is required"),
    ("nested-disabled", changed(lambda b: (item(b, "age").update(answer("age", valueInteger=12)))),
     "QuestionnaireResponse.item[6].item[1].answer", "enableWhen"),
    ("group-with-answer", changed(lambda b: item(b, "visit").update({"answer": [{"valueString": "x"}]})),
     "QuestionnaireResponse.item[6].answer", "group"),
]


@pytest.fixture
def stored(http: Any, admin: BackendClient) -> None:
    assert http.put("/fhir/Patient/q1", json={"resourceType": "Patient", "id": "q1"},
                    headers=admin.headers()).status_code in (200, 201)
    resp = http.post("/fhir/Questionnaire", json=QUESTIONNAIRE, headers=admin.headers())
    assert resp.status_code == 201, resp.get_data(as_text=True)


def count(http: Any, admin: BackendClient) -> int:
    return int(http.get("/fhir/QuestionnaireResponse?_summary=count", headers=admin.headers()).get_json()["total"])


def test_a_conforming_response_is_stored(http: Any, admin: BackendClient, stored: None) -> None:
    resp = http.post("/fhir/QuestionnaireResponse", json=VALID, headers=admin.headers())
    assert resp.status_code == 201, resp.get_data(as_text=True)
    # in progress: required items may still be missing
    partial = changed(lambda b: (b.update(status="in-progress"), drop(b, "name"), drop(b, "packs")))
    assert http.post("/fhir/QuestionnaireResponse", json=partial, headers=admin.headers()).status_code == 201
    # the versioned canonical names the same Questionnaire
    versioned = changed(lambda b: b.update(questionnaire=URL + "|2"))
    assert http.post("/fhir/QuestionnaireResponse", json=versioned, headers=admin.headers()).status_code == 201


@pytest.mark.parametrize(("name", "body", "where", "words"), INVALID, ids=[c[0] for c in INVALID])
def test_a_violation_is_refused_with_its_place(http: Any, admin: BackendClient, stored: None, name: str,
                                               body: dict[str, Any], where: str, words: str) -> None:
    before = count(http, admin)
    resp = http.post("/fhir/QuestionnaireResponse", json=body, headers=admin.headers())
    assert resp.status_code == 422, (name, resp.get_data(as_text=True))
    outcome = resp.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert any(where in i.get("expression", []) and words in i["diagnostics"] for i in outcome["issue"]), outcome
    assert count(http, admin) == before  # nothing stored
    # $validate reports the same violation (200: the operation ran) and stores nothing either
    resp = http.post("/fhir/QuestionnaireResponse/$validate", json=body, headers=admin.headers())
    assert resp.status_code == 200
    assert any(i["severity"] == "error" and where in i.get("expression", []) for i in resp.get_json()["issue"])
    assert count(http, admin) == before


def test_update_patch_and_transaction_are_checked_too(http: Any, admin: BackendClient, stored: None) -> None:
    created = http.post("/fhir/QuestionnaireResponse", json=VALID, headers=admin.headers()).get_json()
    rid = created["id"]
    bad = changed(lambda b: drop(b, "age"))
    bad["id"] = rid
    assert http.put(f"/fhir/QuestionnaireResponse/{rid}", json=bad, headers=admin.headers()).status_code == 422
    patch = [{"op": "replace", "path": "/item/1/answer/0", "value": {"valueString": "old"}}]
    resp = http.patch(f"/fhir/QuestionnaireResponse/{rid}", json=patch,
                      headers=admin.headers(**{"Content-Type": "application/json-patch+json"}))
    assert resp.status_code == 422, resp.get_data(as_text=True)
    assert http.get(f"/fhir/QuestionnaireResponse/{rid}", headers=admin.headers()).get_json()["meta"]["versionId"] == "1"
    before = count(http, admin)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:0f1c6a3e-0000-4000-8000-000000000001", "resource": VALID,
         "request": {"method": "POST", "url": "QuestionnaireResponse"}},
        {"fullUrl": "urn:uuid:0f1c6a3e-0000-4000-8000-000000000002",
         "resource": {k: v for k, v in bad.items() if k != "id"},
         "request": {"method": "POST", "url": "QuestionnaireResponse"}}]}
    resp = http.post("/fhir", json=bundle, headers=admin.headers())
    assert resp.status_code == 422, resp.get_data(as_text=True)
    assert count(http, admin) == before  # the transaction failed whole


def test_an_unknown_questionnaire_is_not_checked_and_validate_says_so(http: Any, admin: BackendClient,
                                                                      stored: None) -> None:
    other = changed(lambda b: (b.update(questionnaire="http://example.org/q/elsewhere"), drop(b, "age")))
    assert http.post("/fhir/QuestionnaireResponse", json=other, headers=admin.headers()).status_code == 201
    issues = http.post("/fhir/QuestionnaireResponse/$validate", json=other, headers=admin.headers()).get_json()["issue"]
    assert not [i for i in issues if i["severity"] == "error"]
    assert any("not stored on this server" in i["diagnostics"] for i in issues)
    # a version that is not stored is not silently checked against another version
    wrong_version = changed(lambda b: (b.update(questionnaire=URL + "|9"), drop(b, "age")))
    assert http.post("/fhir/QuestionnaireResponse", json=wrong_version, headers=admin.headers()).status_code == 201
