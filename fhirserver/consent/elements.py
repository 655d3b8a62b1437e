"""What consent criteria and sensitivity labelling look at in each resource type, as data.

`profiles/consent-elements.json` names, per type of the patient compartment, the search parameters
holding its clinical date (a provision's `dataPeriod`) and its clinical codes (a provision's
`code`), and the elements whose codings are checked against the sensitive-code lists on write. The
engine turns the table into SQL over the search index, so a new type needs a table row, no code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, case, false, literal

from ..search.params import ParamRegistry

FILE = "consent-elements.json"


@dataclass(frozen=True)
class TypeElements:
    dates: tuple[str, ...] = ()
    codes: tuple[str, ...] = ()
    canonicals: tuple[str, ...] = ()
    labelled: tuple[str, ...] = ()
    labelled_canonical: str | None = None


@dataclass
class ConsentElements:
    types: dict[str, TypeElements] = field(default_factory=dict)

    def of(self, rtype: str) -> TypeElements:
        return self.types.get(rtype, TypeElements())

    def by_param(self, kind: str) -> dict[str, tuple[str, ...]]:
        """param name -> the types for which it holds `kind` ("dates", "codes", "canonicals")."""
        out: dict[str, list[str]] = {}
        for rtype, te in sorted(self.types.items()):
            for param in getattr(te, kind):
                out.setdefault(param, []).append(rtype)
        return {p: tuple(ts) for p, ts in sorted(out.items())}

    def param_of(self, kind: str, param_col: ColumnElement[Any], type_col: ColumnElement[Any]) -> ColumnElement[bool]:
        """SQL: the index row's parameter is one of `kind` for the resource row's type.

        A constant `IN` list of every such name (as the index probes had before there were per-type
        names), then a per-row filter: the row type's names, as one space-separated string from a
        CASE, must contain the parameter. A filter the planner cannot turn into index lookups on
        `param`: an OR of (param, type) pairs made SQLite scan every row of a parameter per probe
        (a 10-page walk under Consents went from 1.3x to 5x)."""
        groups = self.by_param(kind)
        if not groups:
            return false()
        names = {t: f" {' '.join(getattr(te, kind))} " for t, te in sorted(self.types.items()) if getattr(te, kind)}
        listed = case({t: literal(v) for t, v in names.items()}, value=type_col, else_=literal(" "))
        return and_(param_col.in_([literal(p) for p in groups]),
                    listed.like(literal("% ").concat(param_col).concat(literal(" %"))))

    def concepts(self, rtype: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The CodeableConcepts of `body` that sensitivity labelling looks up."""
        for path in self.of(rtype).labelled:
            yield from _walk(body, path.split("."))


def _walk(node: object, steps: list[str]) -> Iterator[dict[str, Any]]:
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, steps)
    elif isinstance(node, dict):
        if not steps:
            yield node
        else:
            yield from _walk(node.get(steps[0]), steps[1:])


def load_consent_elements(profiles_dir: Path, params: ParamRegistry | None = None) -> ConsentElements:
    """The table; with `params`, every parameter it names must exist with the right type (a typo
    would silently make a criterion match nothing)."""
    spec = json.loads((profiles_dir / FILE).read_text())
    out = ConsentElements()
    for rtype, entry in spec["types"].items():
        te = TypeElements(tuple(entry.get("dates", ())), tuple(entry.get("codes", ())),
                          tuple(entry.get("canonicals", ())), tuple(entry.get("labelled", ())),
                          entry.get("labelledCanonical"))
        if params is not None:
            for kind, want in (("dates", "date"), ("codes", "token"), ("canonicals", "reference")):
                for name in getattr(te, kind):
                    param = params.get(rtype, name)
                    if param is None or param.type != want:
                        raise ValueError(f"{FILE}: {rtype}.{kind} names '{name}', which is not a {want} "
                                         f"search parameter of {rtype}")
        out.types[rtype] = te
    return out
