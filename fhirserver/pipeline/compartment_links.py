"""Compartments a resource joins through a reference (`compartmentVia` in the registry).

Binary and Provenance are outside the R4 Patient CompartmentDefinition, yet a Binary holding a
patient's letter, or a Provenance about a patient's Observation, is part of that patient's record.
A type lists the reference elements (Binary: `securityContext`; Provenance: `target`) whose stored
targets' compartments it joins when it is written, so the patient's scopes, consents,
`$everything` and erasure cover it. A target that is not stored (yet) adds nothing: the resource
then belongs to no patient (and Binary stays readable with a scope naming Binary only).
"""

from __future__ import annotations

from typing import Any

from ..search.values import parse_reference
from ..storage.repository import PreparedWrite
from .context import RequestContext
from .subscription_writes import admitted


def _references(value: object) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [str(v["reference"]) for v in items if isinstance(v, dict) and isinstance(v.get("reference"), str)]


def linked_patients(ctx: RequestContext, rtype: str, body: dict[str, Any]) -> list[str]:
    """The patients whose compartments a `rtype` body joins through its `compartmentVia` references."""
    spec = ctx.services.types.get(rtype)
    refs = [r for element in (spec.compartment_via if spec else ()) for r in _references(body.get(element))]
    found: list[str] = []
    targets: list[tuple[str, str]] = []
    for ref in refs:
        # parsed as the indexer parses references (this server's full URLs, _history, contained #)
        target_type, target_id, _url = parse_reference(ref, ctx.services.settings.fhir_base)
        if target_type is None or target_id is None:
            continue  # contained, another server's or malformed: nothing stored here to follow
        if target_type == "Patient":
            found.append(target_id)
        else:
            targets.append((target_type, target_id))
    if targets:
        held = ctx.gate.compartments_of(ctx.reading(), [f"{t}/{i}" for t, i in targets[:20]], live_only=True)
        for target_type, target_id in targets[:20]:
            found.extend(sorted(held.get(f"{target_type}/{target_id}", ())))
    return list(dict.fromkeys(found))


def prepare_write(ctx: RequestContext, rtype: str, body: dict[str, Any], rid: str | None) -> PreparedWrite:
    """`repo.prepare` of a REST write, with the compartments its references make it join (and a
    Subscription admitted: pipeline/subscription_writes.py)."""
    body = admitted(ctx, rtype, body)
    return ctx.services.repo.prepare(rtype, body, rid, linked_patients(ctx, rtype, body))
