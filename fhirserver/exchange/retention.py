"""Retention (issue 15, item 1): data kept no longer than its policy says.

A policy is `Type[search]=<period>:<action>`, comma-separated in `retention_policy`, e.g.

    Observation=10y:erase, QuestionnaireResponse=5y:deidentify, Consent[purpose=HMARKT]=2y:erase

- the optional `[search]` is any search of that type (`purpose=HMARKT`, `category=survey`), so a
  policy can single out data collected for one purpose;
- the period (`y` 365 days, `d` days) counts from the resource's last write (`_lastUpdated`);
- `erase` removes every version of the resource (its ciphertexts are deleted, a bodiless tombstone
  answers 410) -- for a Patient, the whole patient is erased as `$erase` does, key destroyed;
- `deidentify` rewrites it in place with the Safe Harbor transform of de-identified exports
  (references pseudonymized under the `pseudonym:retention` key, so it leaves the patient's
  compartment), tags it `urn:fhirserver:retention|deidentified`, and removes its older versions.

`plan` lists what a run would do now; `run` does it a batch at a time, each batch in one
transaction with its AuditEvent (fail closed). The eligible set is re-read for every batch:
erased and tagged resources are never selected again and the cutoff is recomputed from the clock,
so an interrupted run resumes where it stopped, touches nothing twice and nothing early.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, delete

from ..audit.events import AuditRecord
from ..clock import now_us
from ..db.schema import resource_version
from ..fhir.dates import instant_text
from ..fhir.registry import TypeRegistry
from ..search.executor import run_search
from ..search.params import ParamRegistry
from ..search.parser import parse_search
from ..services import Services
from ..storage.codec import parse_json
from ..storage.compartments import patients_of
from ..storage.repository import Stored, key_scope_for
from .deidentify import Deidentifier
from .erase import already_erased, erase_patient, pseudonym_for

TAG_SYSTEM = "urn:fhirserver:retention"
TAG = {"system": TAG_SYSTEM, "code": "deidentified", "display": "de-identified by retention"}
DAY_US = 86_400_000_000
_POLICY = re.compile(r"^([A-Z][A-Za-z]+)(?:\[([^\]]+)\])?=(\d+)([yd]):(erase|deidentify)$")


class PolicyError(ValueError):
    pass


@dataclass
class Policy:
    resource_type: str
    search: list[tuple[str, str]]
    days: int
    action: str
    text: str

    def cutoff(self, now: int) -> int:
        return now - self.days * DAY_US


def parse_policies(text: str, types: TypeRegistry | None = None, params: ParamRegistry | None = None) -> list[Policy]:
    """Policies from the setting; with the registries, unknown types and searches are errors."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = _POLICY.match(part.replace(" ", ""))
        if m is None:
            raise PolicyError(f"retention policy {part!r} is not Type[search]=<n>y|d:erase|deidentify")
        rtype, search, n, unit, action = m.groups()
        pairs = [tuple(kv.split("=", 1)) for kv in (search or "").split("&") if kv]
        if any(len(kv) != 2 for kv in pairs):
            raise PolicyError(f"retention policy {part!r}: the search must be name=value[&name=value]")
        if types is not None and rtype not in types.names():
            raise PolicyError(f"retention policy {part!r}: {rtype} is not a served type")
        if params is not None and pairs:
            parse_search(params, rtype, pairs, 1, 1, strict=True)  # raises on an unknown parameter
        out.append(Policy(rtype, pairs, int(n) * (365 if unit == "y" else 1), action, part))
    return out


@dataclass
class PolicyResult:
    policy: str
    due: int = 0
    done: int = 0
    sample: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "due": self.due, "done": self.done, "sample": self.sample}


def _eligible(svc: Services, conn: Connection, p: Policy, now: int, count: int) -> tuple[list[int], int]:
    query = [*p.search, ("_lastUpdated", f"lt{instant_text(p.cutoff(now))}"), ("_sort", "_lastUpdated")]
    if p.action == "deidentify":
        query.append(("_tag:not", f"{TAG_SYSTEM}|deidentified"))
    parsed = parse_search(svc.params, p.resource_type, query, count, max(count, 1), strict=True)
    page = run_search(conn, parsed, svc.compiler, [], lambda _t, _r: [])
    return page.pks, page.total or 0


def plan(svc: Services, policies: list[Policy], sample: int = 10) -> list[PolicyResult]:
    now = now_us()
    out = []
    with svc.engine.connect() as conn:
        for p in policies:
            pks, total = _eligible(svc, conn, p, now, sample)
            stored = svc.repo.load_current(conn, pks)
            out.append(PolicyResult(p.text, total, 0, [f"{s.type}/{s.id}" for s in stored]))
    return out


def run(svc: Services, policies: list[Policy], batch: int = 100, limit: int | None = None,
        stop: threading.Event | None = None) -> list[PolicyResult]:
    """Apply every policy; `limit` (resources in all) and `stop` end the run early, safely."""
    results = [PolicyResult(p.text) for p in policies]
    left = limit
    for p, result in zip(policies, results, strict=True):
        while left is None or left > 0:
            if stop is not None and stop.is_set():
                return results
            size = batch if left is None else min(batch, left)
            done = _batch(svc, p, size)
            result.done += done
            if left is not None:
                left -= done
            if done < size:
                break
    return results


def _batch(svc: Services, p: Policy, size: int) -> int:
    """One transaction: select what is due now, act on it, audit it. Returns how many."""
    keys: dict[str, bytes] = {}
    pseudonyms: dict[str, str] = {}
    if p.action == "deidentify":
        keys["pseudonym"] = svc.keys.ensure("pseudonym:retention")[1]
        svc.keys.ensure(key_scope_for(p.resource_type, []))  # the key of data in no compartment
    elif p.resource_type == "Patient":
        with svc.engine.connect() as conn:
            pks, _total = _eligible(svc, conn, p, now_us(), size)
            ids = [s.id for s in svc.repo.load_current(conn, pks)]
        pseudonyms = {pid: pseudonym_for(svc, pid) for pid in ids}  # keys made before the transaction
    with svc.engine.begin() as conn:
        pks, _total = _eligible(svc, conn, p, now_us(), size)
        stored = svc.repo.load_current(conn, pks)
        if not stored:
            return 0
        patients = patients_of(conn, stored)
        touched = []
        for st in stored:
            if p.action == "erase" and p.resource_type == "Patient":
                if st.id not in pseudonyms or already_erased(conn, st.deleted, st.id):
                    continue
                erase_patient(svc, conn, st.id, pseudonyms[st.id])
                touched.append(f"Patient/{pseudonyms[st.id]}")
                patients = [x if x != st.id else pseudonyms[st.id] for x in patients]
            elif p.action == "erase":
                if st.type == "Consent":
                    from ..consent.rules import clear as clear_consent_rules

                    clear_consent_rules(conn, st.pk)
                svc.repo.erase(conn, st.pk, st.type)
                touched.append(f"{st.type}/{st.id}")
            else:
                _deidentify(svc, conn, st, keys["pseudonym"])
                touched.append(f"{st.type}/{st.id}")
        rec = AuditRecord(interaction="delete" if p.action == "erase" else "update",
                          request_id=f"retention-{now_us()}", network_address="localhost", recorded_us=now_us(),
                          status=200, resources=touched, patients=sorted(set(patients)), resource_type=p.resource_type,
                          outcome_desc=f"retention {p.text}: {len(touched)} {p.resource_type} {p.action}d")
        rec.subtype_code = ("urn:fhirserver:privacy-job", f"retention-{p.action}", f"retention {p.action}")
        svc.audit.append(conn, rec)
        return len(stored)


def _deidentify(svc: Services, conn: Connection, st: Stored, key: bytes) -> None:
    if st.body is None:
        return  # a deleted version holds nothing to de-identify
    body = Deidentifier(key).apply(parse_json(st.body))
    body["id"] = st.id
    meta = body.setdefault("meta", {})
    meta["tag"] = [t for t in meta.get("tag", []) if t.get("system") != TAG_SYSTEM] + [dict(TAG)]
    index = svc.indexer.index(st.type, body)
    index.patients = []  # its references are pseudonyms now: in nobody's compartment
    prepared = svc.repo.prepare_indexed(st.type, body, index)
    written, _created = svc.repo.update(conn, prepared)
    conn.execute(delete(resource_version).where(resource_version.c.resource_pk == st.pk,
                                                resource_version.c.version < written.version))
