"""Dependencies run one way: a module may import only from its own layer or the layers below it
(docs/architecture.md). Checked over the source with `ast`, lazy and TYPE_CHECKING imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fhirserver"
# lowest first; a top-level module or package of fhirserver per name
LAYERS: list[list[str]] = [
    ["__init__", "config", "clock", "logs", "metrics"],
    ["db"],
    ["crypto"],
    ["fhir"],
    ["search"],
    ["storage"],
    ["audit"],
    ["access"],
    ["auth"],
    ["consent"],
    ["oversight"],
    ["subscriptions"],
    ["services"],
    ["users"],
    ["exchange"],
    ["pipeline"],
    ["bulk", "notify"],
    ["smart", "admin_api", "admin_alerts", "portal"],
    ["demo", "startup", "health", "backup", "cors", "security_headers", "schedule"],
    ["app", "wsgi", "dispatcher_process"],
    ["cli", "__main__"],
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """The top-level module or package of fhirserver a dotted name belongs to."""
    parts = module.split(".")
    if len(parts) < 2:
        return "__init__"
    name = parts[1]
    return name if (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file() else "__init__"


def imports(path: Path) -> list[tuple[int, str]]:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    package = module.split(".") if rel.name == "__init__" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # from . import x
                    found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
                    continue
            else:
                target = node.module or ""
            if target.startswith("fhirserver"):
                found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("fhirserver")]
    return found


def violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        here = _unit(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if here not in LEVEL:
            out.append(f"{path.relative_to(PACKAGE.parent)}: '{here}' is in no layer")
            continue
        for line, target in imports(path):
            there = _unit(target)
            if there and there != here and LEVEL.get(there, 99) > LEVEL[here]:
                out.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {here} (layer {LEVEL[here]}) imports "
                           f"{target} (layer {LEVEL.get(there)})")
    return out


def test_no_module_imports_from_a_higher_layer() -> None:
    found = violations()
    assert not found, "\n".join(found)


def test_modules_stay_small_unless_their_docstring_says_why() -> None:
    """A module over 400 lines must say in its docstring why it is one module (e.g. the schema)."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > 400 and "400 lines" not in doc:
            long.append(f"{path.relative_to(PACKAGE.parent)}: {text.count(chr(10))} lines")
    assert not long, "\n".join(long)


def test_handlers_name_no_table() -> None:
    """The pipeline's handlers reach stored rows only through the access gate (`access/`): no
    module of `pipeline/` imports the table definitions, so none can write its own SELECT."""
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: imports {target}"
             for path in sorted((PACKAGE / "pipeline").rglob("*.py"))
             for line, target in imports(path) if target.startswith("fhirserver.db.schema")]
    assert not found, "\n".join(found)
