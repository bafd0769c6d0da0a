"""Bulk install: a resync run's items may install the template into orgs that lack it.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 10:00

Reviewed by hand. A run started with `install: true` has an item for each named org without
an active install of the template: `installs` marks it, and its `install_id` is empty until
the item's install exists (the worker creates it, or finds one made meanwhile, and records
it). An item is now one org's part of a run (UNIQUE(run_id, organization_id), which is the
same as before for existing items: one install per template and org), and the run's items
are listed by (wave, organization). No table is rewritten: the new column has a constant
default.

Downgrading deletes the items that never got an install (the older schema cannot hold them)
and restores the old keys.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "resync_items",
        sa.Column("installs", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.alter_column("resync_items", "install_id", nullable=True)
    op.drop_constraint(op.f("uq_resync_items_run_id_install_id"), "resync_items", type_="unique")
    op.create_unique_constraint(
        op.f("uq_resync_items_run_id_organization_id"),
        "resync_items",
        ["run_id", "organization_id"],
    )
    op.drop_index("ix_resync_items_run_wave", table_name="resync_items")
    op.create_index(
        "ix_resync_items_run_wave",
        "resync_items",
        ["run_id", "wave", "organization_id"],
        postgresql_include=["status"],
    )


def downgrade() -> None:
    op.execute("DELETE FROM resync_items WHERE install_id IS NULL")
    op.drop_index("ix_resync_items_run_wave", table_name="resync_items")
    op.create_index(
        "ix_resync_items_run_wave",
        "resync_items",
        ["run_id", "wave", "install_id"],
        postgresql_include=["status"],
    )
    op.drop_constraint(
        op.f("uq_resync_items_run_id_organization_id"), "resync_items", type_="unique"
    )
    op.create_unique_constraint(
        op.f("uq_resync_items_run_id_install_id"), "resync_items", ["run_id", "install_id"]
    )
    op.alter_column("resync_items", "install_id", nullable=False)
    op.drop_column("resync_items", "installs")
