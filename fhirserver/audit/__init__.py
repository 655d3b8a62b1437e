"""AuditEvents (IHE Basic Audit Log Patterns) and their tamper-evident hash chain."""
