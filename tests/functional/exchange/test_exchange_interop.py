"""Interoperability between two instances: Bulk export from one server (HTTP), `fhirserver load`
of the NDJSON files into a fresh one (CLI), and every patient's `$everything` is the same on both
apart from `meta` -- the demo data and every HL7 example, through the real public surfaces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fhirserver.demo import load_demo
from tests.conftest import AUDITOR_SETTINGS, BASE, example_files, make_settings
from tests.support.apps import fresh_app
from tests.support.bulk import Server, _local, client_token
from tests.support.cli import cli, ok


def everything(srv: Server, token: str, pid: str) -> list[str]:
    """The patient's $everything, all pages, each resource without meta, sorted."""
    out: list[str] = []
    url: str | None = f"/fhir/Patient/{pid}/$everything?_count=500"
    while url:
        resp = srv.http.get(url, headers=srv.h(token))
        assert resp.status_code == 200, resp.get_data(as_text=True)
        bundle = resp.get_json()
        for entry in bundle.get("entry", []):
            res = {k: v for k, v in entry["resource"].items() if k != "meta"}
            out.append(json.dumps(res, sort_keys=True))
        nxt = [link["url"] for link in bundle.get("link", []) if link["relation"] == "next"]
        url = _local(nxt[0]) if nxt else None
    return sorted(out)


@pytest.fixture
def source(tmp_path: Path) -> Any:
    app = fresh_app(make_settings(tmp_path / "a"))
    yield Server(app)
    app.extensions["fhirserver"].engine.dispose()


def test_export_then_load_gives_equal_everything(source: Server, tmp_path: Path) -> None:
    token = client_token(source, "exchange", "system/*.cruds", consent_exempt=True)
    load_demo(source.svc)
    for path in example_files():
        res = json.loads(path.read_text())
        resp = source.http.put(f"/fhir/{res['resourceType']}/{res['id']}", json=res, headers=source.h(token))
        assert resp.status_code in (200, 201), path.name

    kick = source.kickoff(token)
    assert kick.status_code == 202
    manifest = source.wait(token, kick.headers["Content-Location"]).get_json()
    exported = tmp_path / "export"
    exported.mkdir()
    for item in manifest["output"]:
        name = _local(item["url"]).split("/")[-1].split("?")[0]
        data = source.http.get(_local(item["url"]), headers=source.h(token)).get_data()
        (exported / f"{item['type']}-{name}-{len(list(exported.iterdir()))}.ndjson").write_bytes(data)
    total = sum(item["count"] for item in manifest["output"])
    assert total > 100

    target_dir = tmp_path / "b" / "data"
    out = ok(cli("load", str(exported), "--quiet", data_dir=target_dir, FHIRSERVER_BASE_URL=BASE))
    assert f"{total}" in out

    target_app = fresh_app(make_settings(tmp_path / "b"))
    assert target_app.extensions["fhirserver"].settings.data_dir == target_dir
    target = Server(target_app)
    try:
        reader = client_token(target, "reader", "system/*.rs", consent_exempt=True)
        patients = [json.loads(line)["id"] for f in sorted(exported.glob("Patient-*.ndjson"))
                    for line in f.read_text().splitlines()]
        assert len(patients) >= 8
        for pid in patients:
            mine, theirs = everything(source, token, pid), everything(target, reader, pid)
            assert mine == theirs, pid
            assert mine  # at least the Patient itself
        # and the import was audited on the target: one import event per file
        auditor = client_token(target, "auditor", "system/AuditEvent.rs", **AUDITOR_SETTINGS)
        events = target.http.get("/fhir/AuditEvent", query_string={"_count": "1000"},
                                 headers=target.h(auditor)).get_json()
        imports = [e for e in events.get("entry", []) if "import" in json.dumps(e["resource"].get("subtype", []))]
        assert len(imports) == len(list(exported.iterdir()))
    finally:
        target_app.extensions["fhirserver"].engine.dispose()
