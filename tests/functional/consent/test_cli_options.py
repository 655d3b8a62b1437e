"""`fhirserver client register --purpose ... --consent-exempt --break-glass` store the consent
settings in the client's settings JSON; without options the client may claim TREAT only."""

from __future__ import annotations

from pathlib import Path

from fhirserver.auth.clients import get_client
from fhirserver.config import load_settings
from fhirserver.services import build_services
from tests.support.cli import cli


def _register(data: Path, jwks: Path, *options: str) -> str:
    run = cli("client", "register", "--name", "c", "--jwks-file", str(jwks), "--scopes", "system/*.rs", *options,
              data_dir=data)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().splitlines()[-1]


def test_register_consent_options(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key, jwks = tmp_path / "key.json", tmp_path / "jwks.json"
    assert cli("client", "keygen", "--private-key-out", str(key), "--jwks-out", str(jwks),
               data_dir=None).returncode == 0
    plain = _register(data, jwks)
    special = _register(data, jwks, "--purpose", "HRESCH", "--purpose", "PUBHLTH", "--consent-exempt", "--break-glass",
                        "--jurisdiction", "us")
    bad = cli("client", "register", "--name", "c", "--jwks-file", str(jwks), "--scopes", "system/*.rs",
              "--jurisdiction", "United States", data_dir=data)
    assert bad.returncode != 0 and "ISO 3166" in bad.stderr
    svc = build_services(load_settings(data_dir=str(data)))
    try:
        assert get_client(svc.engine, plain).settings.get("purposes") == ["TREAT"]  # type: ignore[union-attr]
        settings = get_client(svc.engine, special).settings  # type: ignore[union-attr]
        assert settings["purposes"] == ["HRESCH", "PUBHLTH"]
        assert settings["consent_exempt"] is True and settings["break_glass"] is True
        assert settings["jurisdiction"] == "US" and "jurisdiction" not in get_client(svc.engine, plain).settings  # type: ignore[union-attr]
    finally:
        svc.engine.dispose()
    assert cli("alerts", "list", data_dir=data).returncode == 0
