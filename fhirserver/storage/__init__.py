"""Storage: the resource repository over encrypted versions and index tables, row visibility
queries, export job storage, and the write hooks other packages plug in (consent).

Owns: every read and write of resources. Knows nothing of HTTP, scopes or audit.
May import: search, fhir, crypto, db, clock, config.
"""
