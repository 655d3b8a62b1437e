"""Tables of the bulk export jobs (in the shared metadata, migration 0005).

A job keeps a snapshot of who asked (client, scopes, launch context, purpose) so the worker
applies the same authorization and consent rules when it runs, possibly after a restart. Output
files are rows of `export_file`: NDJSON sealed with AES-256-GCM under the job's own data key
(scope `export:<job id>`, associated data `export/<job>/<file>`); deleting the job deletes the
rows and the key, so nothing of an expired export stays readable.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, ForeignKey, Integer, LargeBinary, String, Table, Text

from ..db.schema import metadata

export_job = Table(
    "export_job",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("client_id", String(64), ForeignKey("client.client_id"), nullable=False),
    Column("status", String(16), nullable=False),  # queued running complete failed cancelled
    Column("request", Text, nullable=False),  # the kick-off URL (echoed in the manifest)
    Column("spec", Text, nullable=False),  # JSON: level, patient, types, since, type filters, deidentify
    Column("principal", Text, nullable=False),  # JSON snapshot of the caller (scopes, context, purpose)
    Column("progress", String(200), nullable=True),
    Column("error", Text, nullable=True),
    Column("transaction_us", BigInteger, nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("heartbeat_us", BigInteger, nullable=True),
    Column("completed_us", BigInteger, nullable=True),
    Column("expires_us", BigInteger, nullable=True),
)

export_file = Table(
    "export_file",
    metadata,
    Column("job_id", String(64), ForeignKey("export_job.id"), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("type", String(64), nullable=False),
    Column("count", Integer, nullable=False),
    Column("key_id", Integer, ForeignKey("data_key.id"), nullable=False),
    Column("body", LargeBinary, nullable=False),
)
