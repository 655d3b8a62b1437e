"""FHIR IG packages (the NPM layout: a `.tgz` whose `package/package.json` names the package and
whose `package/*.json` are its conformance resources, `package/example/*.json` its examples), read
from bytes without writing any member to disk.

A package is untrusted input: only regular `.json` members under `package/` are read, at most
`MAX_MEMBERS` of them and `MAX_BYTES` uncompressed in all (a gzip bomb stops at the limit), and a
package for another FHIR version than R4 (4.0.x) is refused."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Any

MAX_MEMBERS = 5_000
MAX_BYTES = 200 * 1024 * 1024
CONFORMANCE = frozenset({"StructureDefinition", "ValueSet", "CodeSystem"})


class PackageError(ValueError):
    """A file that is not a usable FHIR R4 package (the message says why)."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    sha256: str
    resources: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (file, resource) conformance
    examples: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    licence: str = ""

    @property
    def label(self) -> str:
        return f"{self.name}#{self.version}"

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, doc in self.resources:
            kind = str(doc["resourceType"])
            if kind == "StructureDefinition":
                kind = "Extension definitions" if doc.get("type") == "Extension" else "profiles"
            out[kind] = out.get(kind, 0) + 1
        out["examples"] = len(self.examples)
        return out


def read_package(data: bytes) -> Package:
    try:
        members = _json_members(data)
    except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as exc:
        raise PackageError(f"not a readable .tgz package ({exc.__class__.__name__})") from None
    manifest = members.pop("package/package.json", None)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("name"), str) \
            or not isinstance(manifest.get("version"), str):
        raise PackageError("package/package.json with a name and a version is missing")
    versions = [str(v) for v in manifest.get("fhirVersions") or manifest.get("fhir-version-list") or []]
    if not any(v.startswith("4.0") for v in versions):
        raise PackageError(f"the package is for FHIR {', '.join(versions)[:60] or '(not stated)'}, not R4 (4.0.x)")
    resources: list[tuple[str, dict[str, Any]]] = []
    examples: list[tuple[str, dict[str, Any]]] = []
    for path, doc in sorted(members.items()):
        if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
            continue
        folder, _, name = path.removeprefix("package/").rpartition("/")
        if folder == "" and doc["resourceType"] in CONFORMANCE:
            resources.append((name, doc))
        elif folder == "example":
            examples.append((name, doc))
    return Package(name=manifest["name"], version=manifest["version"], sha256=hashlib.sha256(data).hexdigest(),
                   resources=resources, examples=examples, licence=str(manifest.get("license") or ""))


def _json_members(data: bytes) -> dict[str, object]:
    out: dict[str, object] = {}
    total = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for count, member in enumerate(tar):
            if count >= MAX_MEMBERS:
                raise PackageError(f"the package has more than {MAX_MEMBERS} files")
            name = member.name.removeprefix("./")
            if not member.isreg() or not name.startswith("package/") or not name.endswith(".json") \
                    or ".." in name.split("/"):
                continue
            total += member.size
            if total > MAX_BYTES:
                raise PackageError(f"the package holds more than {MAX_BYTES // 2**20} MB of JSON")
            stream = tar.extractfile(member)
            if stream is None:
                continue
            try:
                out[name] = json.loads(stream.read())
            except ValueError:
                raise PackageError(f"{name[:120]} is not JSON") from None
    return out
