"""FHIR Bulk Data Access (v2) export jobs run by a background worker: each job re-applies the
caller's scopes and consent (through the pipeline's access rules) and stores its NDJSON output
encrypted in the database until it expires. The HTTP side ($export, status, files) is
pipeline/export_ops.py.

May import: pipeline and everything below it.
"""
