"""Property tests against a live app: whatever a client sends, the server answers a 2xx or a 4xx
OperationOutcome -- never a 5xx -- and a refused write stores nothing.

Search strings are drawn from the registry (every type's parameter names, modifiers, prefixes,
chains, `_has`, result parameters) with random values, including requests far past the parameter
limits. Writes are HL7 R4 examples mutated: fields dropped, replaced by odd JSON, wrapped in deep
nesting or in thousands of extensions.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
from fhirserver.auth.clients import register_backend_client
from tests.conftest import example_files, make_settings
from tests.support.apps import fresh_app

TYPES = ["Patient", "Observation", "QuestionnaireResponse", "Consent", "AuditEvent"]
MODIFIERS = ["", ":exact", ":contains", ":missing", ":not", ":text", ":above", ":below", ":in", ":of-type",
             ":identifier", ":Patient", ":bogus", "::"]
PREFIXES = ["", "eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap", "zz"]
ODD_VALUES = ["", ",", "|", "||", "$", "%", "%%", "\\", "\\,", "a" * 300, "9" * 40, "-1", "1e309", "NaN",
              "2024-13-45", "1961-07-14T25:61:00Z", "urn:uuid:x", "Patient/", "../Patient/x", "\x00", "☃", "'\";--"]


class Live:
    def __init__(self, root: Path) -> None:
        self.app = fresh_app(make_settings(root))
        self.svc = self.app.extensions["fhirserver"]
        self.http = self.app.test_client()
        key = generate_key("ES384")
        scope = "system/*.cruds system/AuditEvent.rs"
        rec = register_backend_client(self.svc.engine, "fuzzer", scope, jwks=public_jwks(key),
                                      settings={"auditor": True, "purposes": ["HOPERAT", "TREAT"],
                                                "consent_exempt": True})
        resp = self.http.post("/auth/token", data=token_request_form(key, rec.client_id, self.svc.settings.token_url,
                                                                      scope))
        self.h = {"Authorization": f"Bearer {resp.get_json()['access_token']}"}
        self.params = {t: sorted(self.svc.params.for_type(t)) for t in TYPES}

    def count(self) -> int:
        with self.svc.engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT count(*) FROM resource WHERE type != 'AuditEvent'").scalar_one())


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    server = Live(tmp_path_factory.mktemp("fuzz"))
    for path in example_files("Patient-")[:5] + example_files("Observation-")[:5]:
        server.http.post(f"/fhir/{path.name.split('-')[0]}", data=path.read_bytes(),
                         headers={**server.h, "Content-Type": "application/fhir+json"})
    yield server
    server.svc.engine.dispose()


def no_server_error(resp: Any) -> None:
    assert resp.status_code < 500, resp.get_data(as_text=True)[:500]
    body = resp.get_json(silent=True)
    if resp.status_code >= 400:
        assert body is not None and body["resourceType"] == "OperationOutcome", resp.get_data(as_text=True)[:300]


@st.composite
def search_param(draw: st.DrawFn, live: Live, rtype: str) -> tuple[str, str]:
    names = live.params[rtype] + ["_id", "_lastUpdated", "_count", "_sort", "_include", "_revinclude", "_summary",
                                  "_elements", "_total", "_has", "_cursor", "_text", "_filter", "bogus"]
    name = draw(st.sampled_from(names))
    if draw(st.booleans()) and rtype != "Patient":
        name = draw(st.sampled_from(["subject", "patient"])) + ":Patient." + draw(st.sampled_from(live.params["Patient"]))
    if name == "_has":
        name = f"_has:{draw(st.sampled_from(TYPES))}:{draw(st.sampled_from(['patient', 'subject', 'x']))}:" \
               f"{draw(st.sampled_from(live.params['Observation']))}"
    name += draw(st.sampled_from(MODIFIERS))
    value = draw(st.one_of(st.sampled_from(ODD_VALUES), st.text(max_size=40),
                           st.builds(lambda p, v: p + v, st.sampled_from(PREFIXES),
                                     st.sampled_from(["2024", "2024-01-01", "1", "0.5", "5|http://loinc.org|kg"]))))
    return name, value


@pytest.mark.parametrize("rtype", TYPES)
def test_random_searches_never_5xx(live: Live, rtype: str) -> None:
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data: st.DataObject) -> None:
        query = data.draw(st.lists(search_param(live, rtype), max_size=8))
        if data.draw(st.integers(0, 9)) == 0:  # now and then far past the limits
            query = query * data.draw(st.integers(20, 200)) or [("name", "a")] * 1000
        no_server_error(live.http.get(f"/fhir/{rtype}?{urlencode(query)}", headers=live.h))
        no_server_error(live.http.post(f"/fhir/{rtype}/_search", data=urlencode(query), headers=live.h,
                                       content_type="application/x-www-form-urlencoded"))

    run()


EXAMPLES = [json.loads(p.read_text()) for p in example_files("Patient-")[:12] + example_files("Observation-")[:12]
            + example_files("QuestionnaireResponse-")]
ODD_JSON = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                     st.just([]), st.just({}), st.just([None]), st.just({"": ""}))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _deep(levels: int) -> dict[str, Any]:
    ext: dict[str, Any] = {"url": "http://example.org/x", "valueString": "x"}
    for _ in range(levels):
        ext = {"url": "http://example.org/x", "extension": [ext]}
    return ext


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    body = copy.deepcopy(draw(st.sampled_from(EXAMPLES)))
    body.pop("id", None)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["replace", "drop", "deep", "wide", "narrative"]))
        paths = [p for p in _paths(body) if p[0] != "resourceType"]
        if kind in ("replace", "drop") and paths:
            path = draw(st.sampled_from(paths))
            parent = body
            for step in path[:-1]:
                parent = parent[step]
            if kind == "drop":
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(ODD_JSON)
        elif kind == "deep":
            body["extension"] = [_deep(draw(st.integers(20, 600)))]
        elif kind == "wide":
            body["extension"] = [{"url": "http://example.org/w", "valueString": "v"}] * draw(st.integers(1, 5000))
        else:
            body["text"] = {"status": "generated", "div": draw(st.sampled_from([
                '<div xmlns="http://www.w3.org/1999/xhtml"><script>x</script></div>', "<div>x</div>", "x",
                '<div xmlns="http://www.w3.org/1999/xhtml">ok</div>']))}
    return body


def test_mutated_examples_are_2xx_or_4xx_and_refusals_store_nothing(live: Live) -> None:
    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(mutated(), st.sampled_from(["POST", "PUT"]))
    def run(body: dict[str, Any], method: str) -> None:
        before = live.count()
        rtype = body["resourceType"]
        path = f"/fhir/{rtype}" if method == "POST" else f"/fhir/{rtype}/fuzz-put"
        if method == "PUT":
            body = {**body, "id": "fuzz-put"}
        resp = live.http.open(path, method=method, data=json.dumps(body),
                              headers={**live.h, "Content-Type": "application/fhir+json"})
        no_server_error(resp)
        if resp.status_code >= 400:
            assert live.count() == before
        else:
            assert live.count() in (before, before + 1)

    run()
