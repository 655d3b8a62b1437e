"""Every step of every served search parameter's path reaches an element of the R4 schema, and a
step naming a choice element (Condition.onset -> onsetDateTime, onsetPeriod, ...) is one the
FHIRPath navigation expands (profiles/summary-elements.json `choiceElements`). A missing choice
name silently indexes nothing: `Condition?onset-date=` found no Condition and consent
`dataPeriod` criteria never matched one, until the list was generated from every served type."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
STEP = re.compile(r"^[a-z][A-Za-z0-9]*$")


def _target(prop: dict[str, Any]) -> str | None:
    ref = prop.get("$ref") or (prop.get("items") or {}).get("$ref")
    return ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None


def _paths(expression: str, rtype: str) -> list[list[str]]:
    """The plain dotted paths of `expression` rooted at `rtype` (functions end a path)."""
    out = []
    for branch in expression.split("|"):
        branch = branch.strip().strip("()")
        if not branch.startswith(rtype + "."):
            continue
        steps = []
        for step in re.split(r"\.(?![^(]*\))", branch)[1:]:
            step = step.split(" ")[0]
            if not STEP.match(step):
                break
            steps.append(step)
        out.append(steps)
    return out


def test_every_search_path_step_is_an_element_or_an_expanded_choice() -> None:
    defs = json.loads((PROFILES / "fhir-schema-subset.json").read_text())["definitions"]
    choices = set(json.loads((PROFILES / "summary-elements.json").read_text())["choiceElements"])
    served = json.loads((PROFILES / "resource-types.json").read_text())["types"]
    params = json.loads((PROFILES / "search-parameters.json").read_text())["entry"]
    checked, problems = 0, []
    for entry in params:
        sp = entry["resource"]
        for rtype in sp.get("base", []):
            if rtype not in served or not sp.get("expression"):
                continue
            for steps in _paths(sp["expression"], rtype):
                node = rtype
                for step in steps:
                    props = defs.get(node, {}).get("properties", {})
                    if step in props:
                        node = _target(props[step]) or ""
                    elif any(k.startswith(step) and k[len(step):][:1].isupper() for k in props):
                        if step not in choices:
                            problems.append(f"{sp['code']} ({rtype}): choice {step}[x] not in choiceElements")
                        break
                    else:
                        if node in defs:  # a known definition without the element: the path is wrong
                            problems.append(f"{sp['code']} ({rtype}): no element {node}.{step}")
                        break
                    checked += 1
    assert not problems, problems
    assert checked > 500  # the walk really covered the registry's parameters
