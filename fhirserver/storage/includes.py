"""_include and _revinclude: the resources they add to a page, through the caller's access rules
(`access(type, table)` gives the row predicates for a type, None where the caller may not read it)."""

from __future__ import annotations

from sqlalchemy import Connection, and_, or_, select

from ..db.schema import idx_reference, resource
from ..search.model import AccessFn, Include
from .repository import Repository, Stored

MAX_INCLUDED = 1000


def _include_targets(conn: Connection, types: list[str], access: AccessFn, inc: Include,
                     sources: list[Stored]) -> list[int]:
    """pks that one _include / _revinclude adds for `sources`, through the caller's access rules."""
    alias = resource.alias()
    if not inc.reverse:
        src = [st.pk for st in sources if st.type == inc.source_type]
        if not src:
            return []
        ref = idx_reference.alias()
        allowed = []
        for t in ([inc.target_type] if inc.target_type else types):
            preds = access(t, alias) if t in types else None
            if preds is not None:
                allowed.append(and_(alias.c.type == t, *preds))
        if not allowed:
            return []
        stmt = (select(alias.c.pk).join(ref, and_(ref.c.target_type == alias.c.type, ref.c.target_id == alias.c.id))
                .where(ref.c.resource_pk.in_(src), ref.c.param == inc.param, alias.c.deleted.is_(False), or_(*allowed))
                .distinct().limit(MAX_INCLUDED))
    else:
        preds = access(inc.source_type, alias)
        if preds is None:
            return []
        ref = idx_reference.alias()
        targets = [(st.type, st.id) for st in sources if inc.target_type in (None, st.type)]
        if not targets:
            return []
        by_type: dict[str, list[str]] = {}
        for t, rid in targets:
            by_type.setdefault(t, []).append(rid)
        match = or_(*[and_(ref.c.target_type == t, ref.c.target_id.in_(ids)) for t, ids in by_type.items()])
        stmt = (select(alias.c.pk).join(ref, ref.c.resource_pk == alias.c.pk)
                .where(alias.c.type == inc.source_type, alias.c.deleted.is_(False), ref.c.param == inc.param,
                       match, *preds).distinct().limit(MAX_INCLUDED))
    return [r[0] for r in conn.execute(stmt).all()]


def resolve_includes(conn: Connection, repo: Repository, types: list[str], access: AccessFn, includes: list[Include],
                     matches: list[Stored]) -> list[Stored]:
    if not includes:
        return []
    seen = {st.pk for st in matches}
    included: list[Stored] = []
    for iterate in (False, True):
        for inc in includes:
            if inc.iterate != iterate:
                continue
            sources = matches + included if iterate else matches
            new = [pk for pk in _include_targets(conn, types, access, inc, sources) if pk not in seen]
            seen.update(new)
            included.extend(repo.load_current(conn, new))
    return included[:MAX_INCLUDED]
