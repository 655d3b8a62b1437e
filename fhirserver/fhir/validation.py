"""Validate a client's resource JSON as FHIR R4 without changing it.

Two layers, both needed:
1. The R4 JSON schema (shipped pruned in profiles/), compiled with fastjsonschema: strict JSON
   types (`"active": "true"` is not a boolean), required-binding enums, primitive regexes and
   unknown elements -- things the pydantic models coerce or accept.
2. fhir.resources R4B models (the R4 wire format for our types): structure, choice types,
   cardinality and the models' own rules.

Then the profiles the resource claims in `meta.profile` that this server ships (see
fhir/profiles.py): a violation is a 422, the FHIR status for "violated applicable FHIR profiles"
(structurally invalid JSON stays a 400). A claimed profile the server does not know is accepted
unchecked: FHIR lets a server ignore profiles it does not know, and rejecting them would turn
away every resource written under an implementation guide we do not ship.

Error locations become FHIRPath-style `issue.expression` values (`Patient.name[0].given[0]`).
The original JSON is never re-serialized: FHIR requires decimals back as sent (`1.0`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fastjsonschema
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from ..config import SettingsError
from . import schema_cache
from .errors import FhirError, Issue
from .narrative import check_narratives
from .packages import Package
from .profiles import ProfileRegistry
from .structure import DEFAULT_MAX_DEPTH, check_structure


def _expression(root: str, loc: list[Any] | tuple[Any, ...]) -> str:
    out = root
    for part in loc:
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
            out += f"[{part}]"
        else:
            out += f".{part}"
    return out


# Compiled schema validators are shared by every Validator in the process (compiling one type
# takes ~0.2 s; fhir/schema_cache.py has them all from one module); keyed by schema file and type.
_COMPILED: dict[tuple[str, str], Any] = {}
_DEFINITIONS: dict[str, tuple[dict[str, Any], str]] = {}
_LOCK = threading.Lock()


class Validator:
    def __init__(self, profiles_dir: Path, max_depth: int = DEFAULT_MAX_DEPTH, required: str = "",
                 packages: Sequence[Package] = ()) -> None:
        self._schema_file = profiles_dir / "fhir-schema-subset.json"
        self.profiles = ProfileRegistry.load(profiles_dir, packages)
        self.max_depth = max_depth
        self.required = self._required(required)

    def _required(self, text: str) -> dict[str, tuple[str, ...]]:
        """The `required_profiles` setting by type. A profile this server does not know, or one
        that constrains another type, is a configuration error (a requirement it cannot check
        would silently let everything through)."""
        out: dict[str, tuple[str, ...]] = {}
        for part in (p.strip() for p in text.split(";") if p.strip()):
            rtype, sep, urls = part.partition("=")
            if not sep or not rtype.strip():
                raise SettingsError(f"required_profiles: '{part[:80]}' is not Type=url,url")
            for url in (u.strip() for u in urls.split(",") if u.strip()):
                profile = self.profiles.resolve(url)
                if profile is None or profile.type != rtype.strip():
                    raise SettingsError(f"required_profiles: {url[:120]} is not a known profile of {rtype.strip()[:40]}")
                out[rtype.strip()] = (*out.get(rtype.strip(), ()), url)
        return out

    def _definitions(self) -> tuple[dict[str, Any], str]:
        """The schema's definitions as compiled, and their digest (fhir/schema_cache.py)."""
        file = str(self._schema_file)
        if file not in _DEFINITIONS:
            definitions = _ascii_classes(_without_descriptions(json.loads(self._schema_file.read_text())["definitions"],
                                                                    names=True))
            _DEFINITIONS[file] = (definitions, schema_cache.digest(definitions))
        return _DEFINITIONS[file]

    def _schema_for(self, type_name: str):  # type: ignore[no-untyped-def]
        key = (str(self._schema_file), type_name)
        if key in _COMPILED:
            return _COMPILED[key]
        with _LOCK:
            if key not in _COMPILED:
                definitions, digest = self._definitions()
                if type_name not in definitions:
                    _COMPILED[key] = None
                else:
                    # every type at once from an earlier process's module, else this type alone
                    for name, fn in schema_cache.load(definitions, digest, generate=False).items():
                        _COMPILED.setdefault((key[0], name), fn)
                    if key not in _COMPILED:
                        _COMPILED[key] = fastjsonschema.compile(schema_cache.schema_for(definitions, type_name))
        return _COMPILED[key]

    def warm(self, type_names: list[str]) -> None:
        """Have every type's validator ready (a background thread at start): loaded from the
        cached module, or generated all at once -- the shared definitions once -- and cached."""
        definitions, digest = self._definitions()
        if not all((str(self._schema_file), name) in _COMPILED for name in type_names):
            validators = schema_cache.load(definitions, digest, generate=True)  # seconds, the first time only
            with _LOCK:
                for name, fn in validators.items():
                    _COMPILED.setdefault((str(self._schema_file), name), fn)
        for name in type_names:
            self._schema_for(name)

    def validate(self, body: object, expected_type: str | None = None, root: str | None = None,
                 profiles: Sequence[str] = (), must_support: bool = False) -> list[Issue]:
        """Raise FhirError(400) describing the first problems found, or FhirError(422) when the
        resource breaks a known profile it claims (or one of `profiles`, for $validate). Returns
        the issues that do not fail it (warnings, unknown claimed profiles)."""
        if not isinstance(body, dict):
            raise FhirError(400, "structure", "A resource must be a JSON object")
        rtype = body.get("resourceType")
        if not isinstance(rtype, str):
            raise FhirError(400, "required", "resourceType is missing", ["resourceType"])
        if expected_type and rtype != expected_type:
            raise FhirError(
                400, "invalid",
                f"resourceType '{rtype}' does not match the endpoint type '{expected_type}'",
                ["resourceType"],
            )
        root = root or rtype
        notes: list[Issue] = []
        if root == rtype:
            check_structure(body, rtype, self.max_depth)  # depth, JSON rules, ext-1, dom-2/4/5
            check_narratives(body, rtype)  # txt-1, txt-2
        schema_fn = self._schema_for(rtype)
        if schema_fn is not None:
            try:
                schema_fn(body)
            except fastjsonschema.JsonSchemaValueException as exc:
                raise self._schema_error(root, exc) from None
            for i, contained in enumerate(body.get("contained") or []):
                if isinstance(contained, dict) and isinstance(contained.get("resourceType"), str):
                    notes += self.validate(contained, None, f"{root}.contained[{i}]")
        try:
            model = get_fhir_model_class(rtype)
        except (KeyError, ValueError):
            raise FhirError(400, "not-supported", f"Unknown resource type '{rtype}'", [f"{root}.resourceType"]) from None
        try:
            model.model_validate(body)
        except ValidationError as exc:
            issues = []
            for err in exc.errors()[:20]:
                loc = [p for p in err["loc"] if p not in ("__root__",)]
                issues.append(Issue(code="structure" if err["type"] == "extra_forbidden" else "value",
                                    diagnostics=_clean_message(err["msg"]),
                                    expression=[_expression(root, loc)]))
            raise FhirError(400, issues[0].code, issues[0].diagnostics, issues=issues) from None
        except (ValueError, TypeError) as exc:
            raise FhirError(400, "structure", _clean_message(str(exc)), [root]) from None
        required = self.required.get(rtype, ()) if root == rtype else ()
        return notes + self._check_profiles(body, root, [*profiles, *required], must_support)

    def _check_profiles(self, body: dict[str, Any], root: str, extra: Sequence[str],
                        must_support: bool = False) -> list[Issue]:
        claimed = (body.get("meta") or {}).get("profile") or []
        if not claimed and not extra:
            return []
        issues = self.profiles.check(body, root, [u for u in claimed if isinstance(u, str)], extra, must_support)
        errors = [i for i in issues if i.severity in ("error", "fatal")]
        if errors:
            rest = [i for i in issues if i not in errors]
            raise FhirError(422, errors[0].code, errors[0].diagnostics, issues=errors + rest)
        return issues

    @staticmethod
    def _schema_error(root: str, exc: fastjsonschema.JsonSchemaValueException) -> FhirError:
        """The 422 for a value the compiled R4 JSON schema refused."""
        path = list(exc.path[1:]) if exc.path else []
        if exc.rule == "additionalProperties" and isinstance(exc.value, dict):
            allowed = set((exc.definition or {}).get("properties", {}))
            unknown = sorted(k for k in exc.value if k not in allowed)
            issues = [
                Issue(code="structure", diagnostics=f"Unknown element '{k}'", expression=[_expression(root, [*path, k])])
                for k in unknown
            ] or [Issue(code="structure", diagnostics="Unknown element", expression=[_expression(root, path)])]
            return FhirError(400, "structure", issues[0].diagnostics, issues=issues)
        message = exc.message.replace("data.", f"{root}.", 1).replace("data ", f"{root} ", 1)
        if exc.rule == "pattern":
            message = f"{_expression(root, path)}: value has an invalid format"
        return FhirError(400, "value" if exc.rule in ("type", "enum", "pattern") else "structure",
                         _clean_message(message), [_expression(root, path)])


_ASCII_NON_SPACE = "\\x00-\\x08\\x0e-\\x1f\\x21-\\U0010ffff"  # \\S in ASCII: all but [ \\t\\n\\v\\f\\r]


def _ascii_pattern(pattern: str) -> str:
    out, in_class, i = [], False, 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            pair = pattern[i:i + 2]
            out.append(_ASCII_NON_SPACE if pair == "\\S" and in_class else pair)
            i += 2
            continue
        in_class = True if ch == "[" else False if ch == "]" else in_class
        out.append(ch)
        i += 1
    return "".join(out)


def _ascii_classes(node: object) -> Any:
    """The string pattern `[ \\r\\n\\t\\S]+` with `\\S` read as in ASCII: Python's Unicode `\\S`
    refuses a non-breaking space (U+00A0) in text, which FHIR's rule for strings (about control
    characters) allows and HL7's own examples contain (DiagnosticReport/gingival-mass). A bare
    `\\S` (code, id: no whitespace at all) keeps its Unicode meaning."""
    if isinstance(node, dict):
        return {k: (_ascii_pattern(v) if k == "pattern" and isinstance(v, str) else _ascii_classes(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_ascii_classes(v) for v in node]
    return node


def _without_descriptions(node: object, names: bool = False) -> object:
    """The schema without its `description` texts: fastjsonschema writes each failing rule's
    definition into the generated code, and the texts are most of it. `names`: the keys of
    `properties`/`definitions`, where a `description` is an element's name and stays."""
    if isinstance(node, dict):
        return {k: _without_descriptions(v, names=k in ("properties", "definitions") and not names)
                for k, v in node.items() if names or not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [_without_descriptions(v) for v in node]
    return node


def _clean_message(text: str) -> str:
    """Keep validator messages short and free of echoed input values."""
    text = text.split("\n")[0]
    return text if len(text) <= 300 else text[:297] + "..."
