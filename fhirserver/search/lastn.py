"""Observation/$lastn as one query: the most recent `max_n` Observations per code among those
matching the search (and the caller's access rules), newest first within each code."""

from __future__ import annotations

from sqlalchemy import Connection, false, func, select

from ..db import guard
from ..db.schema import idx_date, idx_token, resource
from .compiler import QueryCompiler
from .model import AccessFn, ParsedSearch


def lastn_pks(conn: Connection, parsed: ParsedSearch, compiler: QueryCompiler, access_fn: AccessFn, max_n: int,
              limit: int) -> list[int]:
    guard.check("lastn_pks")
    r = resource.alias()
    access = access_fn("Observation", r)
    conds = [r.c.type == "Observation", r.c.deleted.is_(False), *compiler.where(parsed, r, access_fn),
             *(access if access is not None else [false()])]
    tok, dat = idx_token.alias(), idx_date.alias()
    code_key = (select(func.min(func.coalesce(tok.c.system, "") + "|" + tok.c.code))
                .where(tok.c.resource_pk == r.c.pk, tok.c.param == "code").scalar_subquery())
    when = (select(func.max(dat.c.high_us)).where(dat.c.resource_pk == r.c.pk, dat.c.param == "date")
            .scalar_subquery())
    ranked = (select(r.c.pk.label("pk"), code_key.label("code_key"), when.label("when"),
                     func.row_number().over(partition_by=code_key,
                                            order_by=(func.coalesce(when, -(2**62)).desc(), r.c.pk.desc()))
                     .label("rn"))
              .where(*conds).subquery())
    rows = conn.execute(select(ranked.c.pk).where(ranked.c.rn <= max_n)
                        .order_by(ranked.c.code_key, ranked.c.rn).limit(limit)).all()
    return [row[0] for row in rows]
