"""The R4 JSON-schema validators generated once per machine (fhir/schema_cache.py): kept in the
user's cache directory, loaded by the next process, refused from a directory others may write,
regenerated when damaged, and judging every resource exactly as a validator compiled for its
type alone does."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

import fastjsonschema
import pytest

from fhirserver.fhir import schema_cache
from fhirserver.fhir.validation import Validator

PROFILES = Path(__file__).resolve().parents[3] / "profiles"

# (type, body): each breaks one rule of the R4 JSON schema
INVALID: list[tuple[str, dict[str, Any]]] = [
    ("Patient", {"resourceType": "Patient", "active": "true"}),  # type
    ("Patient", {"resourceType": "Patient", "gender": "robot"}),  # enum
    ("Patient", {"resourceType": "Patient", "birthDate": "12/01/1990"}),  # pattern
    ("Patient", {"resourceType": "Patient", "nickname": "x"}),  # unknown element
    ("Patient", {"resourceType": "Patient", "name": [{"given": [1]}]}),  # nested type
    ("Observation", {"resourceType": "Observation", "status": "final",
                     "code": {"coding": [{"system": 5}]}}),
    ("Observation", {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                     "valueQuantity": {"value": "7"}}),
    ("Consent", {"resourceType": "Consent", "status": "active", "scope": {}, "category": "x"}),
]
VALID = [("Patient", {"resourceType": "Patient", "active": True, "name": [{"family": "Chalmers"}],
                      "birthDate": "1974-12-25"}),
         ("Observation", {"resourceType": "Observation", "status": "final", "code": {"text": "weight"},
                          "valueQuantity": {"value": 72.5, "unit": "kg"}})]


@pytest.fixture()
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "fhirserver"


@pytest.fixture(scope="module")
def definitions() -> tuple[dict[str, Any], str]:
    return Validator(PROFILES)._definitions()


def _outcome(fn: Any, body: dict[str, Any]) -> tuple[str, list[Any], str] | None:
    try:
        fn(body)
    except fastjsonschema.JsonSchemaValueException as exc:
        return exc.message, list(exc.path), str(exc.rule)
    return None


def test_generated_once_kept_private_and_loaded_by_the_next_process(
        cache_home: Path, definitions: tuple[dict[str, Any], str]) -> None:
    defs, key = definitions
    assert schema_cache.load(defs, key, generate=False) == {}  # nothing cached yet: the caller compiles
    made = schema_cache.load(defs, key, generate=True)
    assert set(made) == set(schema_cache.resource_types(defs)) >= {"Patient", "Observation", "Consent", "AuditEvent"}
    files = list(cache_home.iterdir())
    assert len(files) == 1 and files[0].name.startswith(f"fhirserver_schema_{key}")
    assert stat.S_IMODE(cache_home.stat().st_mode) == 0o700
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    loaded = schema_cache.load(defs, key, generate=False)  # as a later process would
    assert set(loaded) == set(made)
    assert loaded["Patient"] is not made["Patient"]  # from the file, not this process's module


def test_cached_validators_judge_as_a_compile_of_the_type_alone(
        cache_home: Path, definitions: tuple[dict[str, Any], str]) -> None:
    defs, key = definitions
    schema_cache.load(defs, key, generate=True)
    cached = schema_cache.load(defs, key, generate=False)
    alone = {t: fastjsonschema.compile(schema_cache.schema_for(defs, t)) for t in {t for t, _ in INVALID + VALID}}
    for rtype, body in INVALID:
        expected = _outcome(alone[rtype], body)
        assert expected is not None, body
        assert _outcome(cached[rtype], body) == expected
    for rtype, body in VALID:
        assert _outcome(alone[rtype], body) is None and _outcome(cached[rtype], body) is None


def test_a_directory_others_may_write_is_not_used(cache_home: Path, definitions: tuple[dict[str, Any], str]) -> None:
    defs, key = definitions
    schema_cache.load(defs, key, generate=True)
    os.chmod(cache_home, 0o777)
    assert schema_cache.load(defs, key, generate=False) == {}  # someone else could have put code there
    os.chmod(cache_home, 0o700)
    target = next(cache_home.iterdir())
    os.chmod(target, 0o666)
    assert schema_cache.load(defs, key, generate=False) == {}
    os.chmod(target, 0o600)
    assert schema_cache.load(defs, key, generate=False)  # ours alone again: used


def test_a_damaged_cache_file_is_generated_again(cache_home: Path, definitions: tuple[dict[str, Any], str]) -> None:
    defs, key = definitions
    schema_cache.load(defs, key, generate=True)
    target = next(cache_home.iterdir())
    target.write_bytes(b"\x00garbage")
    assert schema_cache.load(defs, key, generate=False) == {}
    again = schema_cache.load(defs, key, generate=True)
    assert _outcome(again["Patient"], {"resourceType": "Patient", "active": "true"}) is not None
    assert target.stat().st_size > 1_000_000  # replaced by a whole module


def test_a_changed_schema_is_a_new_file(cache_home: Path, definitions: tuple[dict[str, Any], str]) -> None:
    defs, key = definitions
    changed = json.loads(json.dumps(defs))
    changed["Patient"]["properties"]["gender"]["enum"] = ["male", "female"]
    assert schema_cache.digest(changed) != key
    schema_cache.load(defs, key, generate=True)
    assert schema_cache.load(changed, schema_cache.digest(changed), generate=False) == {}


def test_files_no_process_loads_any_more_are_removed_by_the_next_writer(
        cache_home: Path, definitions: tuple[dict[str, Any], str]) -> None:
    defs, key = definitions
    cache_home.mkdir(mode=0o700, parents=True)
    month_ago = schema_cache.STALE_DAYS * 86400 + 3600
    stale = cache_home / f"fhirserver_schema_{'0' * 32}.{sys.implementation.cache_tag}.marshal"  # an old version's
    in_use = cache_home / f"fhirserver_schema_{'1' * 32}.{sys.implementation.cache_tag}.marshal"  # another install's
    dead_tmp, fresh_tmp = cache_home / ".schema-dead.tmp", cache_home / ".schema-writing.tmp"
    unrelated = cache_home / "notes.txt"
    for f in (stale, in_use, dead_tmp, fresh_tmp, unrelated):
        f.write_bytes(b"x")
        f.chmod(0o600)
    old = time.time() - month_ago
    for f in (stale, dead_tmp, unrelated):
        os.utime(f, (old, old))
    os.utime(in_use, (time.time() - 86400, time.time() - 86400))
    schema_cache.load(defs, key, generate=True)
    assert {f.name for f in cache_home.iterdir()} == {
        f"fhirserver_schema_{key}.{sys.implementation.cache_tag}.marshal", in_use.name, fresh_tmp.name, unrelated.name}
    # loading marks a file as in use: an old but loaded file survives the next writer
    current = cache_home / f"fhirserver_schema_{key}.{sys.implementation.cache_tag}.marshal"
    os.utime(current, (old, old))
    assert schema_cache.load(defs, key, generate=False)
    assert time.time() - current.stat().st_mtime < 60
    changed = json.loads(json.dumps(defs))
    changed["Patient"]["properties"]["gender"]["enum"] = ["male", "female"]
    schema_cache.load(changed, schema_cache.digest(changed), generate=True)
    assert current.exists()
