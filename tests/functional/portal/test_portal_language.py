"""The portal in simplified Chinese: chosen with ?lang= (kept for the session) or from the
browser's Accept-Language; every text of the templates and of the portal's messages has a
translation in the catalogue."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jinja2
import pytest

from fhirserver.portal.i18n import DIR
from tests.conftest import make_settings

PORTAL = Path(__file__).resolve().parents[3] / "fhirserver" / "portal"
CALL = re.compile(r"""(?<![\w.])_\(\s*(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)")""")


@pytest.fixture
def settings(tmp_path: Any, db_url: str):  # type: ignore[no-untyped-def]
    return make_settings(tmp_path, db_url, portal=True)


def texts() -> set[str]:
    """Every literal text given to `_()` in the templates and the portal's Python code."""
    out: set[str] = set()
    for path in [*(PORTAL / "templates" / "portal").glob("*.html"), *PORTAL.glob("*.py")]:
        for single, double in CALL.findall(path.read_text()):
            out.add((single or double).replace("\\'", "'").replace('\\"', '"'))
    return out


def test_every_text_is_translated() -> None:
    found = texts()
    assert len(found) > 100
    catalogue = json.loads((DIR / "zh-CN.json").read_text(encoding="utf-8"))
    assert sorted(found - set(catalogue)) == []
    for english, chinese in catalogue.items():  # placeholders survive translation
        assert sorted(re.findall(r"%\(\w+\)s", english)) == sorted(re.findall(r"%\(\w+\)s", chinese)), english
    env = jinja2.Environment()
    for path in (PORTAL / "templates" / "portal").glob("*.html"):
        env.parse(path.read_text())  # every template still parses


def test_the_language_follows_the_choice_and_the_browser(http: Any) -> None:
    english = http.get("/portal/").get_data(as_text=True)
    assert 'lang="en"' in english and "Sign in" in english
    chinese = http.get("/portal/", headers={"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.5"}).get_data(as_text=True)
    assert 'lang="zh-CN"' in chinese and "登录" in chinese and "Sign in" not in chinese
    chosen = http.get("/portal/?lang=zh-CN").get_data(as_text=True)
    assert "您的健康数据，由您做主" in chosen
    kept = http.get("/portal/").get_data(as_text=True)  # the choice is kept for the session
    assert 'lang="zh-CN"' in kept
    back = http.get("/portal/?lang=en").get_data(as_text=True)
    assert "Your health data, your choices" in back and 'hreflang="zh-CN"' in back
