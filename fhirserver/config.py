"""Settings: defaults < TOML file (--config) < FHIRSERVER_* environment variables.

Every setting is a typed field of `Settings` with its default here and nowhere else, and every
one can be set from the environment as FHIRSERVER_<NAME IN CAPITALS> (read only in this module).
An unknown key in the TOML file is an error, not silently ignored. Secrets never come from the
TOML file's defaults: with no master key configured, a random key is generated once into the data
directory (mode 0600) by the key ring.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_PROFILES_DIR = PACKAGE_DIR.parent / "profiles"
DEFAULT_REGISTRATION_SCOPES = ("openid fhirUser launch launch/patient online_access offline_access "
                               "patient/*.rs user/*.rs patient/*.read user/*.read")


class SettingsError(ValueError):
    """A configuration file or environment variable names an unknown setting or a bad value."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("./fhirserver-data")
    database_url: str = ""
    # PostgreSQL streaming replicas for GET requests, comma-separated URLs (docs/operations.md);
    # a replica serves a request only once it has replayed what the primary had when it began
    read_replica_urls: str = ""
    base_url: str = "http://127.0.0.1:8080/fhir"
    master_key: str = ""  # base64 of 32 bytes; empty = use the key ring file
    master_key_file: str = ""  # the key ring file; empty = data_dir/master-keys.json (warned about at start)
    profiles_dir: Path = DEFAULT_PROFILES_DIR
    log_level: str = "INFO"
    # ---- HTTP and input limits (docs/security.md)
    max_body_bytes: int = 10 * 1024 * 1024
    max_url_bytes: int = 8192  # path + query string; longer is a 414 OperationOutcome (use POST _search)
    max_json_depth: int = 64  # nesting of a resource's JSON objects and arrays
    # profiles every written resource of a type must meet, whether or not it claims them
    # ("Observation=http://...,http://...;Patient=http://..."; each must be known: docs/profiles.md)
    required_profiles: str = ""
    search_max_params: int = 100  # parameters of one search
    search_max_values: int = 100  # comma-separated values of one parameter
    default_page_size: int = 20
    max_page_size: int = 1000
    history_max_page_size: int = 1000
    bundle_max_entries: int = 1000
    cors_origins: str = ""  # browser origins allowed besides the registered apps' redirect-URI origins
    proxy_hops: int = 0  # TLS-terminating proxies in front that set X-Forwarded-For/-Proto/-Host
    # ---- tokens and SMART (docs/smart.md)
    access_token_lifetime: int = 300  # seconds; SMART backend services recommend <= 5 min
    user_access_token_lifetime: int = 3600  # tokens of apps acting for a signed-in user
    client_assertion_max_lifetime: int = 300
    jwks_cache_seconds: int = 300
    authorization_code_lifetime: int = 60
    launch_lifetime: int = 300  # an EHR launch id is valid this long
    offline_refresh_days: int = 90  # refresh tokens for offline_access
    online_refresh_days: int = 1  # refresh tokens for online_access
    login_max_failures: int = 5  # consecutive failures that lock an account
    login_lockout_seconds: int = 900
    login_session_seconds: int = 1800  # how long a sign-in at /auth/authorize is remembered
    totp_issuer: str = "fhirserver"  # shown by authenticator apps
    session_secret: str = ""  # signs sign-in cookies; empty: generated into data_dir (0600)
    dynamic_registration: bool = False  # RFC 7591 at /auth/register (needs registration_token)
    registration_token: str = ""
    registration_max_scopes: str = DEFAULT_REGISTRATION_SCOPES
    demo_app: bool = False  # serve the demo SMART app at /demo-app/
    portal: bool = False  # serve the patient privacy portal at /portal/ (docs/portal.md; on in demo mode)
    # ---- consent engine (docs/consent.md): purposes that permit unless a consent denies
    # (opt-out); every other purpose denies unless a consent permits (opt-in)
    consent_opt_out_purposes: str = "TREAT,HPAYMT,HOPERAT"
    consent_minor_age: int = 14  # younger patients' privacy Consents must come from a guardian
    denial_burst_threshold: int = 20  # denied requests per client per minute that raise an alert (0: off)
    denial_burst_suspend: bool = False  # also disable the client on a burst
    # ---- cross-border transfer (docs/consent.md): the deployment's jurisdiction (ISO 3166 code or
    # a union such as EU; empty: the rule is off). A client registered with another jurisdiction sees
    # a patient's data only where the patient's Consent permits that transfer.
    jurisdiction: str = ""
    cross_border_deidentified: bool = False  # de-identified exports leave without a per-patient permit
    # ---- privacy operations (docs/operations.md): snooping detection over each finished day
    privacy_jobs: bool = True  # run snooping detection and retention on schedule in this process
    snoop_baseline_days: int = 28  # the days a user's day is compared with
    snoop_volume_min_patients: int = 30  # distinct patients in an hour below which volume never alerts
    snoop_volume_factor: float = 3.0  # ... above this many times the user's own 95th percentile hour
    snoop_peer_factor: float = 5.0  # ... and this many times the median busy hour of their peers
    snoop_offhours_share: float = 0.02  # an hour of day holding less of the user's baseline is unusual
    snoop_offhours_min_days: int = 10  # active baseline days needed before off-hours is judged
    snoop_vip_labels: str = ("http://terminology.hl7.org/CodeSystem/v3-ActCode|CEL,"
                             "http://terminology.hl7.org/CodeSystem/v3-ActCode|EMP")
    snoop_break_glass_per_day: int = 3  # break-the-glass requests per account per day that alert
    snoop_app_patients_per_hour: int = 200  # distinct patients an interactive app may read in an hour
    retention_policy: str = ""  # e.g. "Observation=10y:erase,Consent[purpose=HMARKT]=2y:erase" (docs/operations.md)
    audit_retention_days: int = 2192  # access records: 6 years (HIPAA documentation), dropped by whole months
    penalty_policy: str = "warn:2,limit:6,suspend:10"  # alert points -> level (docs/operations.md)
    penalty_window_days: int = 30  # alerts older than this no longer count
    penalty_rate: str = "30/minute"  # what a limited account may do
    rate_limit_storage: str = "memory://"  # limits storage URI (redis://... shares it between processes)
    # ---- bulk export and background work (docs/exchange.md)
    export_expiry_seconds: int = 3600
    export_file_max_resources: int = 10_000
    bulk_worker: bool = True  # run export jobs in this process
    # ---- subscriptions (docs/subscriptions.md)
    subscription_dispatcher: bool = True  # match and deliver notifications (serve: in a process of its own)
    subscription_poll_seconds: float = 0.2  # how often an idle dispatcher looks for work
    subscription_timeout_seconds: float = 10.0  # one delivery attempt (connect + answer)
    subscription_retry_hours: float = 24.0  # failed deliveries are retried this long, then status error
    subscription_retry_max_seconds: float = 600.0  # the longest wait between two attempts
    subscription_allow_http_loopback: bool = False  # http:// endpoints on 127.0.0.1/::1 (tests, local dev)
    subscription_private_networks: str = ""  # CIDRs endpoints may resolve into besides public addresses
    group_commit: bool = True  # concurrent writes of one worker share a commit (SQLite)
    # ---- the audit log (docs/audit.md)
    audit_signing_key_file: str = ""  # Ed25519 checkpoint key (PEM); empty = data_dir/audit-signing-key.pem
    audit_checkpoint_file: str = ""  # signed checkpoints appended here too; empty = data_dir/audit-checkpoints.jsonl
    audit_checkpoint_seconds: float = 60.0  # a signed checkpoint at most this often (and at shutdown)
    audit_sequence_seconds: float = 0.5  # new access records enter the Merkle tree within about this delay
    audit_sequencer: bool = True  # run the sequencer in this process (every server process may)

    @property
    def public_root(self) -> str:
        """Server root URL (base URL without the trailing /fhir)."""
        base = self.base_url.rstrip("/")
        return base[: -len("/fhir")] if base.endswith("/fhir") else base

    @property
    def home_jurisdiction(self) -> str:
        """The deployment's jurisdiction code, normalized ("" when the cross-border rule is off)."""
        return self.jurisdiction.strip().upper()

    @property
    def fhir_base(self) -> str:
        return self.base_url.rstrip("/")

    @property
    def token_url(self) -> str:
        return f"{self.public_root}/auth/token"

    @property
    def signing_key_path(self) -> Path:
        return Path(self.audit_signing_key_file) if self.audit_signing_key_file else self.data_dir / "audit-signing-key.pem"

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.audit_checkpoint_file) if self.audit_checkpoint_file else self.data_dir / "audit-checkpoints.jsonl"

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'fhirserver.sqlite3').resolve()}"


ENV_PREFIX = "FHIRSERVER_"


def env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def _coerce(name: str, value: object) -> object:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    try:
        if kind == "Path":
            return value if isinstance(value, Path) else Path(str(value))
        if kind == "int":
            return int(value) if isinstance(value, (int, float)) else int(str(value))
        if kind == "float":
            return float(value) if isinstance(value, (int, float)) else float(str(value))
        if kind == "bool":
            return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")
    except (TypeError, ValueError):
        raise SettingsError(f"setting {name} must be {'an integer' if kind == 'int' else 'a number' if kind == 'float' else kind}, not {value!r}") from None
    return value if isinstance(value, str) else str(value)


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: object) -> Settings:
    """Build Settings from an optional TOML file, the environment, then explicit overrides."""
    values: dict[str, Any] = {}
    known = {f.name for f in fields(Settings)}
    if config_file:
        raw = tomllib.loads(Path(config_file).read_text())
        section = raw.get("fhirserver", raw)
        unknown = sorted(set(section) - known)
        if unknown:
            raise SettingsError(f"unknown setting(s) in {config_file}: {', '.join(unknown)}")
        values.update({key: _coerce(key, value) for key, value in section.items()})
    for key in known:
        if os.environ.get(env_name(key)):
            values[key] = _coerce(key, os.environ[env_name(key)])
    for key, value in overrides.items():
        if key not in known:
            raise SettingsError(f"unknown setting {key}")
        if value is not None:
            values[key] = _coerce(key, value)
    return replace(Settings(), **values)


def explicitly_set(config_file: str | os.PathLike[str] | None) -> set[str]:
    """The settings a TOML file or an environment variable sets (so that a command's own
    defaults, such as `serve --demo`'s data directory, do not override them)."""
    names = {f.name for f in fields(Settings) if os.environ.get(env_name(f.name))}
    if config_file:
        raw = tomllib.loads(Path(config_file).read_text())
        names |= set(raw.get("fhirserver", raw))
    return names
