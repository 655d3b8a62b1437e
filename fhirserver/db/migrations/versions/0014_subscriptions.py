"""Subscriptions (issue 26): the change outbox, each subscription's live state, its numbered events and
the one-time websocket binding tokens.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 20:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "change_event",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("resource_pk", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("recorded_us", sa.BigInteger(), nullable=False),
        sqlite_autoincrement=True,  # numbers are never reused (db/schema.py)
    )
    op.create_table(
        "subscription_state",
        sa.Column("resource_pk", sa.Integer(), sa.ForeignKey("resource.pk"), primary_key=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("principal", sa.Text(), nullable=False),
        sa.Column("topic", sa.String(1024), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("events_since_start", sa.BigInteger(), nullable=False),
        sa.Column("delivered_through", sa.BigInteger(), nullable=False),
        sa.Column("handshake_done", sa.Boolean(), nullable=False),
        sa.Column("withheld", sa.BigInteger(), nullable=False),
        sa.Column("failing_since_us", sa.BigInteger(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_us", sa.BigInteger(), nullable=False),
        sa.Column("last_sent_us", sa.BigInteger(), nullable=True),
        sa.Column("heartbeat_us", sa.BigInteger(), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until_us", sa.BigInteger(), nullable=True),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_subscription_due", "subscription_state", ["status", "next_attempt_us"])
    op.create_table(
        "subscription_ws_token",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("subscription_pk", sa.Integer(), sa.ForeignKey("subscription_state.resource_pk"), nullable=False),
        sa.Column("expires_us", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "subscription_event",
        sa.Column("subscription_pk", sa.Integer(), sa.ForeignKey("subscription_state.resource_pk"),
                  primary_key=True),
        sa.Column("number", sa.BigInteger(), primary_key=True),
        sa.Column("resource_pk", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("recorded_us", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("subscription_event")
    op.drop_table("subscription_ws_token")
    op.drop_index("ix_subscription_due", table_name="subscription_state")
    op.drop_table("subscription_state")
    op.drop_table("change_event")
