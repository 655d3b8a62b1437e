"""Terminology operations over the stored CodeSystems and ValueSets (docs/terminology.md):
`CodeSystem/$lookup`, `CodeSystem/$validate-code`, `ValueSet/$expand`, `ValueSet/$validate-code`
(type level with `url`, instance level by id; GET parameters or a POST `Parameters` body).

Every CodeSystem or ValueSet an operation uses is read through the access gate with the caller's
search access to that type: a code system the caller may not read is "not available", exactly as
an absent one. Audited like a search (the resources used are named in the record)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from ..clock import now_us
from ..fhir.dates import instant_text
from ..fhir.errors import FhirError
from ..fhir.terminology import Concept, children, expand, lookup, text_filter
from ..search.parser import parse_search
from ..search.sources import source_of
from ..storage.codec import dump_json, parse_json
from ..storage.errors import StorageError
from ..storage.repository import Stored
from .context import RequestContext, Result
from .errors import fhir_error
from .handler import Handler
from .operation_params import parameters_of
from .request_body import parse_body


def _params(ctx: RequestContext) -> dict[str, Any]:
    """The operation's parameters: the query, and a POST's Parameters body (`coding` as a dict)."""
    out: dict[str, Any] = dict(ctx.interaction.params)
    if ctx.interaction.method == "POST" and ctx.body:
        for param in parameters_of(parse_body(ctx), "a terminology operation"):
            if param.value is not None:
                out[param.name] = param.value
    coding = out.get("coding")
    if isinstance(coding, dict):
        out.setdefault("system", coding.get("system"))
        out.setdefault("code", coding.get("code"))
        out.setdefault("display", coding.get("display"))
    return out


class _Resources:
    """CodeSystems and ValueSets by canonical URL, as the caller may read them (per request)."""

    def __init__(self, ctx: RequestContext, conn: Connection) -> None:
        self.ctx, self.conn = ctx, conn
        self.used: list[Stored] = []

    def by_id(self, rtype: str, rid: str) -> dict[str, Any]:
        try:
            stored = self.ctx.gate.read(self.conn, rtype, rid, preds=self.ctx.access.search)
        except StorageError as err:
            raise fhir_error(err) from None
        self.used.append(stored)
        return dict(parse_json(stored.body or b"{}"))

    def find(self, rtype: str, url: str, version: str | None) -> dict[str, Any] | None:
        ctx = self.ctx
        preds = ctx.access.search if rtype == ctx.interaction.resource_type else (
            ctx.access.others(rtype, source_of(rtype).res) if ctx.access.others is not None else None)
        if preds is None:
            return None  # the caller may not read that type: not available
        query = [("url", url.split("|", 1)[0])] + ([("version", version)] if version else [])
        try:
            parsed = parse_search(ctx.services.params, rtype, query, 20, 20, strict=True)
        except FhirError:
            return None
        _page, stored = ctx.gate.search(self.conn, parsed, preds)
        bodies = [(st, parse_json(st.body)) for st in stored if st.body]
        if not bodies:
            return None
        st, best = max(bodies, key=lambda b: (b[1].get("status") == "active", str(b[1].get("version") or "")))
        self.used.append(st)
        return dict(best)

    def value_set(self, params: dict[str, Any]) -> dict[str, Any]:
        it = self.ctx.interaction
        if it.id:
            return self.by_id("ValueSet", it.id)
        if isinstance(params.get("valueSet"), dict):
            return dict(params["valueSet"])  # a ValueSet sent in the request itself
        url = params.get("url")
        if not isinstance(url, str) or not url:
            raise FhirError(400, "required", "Name the value set: url (or call the operation on ValueSet/[id])", ["url"])
        found = self.find("ValueSet", url, params.get("valueSetVersion"))
        if found is None:
            raise FhirError(404, "not-found", f"The value set {url[:80]} is not available on this server")
        return found

    def resolve_any(self, url: str, version: str | None) -> dict[str, Any] | None:
        """A compose's reference: a CodeSystem by `system`, a ValueSet by `valueSet` (imports)."""
        return self.find("CodeSystem", url, version) or self.find("ValueSet", url, version)

    def audit(self) -> None:
        self.ctx.capture.disclosed(list({(st.type, st.id): st for st in self.used}.values()), patients=[])


def _parameters(*items: tuple[str, str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters",
            "parameter": [{"name": name, kind: value} for name, kind, value in items if value is not None]}


def _int(params: dict[str, Any], name: str, default: int, limit: int) -> int:
    try:
        value = int(params.get(name, default))
    except (TypeError, ValueError):
        raise FhirError(400, "invalid", f"{name} must be an integer", [name]) from None
    if value < 0:
        raise FhirError(400, "invalid", f"{name} must not be negative", [name])
    return min(value, limit)


class Lookup(Handler):
    """CodeSystem/$lookup: a code's display, its code system's name and version, its parents and
    children in the hierarchy."""

    reads_only = True

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        params = _params(ctx)
        system, code = params.get("system"), params.get("code")
        if not isinstance(system, str) or not isinstance(code, str) or not system or not code:
            raise FhirError(400, "required", "$lookup needs system and code (or a coding)", ["system", "code"])
        res = _Resources(ctx, conn)
        cs = res.find("CodeSystem", system, params.get("version"))
        res.audit()
        if cs is None:
            raise FhirError(404, "not-found", f"The code system {system[:80]} is not available on this server")
        concept = lookup(cs, code)
        if concept is None:
            raise FhirError(404, "not-found", f"{code[:40]} is not a code of {system[:80]}")
        out = _parameters(("name", "valueString", cs.get("name") or cs.get("title") or system),
                          ("version", "valueString", cs.get("version")),
                          ("display", "valueString", concept.display))
        for code_above in concept.ancestors[:1]:
            out["parameter"].append({"name": "property", "part": [{"name": "code", "valueCode": "parent"},
                                                                   {"name": "value", "valueCode": code_above}]})
        for child in children(cs, code):
            out["parameter"].append({"name": "property", "part": [{"name": "code", "valueCode": "child"},
                                                                   {"name": "value", "valueCode": child}]})
        return Result(200, dump_json(out))


class Expand(Handler):
    """ValueSet/$expand: the compose expanded against the stored code systems, `filter` (words of
    the code or display), `offset` and `count` paging, the total."""

    reads_only = True

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        params = _params(ctx)
        res = _Resources(ctx, conn)
        vs = res.value_set(params)
        found: list[Concept] = expand(vs, res.resolve_any)
        res.audit()
        if isinstance(params.get("filter"), str) and params["filter"].strip():
            found = text_filter(found, params["filter"])
        offset = _int(params, "offset", 0, len(found))
        count = _int(params, "count", ctx.services.settings.default_page_size, 1000)
        expansion: dict[str, Any] = {"timestamp": instant_text(now_us()), "total": len(found), "offset": offset,
                                     "contains": [c.as_contains() for c in found[offset:offset + count]]}
        if isinstance(params.get("filter"), str):
            expansion["parameter"] = [{"name": "filter", "valueString": params["filter"]}]
        out = {k: v for k, v in vs.items() if k not in ("compose", "text", "meta")}
        out["expansion"] = expansion
        return Result(200, dump_json(out))


class ValidateCode(Handler):
    """CodeSystem/$validate-code and ValueSet/$validate-code: whether the code is in the code
    system or the value set's expansion, with its display (and a message when not, or when the
    given display differs)."""

    reads_only = True

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        params = _params(ctx)
        code, display = params.get("code"), params.get("display")
        if not isinstance(code, str) or not code:
            raise FhirError(400, "required", "$validate-code needs a code (or a coding)", ["code"])
        res = _Resources(ctx, conn)
        found: Concept | None
        if ctx.interaction.resource_type == "CodeSystem":
            cs = res.by_id("CodeSystem", ctx.interaction.id) if ctx.interaction.id else (
                res.find("CodeSystem", str(params.get("url") or params.get("system") or ""), params.get("version")))
            if cs is None:
                raise FhirError(404, "not-found", "The code system is not available on this server")
            found = lookup(cs, code)
            where = str(cs.get("url") or "")
        else:
            vs = res.value_set(params)
            system = params.get("system")
            found = next((c for c in expand(vs, res.resolve_any)
                          if c.code == code and (not isinstance(system, str) or c.system == system)), None)
            where = str(vs.get("url") or "the value set")
        res.audit()
        message = None
        if found is None:
            message = f"{code[:40]} is not in {where[:80]}"
        elif isinstance(display, str) and found.display and display != found.display:
            message = f"The display for {code[:40]} is '{found.display}', not '{display[:60]}'"
        out = _parameters(("result", "valueBoolean", found is not None and message is None),
                          ("message", "valueString", message),
                          ("display", "valueString", found.display if found else None))
        return Result(200, dump_json(out))
