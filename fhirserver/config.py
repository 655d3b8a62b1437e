"""Settings: defaults < TOML file (--config) < FHIRSERVER_* environment variables.

Secrets never come from the TOML file's defaults: with no master key configured, a random key is
generated once into the data directory (mode 0600) by the key ring.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_PROFILES_DIR = PACKAGE_DIR.parent / "profiles"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("./fhirserver-data")
    database_url: str = ""
    base_url: str = "http://127.0.0.1:8080/fhir"
    master_key: str = ""  # base64 of 32 bytes; empty = use the key ring file in data_dir
    profiles_dir: Path = DEFAULT_PROFILES_DIR
    max_body_bytes: int = 10 * 1024 * 1024
    # input limits (docs/security.md): nesting of a resource's JSON, parameters of a search and
    # comma-separated values of one parameter; beyond them a request is a 400 OperationOutcome
    max_json_depth: int = 64
    search_max_params: int = 100
    search_max_values: int = 100
    access_token_lifetime: int = 300  # seconds; SMART backend services recommend <= 5 min
    client_assertion_max_lifetime: int = 300
    jwks_cache_seconds: int = 300
    default_page_size: int = 20
    max_page_size: int = 1000
    history_max_page_size: int = 1000
    log_level: str = "INFO"
    # consent engine (docs/consent.md): purposes that permit unless a consent denies (opt-out);
    # every other purpose denies unless a consent permits (opt-in)
    consent_opt_out_purposes: str = "TREAT,HPAYMT,HOPERAT"
    consent_minor_age: int = 14  # younger patients' privacy Consents must come from a guardian
    denial_burst_threshold: int = 20  # denied requests per client per minute that raise an alert (0: off)
    denial_burst_suspend: bool = False  # also disable the client on a burst
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def public_root(self) -> str:
        """Server root URL (base URL without the trailing /fhir)."""
        base = self.base_url.rstrip("/")
        return base[: -len("/fhir")] if base.endswith("/fhir") else base

    @property
    def fhir_base(self) -> str:
        return self.base_url.rstrip("/")

    @property
    def token_url(self) -> str:
        return f"{self.public_root}/auth/token"

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'fhirserver.sqlite3').resolve()}"


_ENV = {
    "FHIRSERVER_DATABASE_URL": "database_url",
    "FHIRSERVER_BASE_URL": "base_url",
    "FHIRSERVER_DATA_DIR": "data_dir",
    "FHIRSERVER_MASTER_KEY": "master_key",
    "FHIRSERVER_PROFILES_DIR": "profiles_dir",
    "FHIRSERVER_MAX_BODY_BYTES": "max_body_bytes",
    "FHIRSERVER_MAX_JSON_DEPTH": "max_json_depth",
    "FHIRSERVER_SEARCH_MAX_PARAMS": "search_max_params",
    "FHIRSERVER_SEARCH_MAX_VALUES": "search_max_values",
    "FHIRSERVER_ACCESS_TOKEN_LIFETIME": "access_token_lifetime",
    "FHIRSERVER_LOG_LEVEL": "log_level",
    "FHIRSERVER_CONSENT_OPT_OUT_PURPOSES": "consent_opt_out_purposes",
    "FHIRSERVER_CONSENT_MINOR_AGE": "consent_minor_age",
    "FHIRSERVER_DENIAL_BURST_THRESHOLD": "denial_burst_threshold",
    "FHIRSERVER_DENIAL_BURST_SUSPEND": "denial_burst_suspend",
}


def _coerce(name: str, value: Any) -> Any:
    kinds = {f.name: f.type for f in fields(Settings)}
    kind = kinds[name]
    if kind == "Path":
        return Path(value)
    if kind == "int":
        return int(value)
    if kind == "bool":
        return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")
    return value


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from an optional TOML file, the environment, then explicit overrides."""
    values: dict[str, Any] = {}
    known = {f.name for f in fields(Settings)}
    if config_file:
        raw = tomllib.loads(Path(config_file).read_text())
        section = raw.get("fhirserver", raw)
        extra = {}
        for key, value in section.items():
            if key in known:
                values[key] = _coerce(key, value)
            else:
                extra[key] = value
        if extra:
            values["extra"] = extra
    for env_name, key in _ENV.items():
        if os.environ.get(env_name):
            values[key] = _coerce(key, os.environ[env_name])
    for key, value in overrides.items():
        if value is not None:
            values[key] = _coerce(key, value)
    return replace(Settings(), **values)
