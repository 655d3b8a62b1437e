"""Rebuild search indexes from stored (decrypted) current versions, e.g. after adding a
SearchParameter to profiles/. Runs in batches of short transactions. AuditEvents are access
records whose search rows are written with them (audit/records.py), not resource rows."""

from __future__ import annotations

from sqlalchemy import select

from ..db.engine import read_connection
from ..db.schema import resource
from ..services import Services
from ..storage.codec import parse_json
from .statistics import analyze


def reindex_all(svc: Services, batch: int = 500) -> int:
    last, count = 0, 0
    while True:
        with read_connection(svc.engine) as conn:
            pks = [r[0] for r in conn.execute(
                select(resource.c.pk).where(resource.c.pk > last, resource.c.deleted.is_(False))
                .order_by(resource.c.pk).limit(batch)).all()]
            stored = svc.repo.load_current(conn, pks)
        if not pks:
            analyze(svc.engine)
            return count
        with svc.engine.begin() as conn:
            for st in stored:
                assert st.body is not None
                body = parse_json(st.body)
                svc.repo.reindex(conn, st.pk, st.type, body)
                count += 1
        last = pks[-1]
