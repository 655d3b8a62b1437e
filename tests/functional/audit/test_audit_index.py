"""AuditEvents are indexed straight from the event the server built (AuditIndexer), not through
the FHIRPath SearchParameter expressions. Both routes must produce the same index rows and
Patient compartments for every record the server can audit; if the AuditEvent SearchParameters
change, the direct route must step aside."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhirserver.audit.events import ACTIONS, AuditIndexer, AuditRecord, build_audit_event
from fhirserver.audit.record_index import RecordIndex, subject_rows, term_set
from fhirserver.search.indexer import Indexer
from fhirserver.search.params import ParamRegistry
from tests.conftest import make_settings
from tests.support.apps import fresh_app

ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SERVER = "http://testserver/fhir"

ids = st.text(alphabet="abcXYZ019-.", min_size=1, max_size=12)
texts = st.text(max_size=30)  # any unicode: blind-indexed strings are normalized (case, accents)
references = st.one_of(
    st.builds(lambda t, i: f"{t}/{i}", st.sampled_from(["Patient", "Observation", "Practitioner", "Device",
                                                         "RelatedPerson", "Consent", "patient"]), ids),
    st.builds(lambda i, v: f"Patient/{i}/_history/{v}", ids, st.integers(1, 9)),
    st.builds(lambda i: f"{SERVER}/Patient/{i}", ids),  # absolute, this server
    st.builds(lambda i: f"http://elsewhere.example/fhir/Patient/{i}", ids),
    st.sampled_from(["Patient/", "/Patient/x", "#contained", "urn:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427",
                     "Patient/a?x=1", "Patient", ""]),
    texts,
)
codings = st.fixed_dictionaries({}, optional={"system": st.sampled_from([ENTITY_TYPE, OBJECT_ROLE, "urn:x"]),
                                              "code": st.one_of(ids, st.integers(0, 30).map(str)),
                                              "display": texts})
whats = st.one_of(
    st.builds(lambda r: {"reference": r}, references),
    st.builds(lambda v: {"identifier": {"system": "urn:fhirserver:consent", "value": v}}, texts),
    st.builds(lambda r, t: {"reference": r, "type": t}, references, st.sampled_from(["Patient", "Consent"])),
    st.builds(lambda t: {"type": t}, st.sampled_from(["Patient", "Group"])),  # resolve() by declared type
    st.lists(st.builds(lambda r: {"reference": r}, references), min_size=1, max_size=2),  # not FHIR, but JSON
)
extra_entities = st.fixed_dictionaries({}, optional={
    "what": whats,
    "type": codings,
    "role": st.one_of(codings, st.builds(lambda c: {"coding": [c]}, codings)),
    "name": st.one_of(texts, st.lists(texts, max_size=2)),
    "description": texts,
    "detail": st.lists(st.fixed_dictionaries({"type": texts, "valueString": texts}), max_size=2),
})
records = st.builds(
    AuditRecord,
    interaction=st.sampled_from(sorted(ACTIONS)),
    request_id=st.text(alphabet="abcdef0123456789-", min_size=8, max_size=36),
    network_address=st.one_of(st.just(""), st.sampled_from(["127.0.0.1", "::1", "10.0.0.7"]), texts),
    recorded_us=st.integers(0, 4_102_444_800_000_000 - 1),
    status=st.sampled_from([200, 201, 204, 304, 400, 401, 403, 404, 409, 410, 412, 422, 500, 503]),
    outcome_desc=texts,
    client_id=st.one_of(st.none(), ids),
    client_name=st.one_of(st.none(), texts),
    user=st.one_of(st.none(), references),
    resources=st.lists(references, max_size=3),
    target=st.one_of(st.none(), references),
    patients=st.lists(st.one_of(ids, texts), max_size=3),
    query=st.one_of(st.none(), texts),
    resource_type=st.one_of(st.none(), st.sampled_from(["Patient", "Observation", "AuditEvent"])),
    purpose=st.lists(st.sampled_from(["TREAT", "ETREAT", "HRESCH", "PUBHLTH"]), max_size=2),
    type_code=st.one_of(st.just(AuditRecord.type_code),
                        st.tuples(st.just("http://dicom.nema.org/resources/ontology/DCM"), ids, texts)),
    subtype_code=st.one_of(st.none(), st.tuples(st.sampled_from(["http://hl7.org/fhir/restful-interaction",
                                                                 "urn:x"]), ids, texts)),
    extra_entities=st.lists(extra_entities, max_size=3),
)


@pytest.fixture(scope="module")
def indexer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    app = fresh_app(make_settings(Path(tmp_path_factory.mktemp("audit-index"))))
    yield app.extensions["fhirserver"].indexer
    app.extensions["fhirserver"].engine.dispose()


def both(indexer: Indexer, rec: AuditRecord) -> tuple[Any, Any]:
    event = build_audit_event(rec, SERVER)
    audit_indexer = AuditIndexer(indexer)
    assert audit_indexer.direct
    return audit_indexer.index(event), indexer.index("AuditEvent", event)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rec=records)
def test_direct_rows_equal_generic_rows(indexer: Indexer, rec: AuditRecord) -> None:
    direct, generic = both(indexer, rec)
    assert direct.rows == generic.rows  # same tables, same rows, same order
    assert list(direct.rows) == list(generic.rows)
    assert direct.patients == generic.patients
    # one indexer over all the examples: the rows it keeps per value list (AuditIndexer.index)
    # come back for later records exactly as computing them afresh gives them
    kept = _shared(indexer).index(build_audit_event(rec, SERVER))
    assert kept.rows == generic.rows and list(kept.rows) == list(generic.rows)
    assert kept.patients == generic.patients


_SHARED: dict[int, AuditIndexer] = {}


def _shared(indexer: Indexer) -> AuditIndexer:
    return _SHARED.setdefault(id(indexer), AuditIndexer(indexer))


def test_kept_rows_are_reused_across_records(indexer: Indexer) -> None:
    """Two reads by the same client differ in their resource, patient and time only: the second
    record's token, uri and string rows are the kept ones, and still equal the generic route's."""
    audit_indexer = AuditIndexer(indexer)
    first = AuditRecord("read", "req-00000003", "10.0.0.9", 1_700_000_000_000_000, client_id="c1",
                        resources=["Observation/o1/_history/1"], patients=["p1"], purpose=["TREAT"])
    second = replace(first, request_id="req-00000004", recorded_us=1_700_000_000_500_000,
                     resources=["Observation/o2/_history/3"], patients=["p2"])
    audit_indexer.index(build_audit_event(first, SERVER))
    kept = len(audit_indexer._memo)
    assert kept > 0
    event = build_audit_event(second, SERVER)
    rows = audit_indexer.index(event)
    assert len(audit_indexer._memo) == kept  # nothing new to keep: every value list was seen
    assert rows.rows == indexer.index("AuditEvent", event).rows
    assert rows.patients == ["p2"]


def test_typical_records_cover_every_row_kind(indexer: Indexer) -> None:
    """The property above compares like with like; this pins that the common records really
    produce blind-indexed addresses, references, compartments and tokens on both routes."""
    rec = AuditRecord("create", "req-00000001", "127.0.0.1", 1_700_000_000_000_000, status=201, client_id="c1",
                      client_name="C", user="Patient/p9", resources=["Observation/o1/_history/1"],
                      patients=["p1", "p9"], query="code=x", purpose=["TREAT"],
                      extra_entities=[{"what": {"reference": "Consent/k1"}, "type": {"system": ENTITY_TYPE, "code": "2"},
                                       "role": {"system": OBJECT_ROLE, "code": "13"}, "name": "policy"}])
    direct, generic = both(indexer, rec)
    assert direct.rows == generic.rows and direct.patients == generic.patients == ["p9", "p1"]
    assert {"token", "string", "reference", "date", "uri"} <= set(direct.rows)
    assert {r["param"] for r in direct.rows["string"]} == {"address", "entity-name"}
    failed = replace(rec, status=500, user=None, client_id=None, resources=[], patients=[], query=None,
                     target="Observation/o2", extra_entities=[])
    direct, generic = both(indexer, failed)
    assert direct.rows == generic.rows and direct.patients == generic.patients == []


def test_changed_audit_parameters_fall_back_to_fhirpath(indexer: Indexer) -> None:
    params = dict(indexer.params.for_type("AuditEvent"))
    params["address"] = replace(params["address"], expression="AuditEvent.agent.network.address.first()")
    registry = ParamRegistry(by_type={**indexer.params.by_type, "AuditEvent": params})
    custom = Indexer(registry, indexer.blind, indexer.base_url, indexer.compartment_params)
    assert not AuditIndexer(custom).direct
    event = build_audit_event(AuditRecord("read", "req-00000002", "10.0.0.1", 1), SERVER)
    assert AuditIndexer(custom).index(event).rows == custom.index("AuditEvent", event).rows


# ---- RecordIndex: an access record's term set and subjects without building its event
def general(indexer: Indexer, rec: AuditRecord) -> tuple[str, Any, Any]:
    rows = indexer.index("AuditEvent", build_audit_event(rec, SERVER, "rec-1"))
    set_id, terms = term_set(rows)
    return set_id, terms, subject_rows(rows)


_RECORD_INDEXES: dict[int, RecordIndex] = {}


def _record_index(indexer: Indexer) -> RecordIndex:
    return _RECORD_INDEXES.setdefault(id(indexer), RecordIndex(AuditIndexer(indexer), SERVER))


def _same_shape(rec: AuditRecord, other: AuditRecord) -> AuditRecord:
    """`other`'s id, time, texts and references in `rec`'s shape: as many resources and patients
    (other ones), the same extra entities pointing elsewhere (other's targets, or none)."""
    extra = [{**{k: v for k, v in e.items() if k != "what"},
              **({"what": o["what"]} if "what" in o else {})}
             for e, o in zip(rec.extra_entities, [*other.extra_entities, *[{}] * len(rec.extra_entities)], strict=False)]
    return replace(other, interaction=rec.interaction, status=rec.status, network_address=rec.network_address,
                   type_code=rec.type_code, subtype_code=rec.subtype_code, purpose=rec.purpose,
                   resources=[f"Observation/x{i}" for i in range(len(rec.resources))],
                   target=(other.target or "Observation/t") if rec.target else None,
                   patients=[f"q{i}" for i in range(len(rec.patients))],
                   query=None if rec.query is None else (other.query or ""), extra_entities=extra)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rec=records, other=records)
def test_record_index_equals_the_generic_route(indexer: Indexer, rec: AuditRecord, other: AuditRecord) -> None:
    """One RecordIndex over all the examples (its kept term sets come back for later records)
    gives every record the set and the subjects the FHIRPath route gives it. Each record first
    passes a record of the same shape with other references, ids, times and texts (extra
    entities pointing elsewhere), so the set it gets is the one kept from that record."""
    index = _record_index(indexer)
    similar = _same_shape(rec, other)
    assert index.index(similar, "rec-0") == general(indexer, similar)
    assert index.index(rec, "rec-1") == general(indexer, rec)


def test_record_index_reuses_a_shape_and_parses_references(indexer: Indexer) -> None:
    """A second read by the same client keeps the first one's term set (no event is indexed:
    the AuditIndexer is not called) and still names its own resource, patient and user."""
    index = RecordIndex(AuditIndexer(indexer), SERVER)
    assert index.shortcut
    first = AuditRecord("read", "req-1", "10.0.0.9", 1_700_000_000_000_000, client_id="c1", user="Patient/p1",
                        resources=["Observation/o1/_history/1"], patients=["p1"])
    second = replace(first, request_id="req-2", recorded_us=1_700_000_000_000_001, client_id="c2",
                     user=f"{SERVER}/Practitioner/d7", resources=["Observation/o2/_history/4"], patients=["p2"])
    assert index.index(first, "a") == general(indexer, first)
    calls: list[object] = []
    index.indexer = type("Spy", (), {"index": lambda _s, event: calls.append(event)})()  # type: ignore[assignment]
    set_id, terms, subjects = index.index(second, "b")
    assert calls == []
    assert (set_id, terms, subjects) == general(indexer, second)
    assert ("agent", "Practitioner", "d7", None) in subjects and ("patient", "Patient", "p2", None) in subjects
    assert not any(s[2] in ("o1", "p1", "c1") for s in subjects)


def test_extra_entities_keep_their_shape_and_name_their_targets(indexer: Indexer) -> None:
    """The consent stage's policy and Consent entities: their codes and names are part of the
    kept set, their targets are each record's own subjects."""
    index = RecordIndex(AuditIndexer(indexer), SERVER)
    policy = {"what": {"identifier": {"system": "urn:x", "value": "default-policy:TREAT"}}, "name": "policy",
              "type": {"system": ENTITY_TYPE, "code": "2"}, "role": {"system": OBJECT_ROLE, "code": "13"}}
    rec = AuditRecord("read", "req-1", "10.0.0.9", 1, client_id="c1", patients=["p1"],
                      extra_entities=[policy, {**policy, "what": {"reference": "Consent/k1"}}])
    assert index.index(rec, "a") == general(indexer, rec)
    assert len(index._shapes) == 1
    other = replace(rec, extra_entities=[policy, {**policy, "what": {"reference": "Patient/p5"}}])
    set_id, terms, subjects = index.index(other, "b")
    assert len(index._shapes) == 1  # the same shape: the kept set
    assert (set_id, terms, subjects) == general(indexer, other)
    assert ("entity", "Patient", "p5", None) in subjects and ("patient", "Patient", "p5", None) in subjects
    assert not any(s[2] == "k1" for s in subjects)
    assert any(t[1] == "entity-name" for t in terms)
    renamed = replace(rec, extra_entities=[{**policy, "name": "another"}])
    assert index.index(renamed, "c") == general(indexer, renamed)
    assert len(index._shapes) == 2
