"""A row remembers every template it was detached from, not only the last.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 07:00

Reviewed by hand. A row the org detached from one template's install may later be adopted by
another template that has the same slug, and detached from that one too. Each of those installs
must keep leaving the slug alone, so the single `detached_from_template_agent_id` becomes the
array `detached_from_template_agent_ids` (empty: never detached). Upgrading carries every
existing marker over; the new column has a constant default, so no table is rewritten for it.

Downgrading keeps one template per row, the last it was detached from (the older schema can
say no more); the older code then treats the row as that template's detached row only.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MIRRORED = ("entity_types", "entity_relationship_types", "event_classifiers", "watchers")


def upgrade() -> None:
    for table in MIRRORED:
        op.add_column(
            table,
            sa.Column(
                "detached_from_template_agent_ids",
                postgresql.ARRAY(sa.UUID()),
                server_default=sa.text("'{}'::uuid[]"),
                nullable=False,
            ),
        )
        op.execute(
            f"""UPDATE {table}
                SET detached_from_template_agent_ids = ARRAY[detached_from_template_agent_id]
                WHERE detached_from_template_agent_id IS NOT NULL"""
        )
        op.drop_constraint(
            op.f(f"fk_{table}_detached_from_template_agent_id"), table, type_="foreignkey"
        )
        op.drop_column(table, "detached_from_template_agent_id")


def downgrade() -> None:
    for table in MIRRORED:
        op.add_column(table, sa.Column("detached_from_template_agent_id", sa.UUID(), nullable=True))
        op.execute(
            f"""UPDATE {table}
                SET detached_from_template_agent_id = detached_from_template_agent_ids[
                    cardinality(detached_from_template_agent_ids)]
                WHERE cardinality(detached_from_template_agent_ids) > 0"""
        )
        op.create_foreign_key(
            op.f(f"fk_{table}_detached_from_template_agent_id"),
            table,
            "agents",
            ["detached_from_template_agent_id"],
            ["id"],
        )
        op.drop_column(table, "detached_from_template_agent_ids")
