"""OAuth 2.0 / SMART building blocks: the client registry, the scope grammar and algebra, opaque
access tokens, grant families, codes, refresh tokens and launch contexts, client assertions.

Owns: who may ask for tokens and what a token grants. The HTTP endpoints live in smart/.
May import: audit, storage, search, fhir, crypto, db, clock, config.
"""
