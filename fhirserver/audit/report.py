"""Breach report (issue 15, item 5): every patient whose data one account touched, from the
hourly roll-up of the access records (whole hours) and their own index (the edge hours and the
records not rolled up yet), in one statement -- never by decrypting and rendering AuditEvents.

An account is a client (`Device/<client_id>`, the agent every access record names) or a user
(their `fhirUser`, e.g. `Practitioner/7`). For each patient named by a successful access
(outcome 0) of that account in [since, until): how many accesses per action (R read, C create,
U update, D delete, E search/operation/export) and the first and last time. Denied attempts
touched no data and are counted apart, per patient too. An erased patient appears under the
pseudonym that replaced their id in the audit trail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, union_all

from ..db.schema import access_hourly, access_record, access_subject, audit_state, audit_term
from .rollup import WATERMARK, hour_ceil, hour_floor

ACTIONS = ("R", "C", "U", "D", "E")


@dataclass
class PatientTouched:
    patient: str
    actions: dict[str, int] = field(default_factory=dict)  # action code -> successful accesses
    denied: int = 0
    first_us: int = 0
    last_us: int = 0

    def to_json(self) -> dict[str, Any]:
        from ..fhir.dates import instant_text

        return {"patient": f"Patient/{self.patient}", **{a: self.actions.get(a, 0) for a in ACTIONS},
                "denied": self.denied, "first": instant_text(self.first_us), "last": instant_text(self.last_us)}


def touched_patients(conn: Connection, agent: str, since_us: int, until_us: int) -> list[PatientTouched]:
    """The patients `agent` (`Type/id`) accessed in [since_us, until_us), most accessed first."""
    agent_type, _sep, agent_id = agent.partition("/")
    whole_lo, whole_hi = hour_ceil(since_us), hour_floor(until_us)
    h = access_hourly
    rolled = (select(h.c.patient_id, h.c.action, h.c.outcome, h.c.n, h.c.first_us, h.c.last_us)
              .where(h.c.agent_type == agent_type, h.c.agent_id == agent_id,
                     h.c.hour_us >= whole_lo, h.c.hour_us < whole_hi))
    who, pat, act, out = access_subject.alias(), access_subject.alias(), audit_term.alias(), audit_term.alias()
    mark = select(func.coalesce(func.max(audit_state.c.value), 0)).where(
        audit_state.c.name == WATERMARK).scalar_subquery()
    loose = (
        select(pat.c.target_id, act.c.code, out.c.code, func.count(access_record.c.pk.distinct()),
               func.min(access_record.c.recorded_us), func.max(access_record.c.recorded_us))
        .select_from(who)
        .join(access_record, access_record.c.pk == who.c.record_pk)
        .join(pat, and_(pat.c.record_pk == who.c.record_pk, pat.c.param == "patient", pat.c.target_type == "Patient"))
        .join(act, and_(act.c.set_id == access_record.c.terms, act.c.tbl == "token", act.c.param == "action"))
        .join(out, and_(out.c.set_id == access_record.c.terms, out.c.tbl == "token", out.c.param == "outcome"))
        .where(who.c.param == "agent", who.c.target_id == agent_id, who.c.target_type == agent_type,
               who.c.recorded_us >= since_us, who.c.recorded_us < until_us,
               or_(who.c.recorded_us < whole_lo, who.c.recorded_us >= whole_hi, access_record.c.seq.is_(None),
                   access_record.c.seq >= mark))
        .group_by(pat.c.target_id, act.c.code, out.c.code)
    )
    groups: dict[tuple[str, str, str], list[int]] = {}
    for patient, action, outcome, count, first, last in conn.execute(union_all(rolled, loose)).all():
        g = groups.get((patient, action, outcome))
        groups[(patient, action, outcome)] = [count, first, last] if g is None else \
            [g[0] + count, min(g[1], first), max(g[2], last)]
    found: dict[str, PatientTouched] = {}
    denied_times: dict[str, tuple[int, int]] = {}
    for (patient, action, outcome), (count, first, last) in groups.items():
        row = found.setdefault(patient, PatientTouched(patient))
        if outcome == "0":
            row.actions[action] = row.actions.get(action, 0) + count
            row.first_us = first if not row.first_us else min(row.first_us, first)
            row.last_us = max(row.last_us, last)
        else:
            row.denied += count
            low, high = denied_times.get(patient, (first, last))
            denied_times[patient] = (min(low, first), max(high, last))
    for patient, row in found.items():
        if not row.actions:  # denied only: the times of the denials
            row.first_us, row.last_us = denied_times[patient]
    touched = sorted((r for r in found.values() if r.actions), key=lambda r: (-sum(r.actions.values()), r.patient))
    denied_only = sorted((r for r in found.values() if not r.actions), key=lambda r: (-r.denied, r.patient))
    return touched + denied_only
