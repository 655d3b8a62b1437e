"""Import checkpoint tables (`fhirserver load`, migration 0006), in the shared metadata."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, ForeignKey, String, Table, Text

from ..db.schema import metadata

import_file = Table(
    "import_file",
    metadata,
    Column("key", String(64), primary_key=True),  # SHA-256 of the absolute path
    Column("path", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("position", BigInteger, nullable=False),  # items (lines / entries) consumed and committed
    Column("counts", Text, nullable=False),  # JSON: loaded/updated/skipped per type, invalid
    Column("done", Boolean, nullable=False),
    Column("started_us", BigInteger, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    Column("completed_us", BigInteger, nullable=True),
)

import_patient = Table(
    "import_patient",
    metadata,
    Column("file_key", String(64), ForeignKey("import_file.key"), primary_key=True),
    Column("patient_id", String(64), primary_key=True),
)
