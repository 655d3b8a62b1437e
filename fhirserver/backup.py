"""Online backup and restore of an embedded (SQLite) server, and what they deliberately leave out.

`backup` copies the database with SQLite's backup API (a consistent snapshot while the server
runs, unlike a file copy of a live WAL database), the OpenID signing key and the session secret,
and writes a manifest with the database's SHA-256 and the ids of the master keys its data keys
are wrapped with. The master key itself is never in a backup: every resource is encrypted under
data keys that only the master key unwraps, so a backup without it reveals nothing, and the key
goes to the key backup (or KMS) instead. `restore` refuses a target that already holds a
database and a backup whose database does not match its manifest.

PostgreSQL deployments use pg_dump / PITR with the same key handling (docs/operations.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from .config import Settings
from .db.engine import read_connection
from .db.schema import data_key
from .smart.secrets_store import SESSION_SECRET_FILE, SIGNING_KEY_FILE
from .startup import open_services

DB_NAME = "fhirserver.sqlite3"
MANIFEST = "backup-manifest.json"
SIDE_FILES = (SIGNING_KEY_FILE, SESSION_SECRET_FILE)


class BackupError(Exception):
    """A backup or restore that cannot be done as asked; the message says why."""


@dataclass
class BackupReport:
    path: Path
    sha256: str
    master_kids: list[str]


def _sqlite_path(settings: Settings) -> Path:
    url = settings.effective_database_url
    if not url.startswith("sqlite:///"):
        raise BackupError("backup covers the embedded SQLite database; for PostgreSQL use pg_dump or "
                          "point-in-time recovery with the same key handling (docs/operations.md)")
    return Path(url[len("sqlite:///"):])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def backup(settings: Settings, out: Path) -> BackupReport:
    source = _sqlite_path(settings)
    if out.exists() and any(out.iterdir()):
        raise BackupError(f"{out} is not empty")
    svc = open_services(settings)  # migrated, keys unwrap: a backup of a database we cannot open is no backup
    try:
        with read_connection(svc.engine) as conn:
            kids = sorted(set(conn.execute(select(data_key.c.master_kid)).scalars()))
    finally:
        svc.engine.dispose()
    out.mkdir(parents=True, exist_ok=True)
    target = out / DB_NAME
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file (no -wal beside it) that the hash covers
    finally:
        dst.close()
        src.close()
    for name in SIDE_FILES:
        if (settings.data_dir / name).is_file():
            shutil.copy2(settings.data_dir / name, out / name)
    sha = _sha256(target)
    manifest = {"format": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "database": DB_NAME,
                "sha256": sha, "master_key_ids": kids,
                "note": "The master key is not in this backup: restore needs the same master key "
                        "(FHIRSERVER_MASTER_KEY or the key ring file) from your key backup."}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return BackupReport(out, sha, kids)


def restore(settings: Settings, src: Path) -> BackupReport:
    target = _sqlite_path(settings)
    if target.exists():
        raise BackupError(f"{target} already exists: restore into a new data directory")
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{src} has no readable {MANIFEST}") from exc
    backup_db = src / str(manifest.get("database", DB_NAME))
    if not backup_db.is_file() or _sha256(backup_db) != manifest.get("sha256"):
        raise BackupError(f"{backup_db} does not match the backup manifest (changed or incomplete)")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    src_db, dst_db = sqlite3.connect(backup_db), sqlite3.connect(target)
    try:
        src_db.backup(dst_db)
    finally:
        dst_db.close()
        src_db.close()
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, settings.data_dir / name)
    svc = open_services(settings)  # fails (one line) unless the master key that wraps the data keys is given
    svc.engine.dispose()
    return BackupReport(target, str(manifest["sha256"]), list(manifest.get("master_key_ids", [])))
