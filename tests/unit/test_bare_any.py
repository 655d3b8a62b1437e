"""Types at the seams (issue 25, item 6): a bare `Any` annotation says nothing about a value, so
the package keeps few of them. `Any` inside a generic (`dict[str, Any]` for a FHIR resource's JSON,
`Row[Any]`) still names the container and is not counted; `Any` alone as a parameter, return,
variable or attribute annotation is."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fhirserver"
LIMIT = 21  # issue 25 asked for <= 30; the count reached 21, and the limit follows it down


def _is_bare_any(node: ast.expr | None) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a string annotation
        return node.value.strip() in ("Any", "typing.Any")
    return (isinstance(node, ast.Name) and node.id == "Any") or (
        isinstance(node, ast.Attribute) and node.attr == "Any" and isinstance(node.value, ast.Name)
        and node.value.id == "typing")


def bare_any(source: str) -> list[int]:
    """Line numbers of bare `Any` annotations in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.arg) and _is_bare_any(node.annotation) or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_bare_any(node.returns) or isinstance(node, ast.AnnAssign) and _is_bare_any(node.annotation):
            found.append(node.lineno)
    return found


def test_counter_finds_each_kind_of_bare_any() -> None:
    source = ("from typing import Any\nimport typing\n"
              "def f(a: Any, *args: Any, **kw: 'Any') -> Any: ...\n"
              "x: typing.Any = 1\n"
              "class C:\n    y: Any\n"
              "def g(a: dict[str, Any], b: list[Any]) -> tuple[Any, ...]: ...\n")
    assert sorted(bare_any(source)) == [3, 3, 3, 3, 4, 6]


def test_bare_any_annotations_stay_few() -> None:
    where = [f"{path.relative_to(PACKAGE.parent)}:{line}"
             for path in sorted(PACKAGE.rglob("*.py")) for line in bare_any(path.read_text())]
    assert len(where) <= LIMIT, f"{len(where)} bare Any annotations (limit {LIMIT}):\n" + "\n".join(where)
