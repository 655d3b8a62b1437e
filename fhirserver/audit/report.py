"""Breach report (issue 15, item 5): every patient whose data one account touched, from the
hourly roll-up of the access records (whole hours) and their own index (the edge hours and the
records not rolled up yet), in one statement -- never by decrypting and rendering AuditEvents.

An account is a client (`Device/<client_id>`, the agent every access record names) or a user
(their `fhirUser`, e.g. `Practitioner/7`). For each patient named by a successful access
(outcome 0) of that account in [since, until): how many accesses per action (R read, C create,
U update, D delete, E search/operation/export) and the first and last time. Denied attempts
touched no data and are counted apart, per patient too. An erased patient appears under the
pseudonym that replaced their id in the audit trail.

The same counts the other way round -- per patient, every account that touched their data
(`accessors`) -- are the list a patient (or the privacy office notifying them) is shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, case, func, or_, select, union_all

from ..db.schema import access_hourly, access_record, access_subject, audit_state, audit_term
from .rollup import WATERMARK, hour_ceil, hour_floor

ACTIONS = ("R", "C", "U", "D", "E")


@dataclass
class Touch:
    """One side's accesses to or by the other: `who` is a patient id (report by account) or an
    agent reference `Type/id` (report by patient)."""

    who: str
    actions: dict[str, int] = field(default_factory=dict)  # action code -> successful accesses
    denied: int = 0
    first_us: int = 0
    last_us: int = 0

    @property
    def patient(self) -> str:
        return self.who

    def to_json(self, key: str = "patient") -> dict[str, Any]:
        from ..fhir.dates import instant_text

        who = f"Patient/{self.who}" if key == "patient" else self.who
        return {key: who, **{a: self.actions.get(a, 0) for a in ACTIONS},
                "denied": self.denied, "first": instant_text(self.first_us), "last": instant_text(self.last_us)}


def touched_patients(conn: Connection, agent: str, since_us: int, until_us: int) -> list[Touch]:
    """The patients `agent` (`Type/id`) accessed in [since_us, until_us), most accessed first."""
    agent_type, _sep, agent_id = agent.partition("/")
    return _touches(conn, since_us, until_us, agent=(agent_type, agent_id))


def accessors(conn: Connection, patient_id: str, since_us: int, until_us: int) -> list[Touch]:
    """Every agent (client `Device/<id>`, user `Practitioner/7`, ...) that accessed the patient's
    data in [since_us, until_us), most accesses first."""
    return _touches(conn, since_us, until_us, patient=patient_id)


def _touches(conn: Connection, since_us: int, until_us: int, agent: tuple[str, str] | None = None,
             patient: str | None = None) -> list[Touch]:
    whole_lo, whole_hi = hour_ceil(since_us), hour_floor(until_us)
    h = access_hourly
    who, pat, act, out = access_subject.alias(), access_subject.alias(), audit_term.alias(), audit_term.alias()
    key_rolled: ColumnElement[str]
    key_loose: ColumnElement[str]
    if agent is not None:  # driven by the account's own subject rows
        key_rolled, key_loose = h.c.patient_id, pat.c.target_id
        fix_rolled = [h.c.agent_type == agent[0], h.c.agent_id == agent[1]]
        driver, other = who, pat
        fix_loose = [who.c.param == "agent", who.c.target_id == agent[1], who.c.target_type == agent[0],
                     pat.c.param.concat("") == "patient", pat.c.target_type == "Patient"]
    else:  # driven by the patient's subject rows
        key_rolled = h.c.agent_type.concat("/").concat(h.c.agent_id)
        key_loose = who.c.target_type.concat("/").concat(who.c.target_id)
        fix_rolled = [h.c.patient_id == patient]
        driver, other = pat, who
        fix_loose = [pat.c.param == "patient", pat.c.target_id == patient, pat.c.target_type == "Patient",
                     who.c.param.concat("") == "agent", who.c.target_id.is_not(None)]
    rolled = (select(key_rolled, h.c.action, h.c.outcome, h.c.n, h.c.first_us, h.c.last_us)
              .where(*fix_rolled, h.c.hour_us >= whole_lo, h.c.hour_us < whole_hi))
    mark = select(func.coalesce(func.max(audit_state.c.value), 0)).where(
        audit_state.c.name == WATERMARK).scalar_subquery()
    # the records the roll-up does not hold yet are the newest: from the oldest of them on
    # (`+ 0`: found through the seq indexes, not by walking the time index from its start)
    never = 2**62
    unsequenced = func.coalesce(select(func.min(access_record.c.recorded_us + 0))
                                .where(access_record.c.seq.is_(None)).scalar_subquery(), never)
    unrolled = func.coalesce(select(func.min(access_record.c.recorded_us + 0))
                             .where(access_record.c.seq >= mark).scalar_subquery(), never)
    pending_from = case((unsequenced < unrolled, unsequenced), else_=unrolled)
    t = driver.c.recorded_us
    in_window = or_(and_(t >= since_us, t < min(whole_lo, until_us)), and_(t >= max(whole_hi, since_us), t < until_us),
                    and_(t >= since_us, t < until_us, t >= pending_from))  # index ranges of the driver rows
    loose = (
        select(key_loose, act.c.code, out.c.code, func.count(access_record.c.pk.distinct()),
               func.min(access_record.c.recorded_us), func.max(access_record.c.recorded_us))
        .select_from(driver)
        .join(access_record, access_record.c.pk == driver.c.record_pk)
        .join(other, other.c.record_pk == driver.c.record_pk)
        .join(act, and_(act.c.set_id == access_record.c.terms, act.c.tbl.concat("") == "token",
                        act.c.param.concat("") == "action"))
        .join(out, and_(out.c.set_id == access_record.c.terms, out.c.tbl.concat("") == "token",
                        out.c.param.concat("") == "outcome"))
        .where(*fix_loose, in_window,
               or_(access_record.c.recorded_us < whole_lo, access_record.c.recorded_us >= whole_hi,
                   access_record.c.seq.is_(None), access_record.c.seq >= mark))
        .group_by(key_loose, act.c.code, out.c.code)
    )
    both = union_all(rolled, loose).subquery()
    k, a, o, n, f, last_ = both.c
    summed = select(k, a, o, func.sum(n), func.min(f), func.max(last_)).group_by(k, a, o)  # in the database
    groups = {(key, action, outcome): (int(count), int(first), int(last))
              for key, action, outcome, count, first, last in conn.execute(summed).all()}
    found: dict[str, Touch] = {}
    denied_times: dict[str, tuple[int, int]] = {}
    for (key, action, outcome), (count, first, last) in groups.items():
        row = found.setdefault(key, Touch(key))
        if outcome == "0":
            row.actions[action] = row.actions.get(action, 0) + count
            row.first_us = first if not row.first_us else min(row.first_us, first)
            row.last_us = max(row.last_us, last)
        else:
            row.denied += count
            low, high = denied_times.get(key, (first, last))
            denied_times[key] = (min(low, first), max(high, last))
    for key, row in found.items():
        if not row.actions:  # denied only: the times of the denials
            row.first_us, row.last_us = denied_times[key]
    touched = sorted((r for r in found.values() if r.actions), key=lambda r: (-sum(r.actions.values()), r.who))
    denied_only = sorted((r for r in found.values() if not r.actions), key=lambda r: (-r.denied, r.who))
    return touched + denied_only
