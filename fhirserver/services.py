"""The long-lived parts of a running server, built once per process from Settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from .access import Access, AccessGate
from .audit.checkpoints import Signer
from .audit.legacy import migrate_chain
from .audit.records import CHAIN_SCOPE, AuditLog
from .audit.sequencer import Sequencer
from .config import Settings, SettingsError
from .consent.hooks import ConsentHook
from .crypto.blind_index import BLIND_SCOPE, BlindIndexer
from .crypto.datakeys import DataKeyStore
from .crypto.keyring import MasterKeyRing
from .db.compiled import CompiledStatements
from .db.engine import make_engine
from .db.replicas import ReplicaRouter
from .fhir.fhirpath import set_choice_elements
from .fhir.registry import TypeRegistry, load_type_registry
from .fhir.validation import Validator
from .oversight.penalties import Penalties
from .search.compiler import QueryCompiler
from .search.indexer import Indexer
from .search.params import ParamRegistry, load_param_registry
from .search.sources import use_stores
from .storage import ig_packages
from .storage.repository import Repository
from .subscriptions.endpoints import check_networks
from .subscriptions.topics import Topics, load_topics


@dataclass
class Services:
    settings: Settings
    engine: Engine
    ring: MasterKeyRing
    keys: DataKeyStore
    blind: BlindIndexer
    types: TypeRegistry
    params: ParamRegistry
    validator: Validator
    indexer: Indexer
    repo: Repository
    audit: AuditLog
    compiler: QueryCompiler
    consent: ConsentHook
    sequencer: Sequencer
    penalties: Penalties
    topics: Topics
    summary_elements: dict[str, Any] = field(default_factory=dict)
    # answers derived from the registries alone (the CapabilityStatement's bytes): built on first
    # use; the registries are fixed for the life of a Services, so nothing here goes stale
    derived: dict[str, Any] = field(default_factory=dict)
    statements: CompiledStatements = field(default_factory=CompiledStatements)  # the gate's kept SQL
    replicas: ReplicaRouter | None = None  # read replicas for GET requests (settings.read_replica_urls)

    def gate(self, access: Access) -> AccessGate:
        """The access gate bound to `access`: how a request (or an export job) reads rows."""
        return AccessGate(access, self.repo, self.audit, self.compiler, self.params, self.types.names(),
                          self.statements)


def build_services(settings: Settings, engine: Engine | None = None) -> Services:
    import json

    from .consent import build_consent

    check_networks(settings.subscription_private_networks)
    engine = engine or make_engine(settings.effective_database_url)
    ring = MasterKeyRing(settings.master_key, settings.data_dir, may_create=not _holds_data_keys(engine),
                         key_file=Path(settings.master_key_file) if settings.master_key_file else None)
    keys = DataKeyStore(engine, ring)
    blind = BlindIndexer(keys)
    types = load_type_registry(settings.profiles_dir)
    use_stores({t.name: t.store for t in types})
    elements = json.loads((settings.profiles_dir / "summary-elements.json").read_text())
    set_choice_elements(set(elements.get("choiceElements", [])))
    params = load_param_registry(settings.profiles_dir, types.names())
    params.max_params, params.max_values = settings.search_max_params, settings.search_max_values
    validator = Validator(settings.profiles_dir, settings.max_json_depth, settings.required_profiles,
                          ig_packages.installed(engine))
    indexer = Indexer(params, blind, settings.fhir_base, {t.name: t.compartment_params for t in types})
    consent = build_consent(settings, blind, params, frozenset(t.name for t in types if t.owned_by_client),
                            validator.profiles.terminology)
    repo = Repository(keys, indexer, hooks=[consent.writes])
    summary = elements["types"]
    audit = AuditLog(repo, settings.fhir_base)
    replicas = _replicas(settings, engine)
    return Services(
        replicas=replicas, settings=settings, engine=engine, ring=ring, keys=keys, blind=blind, types=types,
        params=params, validator=validator, indexer=indexer, repo=repo,
        audit=audit, penalties=Penalties(engine, settings, audit.append), compiler=QueryCompiler(blind, settings.fhir_base, params),
        consent=consent.stage(repo, audit), summary_elements=summary,
        topics=load_topics(settings.profiles_dir, [t.name for t in types if t.compartment_params or t.name == "Patient"],
                           [t.name for t in types if not t.server_written and not t.owned_by_client]),
        sequencer=Sequencer(engine, Signer(settings.signing_key_path, may_create=not _holds_checkpoints(engine)),
                            settings.checkpoint_path, settings.audit_checkpoint_seconds),
    )


def _replicas(settings: Settings, primary: Engine) -> ReplicaRouter | None:
    urls = [u.strip() for u in settings.read_replica_urls.split(",") if u.strip()]
    if not urls:
        return None
    if primary.dialect.name != "postgresql" or not all(u.startswith("postgresql") for u in urls):
        raise SettingsError("read_replica_urls: read replicas are PostgreSQL streaming replicas of a PostgreSQL "
                            "primary (database_url)")
    return ReplicaRouter(primary, [make_engine(u) for u in urls])


def _holds_checkpoints(engine: Engine) -> bool:
    """Whether signed checkpoints exist (then a missing signing key is an error, not created anew)."""
    from sqlalchemy import inspect, select

    from .db.engine import read_connection
    from .db.schema import audit_checkpoint

    with read_connection(engine) as conn:
        if not inspect(conn).has_table("audit_checkpoint"):
            return False
        return conn.execute(select(audit_checkpoint.c.id).limit(1)).first() is not None


def _holds_data_keys(engine: Engine) -> bool:
    """Whether the database already has wrapped data keys (False also before its first migration)."""
    from sqlalchemy import inspect, select

    from .db.engine import read_connection
    from .db.schema import data_key

    with read_connection(engine) as conn:
        if not inspect(conn).has_table("data_key"):
            return False
        return conn.execute(select(data_key.c.id).limit(1)).first() is not None


def key_beside_data(services: Services) -> str | None:
    """A warning when the master key ring sits inside the data directory (None when it does not)."""
    key_file = services.ring.key_file
    if key_file is None:
        return None
    data = services.settings.data_dir.resolve()
    if key_file.resolve().is_relative_to(data):
        return (f"the master key ring {key_file} is inside the data directory: a copy of the directory is a copy "
                "of the plaintext. Keep it elsewhere (FHIRSERVER_MASTER_KEY_FILE) or use FHIRSERVER_MASTER_KEY")
    return None


def warm_keys(services: Services) -> None:
    """Create/unwrap the system data keys before serving, so no request creates them mid-transaction."""
    for scope in ("audit", "shared", BLIND_SCOPE, CHAIN_SCOPE):
        services.keys.ensure(scope)
    migrate_chain(services.audit)  # AuditEvents of the old hash chain, once (audit/legacy.py)


def current_services() -> Services:
    """The Services the running Flask app was built with (`create_app` stores them)."""
    from flask import current_app

    svc: Services = current_app.extensions["fhirserver"]
    return svc
