"""Values as the search index sees them: the rows an index write produces (IndexRows), and the
search-relevant parts of FHIR JSON values (token pairs, display texts, strings of names and
addresses, references, numbers, date ranges). Shared by the indexer and the parameter types."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ..fhir.dates import MAX_US, MIN_US, parse_range

MAX_PREFIX_CHARS = 20
_STRING_PARTS = ("family", "given", "prefix", "suffix", "text", "line", "city", "district", "state",
                 "postalCode", "country")


@dataclass
class IndexRows:
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    patients: list[str] = field(default_factory=list)  # Patient compartments this resource is in

    def add(self, table: str, **row: object) -> None:
        self.rows.setdefault(table, []).append(row)


def strings_of(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        out: list[str] = []
        for part in _STRING_PARTS:
            v = value.get(part)
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, list):
                out.extend(x for x in v if isinstance(x, str))
        return out
    return []


def token_pairs(value: object) -> list[tuple[str | None, str]]:
    """(system, code) pairs of a Coding, CodeableConcept, Identifier, ContactPoint or primitive."""
    if isinstance(value, bool):
        return [(None, "true" if value else "false")]
    if isinstance(value, str):
        return [(None, value)]
    if isinstance(value, (int, float)):
        return [(None, str(value))]
    if not isinstance(value, dict):
        return []
    if "coding" in value or ("text" in value and "code" not in value and "value" not in value):
        return [p for c in value.get("coding", []) for p in token_pairs(c)]
    if "code" in value:
        return [(value.get("system"), value["code"])] if isinstance(value["code"], str) else []
    if "value" in value and isinstance(value["value"], str):
        return [(value.get("system"), value["value"])]
    return []


def token_texts(value: object) -> list[str]:
    """Display texts of a CodeableConcept / Coding (for token :text)."""
    if not isinstance(value, dict):
        return []
    texts = [value["text"]] if isinstance(value.get("text"), str) else []
    codings = value.get("coding", [value]) if "coding" in value else [value]
    texts.extend(c["display"] for c in codings if isinstance(c, dict) and isinstance(c.get("display"), str))
    return texts


def parse_reference(ref: str, base_url: str) -> tuple[str | None, str | None, str | None]:
    """(type, id, url) of a reference string; local references have url None."""
    if ref.startswith("#"):
        return None, None, ref
    if ref.startswith(base_url + "/"):
        ref = ref[len(base_url) + 1:]
    if "://" in ref or ref.startswith("urn:"):
        return None, None, ref.split("|")[0]
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) == 2 and parts[0] and parts[1]:
        return parts[0], parts[1], None
    return None, None, ref


def number_of(value: object) -> float | None:
    """JSON numbers arrive as int or Decimal (parsed so decimal precision is kept)."""
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return float(value)
    return None


def date_ranges(value: object) -> list[tuple[int, int]]:
    try:
        if isinstance(value, str):
            return [parse_range(value)]
        if isinstance(value, dict) and ("start" in value or "end" in value):  # Period
            low = parse_range(value["start"])[0] if isinstance(value.get("start"), str) else MIN_US
            high = parse_range(value["end"])[1] if isinstance(value.get("end"), str) else MAX_US
            return [(low, high)]
        if isinstance(value, dict) and ("event" in value or "repeat" in value):  # Timing
            # only the outer limits count (FHIR search, date: "the specified scheduling details are
            # ignored"): from the first event or bounds start to the last event or bounds end
            bounds = (value.get("repeat") or {}).get("boundsPeriod") if isinstance(value.get("repeat"), dict) else None
            parts = [r for e in value.get("event") or [] for r in date_ranges(e)]
            parts += date_ranges(bounds) if isinstance(bounds, dict) else []
            return [(min(lo for lo, _h in parts), max(hi for _l, hi in parts))] if parts else []
    except ValueError:
        return []
    return []
