"""The consent engine: patients' privacy Consents enforced inside every query, purpose of use,
sensitive-data labelling, break-the-glass, minors, and the privacy alert feed. See
docs/consent.md for the rules (a contract) and what the rule tables reveal.

Owns: the consent stage (hooks.py is its contract with the pipeline) and the repository's
write hook. May import: auth, audit, storage, search, fhir, crypto, db, clock, config.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..audit.records import AuditLog
from ..config import Settings
from ..crypto.blind_index import BlindIndexer
from ..fhir.bindings import Terminology
from ..search.params import ParamRegistry
from ..storage.repository import Repository
from .elements import load_consent_elements
from .engine import ConsentEngine, actor_digest
from .labels import Labeller, load_sensitive_codes
from .stage import ConsentStage, ConsentWrites


@dataclass
class Consent:
    """The consent package built from settings: the repository's write hook (labelling and rule
    materialization), which the repository needs first, and the engine the stage runs on."""

    settings: Settings
    engine: ConsentEngine
    writes: ConsentWrites

    def stage(self, repo: Repository, audit: AuditLog) -> ConsentStage:
        """The pipeline's stage over the repository that carries `writes` and the audit log."""
        return ConsentStage(self.engine, self.settings, repo, audit)


def build_consent(settings: Settings, blind: BlindIndexer, params: ParamRegistry | None = None,
                  owned_types: frozenset[str] = frozenset(), terms: Terminology | None = None) -> Consent:
    """`terms`: the value sets the sensitivity categories name (the validator's: shipped and from
    installed IG packages)."""
    codes = load_sensitive_codes(settings.profiles_dir)
    elements = load_consent_elements(settings.profiles_dir, params)
    digest = actor_digest(blind)
    opt_out = tuple(p.strip() for p in settings.consent_opt_out_purposes.split(",") if p.strip())
    engine = ConsentEngine(codes, digest, opt_out, elements, settings.home_jurisdiction, owned_types)
    return Consent(settings, engine, ConsentWrites(Labeller(codes, elements, terms), digest))


__all__ = ["Consent", "ConsentEngine", "ConsentStage", "ConsentWrites", "build_consent"]
