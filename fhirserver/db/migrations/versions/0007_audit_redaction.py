"""audit redaction (patient erasure pseudonymizes AuditEvents without breaking the chain)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 22:15:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_chain") as batch:
        batch.add_column(sa.Column("redaction", sa.String(length=160), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_chain") as batch:
        batch.drop_column("redaction")
