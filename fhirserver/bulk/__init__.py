"""FHIR Bulk Data Access (v2) export: asynchronous `$export` jobs run by a background worker,
with their NDJSON output encrypted at rest in the database and removed when the job expires."""
