"""erasure requests: a patient (or guardian) asks, an administrator approves (running $erase) or refuses

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 17:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erasure_request",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("patient_id", sa.String(255), nullable=False),
        sa.Column("requested_by", sa.String(255), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.LargeBinary(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("decided_us", sa.BigInteger(), nullable=True),
        sa.Column("decided_by", sa.String(255), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
    )
    op.create_index("ix_erasure_request_patient", "erasure_request", ["patient_id", "created_us"])
    op.create_index("ix_erasure_request_status", "erasure_request", ["status", "created_us"])


def downgrade() -> None:
    op.drop_table("erasure_request")
