"""The R4 JSON schema's validators for every resource type, generated once per machine.

Why: fastjsonschema compiles one type's validator in ~0.2 s, and nearly every datatype is in
each type's closure (through Extension's `value[x]`), so compiling the 36 types one by one cost
every process ~8.6 s of CPU at start (the schema warm-up of each gunicorn worker and each
server). Here all types are generated together, each shared definition once, into one Python
module (`fastjsonschema.compile_to_code`), whose compiled code object is kept in the user's
cache directory (`$XDG_CACHE_HOME/fhirserver`, else `~/.cache/fhirserver`) with `marshal`, as
Python keeps a `.pyc` (which PYTHONDONTWRITEBYTECODE, common in containers, would turn off). A
later process loads every validator in milliseconds.

The file name is a digest of everything the code depends on (the definitions as compiled, the
fastjsonschema and Python versions), so a changed schema is a new file. Only a directory that
belongs to this user and that nobody else may write to is used (the module is code this process
runs); otherwise, or when the directory cannot be written, the module is generated in memory.
Each upgrade of the schema, fastjsonschema or Python leaves its predecessor's file (~8 MB) behind:
a file is touched whenever a process loads it, and files no process has loaded for
`STALE_DAYS` (and temporary files a crash left) are removed when a new one is written, so other
installations on the machine that still use theirs keep them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import marshal
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any

import fastjsonschema

log = logging.getLogger("fhirserver.validation")
Validate = Callable[[Any], Any]
DRAFT = "http://json-schema.org/draft-06/schema#"
PREFIX = "fhirserver_schema_"
STALE_DAYS = 30  # a cache file no process has loaded for this long is removed (by the next writer)
TMP_STALE_SECONDS = 3600  # a temporary file older than this was left by a writer that died


def resource_types(definitions: dict[str, Any]) -> list[str]:
    """The resource types among the definitions (those with a `resourceType` element)."""
    return sorted(name for name, node in definitions.items() if name != "ResourceList" and isinstance(node, dict)
                  and "resourceType" in node.get("properties", {}))


def schema_for(definitions: dict[str, Any], type_name: str) -> dict[str, Any]:
    return {"$schema": DRAFT, "$ref": f"#/definitions/{type_name}", "definitions": definitions}


def digest(definitions: dict[str, Any]) -> str:
    """What the generated code depends on: the definitions and the generator's and Python's versions."""
    text = json.dumps(definitions, sort_keys=True, separators=(",", ":"))
    parts = (text, fastjsonschema.VERSION, sys.version)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fhirserver"


def _trusted(path: Path) -> bool:
    """Ours alone: owned by this user, writable by no one else."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _function_name(type_name: str) -> str:
    """fastjsonschema's name for the function validating `#/definitions/<type_name>`."""
    return "validate___definitions_" + re.sub(r"[^a-zA-Z0-9]", "_", type_name).lower()


def _generate(definitions: dict[str, Any], types: list[str]) -> str:
    """One module with a function per definition (each type's is what we use; the root, an
    object holding every type, is not)."""
    root = {"$schema": DRAFT, "type": "object", "definitions": definitions,
            "properties": {t: {"$ref": f"#/definitions/{t}"} for t in types}}
    code: str = fastjsonschema.compile_to_code(root)
    return code


def _module(code: CodeType, name: str) -> ModuleType:
    module = ModuleType(name)
    exec(code, module.__dict__)  # noqa: S102 - code fastjsonschema generated on this machine, as this user
    return module


def load(definitions: dict[str, Any], key: str, generate: bool) -> dict[str, Validate]:
    """The validator of each resource type: from the cached module, or (when `generate`) from a
    module generated now and cached for the next process. {} when there is none and `generate`
    is false, or when the module lacks the functions (another fastjsonschema's naming): the
    caller then compiles type by type."""
    types = resource_types(definitions)
    name = f"{PREFIX}{key}"
    directory = cache_dir()
    path = directory / f"{name}.{sys.implementation.cache_tag}.marshal"
    module: ModuleType | None = None
    try:
        if path.is_file() and _trusted(directory) and _trusted(path):
            module = _module(marshal.loads(path.read_bytes()), name)
            _touch(path)
    except Exception:  # noqa: BLE001 - a damaged cache file: generate it again
        log.warning("the cached schema validators in %s could not be loaded; they will be generated again", directory)
        module = None
    if module is None:
        if not generate:
            return {}
        code = compile(_generate(definitions, types), f"<{name}>", "exec")
        _write(directory, path, code)
        module = _module(code, name)
    found = {t: getattr(module, _function_name(t), None) for t in types}
    return {t: fn for t, fn in found.items() if callable(fn)}


def _write(directory: Path, path: Path, code: CodeType) -> None:
    """Keep the code for the next process, atomically (concurrent writers each replace it
    whole); a directory that cannot be written, or is not ours alone, keeps nothing."""
    tmp: str | None = None
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _trusted(directory):
            return
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".schema-", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(marshal.dumps(code))
        os.replace(tmp, path)
        tmp = None
        _prune(directory, keep=path)
    except OSError:
        log.info("the schema validators could not be cached in %s", directory)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _touch(path: Path) -> None:
    """Mark a cache file as in use (its age is what `_prune` judges)."""
    with contextlib.suppress(OSError):  # a read-only cache still serves; it is just never pruned from here
        os.utime(path)


def _prune(directory: Path, keep: Path) -> None:
    """Remove the cache files no process has loaded for STALE_DAYS and dead writers' temporary
    files; `keep` (just written) and anything else in the directory are left alone."""
    now = time.time()
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry == keep:
            continue
        if entry.name.startswith(PREFIX) and entry.name.endswith(".marshal"):
            limit = STALE_DAYS * 86400
        elif entry.name.startswith(".schema-") and entry.name.endswith(".tmp"):
            limit = TMP_STALE_SECONDS
        else:
            continue
        try:
            if now - entry.stat().st_mtime > limit:
                entry.unlink()
                log.info("removed the unused schema validators' cache file %s", entry.name)
        except OSError:
            continue  # gone already, or not ours to remove
