"""Opening a data directory for the CLI and the server, with operator mistakes told in one line.

A missing or wrong master key, a read-only database, a database migrated by a newer fhirserver:
each fails closed (nothing is served), and the operator gets one sentence saying what is wrong
and how to fix it instead of a traceback. Nothing is written on the way out: a missing key file
is never replaced by a fresh key ring while the database holds data keys (that would make the
mistake permanent and hide it).
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

from .config import Settings, SettingsError
from .services import Services


class StartupError(Exception):
    """A data directory cannot be opened; the message says why and what to do."""


def explain(exc: BaseException, settings: Settings) -> str | None:
    """The one-line explanation of an operator error, or None for anything else (a bug)."""
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import OperationalError

    from .audit.checkpoints import SigningKeyError
    from .audit.legacy import LegacyChainError
    from .crypto.keyring import KEY_FILE_NAME, KeyError_

    where = settings.database_url and "the database" or f"{settings.effective_database_url[len('sqlite:///'):]}"
    if isinstance(exc, KeyError_):
        source = "FHIRSERVER_MASTER_KEY" if settings.master_key else \
            (settings.master_key_file or f"{settings.data_dir / KEY_FILE_NAME}")
        return (f"master key problem: {exc}. Fix: provide the master key this database was encrypted with "
                f"(key source: {source}); see docs/security.md, 'Keys'")
    if isinstance(exc, SigningKeyError):
        return (f"audit signing key problem: {exc}. Fix: provide the key that signed this database's audit "
                "checkpoints (FHIRSERVER_AUDIT_SIGNING_KEY_FILE); see docs/audit.md")
    if isinstance(exc, LegacyChainError):
        return (f"the audit log from before this version does not verify ({exc}); nothing was changed. Fix: "
                "restore the database from a backup taken before the tampering, or investigate with the "
                "previous fhirserver version's `audit verify`")
    if isinstance(exc, CommandError) and "Can't locate revision" in str(exc):
        return (f"{where} was migrated by a newer fhirserver ({exc}). Fix: run the fhirserver version that "
                "wrote it, or restore a backup made by this version")
    if isinstance(exc, OperationalError):
        text = str(exc.orig) if exc.orig is not None else str(exc)
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            return (f"cannot write {where} ({text}). Fix: make {settings.data_dir} and the files in it "
                    "writable by the user running fhirserver")
        return f"cannot use {where} ({text.splitlines()[0][:200]}). Fix: check FHIRSERVER_DATABASE_URL and that the database is running"
    if isinstance(exc, SettingsError):
        return f"{exc}. Fix: correct the configuration (README, 'Configuration')"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or exc}. Fix: make {settings.data_dir} writable by the user running fhirserver"
    return None


def open_database(settings: Settings) -> Engine:
    """Only the migrated database, for commands that manage what the services are built from (IG
    packages): those must work while the configuration names something not installed yet."""
    from .db.engine import make_engine
    from .db.migrations import upgrade

    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(settings.effective_database_url)
        return make_engine(settings.effective_database_url)
    except Exception as exc:
        message = explain(exc, settings)
        if message is None:
            raise
        raise StartupError(message) from None


def open_services(settings: Settings, migrate: bool = True) -> Services:
    """Migrate (optionally), build the services and unwrap the system data keys, or raise
    StartupError with the operator's fix."""
    from .db.migrations import upgrade
    from .services import build_services, warm_keys

    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if migrate:
            upgrade(settings.effective_database_url)
        svc = build_services(settings)
        warm_keys(svc)
        return svc
    except Exception as exc:
        message = explain(exc, settings)
        if message is None:
            raise
        raise StartupError(message) from None
