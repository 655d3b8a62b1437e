"""access records: the audit log without a global lock (compact records, Merkle tree, checkpoints)

audit_chain and audit_head stay until the server moves their events into access records at its
next start (audit/legacy.py, which needs the keys); nothing writes to them any more.

On PostgreSQL access_record and access_subject are partitioned by recorded_us (declarative
range partitioning, monthly partitions made ahead by the sequencer, plus a default partition so
an insert never fails for want of one).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 10:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_PG = [
    """CREATE TABLE access_record (
        pk BIGSERIAL NOT NULL, id VARCHAR(64) NOT NULL, recorded_us BIGINT NOT NULL, seq BIGINT,
        terms VARCHAR(64) NOT NULL, key_id INTEGER NOT NULL, detail BYTEA NOT NULL,
        content_hash VARCHAR(64) NOT NULL, redaction VARCHAR(160),
        PRIMARY KEY (pk, recorded_us)) PARTITION BY RANGE (recorded_us)""",
    "CREATE TABLE access_record_default PARTITION OF access_record DEFAULT",
    "CREATE INDEX ix_access_record_id ON access_record (id)",
    "CREATE INDEX ix_access_record_time ON access_record (recorded_us, pk)",
    "CREATE INDEX ix_access_record_terms ON access_record (terms, pk)",
    "CREATE INDEX ix_access_record_seq ON access_record (seq)",
    "CREATE INDEX ix_access_record_unsequenced ON access_record (pk) WHERE seq IS NULL",
    """CREATE TABLE access_subject (
        record_pk BIGINT NOT NULL, recorded_us BIGINT NOT NULL, param VARCHAR(64) NOT NULL,
        target_type VARCHAR(64), target_id VARCHAR(255), url VARCHAR(1024)) PARTITION BY RANGE (recorded_us)""",
    "CREATE TABLE access_subject_default PARTITION OF access_subject DEFAULT",
    "CREATE INDEX ix_subject_target ON access_subject (param, target_id, target_type, record_pk)",
    "CREATE INDEX ix_subject_record ON access_subject (record_pk)",
]


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for ddl in _PG:
            op.execute(ddl)
    else:
        op.create_table(
            "access_record",
            sa.Column("pk", sa.Integer(), primary_key=True, autoincrement=True),
            sa.Column("id", sa.String(64), nullable=False),
            sa.Column("recorded_us", sa.BigInteger(), nullable=False),
            sa.Column("seq", sa.BigInteger(), nullable=True),
            sa.Column("terms", sa.String(64), nullable=False),
            sa.Column("key_id", sa.Integer(), nullable=False),
            sa.Column("detail", sa.LargeBinary(), nullable=False),
            sa.Column("content_hash", sa.String(64), nullable=False),
            sa.Column("redaction", sa.String(160), nullable=True),
        )
        op.create_index("ix_access_record_id", "access_record", ["id"])
        op.create_index("ix_access_record_time", "access_record", ["recorded_us", "pk"])
        op.create_index("ix_access_record_terms", "access_record", ["terms", "pk"])
        op.create_index("ix_access_record_seq", "access_record", ["seq"])
        op.create_index("ix_access_record_unsequenced", "access_record", ["pk"],
                        sqlite_where=sa.text("seq IS NULL"))
        op.create_table(
            "access_subject",
            sa.Column("record_pk", sa.Integer(), nullable=False),
            sa.Column("recorded_us", sa.BigInteger(), nullable=False),
            sa.Column("param", sa.String(64), nullable=False),
            sa.Column("target_type", sa.String(64), nullable=True),
            sa.Column("target_id", sa.String(255), nullable=True),
            sa.Column("url", sa.String(1024), nullable=True),
        )
        op.create_index("ix_subject_target", "access_subject", ["param", "target_id", "target_type", "record_pk"])
        op.create_index("ix_subject_record", "access_subject", ["record_pk"])
    op.create_table(
        "audit_term",
        sa.Column("set_id", sa.String(64), primary_key=True),
        sa.Column("n", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("tbl", sa.String(16), nullable=False),
        sa.Column("param", sa.String(64), nullable=False),
        sa.Column("system", sa.String(255), nullable=True),
        sa.Column("code", sa.String(255), nullable=True),
        sa.Column("kind", sa.String(1), nullable=True),
        sa.Column("value", sa.String(1024), nullable=True),
    )
    op.create_index("ix_audit_term_code", "audit_term", ["tbl", "param", "code", "set_id"])
    op.create_index("ix_audit_term_value", "audit_term", ["tbl", "param", "value", "set_id"])
    op.create_table(
        "audit_node",
        sa.Column("level", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("idx", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "audit_checkpoint",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("tree_size", sa.BigInteger(), nullable=False),
        sa.Column("root", sa.String(64), nullable=False),
        sa.Column("time_us", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(200), nullable=False),
    )
    op.create_index("ix_audit_checkpoint_size", "audit_checkpoint", ["tree_size"])


def downgrade() -> None:
    for table in ("audit_checkpoint", "audit_node", "audit_term", "access_subject", "access_record"):
        op.drop_table(table)
