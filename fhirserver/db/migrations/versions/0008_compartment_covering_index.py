"""compartment: covering (resource_pk, patient_id) index

The consent predicate looks up, for every candidate row of a search, the patients whose
compartment holds it; with the patient id in the index that is one index probe, not an index
probe plus a table read.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 22:50:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("compartment") as batch:
        batch.drop_index("ix_compartment_resource")
        batch.create_index("ix_compartment_resource", ["resource_pk", "patient_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("compartment") as batch:
        batch.drop_index("ix_compartment_resource")
        batch.create_index("ix_compartment_resource", ["resource_pk"], unique=False)
