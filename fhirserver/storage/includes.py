"""_include and _revinclude: the resources they add to a page, through the caller's access rules
(`access(type, table)` gives the row predicates for a type, None where the caller may not read it).
Each type's rows and references come from its own store (search/sources.py)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, FromClause, and_, or_, select

from ..db import guard
from ..db.schema import resource
from ..search.model import AccessFn, Include
from ..search.sources import source_of
from .repository import Stored

MAX_INCLUDED = 1000
# `:iterate` follows includes level by level until a level adds nothing new (cycles end there:
# a resource is added once); past this many levels it stops (MAX_INCLUDED caps the total too)
MAX_ITERATE_LEVELS = 10
Loader = Callable[[Connection, str, list[int]], list[Stored]]  # (conn, type, pks) -> current versions


def _include_targets(conn: Connection, types: list[str], access: AccessFn, inc: Include,
                     sources: list[Stored]) -> tuple[str, list[int]]:
    """(type whose store holds them, pks) that one _include / _revinclude adds for `sources`."""
    if not inc.reverse:
        src = [st.pk for st in sources if st.type == inc.source_type]
        if not src:
            return "*", []
        alias: FromClause = resource.alias()
        ref = source_of(inc.source_type).tables["reference"].alias()
        allowed = []
        for t in ([inc.target_type] if inc.target_type else types):
            if source_of(t).res is not resource:
                continue  # nothing refers to a type outside the resource table (AuditEvent)
            preds = access(t, alias) if t in types else None
            if preds is not None:
                allowed.append(and_(alias.c.type == t, *preds))
        if not allowed:
            return "*", []
        stmt = (select(alias.c.pk).join(ref, and_(ref.c.target_type == alias.c.type, ref.c.target_id == alias.c.id))
                .where(ref.c.resource_pk.in_(src), ref.c.param == inc.param, alias.c.deleted.is_(False), or_(*allowed))
                .distinct().limit(MAX_INCLUDED))
        return "*", [r[0] for r in conn.execute(stmt).all()]
    source = source_of(inc.source_type)
    alias = source.res.alias()
    preds = access(inc.source_type, alias)
    if preds is None:
        return inc.source_type, []
    ref = source.tables["reference"].alias()
    targets = [(st.type, st.id) for st in sources if inc.target_type in (None, st.type)]
    if not targets:
        return inc.source_type, []
    by_type: dict[str, list[str]] = {}
    for t, rid in targets:
        by_type.setdefault(t, []).append(rid)
    match = or_(*[and_(ref.c.target_type == t, ref.c.target_id.in_(ids)) for t, ids in by_type.items()])
    stmt = (select(alias.c.pk).join(ref, ref.c.resource_pk == alias.c.pk)
            .where(alias.c.type == inc.source_type, alias.c.deleted.is_(False), ref.c.param == inc.param,
                   match, *preds).distinct().limit(MAX_INCLUDED))
    return inc.source_type, [r[0] for r in conn.execute(stmt).all()]


def resolve_includes(conn: Connection, load: Loader, types: list[str], access: AccessFn, includes: list[Include],
                     matches: list[Stored]) -> list[Stored]:
    guard.check("resolve_includes")
    if not includes:
        return []
    seen = {(source_of(st.type).store, st.pk) for st in matches}
    included: list[Stored] = []

    def add(inc: Include, sources: list[Stored]) -> list[Stored]:
        rtype, pks = _include_targets(conn, types, access, inc, sources)
        store = source_of(rtype).store
        new = [pk for pk in pks if (store, pk) not in seen]
        seen.update((store, pk) for pk in new)
        loaded = load(conn, rtype, new)
        included.extend(loaded)
        return loaded

    for inc in includes:
        if not inc.iterate:
            add(inc, matches)
    iterating = [inc for inc in includes if inc.iterate]
    frontier = matches + included  # the first level iterates from everything so far
    for _level in range(MAX_ITERATE_LEVELS if iterating else 0):
        added: list[Stored] = []
        for inc in iterating:
            added += add(inc, frontier + added)
        if not added or len(included) >= MAX_INCLUDED:
            break
        frontier = added  # the next level: what this one added
    return included[:MAX_INCLUDED]
