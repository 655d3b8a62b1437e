"""The consent engine: patients' privacy Consents enforced inside every query, purpose of use,
sensitive-data labelling, break-the-glass, minors, and the privacy alert feed. See
docs/consent.md for the rules (a contract) and what the rule tables reveal.

Owns: the consent stage (hooks.py is its contract with the pipeline) and the repository's
write hook. May import: auth, audit, storage, search, fhir, crypto, db, clock, config.
"""

from __future__ import annotations

from typing import Any

from .elements import load_consent_elements
from .engine import ConsentEngine, actor_digest
from .labels import Labeller, load_sensitive_codes
from .stage import ConsentStage, ConsentWrites


def build_consent(settings: Any, blind: Any, params: Any = None) -> tuple[ConsentWrites, ConsentStage]:
    """The repository write hook (labelling + rule materialization) and the pipeline stage."""
    codes = load_sensitive_codes(settings.profiles_dir)
    elements = load_consent_elements(settings.profiles_dir, params)
    digest = actor_digest(blind)
    opt_out = tuple(p.strip() for p in str(getattr(settings, "consent_opt_out_purposes", "TREAT,HPAYMT,HOPERAT"))
                    .split(",") if p.strip())
    engine = ConsentEngine(codes, digest, opt_out, elements, str(getattr(settings, "home_jurisdiction", "")))
    return ConsentWrites(Labeller(codes, elements), digest), ConsentStage(engine, settings)


__all__ = ["ConsentEngine", "ConsentStage", "ConsentWrites", "build_consent"]
