"""History: instance and type history, keyset-paged over versions."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import Connection

from ..clock import now_us
from ..fhir.dates import instant_text, parse_range
from ..fhir.errors import FhirError
from ..search.cursor import decode_cursor, encode_cursor
from ..storage.codec import dump_json, fragment
from .context import RequestContext, Result
from .handler import Handler
from .render import output_body


def _history_params(ctx: RequestContext) -> tuple[int, int | None, int | None, tuple[int, int] | None]:
    params = dict(ctx.interaction.params)
    unknown = sorted(set(params) - {"_count", "_since", "_at", "_cursor", "_format", "_pretty"})
    if unknown and ctx.prefer.get("handling") == "strict":
        raise FhirError(400, "not-supported", f"History does not support: {', '.join(unknown)[:200]}", unknown)
    settings = ctx.services.settings
    try:
        count = min(int(params.get("_count", settings.default_page_size)), settings.history_max_page_size)
    except ValueError:
        raise FhirError(400, "invalid", "_count must be an integer", ["_count"]) from None
    since = None
    if "_since" in params:
        try:
            since = parse_range(params["_since"])[0]
        except ValueError:
            raise FhirError(400, "invalid", "_since must be a FHIR instant", ["_since"]) from None
    at = None
    if "_at" in params:  # the versions current at some moment of this date, day or instant
        try:
            at = parse_range(params["_at"])
        except ValueError:
            raise FhirError(400, "invalid", "_at must be a FHIR date or instant", ["_at"]) from None
    cursor = None
    if "_cursor" in params:
        cursor = decode_cursor(params["_cursor"]).pk  # the same cursor format as search, keyed on version pk
    return max(count, 1), since, cursor, at


class History(Handler):
    def read_only(self, ctx: RequestContext) -> bool:
        # restricted access probes old versions in a savepoint
        if ctx.interaction.kind == "history-system":
            return not any(ctx.access.history_types.values())
        return not ctx.access.read

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        it = ctx.interaction
        rtype = it.resource_type
        count, since, cursor, at = _history_params(ctx)
        page, after = ctx.gate.history(conn, rtype, it.id if it.kind == "history-instance" else None, since, count,
                                       cursor, at)
        base = ctx.services.settings.fhir_base
        entries = []
        for _vpk, st in page:
            entry: dict[str, Any] = {"fullUrl": f"{base}/{st.type}/{st.id}"}
            if st.body is not None:
                entry["resource"] = fragment(output_body(ctx, st, conn))
            entry["request"] = {"method": st.method,
                                "url": st.type if st.method == "POST" else f"{st.type}/{st.id}"}
            entry["response"] = {"status": {"POST": "201", "PUT": "200", "DELETE": "204"}.get(st.method, "200"),
                                 "etag": st.etag, "lastModified": instant_text(st.last_updated_us)}
            entries.append(entry)
        ctx.capture.disclosed([st for _v, st in page])
        path = (f"{base}/{rtype}/{it.id}/_history" if it.kind == "history-instance" else
                f"{base}/{rtype}/_history" if rtype else f"{base}/_history")
        keep = [(k, v) for k, v in it.params if k != "_cursor"]
        links = [{"relation": "self", "url": path + ("?" + urlencode(it.params) if it.params else "")}]
        if after is not None:
            links.append({"relation": "next", "url": path + "?" + urlencode(keep + [("_cursor", encode_cursor(True, [], after))])})
        bundle = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "meta": {"lastUpdated": instant_text(now_us())},
                  "type": "history", "link": links, "entry": entries}
        return Result(200, dump_json(bundle))
