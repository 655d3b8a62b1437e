"""The portal's languages: English, and simplified Chinese for the platforms in our users' market.

A catalogue per language (`translations/<lang>.json`: English text -> translation) and a
`gettext` that formats `%(name)s` placeholders after translating -- the same contract as
Flask-Babel, without compiled catalogues. The language is the one the visitor chose (`?lang=`,
kept in the session), else the browser's Accept-Language, else English. A text missing from a
catalogue shows in English (a test checks every text of the templates is translated).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from flask import request, session

LANGUAGES = {"en": "English", "zh-CN": "简体中文"}
DIR = Path(__file__).resolve().parent / "translations"


@cache
def catalogue(lang: str) -> dict[str, str]:
    path = DIR / f"{lang}.json"
    return dict(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else {}


def current() -> str:
    asked = request.args.get("lang")
    if asked in LANGUAGES:
        session["portal_lang"] = asked
        return asked
    kept = session.get("portal_lang")
    if kept in LANGUAGES:
        return str(kept)
    best = request.accept_languages.best_match(["en", "zh-CN", "zh", "zh-Hans"], default="en")
    return "zh-CN" if best and best.startswith("zh") else "en"


def gettext(text: str, **values: object) -> str:
    lang = current()
    out = catalogue(lang).get(text, text) if lang != "en" else text
    return out % values if values else out
