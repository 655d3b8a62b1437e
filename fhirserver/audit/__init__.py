"""AuditEvents (IHE Basic Audit Log Patterns), their tamper-evident hash chain and the redaction of
other requests' values when events are rendered.

Owns: building events from an AuditRecord, appending and verifying the chain, redaction.
May import: storage, search, fhir, crypto, db, clock, config.
"""
