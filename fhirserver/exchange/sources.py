"""Where `fhirserver load` reads from: discovering files, their identity (SHA-256), and the items
(resources with their position) of Bundles and NDJSON files, gzip or not; Bundle references to
fullUrls are rewritten to the ids the resources will have."""

from __future__ import annotations

import gzip
import hashlib
import re
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..fhir.references import rewrite_references
from ..storage.codec import DuplicateKeyError, parse_json

NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz")
JSON_SUFFIXES = (".json", ".json.gz")
NO_RESOURCE = "(entry without resource)"
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_ID_NAMESPACE = uuid.UUID("5d0f7c84-8a0b-4c55-9f39-5b7cbe5e0b1a")


class LoadError(Exception):
    """A path that cannot be loaded at all (unsupported file name)."""


def discover(paths: Iterable[Path], exclude: Path | None = None) -> list[Path]:
    """Files to load: given files, and files with a supported suffix under given directories
    (recursively, in sorted order), except those under `exclude` (the server's data directory:
    its key files are JSON too)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file() and _kind(p)
                              and not (exclude and p.is_relative_to(exclude))))
        elif _kind(path):
            out.append(path)
        else:
            raise LoadError(f"{path}: not a .json, .ndjson or .jsonl file (optionally .gz)")
    return out


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(NDJSON_SUFFIXES):
        return "ndjson"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# An item is one candidate resource: (index in the file, payload, bytes of the file it accounts
# for). The payload is an NDJSON line (parsed by a worker), a resource from a Bundle (parsed and
# reference-rewritten here), or an error message (str) for an unusable entry.
Item = tuple[int, Any, int]


def _read_lines(path: Path) -> Iterator[tuple[bytes, int]]:
    """Lines of an NDJSON file, streamed, with the bytes of the (compressed) file each advanced."""
    with path.open("rb") as raw:
        if path.name.lower().endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as gz:
                last = 0
                for line in gz:
                    pos = raw.tell()
                    yield line, pos - last
                    last = pos
        else:
            for line in raw:
                yield line, len(line)


def _read_json(path: Path) -> Any:
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rb") as packed:
            return parse_json(packed.read())
    return parse_json(path.read_bytes())


def derived_id(sha: str, index: int) -> str:
    """A stable id for a resource that has none: the same file loaded again (--force) updates
    these resources instead of creating duplicates."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{sha}:{index}"))


def _id_from_full_url(full_url: str, rtype: str) -> str | None:
    if full_url.startswith(("urn:uuid:", "urn:oid:")):
        candidate = full_url.split(":", 2)[2]
        return candidate if _ID.fullmatch(candidate) else None
    parts = full_url.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == rtype and _ID.fullmatch(parts[-1]):
        return parts[-1]
    return None


def bundle_items(doc: object, sha: str, size: int, kept: frozenset[str]) -> list[Item]:
    """A Bundle of any type: its entries' resources with ids assigned where missing (the
    urn:uuid of the fullUrl, else the id of an absolute fullUrl, else a derived id) and references
    to other entries' fullUrls rewritten to Type/id. A single resource: one item."""
    if not isinstance(doc, dict):
        return [(0, "the file is not a JSON object", size)]
    if doc.get("resourceType") != "Bundle":
        return [(0, doc, size)]
    entries = doc.get("entry") or []
    if not isinstance(entries, list):
        return [(0, "Bundle.entry is not a list", size)]
    mapping: dict[str, str] = {}
    resources: list[Any] = []
    for index, entry in enumerate(entries):
        res = entry.get("resource") if isinstance(entry, dict) else None
        resources.append(res)
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            continue
        rtype = res["resourceType"]
        full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
        if not isinstance(res.get("id"), str):
            res["id"] = (_id_from_full_url(full_url, rtype) if full_url else None) or derived_id(sha, index)
        if full_url:
            mapping[full_url] = f"{rtype}/{res['id']}"
    share = size // max(len(entries), 1)
    items: list[Item] = []
    for index, res in enumerate(resources):
        nbytes = share + (size - share * len(entries) if index == len(entries) - 1 else 0)
        if res is None:
            items.append((index, None, nbytes))
            continue
        if isinstance(res, dict) and res.get("resourceType") in kept and mapping:
            res = rewrite_references(res, mapping)
        items.append((index, res, nbytes))
    return items or [(0, None, size)]


def iter_items(path: Path, sha: str, size: int, kept: frozenset[str], unit: list[str]) -> Iterator[Item]:
    """The file's items in order; `unit[0]` is set to what an index counts (for messages)."""
    if _kind(path) == "ndjson":
        unit[0] = "line"
        for index, (line, nbytes) in enumerate(_read_lines(path)):
            yield index, line, nbytes
        return
    unit[0] = "file"
    try:
        doc = _read_json(path)
    except DuplicateKeyError as exc:
        yield 0, f"the file repeats a property: {exc}", size
        return
    except (ValueError, UnicodeDecodeError, RecursionError, OSError, EOFError):
        yield 0, "the file is not valid JSON", size
        return
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle" and isinstance(doc.get("entry"), list):
        unit[0] = "entry"
    yield from bundle_items(doc, sha, size, kept)


# ---------------------------------------------------------------- the CPU-heavy part
# An outcome: (index, kind, resource type or message, prepared write). kind: ok | skip | invalid | blank.
