"""Settings: every field typed with one default, settable from TOML and from FHIRSERVER_<NAME>;
unknown keys and bad values are refused with a message naming them."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from fhirserver.config import Settings, SettingsError, env_name, explicitly_set, load_settings


def _sample(kind: str) -> tuple[str, object]:
    return {"int": ("7", 7), "float": ("2.5", 2.5), "bool": ("true", True), "Path": ("/tmp/x", Path("/tmp/x")), "str": ("abc", "abc")}[kind]


@pytest.mark.parametrize("name", [f.name for f in fields(Settings)])
def test_every_setting_comes_from_its_environment_variable(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    text, value = _sample(str(kind))
    monkeypatch.setenv(env_name(name), text)
    assert getattr(load_settings(), name) == value
    assert name in explicitly_set(None)


def test_toml_file_sets_settings_and_the_environment_overrides_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "f.toml"
    cfg.write_text('[fhirserver]\nproxy_hops = 2\nlogin_session_seconds = 60\ndemo_app = true\n')
    s = load_settings(cfg)
    assert (s.proxy_hops, s.login_session_seconds, s.demo_app) == (2, 60, True)
    monkeypatch.setenv("FHIRSERVER_PROXY_HOPS", "3")
    assert load_settings(cfg).proxy_hops == 3
    assert {"proxy_hops", "login_session_seconds", "demo_app"} <= explicitly_set(cfg)


def test_unknown_keys_and_bad_values_are_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "f.toml"
    cfg.write_text('[fhirserver]\nproxy_hop = 2\n')
    with pytest.raises(SettingsError, match="proxy_hop"):
        load_settings(cfg)
    cfg.write_text('[fhirserver]\nproxy_hops = "two"\n')
    with pytest.raises(SettingsError, match="proxy_hops must be an integer"):
        load_settings(cfg)
    with pytest.raises(SettingsError):
        load_settings(no_such_setting=1)


def test_readme_lists_every_environment_variable() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [env_name(f.name) for f in fields(Settings) if env_name(f.name) not in readme]
    assert not missing, missing
