"""FHIR RESTful API semantics through HTTP: routing errors, conditional interactions, versioning
headers (ETag / If-Match / If-None-Match), deletion, history paging, Prefer, _summary/_elements,
formats, POST _search, and request ids.

Every error answer on /fhir must be an OperationOutcome; `outcome()` checks that everywhere.
"""

from __future__ import annotations

import re
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import BASE

SUBSETTED = "SUBSETTED"
METHOD_OF = {"read": "GET", "vread": "GET", "search-type": "GET", "history-instance": "GET",
             "history-type": "GET", "create": "POST", "update": "PUT", "delete": "DELETE"}


# ---------------------------------------------------------------- helpers
def outcome(resp: Any, status: int, code: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Assert an OperationOutcome error response with the given status; return its body."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"].startswith("application/fhir+json"), resp.headers
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome", body
    assert body["issue"] and all(i["severity"] in ("error", "fatal") for i in body["issue"]), body
    if code is not None:
        codes = (code,) if isinstance(code, str) else code
        assert body["issue"][0]["code"] in codes, body
    rid = resp.headers["X-Request-Id"]
    assert rid and all(rid in i["diagnostics"] for i in body["issue"]), body
    return body


def patient(family: str = "Smith", **kw: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family}], **kw}


def ident(value: str, system: str = "urn:test:mrn") -> dict[str, Any]:
    return {"identifier": [{"system": system, "value": value}]}


def create(http: Any, h: dict[str, str], body: dict[str, Any], rtype: str = "Patient") -> dict[str, Any]:
    resp = http.post(f"/fhir/{rtype}", json=body, headers=h)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json()


def put(http: Any, h: dict[str, str], body: dict[str, Any], **headers: str) -> Any:
    return http.put(f"/fhir/{body['resourceType']}/{body['id']}", json=body, headers={**h, **headers})


def local(url: str) -> str:
    """A server link (absolute, under BASE) as a path for the test client."""
    assert url.startswith(BASE + "/"), url
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def search_ids(http: Any, h: dict[str, str], query: str = "", rtype: str = "Patient") -> list[str]:
    resp = http.get(f"/fhir/{rtype}?_count=1000{'&' + query if query else ''}", headers=h)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return [e["resource"]["id"] for e in resp.get_json().get("entry", []) if e["search"]["mode"] == "match"]


def history_pages(http: Any, h: dict[str, str], url: str) -> list[dict[str, Any]]:
    """Follow `next` links from `url` to the end; return every page (bundle)."""
    pages = []
    seen = set()
    while url:
        assert url not in seen, "paging loops"
        seen.add(url)
        resp = http.get(url, headers=h)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        bundle = resp.get_json()
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "history"
        pages.append(bundle)
        nxt = [link["url"] for link in bundle.get("link", []) if link["relation"] == "next"]
        url = local(nxt[0]) if nxt else ""
        assert len(pages) < 100
    return pages


def entry_key(entry: dict[str, Any]) -> tuple[str, int]:
    rid = entry["fullUrl"].rsplit("/", 1)[1]
    m = re.fullmatch(r'W/"(\d+)"', entry["response"]["etag"])
    assert m, entry
    return rid, int(m.group(1))


def capability_resources(http: Any) -> dict[str, dict[str, Any]]:
    resp = http.get("/fhir/metadata")
    assert resp.status_code == 200
    return {r["type"]: r for r in resp.get_json()["rest"][0]["resource"]}


def has_subsetted_tag(resource: dict[str, Any]) -> bool:
    return any(t.get("code") == SUBSETTED for t in resource.get("meta", {}).get("tag", []))


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# ---------------------------------------------------------------- routing errors
def test_unknown_resource_type_is_404(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    served = capability_resources(http)
    unknown = "Basic"  # an R4 type this server does not serve
    assert unknown not in served
    outcome(http.get(f"/fhir/{unknown}", headers=h), 404)
    outcome(http.get(f"/fhir/{unknown}/1", headers=h), 404)
    outcome(http.post(f"/fhir/{unknown}", json={"resourceType": unknown}, headers=h), 404)
    outcome(http.get("/fhir/patient", headers=h), 404)  # type names are case-sensitive
    outcome(http.get("/fhir/Foo?name=x", headers=h), 404)


@pytest.mark.parametrize("path", ["/fhir/Patient/1/foo", "/fhir/Patient/1/_history/1/extra", "/fhir/Patient/1/2/3/4/5",
                                  "/fhir/$unknown-op", "/fhir/Patient/$everything", "/fhir/_history/1"])
def test_unknown_path_is_404(http, admin, path: str) -> None:  # type: ignore[no-untyped-def]
    outcome(http.get(path, headers=admin.headers()), 404)


def test_server_written_type_refuses_writes_with_405(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    audit = capability_resources(http)["AuditEvent"]
    allowed = {i["code"] for i in audit["interaction"]}
    assert "create" not in allowed and "update" not in allowed and "delete" not in allowed
    event = {"resourceType": "AuditEvent", "type": {"code": "rest"}, "recorded": "2020-01-01T00:00:00Z",
             "agent": [{"requestor": True}], "source": {"observer": {"display": "x"}}}
    outcome(http.post("/fhir/AuditEvent", json=event, headers=h), 405, "not-supported")
    outcome(http.put("/fhir/AuditEvent/a1", json={**event, "id": "a1"}, headers=h), 405, "not-supported")
    outcome(http.delete("/fhir/AuditEvent/a1", headers=h), 405, "not-supported")


def test_type_level_delete_and_put_without_parameters_are_405(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    pid = create(http, h, patient())["id"]
    outcome(http.delete("/fhir/Patient", headers=h), 405, "not-supported")
    outcome(http.put("/fhir/Patient", json=patient(), headers=h), 405, "not-supported")
    outcome(http.post(f"/fhir/Patient/{pid}", json={**patient(), "id": pid}, headers=h), 405, "not-supported")
    # nothing was deleted or changed
    resp = http.get(f"/fhir/Patient/{pid}", headers=h)
    assert resp.status_code == 200 and resp.headers["ETag"] == 'W/"1"'
    assert search_ids(http, h) == [pid]


def test_405_lists_the_allowed_methods(http, admin) -> None:  # type: ignore[no-untyped-def]
    """RFC 9110 15.5.6: a 405 response MUST carry an Allow header with the supported methods."""
    h = admin.headers()
    pid = create(http, h, patient())["id"]
    interactions = {i["code"] for i in capability_resources(http)["Patient"]["interaction"]}
    instance_methods = {METHOD_OF[i] for i in interactions if i in ("read", "update", "delete")}
    assert "patch" in interactions
    resp = http.post(f"/fhir/Patient/{pid}", json=patient(), headers=h)  # POST is not an instance interaction
    outcome(resp, 405, "not-supported")
    assert "Allow" in resp.headers, dict(resp.headers)
    allow = {m.strip() for m in resp.headers["Allow"].split(",")}
    assert instance_methods | {"PATCH"} <= allow and "POST" not in allow


@pytest.mark.parametrize("method", ["TRACE", "PROPFIND"])
def test_unsupported_http_method_is_an_operation_outcome(http, admin, method: str) -> None:  # type: ignore[no-untyped-def]
    resp = http.open("/fhir/Patient", method=method, headers=admin.headers())
    outcome(resp, 405)


# ---------------------------------------------------------------- read / vread
def test_read_unknown_id_is_404(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    pid = create(http, h, patient())["id"]
    other = pid[:-1] + ("0" if pid[-1] != "0" else "1")
    outcome(http.get(f"/fhir/Patient/{other}", headers=h), 404, "not-found")
    # the id exists, but as another type
    outcome(http.get(f"/fhir/Observation/{pid}", headers=h), 404, "not-found")
    outcome(http.get(f"/fhir/Patient/{other}/_history", headers=h), 404, "not-found")


def test_vread_unknown_version_is_404(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    pid = create(http, h, patient())["id"]
    assert http.get(f"/fhir/Patient/{pid}/_history/1", headers=h).status_code == 200
    outcome(http.get(f"/fhir/Patient/{pid}/_history/2", headers=h), 404, "not-found")
    outcome(http.get(f"/fhir/Patient/{pid}/_history/0", headers=h), 404, "not-found")
    outcome(http.get(f"/fhir/Patient/{pid}/_history/abc", headers=h), 404, "not-found")
    outcome(http.get("/fhir/Patient/never-was/_history/1", headers=h), 404, "not-found")


# ---------------------------------------------------------------- conditional create
def test_conditional_create(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    cond = {"If-None-Exist": "identifier=urn:test:mrn|A1"}
    # no match: created
    resp = http.post("/fhir/Patient", json=patient("First", **ident("A1")), headers={**h, **cond})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    first = resp.get_json()["id"]
    assert resp.headers["Location"] == f"{BASE}/Patient/{first}/_history/1"

    # one match: 200 with the existing resource, nothing created or changed
    resp = http.post("/fhir/Patient", json=patient("Second", **ident("A1")), headers={**h, **cond})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["id"] == first and body["name"][0]["family"] == "First" and body["meta"]["versionId"] == "1"
    assert resp.headers["ETag"] == 'W/"1"'
    assert search_ids(http, h) == [first]
    assert len(history_pages(http, h, "/fhir/Patient/_history")[0]["entry"]) == 1

    # a resource that matches only another identifier does not count
    other = create(http, h, patient("Other", **ident("B2")))["id"]
    # two matches: 412, nothing created
    second = create(http, h, patient("Dup", **ident("A1")))["id"]
    resp = http.post("/fhir/Patient", json=patient("Third", **ident("A1")), headers={**h, **cond})
    outcome(resp, 412)
    assert sorted(search_ids(http, h)) == sorted([first, other, second])


# ---------------------------------------------------------------- conditional update
def test_conditional_update(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    url = "/fhir/Patient?identifier=urn:test:mrn|C1"
    # no match: created with a server id
    resp = http.put(url, json=patient("Created", **ident("C1")), headers=h)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    pid = resp.get_json()["id"]
    assert resp.headers["Location"] == f"{BASE}/Patient/{pid}/_history/1"
    assert search_ids(http, h, "identifier=urn:test:mrn|C1") == [pid]

    # one match: that resource is updated (no id in the body needed)
    resp = http.put(url, json=patient("Updated", **ident("C1")), headers=h)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["id"] == pid and body["meta"]["versionId"] == "2"
    assert resp.headers["ETag"] == 'W/"2"'
    read = http.get(f"/fhir/Patient/{pid}", headers=h).get_json()
    assert read["name"][0]["family"] == "Updated" and read["meta"]["versionId"] == "2"
    assert search_ids(http, h) == [pid]

    # an id in the body that is not the matched resource's id is refused
    outcome(http.put(url, json={**patient("Wrong", **ident("C1")), "id": "someone-else"}, headers=h), 400)

    # two matches: 412 and neither is changed
    dup = create(http, h, patient("Dup", **ident("C1")))["id"]
    outcome(http.put(url, json=patient("Again", **ident("C1")), headers=h), 412)
    for rid, version, family in ((pid, "2", "Updated"), (dup, "1", "Dup")):
        read = http.get(f"/fhir/Patient/{rid}", headers=h).get_json()
        assert read["meta"]["versionId"] == version and read["name"][0]["family"] == family


# ---------------------------------------------------------------- conditional delete
def test_conditional_delete(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    keep = create(http, h, patient("Keep", **ident("K1")))["id"]
    # no match: success, nothing deleted
    resp = http.delete("/fhir/Patient?identifier=urn:test:mrn|NOPE", headers=h)
    assert resp.status_code in (200, 204), resp.get_data(as_text=True)
    assert search_ids(http, h) == [keep]

    # one match: deleted
    gone = create(http, h, patient("Gone", **ident("D1")))["id"]
    resp = http.delete("/fhir/Patient?identifier=urn:test:mrn|D1", headers=h)
    assert resp.status_code in (200, 204), resp.get_data(as_text=True)
    outcome(http.get(f"/fhir/Patient/{gone}", headers=h), 410)
    assert search_ids(http, h) == [keep]

    # two matches: 412, both kept
    a = create(http, h, patient("A", **ident("E1")))["id"]
    b = create(http, h, patient("B", **ident("E1")))["id"]
    outcome(http.delete("/fhir/Patient?identifier=urn:test:mrn|E1", headers=h), 412)
    for rid in (a, b):
        assert http.get(f"/fhir/Patient/{rid}", headers=h).status_code == 200
    assert sorted(search_ids(http, h)) == sorted([keep, a, b])


# ---------------------------------------------------------------- If-Match / If-None-Match
def test_if_match_on_update(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    body = create(http, h, patient("V1"))
    pid = body["id"]
    outcome(put(http, h, {**body, "name": [{"family": "Stale"}]}, **{"If-Match": 'W/"2"'}), 412)
    resp = put(http, h, {**body, "name": [{"family": "V2"}]}, **{"If-Match": 'W/"1"'})
    assert resp.status_code == 200 and resp.headers["ETag"] == 'W/"2"'
    # the old version is now stale
    outcome(put(http, h, {**body, "name": [{"family": "Stale"}]}, **{"If-Match": 'W/"1"'}), 412)
    read = http.get(f"/fhir/Patient/{pid}", headers=h)
    assert read.headers["ETag"] == 'W/"2"' and read.get_json()["name"][0]["family"] == "V2"
    # If-Match on a resource that does not exist cannot match
    outcome(put(http, h, {**patient(), "id": "not-there"}, **{"If-Match": 'W/"1"'}), 412)
    outcome(http.get("/fhir/Patient/not-there", headers=h), 404)


@pytest.mark.parametrize("bad", ['1', 'W/1', 'W/"x"', '"abc"', 'W/"1', "garbage"])
def test_malformed_if_match_is_400(http, admin, bad: str) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    body = create(http, h, patient())
    outcome(put(http, h, body, **{"If-Match": bad}), 400, "invalid")
    outcome(http.delete(f"/fhir/Patient/{body['id']}", headers={**h, "If-Match": bad}), 400, "invalid")
    read = http.get(f"/fhir/Patient/{body['id']}", headers=h)
    assert read.status_code == 200 and read.headers["ETag"] == 'W/"1"'


def test_if_match_on_delete(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    body = create(http, h, patient())
    pid = body["id"]
    assert put(http, h, body).status_code == 200  # now version 2
    outcome(http.delete(f"/fhir/Patient/{pid}", headers={**h, "If-Match": 'W/"1"'}), 412)
    assert http.get(f"/fhir/Patient/{pid}", headers=h).status_code == 200
    resp = http.delete(f"/fhir/Patient/{pid}", headers={**h, "If-Match": 'W/"2"'})
    assert resp.status_code in (200, 204)
    outcome(http.get(f"/fhir/Patient/{pid}", headers=h), 410)


def test_if_none_match_on_read(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    body = create(http, h, patient())
    pid = body["id"]
    resp = http.get(f"/fhir/Patient/{pid}", headers={**h, "If-None-Match": 'W/"1"'})
    assert resp.status_code == 304
    assert resp.data == b""
    assert resp.headers["ETag"] == 'W/"1"'
    assert put(http, h, body).status_code == 200
    # the client's copy is now out of date: full answer
    resp = http.get(f"/fhir/Patient/{pid}", headers={**h, "If-None-Match": 'W/"1"'})
    assert resp.status_code == 200 and resp.get_json()["meta"]["versionId"] == "2"
    assert resp.headers["ETag"] == 'W/"2"'
    resp = http.get(f"/fhir/Patient/{pid}", headers={**h, "If-None-Match": resp.headers["ETag"]})
    assert resp.status_code == 304


# ---------------------------------------------------------------- update as create, server-managed meta
def test_update_as_create_and_server_managed_meta(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    client_meta = {"versionId": "99", "lastUpdated": "2001-02-03T04:05:06Z",
                   "tag": [{"system": "urn:test:tags", "code": "mine"}]}
    body = {**patient("Client"), "id": "client-chosen-1", "meta": client_meta}
    resp = put(http, h, body)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.headers["Location"] == f"{BASE}/Patient/client-chosen-1/_history/1"
    assert resp.headers["ETag"] == 'W/"1"'
    meta = resp.get_json()["meta"]
    assert meta["versionId"] == "1"
    assert meta["lastUpdated"] != client_meta["lastUpdated"]
    assert instant(meta["lastUpdated"]) > instant(client_meta["lastUpdated"])
    assert meta["tag"] == client_meta["tag"]  # client meta elements other than version/time are kept

    resp = put(http, h, {**body, "name": [{"family": "Second"}]})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert "Location" not in resp.headers
    meta2 = resp.get_json()["meta"]
    assert meta2["versionId"] == "2" and resp.headers["ETag"] == 'W/"2"'
    assert instant(meta2["lastUpdated"]) >= instant(meta["lastUpdated"])  # millisecond text

    read = http.get("/fhir/Patient/client-chosen-1", headers=h)
    assert read.get_json()["meta"] == meta2
    assert read.headers["ETag"] == 'W/"2"'
    assert read.headers["Content-Location"] == f"{BASE}/Patient/client-chosen-1/_history/2"
    # Last-Modified (HTTP date, whole seconds) is meta.lastUpdated
    assert parsedate_to_datetime(read.headers["Last-Modified"]) == instant(meta2["lastUpdated"]).replace(microsecond=0)
    assert read.get_json()["name"] == [{"family": "Second"}]


def test_create_ignores_client_version(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    body = create(http, h, {**patient(), "id": "ignored", "meta": {"versionId": "7"}})
    assert body["id"] != "ignored" and body["meta"]["versionId"] == "1"


# ---------------------------------------------------------------- delete lifecycle
def test_delete_lifecycle(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    body = create(http, h, patient("Before"))
    pid = body["id"]
    resp = http.delete(f"/fhir/Patient/{pid}", headers=h)
    assert resp.status_code in (200, 204)
    body_410 = outcome(http.get(f"/fhir/Patient/{pid}", headers=h), 410)
    assert body_410["issue"][0]["code"] in ("deleted", "not-found")
    assert search_ids(http, h) == []
    # deleting again is fine and changes nothing
    assert http.delete(f"/fhir/Patient/{pid}", headers=h).status_code == 204
    # the old version is still readable; the deletion is a version of its own
    assert http.get(f"/fhir/Patient/{pid}/_history/1", headers=h).get_json()["name"][0]["family"] == "Before"
    outcome(http.get(f"/fhir/Patient/{pid}/_history/2", headers=h), 410)

    hist = history_pages(http, h, f"/fhir/Patient/{pid}/_history")[0]["entry"]
    assert [e["request"]["method"] for e in hist] == ["DELETE", "POST"]
    assert "resource" not in hist[0]
    assert hist[0]["response"]["etag"] == 'W/"2"'

    # re-create with PUT: the version number continues
    resp = put(http, h, {**patient("After"), "id": pid})
    assert resp.status_code in (200, 201), resp.get_data(as_text=True)
    assert resp.get_json()["meta"]["versionId"] == "3" and resp.headers["ETag"] == 'W/"3"'
    read = http.get(f"/fhir/Patient/{pid}", headers=h)
    assert read.status_code == 200 and read.get_json()["name"][0]["family"] == "After"
    assert search_ids(http, h) == [pid]
    hist = history_pages(http, h, f"/fhir/Patient/{pid}/_history")[0]["entry"]
    assert [entry_key(e) for e in hist] == [(pid, 3), (pid, 2), (pid, 1)]
    assert [e["request"]["method"] for e in hist] == ["PUT", "DELETE", "POST"]


# ---------------------------------------------------------------- history paging
def test_instance_history_paging(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    body = create(http, h, patient("v1"))
    pid = body["id"]
    families = ["v1"]
    for n in range(2, 8):
        families.append(f"v{n}")
        assert put(http, h, {**body, "name": [{"family": families[-1]}]}).status_code == 200
    count = 2
    pages = history_pages(http, h, f"/fhir/Patient/{pid}/_history?_count={count}")
    assert all(len(p["entry"]) <= count for p in pages)
    assert len(pages) == -(-len(families) // count)
    entries = [e for p in pages for e in p["entry"]]
    assert [entry_key(e) for e in entries] == [(pid, v) for v in range(len(families), 0, -1)]
    # each entry is the version that was written
    for e in entries:
        version = entry_key(e)[1]
        assert e["resource"]["meta"]["versionId"] == str(version)
        assert e["resource"]["name"][0]["family"] == families[version - 1]
        assert e["request"]["method"] == ("POST" if version == 1 else "PUT")


def test_type_history_paging(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    written: set[tuple[str, int]] = set()
    for i in range(3):
        body = create(http, h, patient(f"P{i}"))
        written.add((body["id"], 1))
        for v in range(2, 2 + i):
            assert put(http, h, body).status_code == 200
            written.add((body["id"], v))
    obs = create(http, h, {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}, "Observation")
    pages = history_pages(http, h, "/fhir/Patient/_history?_count=2")
    entries = [e for p in pages for e in p["entry"]]
    keys = [entry_key(e) for e in entries]
    assert len(keys) == len(set(keys))  # no entry twice across pages
    assert set(keys) == written
    assert obs["id"] not in {k[0] for k in keys}
    assert all(e["fullUrl"].startswith(f"{BASE}/Patient/") for e in entries)
    # newest first
    times = [instant(e["response"]["lastModified"]) for e in entries]
    assert times == sorted(times, reverse=True)


def test_history_since(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    body = create(http, h, patient())
    pid = body["id"]
    other = create(http, h, patient("Other"))["id"]
    for _ in range(4):
        assert put(http, h, body).status_code == 200
    full = history_pages(http, h, f"/fhir/Patient/{pid}/_history")[0]["entry"]
    assert len(full) == 5
    cut = full[2]["response"]["lastModified"]  # version 3
    expected = [entry_key(e) for e in full if instant(e["response"]["lastModified"]) >= instant(cut)]
    # versions 3..5 at least (an earlier one only if written in the same millisecond as version 3)
    assert expected[:3] == [(pid, 5), (pid, 4), (pid, 3)] and (pid, 1) not in expected
    resp = http.get(f"/fhir/Patient/{pid}/_history", query_string={"_since": cut}, headers=h)
    assert resp.status_code == 200
    assert [entry_key(e) for e in resp.get_json()["entry"]] == expected

    # type history: the other patient was written before the cut
    resp = http.get("/fhir/Patient/_history", query_string={"_since": cut}, headers=h)
    assert [entry_key(e) for e in resp.get_json()["entry"]] == expected
    resp = http.get("/fhir/Patient/_history", query_string={"_since": "2000-01-01T00:00:00Z"}, headers=h)
    assert {entry_key(e) for e in resp.get_json()["entry"]} == {*(entry_key(e) for e in full), (other, 1)}
    # _since and paging combine
    pages = history_pages(http, h, f"/fhir/Patient/_history?_count=1&_since={cut.replace('+', '%2B')}")
    assert [entry_key(e) for p in pages for e in p["entry"]] == expected
    outcome(http.get("/fhir/Patient/_history?_since=yesterday", headers=h), 400)


# ---------------------------------------------------------------- Prefer
def test_prefer_return_minimal(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = {**admin.headers(), "Prefer": "return=minimal"}
    resp = http.post("/fhir/Patient", json=patient("Min"), headers=h)
    assert resp.status_code == 201
    assert resp.data == b""
    location = resp.headers["Location"]
    m = re.fullmatch(rf"{re.escape(BASE)}/Patient/([^/]+)/_history/1", location)
    assert m, location
    assert resp.headers["ETag"] == 'W/"1"'
    pid = m.group(1)
    resp = http.put(f"/fhir/Patient/{pid}", json={**patient("Min2"), "id": pid}, headers=h)
    assert resp.status_code == 200 and resp.data == b""
    assert resp.headers["ETag"] == 'W/"2"'
    # the write did happen
    assert http.get(f"/fhir/Patient/{pid}", headers=admin.headers()).get_json()["name"][0]["family"] == "Min2"


def test_prefer_return_representation(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = {**admin.headers(), "Prefer": "return=representation"}
    resp = http.post("/fhir/Patient", json=patient("Rep"), headers=h)
    assert resp.status_code == 201
    body = resp.get_json()
    assert body["resourceType"] == "Patient" and body["name"] == [{"family": "Rep"}]
    assert resp.headers["Location"].endswith(f"/Patient/{body['id']}/_history/1")


def test_prefer_return_operation_outcome(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = {**admin.headers(), "Prefer": "return=OperationOutcome"}
    resp = http.post("/fhir/Patient", json=patient("OO"), headers=h)
    assert resp.status_code == 201
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "information"
    pid = re.search(r"/Patient/([^/]+)/_history/1$", resp.headers["Location"]).group(1)  # type: ignore[union-attr]
    assert pid in body["issue"][0]["diagnostics"]
    assert http.get(f"/fhir/Patient/{pid}", headers=admin.headers()).status_code == 200


def test_empty_responses_are_not_labelled_html(http, admin) -> None:  # type: ignore[no-untyped-def]
    """A bodiless answer (204, Prefer: return=minimal) has no Content-Type, or the FHIR one."""
    h = admin.headers()
    resp = http.post("/fhir/Patient", json=patient(), headers={**h, "Prefer": "return=minimal"})
    assert resp.status_code == 201 and resp.data == b""
    ctype = resp.headers.get("Content-Type")
    assert ctype is None or ctype.startswith("application/fhir+json"), ctype
    pid = resp.headers["Location"].split("/")[-3]
    resp = http.delete(f"/fhir/Patient/{pid}", headers=h)
    assert resp.status_code == 204
    ctype = resp.headers.get("Content-Type")
    assert ctype is None or ctype.startswith("application/fhir+json"), ctype


# ---------------------------------------------------------------- _summary / _elements
FULL = {
    "resourceType": "Patient", "id": "sum1",
    "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Jo Fox</div>"},
    "identifier": [{"system": "urn:test:mrn", "value": "S1"}], "active": True,
    "name": [{"family": "Fox", "given": ["Jo"]}], "gender": "female", "birthDate": "1970-01-02",
    "maritalStatus": {"text": "married"}, "photo": [{"contentType": "image/png", "data": "iVBORw0KGgo="}],
    "contact": [{"name": {"family": "Fox", "given": ["Sam"]}}], "communication": [{"language": {"text": "en"}}],
}
# Patient elements marked isSummary in R4 (the ones present in FULL), and those that are not
SUMMARY = {"identifier", "active", "name", "gender", "birthDate"}
NOT_SUMMARY = {"text", "maritalStatus", "photo", "contact", "communication"}


@pytest.fixture
def stored(http, admin):  # type: ignore[no-untyped-def]
    h = admin.headers()
    resp = put(http, h, FULL)
    assert resp.status_code == 201
    return h


def _subset_checks(body: dict[str, Any], expected: set[str]) -> None:
    assert set(body) == expected | {"resourceType", "id", "meta"}, sorted(body)
    for key in expected:
        assert body[key] == FULL[key]
    assert has_subsetted_tag(body)
    assert body["meta"]["versionId"] == "1"


def test_summary_true(http, stored) -> None:  # type: ignore[no-untyped-def]
    assert set(FULL) - {"resourceType", "id"} == SUMMARY | NOT_SUMMARY
    resp = http.get("/fhir/Patient/sum1?_summary=true", headers=stored)
    assert resp.status_code == 200
    _subset_checks(resp.get_json(), SUMMARY)
    # in search results too
    resp = http.get("/fhir/Patient?_id=sum1&_summary=true", headers=stored)
    entries = resp.get_json()["entry"]
    _subset_checks(entries[0]["resource"], SUMMARY)
    # the stored resource is not changed by reading a summary
    full = http.get("/fhir/Patient/sum1", headers=stored).get_json()
    assert {k: v for k, v in full.items() if k != "meta"} == FULL
    assert not has_subsetted_tag(full)


def test_summary_text(http, stored) -> None:  # type: ignore[no-untyped-def]
    resp = http.get("/fhir/Patient/sum1?_summary=text", headers=stored)
    assert resp.status_code == 200
    _subset_checks(resp.get_json(), {"text"})


def test_summary_data(http, stored) -> None:  # type: ignore[no-untyped-def]
    resp = http.get("/fhir/Patient/sum1?_summary=data", headers=stored)
    assert resp.status_code == 200
    _subset_checks(resp.get_json(), set(FULL) - {"resourceType", "id", "text"})


def test_summary_false_is_the_full_resource(http, stored) -> None:  # type: ignore[no-untyped-def]
    body = http.get("/fhir/Patient/sum1?_summary=false", headers=stored).get_json()
    assert {k: v for k, v in body.items() if k != "meta"} == FULL
    assert not has_subsetted_tag(body)


def test_elements(http, stored) -> None:  # type: ignore[no-untyped-def]
    resp = http.get("/fhir/Patient/sum1?_elements=name,gender", headers=stored)
    assert resp.status_code == 200
    _subset_checks(resp.get_json(), {"name", "gender"})
    resp = http.get("/fhir/Patient?_id=sum1&_elements=photo", headers=stored)
    _subset_checks(resp.get_json()["entry"][0]["resource"], {"photo"})


def test_elements_keeps_mandatory_elements(http, admin) -> None:  # type: ignore[no-untyped-def]
    """_elements: the server returns the requested elements plus mandatory ones (Observation status, code)."""
    h = admin.headers()
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "weight"},
           "subject": {"reference": "Patient/x"}, "valueQuantity": {"value": 72, "unit": "kg"},
           "note": [{"text": "after lunch"}]}
    oid = create(http, h, obs, "Observation")["id"]
    body = http.get(f"/fhir/Observation/{oid}?_elements=value", headers=h).get_json()
    assert set(body) == {"resourceType", "id", "meta", "status", "code", "valueQuantity"}
    assert body["valueQuantity"] == obs["valueQuantity"] and has_subsetted_tag(body)


def test_invalid_summary_is_400(http, stored) -> None:  # type: ignore[no-untyped-def]
    outcome(http.get("/fhir/Patient/sum1?_summary=everything", headers=stored), 400)


# ---------------------------------------------------------------- formats
@pytest.mark.parametrize("how", [{"q": "_format=json"}, {"q": "_format=application/fhir%2Bjson"},
                                 {"q": "_format=application/json"}, {"accept": "application/json"},
                                 {"accept": "application/fhir+json"}, {"accept": "application/fhir+json; fhirVersion=4.0"},
                                 {"accept": "*/*"}, {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}],
                         ids=lambda d: next(iter(d.values())))
def test_json_formats_are_served_as_fhir_json(http, admin, how: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    if "accept" in how:
        h["Accept"] = how["accept"]
    q = how.get("q", "")
    resp = http.post(f"/fhir/Patient?{q}", json=patient("Fmt"), headers=h)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"].startswith("application/fhir+json")
    pid = resp.get_json()["id"]
    for url in (f"/fhir/Patient/{pid}", "/fhir/Patient", f"/fhir/Patient/{pid}/_history", "/fhir/metadata"):
        resp = http.get(f"{url}?{q}" if q else url, headers=h)
        assert resp.status_code == 200, (url, resp.get_data(as_text=True))
        assert resp.headers["Content-Type"].startswith("application/fhir+json"), url
        assert resp.get_json()["resourceType"] in ("Patient", "Bundle", "CapabilityStatement")
    resp = http.get(f"/fhir/Patient/missing?{q}" if q else "/fhir/Patient/missing", headers=h)
    outcome(resp, 404)


# ---------------------------------------------------------------- POST _search
PEOPLE = [("Alpha", "female", "1970-01-01"), ("Beta", "male", "1980-01-01"), ("Gamma", "female", "1990-01-01"),
          ("Delta", "female", "1960-01-01"), ("Alpha", "male", "1975-01-01")]
SEARCHES = [
    # (query, which of PEOPLE match it)
    ({"gender": "female"}, lambda fam, gender, dob: gender == "female"),
    ({"family": "Alpha"}, lambda fam, gender, dob: fam == "Alpha"),
    ({"gender": "female", "birthdate": "1990"}, lambda fam, gender, dob: gender == "female" and dob[:4] == "1990"),
    ({"family": "alp"}, lambda fam, gender, dob: fam.lower().startswith("alp")),
    ({"family": "Nobody"}, lambda fam, gender, dob: False),
]


def test_post_search_matches_get_search(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    ids = [create(http, h, patient(fam, gender=gender, birthDate=dob))["id"] for fam, gender, dob in PEOPLE]
    for query, matches in SEARCHES:
        get = http.get("/fhir/Patient", query_string=query, headers=h)
        post = http.post("/fhir/Patient/_search", data=query, headers=h)  # form-encoded
        assert get.status_code == post.status_code == 200, post.get_data(as_text=True)
        assert post.headers["Content-Type"].startswith("application/fhir+json")
        get_ids = [e["resource"]["id"] for e in get.get_json().get("entry", [])]
        post_ids = [e["resource"]["id"] for e in post.get_json().get("entry", [])]
        assert post_ids == get_ids, query
        assert set(get_ids) == {rid for rid, person in zip(ids, PEOPLE, strict=True) if matches(*person)}, query
        assert post.get_json().get("total", len(post_ids)) == len(post_ids)
    # paging parameters work the same way
    query = {"gender": "female", "_count": "1"}
    get = http.get("/fhir/Patient", query_string=query, headers=h).get_json()
    post = http.post("/fhir/Patient/_search", data=query, headers=h).get_json()
    assert len(post["entry"]) == 1
    assert [e["resource"]["id"] for e in post["entry"]] == [e["resource"]["id"] for e in get["entry"]]
    assert any(link["relation"] == "next" for link in post["link"])


# ---------------------------------------------------------------- request ids
def test_every_response_carries_a_request_id(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    body = create(http, h, patient())
    pid = body["id"]
    requests = [
        ("GET", "/fhir/metadata", {}, None, 200),
        ("GET", f"/fhir/Patient/{pid}", h, None, 200),
        ("GET", f"/fhir/Patient/{pid}", {**h, "If-None-Match": 'W/"1"'}, None, 304),
        ("GET", "/fhir/Patient", h, None, 200),
        ("POST", "/fhir/Patient", h, patient(), 201),
        ("PUT", f"/fhir/Patient/{pid}", h, body, 200),
        ("GET", f"/fhir/Patient/{pid}", {}, None, 401),
        ("GET", "/fhir/Patient/unknown", h, None, 404),
        ("GET", "/fhir/Nope", h, None, 404),
        ("POST", "/fhir/Patient", h, {"resourceType": "Patient", "foo": 1}, 400),
        ("DELETE", "/fhir/Patient", h, None, 405),
        ("PUT", f"/fhir/Patient/{pid}", {**h, "If-Match": 'W/"1"'}, body, 412),
        ("GET", "/fhir/Patient", {**h, "Accept": "application/pdf"}, None, 406),
        ("DELETE", f"/fhir/Patient/{pid}", h, None, 204),
        ("GET", f"/fhir/Patient/{pid}", h, None, 410),
    ]
    seen = set()
    for method, url, headers, json_body, status in requests:
        resp = http.open(url, method=method, headers=headers, json=json_body)
        assert resp.status_code == status, (method, url, resp.get_data(as_text=True))
        rid = resp.headers.get("X-Request-Id")
        assert rid, (method, url)
        assert rid not in seen
        seen.add(rid)
        if status >= 400:
            body_oo = outcome(resp, status)
            assert body_oo["id"] == rid


def test_client_request_id_is_used(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    mine = "client-req-0001"
    resp = http.get("/fhir/Patient/unknown", headers={**h, "X-Request-Id": mine})
    assert resp.headers["X-Request-Id"] == mine
    assert mine in outcome(resp, 404, "not-found")["issue"][0]["diagnostics"]
    resp = http.get("/fhir/Patient", headers={**h, "X-Request-Id": mine})
    assert resp.status_code == 200 and resp.headers["X-Request-Id"] == mine
    # an unusable client value (spaces, too short) is replaced by a server id
    for bad in ("has spaces in it", "short", "x" * 65):
        resp = http.get("/fhir/Patient/unknown", headers={**h, "X-Request-Id": bad})
        rid = resp.headers["X-Request-Id"]
        assert rid != bad and re.fullmatch(r"[A-Za-z0-9\-_.]{8,64}", rid)
        assert rid in outcome(resp, 404)["issue"][0]["diagnostics"]
