"""Red-team fixes (issue 29): denials counted per account (the user of a user-level token, else the
client), and a two-step sign-in enrolment the server issued and holds until it is confirmed.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("access_denial") as batch:
        batch.add_column(sa.Column("account", sa.String(255), nullable=True))
    op.create_index("ix_access_denial_account", "access_denial", ["account", "at_us"])
    with op.batch_alter_table("app_user") as batch:
        batch.add_column(sa.Column("totp_pending_key_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("totp_pending_secret", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("totp_pending_until_us", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("app_user") as batch:
        batch.drop_column("totp_pending_until_us")
        batch.drop_column("totp_pending_secret")
        batch.drop_column("totp_pending_key_id")
    op.drop_index("ix_access_denial_account", table_name="access_denial")
    with op.batch_alter_table("access_denial") as batch:
        batch.drop_column("account")
