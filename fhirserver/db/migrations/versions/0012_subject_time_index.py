"""access_subject: the (param, target) index also orders by time, so that an account's or a
patient's accesses within a time window are an index range (the breach report's edge hours),
not every access they ever made.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 17:15:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_subject_target", table_name="access_subject")
    op.create_index("ix_subject_target", "access_subject",
                    ["param", "target_id", "target_type", "recorded_us", "record_pk"])


def downgrade() -> None:
    op.drop_index("ix_subject_target", table_name="access_subject")
    op.create_index("ix_subject_target", "access_subject", ["param", "target_id", "target_type", "record_pk"])
