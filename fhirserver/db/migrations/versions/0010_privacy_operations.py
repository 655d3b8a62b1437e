"""privacy operations: hourly access roll-up, audit state, account penalties, scheduled job runs

- access_hourly: per (agent, hour, patient, action, outcome) the number of access records and
  their first/last time, kept by the audit sequencer (breach reports and snooping detection read
  it instead of millions of records);
- access_agent_hour: per agent and hour, distinct patients and accesses (the baselines of
  snooping detection, computed once per day);
- audit_state: named values of the audit log (the roll-up's watermark, the retention horizon);
- account_penalty: the graded penalty in force for a client or a user (warn, limit, suspend);
- job_run: scheduled privacy jobs (snooping detection per day, retention runs), so that two
  server processes do not both run one and an interrupted run resumes.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 16:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "access_hourly",
        sa.Column("agent_type", sa.String(64), primary_key=True),
        sa.Column("agent_id", sa.String(255), primary_key=True),
        sa.Column("hour_us", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("patient_id", sa.String(255), primary_key=True),
        sa.Column("action", sa.String(1), primary_key=True),
        sa.Column("outcome", sa.String(2), primary_key=True),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("first_us", sa.BigInteger(), nullable=False),
        sa.Column("last_us", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_access_hourly_hour", "access_hourly", ["hour_us"])
    op.create_index("ix_access_hourly_patient", "access_hourly", ["patient_id", "hour_us"])
    op.create_table(
        "access_agent_hour",
        sa.Column("agent_type", sa.String(64), primary_key=True),
        sa.Column("agent_id", sa.String(255), primary_key=True),
        sa.Column("hour_us", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("patients", sa.Integer(), nullable=False),
        sa.Column("accesses", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_access_agent_hour_hour", "access_agent_hour", ["hour_us"])
    op.create_table(
        "audit_state",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("mac", sa.String(64), nullable=True),
    )
    op.create_table(
        "account_penalty",
        sa.Column("subject_kind", sa.String(8), primary_key=True),
        sa.Column("subject_id", sa.String(255), primary_key=True),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("since_us", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
    )
    op.create_table(
        "job_run",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("period", sa.String(64), primary_key=True),
        sa.Column("started_us", sa.BigInteger(), nullable=False),
        sa.Column("finished_us", sa.BigInteger(), nullable=True),
        sa.Column("progress", sa.Text(), nullable=True),
    )


def downgrade() -> None:
    for table in ("job_run", "account_penalty", "audit_state", "access_agent_hour", "access_hourly"):
        op.drop_table(table)
