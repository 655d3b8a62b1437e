"""Property (hypothesis): whatever the mix of patients, a subscriber's scopes and filter, and the
patients' Consents, a subscriber is notified of exactly the changes it could read -- never another
patient's, never a denied one, never one outside its scopes -- numbered without gaps."""

from __future__ import annotations

import time
from itertools import count
from typing import Any

from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st

from tests.functional.consent.harness import consent
from tests.support.receiver import Receiver, status_of

from .test_rest_hook import FHIR, observation, patient, subscribe, subscription

ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
CATEGORIES = ("laboratory", "vital-signs")
_n = count()




def _foci(receiver: Receiver, path: str) -> list[tuple[int, str]]:
    return [(int(e["event-number"]), e["focus"]["reference"].rsplit("/", 1)[1])
            for r in list(receiver.received) if r["path"] == path
            and status_of(r["body"])["type"] == "event-notification" for e in status_of(r["body"])["events"]]


@examples(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patients=st.integers(2, 3),
       filtered=st.booleans(),
       category_scope=st.sampled_from([None, *CATEGORIES]),
       denied=st.lists(st.booleans(), min_size=3, max_size=3),
       writes=st.lists(st.tuples(st.integers(0, 2), st.sampled_from(CATEGORIES)), min_size=1, max_size=8))
def test_subscribers_are_told_exactly_what_they_may_read(http: Any, make_client: Any, receiver: Receiver,
                                                         patients: int, filtered: bool, category_scope: str | None,
                                                         denied: list[bool], writes: list[tuple[int, str]]) -> None:
    n = next(_n)
    # the writer and the control subscriber are a consent back office: exempt from Consents (audited)
    control = make_client(settings={"subscription_endpoints": [receiver.url], "consent_exempt": True})
    h = control.headers()
    pids = [patient(http, h, f"P{n}-{i}") for i in range(patients)]
    for i, pid in enumerate(pids):
        if denied[i]:  # the patient objects to treatment-purpose access (opt-out purpose)
            body = consent(f"deny-{n}-{i}", pid, {"type": "deny", "purpose": [{"system": ACT_REASON, "code": "TREAT"}]})
            assert http.put(f"/fhir/Consent/{body['id']}", json=body, headers={**h, **FHIR}).status_code in (200, 201)
    scope = (f"system/Observation.rs?category={category_scope}" if category_scope else "system/Observation.rs")
    scope += " system/Subscription.crus"
    subscriber = make_client(scope, default_scope=scope, settings={"subscription_endpoints": [receiver.url]})
    path, control_path = f"/hook/s{n}", f"/hook/c{n}"
    filters = (f"Observation?patient=Patient/{pids[0]}",) if filtered else ()
    sid = subscribe(http, subscriber.headers(), subscription(receiver.url + path[5:], filters=filters))
    subscribe(http, control.headers(), subscription(receiver.url + control_path[5:]))
    expected: list[str] = []
    written: list[str] = []
    for who, category in writes:
        pid = pids[who % patients]
        oid = observation(http, h, pid, 1.0, category)
        written.append(oid)
        visible = (not filtered or pid == pids[0]) and category_scope in (None, category) \
            and not denied[who % patients]
        if visible:
            expected.append(oid)
    # the control subscription (exempt from consent, every result) has seen the last write: every
    # change has been matched for every subscription; then wait for the subscriber's delivery
    deadline = time.monotonic() + 30
    while {f for _n2, f in _foci(receiver, control_path)} < set(written) and time.monotonic() < deadline:
        time.sleep(0.05)
    while time.monotonic() < deadline:
        params = {p["name"]: p for p in http.get(f"/fhir/Subscription/{sid}/$status", headers=subscriber.headers())
                  .get_json()["entry"][0]["resource"]["parameter"]}
        if params["events-delivered-through"]["valueString"] == params["events-since-subscription-start"]["valueString"]:
            break
        time.sleep(0.05)
    got = _foci(receiver, path)
    assert [f for _num, f in got] == expected
    assert [num for num, _f in got] == list(range(1, len(expected) + 1))  # no gap reveals a hidden event
