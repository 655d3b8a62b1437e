"""Snooping detection (issue 15, item 3): six rules over one finished day of access records.

Everything is computed from the hourly roll-up (audit/rollup.py) and the search index -- no
AuditEvent is rendered and no patient record is decrypted (the family rule decrypts only the
staff member's own Practitioner resource, to compute the keyed digests to look for). "Staff" are
agents of type Practitioner / PractitionerRole; patients and their proxies reading their own
records are not judged. Each rule's false-positive trade-off is in docs/operations.md.

| rule | fires when |
|---|---|
| volume | a staff member's distinct patients in an hour exceed max(floor, k x their own 95th percentile hour, k' x the median busy hour of all staff that day) |
| off-hours | a staff member with enough history works in an hour of day that held < share of their baseline |
| vip | a staff member opens a patient labelled VIP/employee (security label) who is not their patient (generalPractitioner) |
| family | a staff member opens a patient with their own family name and one of their address lines (keyed digests) |
| break-glass | an account used break-the-glass more than N times in the day |
| app-bulk | an interactive app (not a backend service) reads more than N distinct patients in an hour, or starts a bulk export |
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, literal, or_, select

from ..audit.rollup import HOUR_US, WATERMARK
from ..config import Settings
from ..crypto.blind_index import BlindIndexer, normalize
from ..db.rows import AnySelect
from ..db.schema import (
    access_agent_hour,
    access_hourly,
    access_record,
    audit_state,
    client,
    consent_alert,
    export_job,
    idx_reference,
    idx_string,
    idx_token,
    job_run,
    resource,
)
from ..fhir.dates import instant_text
from ..storage.repository import Repository

DAY_US = 24 * HOUR_US
STAFF = ("Practitioner", "PractitionerRole")
SAMPLE = 20  # patients named in an alert's evidence


class NotReady(Exception):
    """The day's records are not all sequenced and rolled up yet."""


@dataclass
class Finding:
    rule: str
    severity: str  # low | medium | high
    account: str  # Practitioner/7 (a user) or Device/<client_id> (a client)
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "severity": self.severity, "account": self.account, "evidence": self.evidence}


@dataclass
class SnoopRules:
    baseline_days: int = 28
    volume_min_patients: int = 30
    volume_factor: float = 3.0
    peer_factor: float = 5.0
    offhours_share: float = 0.02
    offhours_min_days: int = 10
    vip_labels: tuple[tuple[str, str], ...] = ()
    break_glass_per_day: int = 3
    app_patients_per_hour: int = 200

    @classmethod
    def from_settings(cls, s: Settings) -> SnoopRules:
        labels = tuple(tuple(p.strip().rsplit("|", 1)) for p in str(s.snoop_vip_labels).split(",") if "|" in p)
        return cls(s.snoop_baseline_days, s.snoop_volume_min_patients, s.snoop_volume_factor, s.snoop_peer_factor,
                   s.snoop_offhours_share, s.snoop_offhours_min_days, labels,  # type: ignore[arg-type]
                   s.snoop_break_glass_per_day, s.snoop_app_patients_per_hour)


def day_label(day_us: int) -> str:
    return instant_text(day_us)[:10]


# ---------------------------------------------------------------- per-agent hourly statistics
def ensure_ready(conn: Connection, end_us: int) -> None:
    """Every record before `end_us` is sequenced and rolled up, else NotReady."""
    mark = conn.execute(select(audit_state.c.value).where(audit_state.c.name == WATERMARK)).scalar() or 0
    for cond in (access_record.c.seq.is_(None), access_record.c.seq >= mark):
        # `+ 0`: found through the seq index, not by walking the time index from its start
        first = conn.execute(select(func.min(access_record.c.recorded_us + 0)).where(cond)).scalar()
        if first is not None and first < end_us:
            raise NotReady(f"access records of {day_label(first)} are not rolled up yet (the sequencer is behind)")


def agent_hours(conn: Connection, day_us: int) -> None:
    """access_agent_hour for one day, from the roll-up (successful accesses only); once per day."""
    period = day_label(day_us)
    if conn.execute(select(job_run.c.name).where(job_run.c.name == "agent-hours", job_run.c.period == period)).first():
        return
    h = access_hourly
    conn.execute(delete(access_agent_hour).where(access_agent_hour.c.hour_us >= day_us,
                                                 access_agent_hour.c.hour_us < day_us + DAY_US))
    conn.execute(insert(access_agent_hour).from_select(
        ["agent_type", "agent_id", "hour_us", "patients", "accesses"],
        select(h.c.agent_type, h.c.agent_id, h.c.hour_us, func.count(h.c.patient_id.distinct()), func.sum(h.c.n))
        .where(h.c.hour_us >= day_us, h.c.hour_us < day_us + DAY_US, h.c.outcome == "0")
        .group_by(h.c.agent_type, h.c.agent_id, h.c.hour_us)))
    conn.execute(insert(job_run).values(name="agent-hours", period=period, started_us=day_us, finished_us=day_us))


def _hours(conn: Connection, lo: int, hi: int, types: tuple[str, ...]) -> dict[str, list[tuple[int, int, int]]]:
    a = access_agent_hour
    out: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for row in conn.execute(select(a.c.agent_type, a.c.agent_id, a.c.hour_us, a.c.patients, a.c.accesses)
                            .where(a.c.hour_us >= lo, a.c.hour_us < hi, a.c.agent_type.in_(types))).all():
        out[f"{row.agent_type}/{row.agent_id}"].append((row.hour_us, row.patients, row.accesses))
    return out


def _sample(conn: Connection, account: str, lo: int, hi: int) -> list[str]:
    atype, _s, aid = account.partition("/")
    h = access_hourly
    rows = conn.execute(select(h.c.patient_id).distinct().where(
        h.c.agent_type == atype, h.c.agent_id == aid, h.c.hour_us >= lo, h.c.hour_us < hi, h.c.outcome == "0")
        .order_by(h.c.patient_id).limit(SAMPLE)).scalars().all()
    return [f"Patient/{p}" for p in rows]


def _p95(values: list[int]) -> int:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


# ---------------------------------------------------------------- the rules
def volume(conn: Connection, day_us: int, r: SnoopRules, today: dict[str, list[tuple[int, int, int]]],
           baseline: dict[str, list[tuple[int, int, int]]]) -> list[Finding]:
    busy = [p for hours in today.values() for _h, p, _n in hours]
    peer = statistics.median(busy) if busy else 0
    found = []
    for account, hours in today.items():
        own = [p for _h, p, _n in baseline.get(account, [])]
        own_p95 = _p95(own) if own else 0
        limit = max(r.volume_min_patients, r.volume_factor * own_p95, r.peer_factor * peer)
        over = [(h, p, n) for h, p, n in hours if p > limit]
        if not over:
            continue
        worst = max(over, key=lambda x: x[1])
        found.append(Finding("volume", "high" if worst[1] > 2 * limit else "medium", account, {
            "hours": [{"hour": instant_text(h), "patients": p, "accesses": n} for h, p, n in sorted(over)],
            "own_p95_patients_per_hour": own_p95, "own_baseline_hours": len(own), "peer_median_patients_per_hour": peer,
            "threshold": round(limit, 1), "patients": _sample(conn, account, worst[0], worst[0] + HOUR_US)}))
    return found


def off_hours(conn: Connection, day_us: int, r: SnoopRules, today: dict[str, list[tuple[int, int, int]]],
              baseline: dict[str, list[tuple[int, int, int]]]) -> list[Finding]:
    found = []
    for account, hours in today.items():
        past = baseline.get(account, [])
        days = {h // DAY_US for h, _p, _n in past}
        if len(days) < r.offhours_min_days:
            continue  # too little history to know the person's hours
        by_hour: dict[int, int] = defaultdict(int)
        for h, _p, n in past:
            by_hour[h // HOUR_US % 24] += n
        total = sum(by_hour.values())
        odd = [(h, p, n) for h, p, n in hours if by_hour[h // HOUR_US % 24] / total < r.offhours_share]
        if not odd:
            continue
        patients = sum(p for _h, p, _n in odd)
        found.append(Finding("off-hours", "medium" if patients >= 10 else "low", account, {
            "hours": [{"hour": instant_text(h), "patients": p, "accesses": n,
                       "baseline_share": round(by_hour[h // HOUR_US % 24] / total, 4)} for h, p, n in sorted(odd)],
            "baseline_days": len(days), "threshold_share": r.offhours_share,
            "patients": _sample(conn, account, odd[0][0], odd[-1][0] + HOUR_US)}))
    return found


def _touched_patients(day_us: int) -> AnySelect:
    h = access_hourly
    return (select(h.c.agent_type, h.c.agent_id, h.c.patient_id, func.sum(h.c.n).label("n"),
                   func.min(h.c.first_us).label("first"), func.max(h.c.last_us).label("last"), resource.c.pk)
            .join(resource, and_(resource.c.type == "Patient", resource.c.id == h.c.patient_id))
            .where(h.c.hour_us >= day_us, h.c.hour_us < day_us + DAY_US, h.c.outcome == "0",
                   h.c.agent_type.in_(STAFF))
            .group_by(h.c.agent_type, h.c.agent_id, h.c.patient_id, resource.c.pk))


def _per_account(rule: str, severity: str, rows: Sequence[Any], extra: dict[str, Any]) -> list[Finding]:
    grouped: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        grouped[f"{row.agent_type}/{row.agent_id}"].append(row)
    return [Finding(rule, severity, account, {**extra, "patients": [
        {"patient": f"Patient/{x.patient_id}", "accesses": int(x.n), "first": instant_text(x.first),
         "last": instant_text(x.last)} for x in sorted(items, key=lambda x: x.patient_id)[:SAMPLE]]})
        for account, items in grouped.items()]


def vip(conn: Connection, day_us: int, r: SnoopRules) -> list[Finding]:
    if not r.vip_labels:
        return []
    base = _touched_patients(day_us).subquery()
    tok, gp = idx_token.alias(), idx_reference.alias()
    labelled = select(literal(1)).where(tok.c.resource_pk == base.c.pk, tok.c.param == "_security",
                                        or_(*[and_(tok.c.system == s, tok.c.code == c) for s, c in r.vip_labels]))
    theirs = select(literal(1)).where(gp.c.resource_pk == base.c.pk, gp.c.param == "general-practitioner",
                                      gp.c.target_type == base.c.agent_type, gp.c.target_id == base.c.agent_id)
    rows = conn.execute(select(base).where(labelled.exists(), ~theirs.exists())).all()
    return _per_account("vip", "medium", rows, {"labels": [f"{s}|{c}" for s, c in r.vip_labels]})


def family(conn: Connection, day_us: int, repo: Repository, blind: BlindIndexer) -> list[Finding]:
    """Staff who opened a patient sharing their family name and an address line: the staff
    member's own Practitioner resource is read (one decryption per person), the patient side is
    matched on the keyed digests the search index already holds."""
    from ..storage.codec import parse_json

    staff = conn.execute(select(access_agent_hour.c.agent_id).distinct().where(
        access_agent_hour.c.agent_type == "Practitioner", access_agent_hour.c.hour_us >= day_us,
        access_agent_hour.c.hour_us < day_us + DAY_US)).scalars().all()
    found: list[Finding] = []
    for pid in staff:
        head = repo.current(conn, "Practitioner", pid)
        if head is None or head.deleted:
            continue
        body = parse_json(repo.read(conn, "Practitioner", pid).body or b"{}")
        names = {n["family"] for n in body.get("name", []) if isinstance(n, dict) and isinstance(n.get("family"), str)}
        lines = {ln for a in body.get("address", []) if isinstance(a, dict) for ln in a.get("line", []) or []
                 if isinstance(ln, str)}
        if not names or not lines:
            continue
        fam = [blind.digest("family", "n", normalize(n)) for n in names]
        addr = [blind.digest("address", "n", normalize(ln)) for ln in lines]
        base = _touched_patients(day_us).where(access_hourly.c.agent_type == "Practitioner",
                                                access_hourly.c.agent_id == pid).subquery()
        f, a = idx_string.alias(), idx_string.alias()
        same_name = select(literal(1)).where(f.c.resource_pk == base.c.pk, f.c.param == "family", f.c.kind == "n",
                                             f.c.value.in_(fam))
        same_home = select(literal(1)).where(a.c.resource_pk == base.c.pk, a.c.param == "address", a.c.kind == "n",
                                             a.c.value.in_(addr))
        rows = conn.execute(select(base).where(same_name.exists(), same_home.exists())).all()
        found += _per_account("family", "high", rows, {"match": "family name and an address line"})
    return found


def break_glass(conn: Connection, day_us: int, r: SnoopRules) -> list[Finding]:
    rows = conn.execute(select(consent_alert.c.client_id, consent_alert.c.detail, consent_alert.c.created_us).where(
        consent_alert.c.kind == "break-glass", consent_alert.c.created_us >= day_us,
        consent_alert.c.created_us < day_us + DAY_US)).all()
    uses: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for row in rows:
        detail = json.loads(row.detail or "{}")
        account = detail.get("user") or f"Device/{row.client_id}"
        uses[account].append((row.created_us, detail))
    found = []
    for account, items in uses.items():
        if len(items) > r.break_glass_per_day:
            found.append(Finding("break-glass", "high" if len(items) > 2 * r.break_glass_per_day else "medium",
                                 account, {"uses": len(items), "threshold": r.break_glass_per_day, "requests": [
                                     {"time": instant_text(t), "reason": d.get("reason"), "target": d.get("target")}
                                     for t, d in sorted(items, key=lambda x: x[0])[:SAMPLE]]}))
    return found


def app_bulk(conn: Connection, day_us: int, r: SnoopRules, apps: dict[str, list[tuple[int, int, int]]]) -> list[Finding]:
    interactive = set(conn.execute(select(client.c.client_id).where(client.c.kind != "backend")).scalars().all())
    found = []
    for account, hours in apps.items():
        cid = account.split("/", 1)[1]
        if cid not in interactive:
            continue
        over = [(h, p, n) for h, p, n in hours if p > r.app_patients_per_hour]
        if over:
            worst = max(over, key=lambda x: x[1])
            found.append(Finding("app-bulk", "high", account, {
                "hours": [{"hour": instant_text(h), "patients": p, "accesses": n} for h, p, n in sorted(over)],
                "threshold": r.app_patients_per_hour, "patients": _sample(conn, account, worst[0], worst[0] + HOUR_US)}))
    exports = conn.execute(select(export_job.c.client_id, func.count()).where(
        export_job.c.created_us >= day_us, export_job.c.created_us < day_us + DAY_US,
        export_job.c.client_id.in_(interactive)).group_by(export_job.c.client_id)).all()
    for cid, count in exports:
        found.append(Finding("app-bulk", "high", f"Device/{cid}", {"exports": count}))
    return found


def detect(conn: Connection, day_us: int, rules: SnoopRules, repo: Repository, blind: BlindIndexer) -> list[Finding]:
    """Every rule over the day [day_us, day_us + 24 h) (UTC); the day must be over and rolled up."""
    from ..clock import now_us

    if day_us + DAY_US > now_us():
        raise NotReady(f"{day_label(day_us)} is not over yet")
    ensure_ready(conn, day_us + DAY_US)
    for d in range(rules.baseline_days, -1, -1):
        agent_hours(conn, day_us - d * DAY_US)
    lo = day_us - rules.baseline_days * DAY_US
    today, baseline = _hours(conn, day_us, day_us + DAY_US, STAFF), _hours(conn, lo, day_us, STAFF)
    apps = _hours(conn, day_us, day_us + DAY_US, ("Device",))
    return (volume(conn, day_us, rules, today, baseline) + off_hours(conn, day_us, rules, today, baseline)
            + vip(conn, day_us, rules) + family(conn, day_us, repo, blind) + break_glass(conn, day_us, rules)
            + app_bulk(conn, day_us, rules, apps))
