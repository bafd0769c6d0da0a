"""What a batch plan reads: each org's rows that are not as its install left them.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06 16:00

Reviewed by hand. A batch of orgs (a resync's items, a bulk install, the fleet dry run) is
planned from the items the release moves away from each org's installed release and from
the rows each org no longer has as its install left them, instead of pairing every org with
every item and every row (contract §12). An install's rows are as it left them when each is
active, managed by it and equal to what it mirrored; the rows that are not are found by
index:

- `unlike_mirrored`, a stored generated column of each mirrored table: the row is managed and
  archived, or its content (`content_hash`, kept by the database's triggers whoever writes
  the row) is not what was mirrored (`mirrored_hash`: edited, renamed, added by hand), or the
  org took it over from a template (detached). A partial index on the organization holds
  those rows only; a column rather than an expression, so that PostgreSQL's statistics know
  how few they are (an expression's selectivity is a guess, which made it read the whole
  table rather than the index for a fleet). Adding it rewrites each table once.
- `mirrored_deletions`: a managed row deleted (by hand: the service archives), recorded by
  a statement trigger on each table, once per (template, org, kind, slug). It stays after
  the row is written again; a plan then finds that row as mirrored and leaves it alone.

Downgrading drops the triggers, the table and the indexes; nothing else changes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS = {
    "entity_types": "entity_types",
    "entity_relationship_types": "relationship_types",
    "event_classifiers": "classifiers",
    "watchers": "watchers",
}


# Whether a row is not as the install that manages (or managed) it left it.
UNLIKE_MIRRORED = (
    "managed_by_template_agent_id IS NOT NULL AND (status <> 'active' "
    "OR content_hash IS DISTINCT FROM mirrored_hash) "
    "OR cardinality(detached_from_template_agent_ids) > 0"
)


def upgrade() -> None:
    op.create_table(
        "mirrored_deletions",
        sa.Column("template_agent_id", sa.UUID(), nullable=False),
        sa.Column("organization_id", sa.UUID(), nullable=False),
        sa.Column("kind", sa.String(length=30), nullable=False),
        sa.Column("slug", sa.String(length=100), nullable=False),
        sa.Column(
            "deleted_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("template_agent_id", "organization_id", "kind", "slug"),
    )
    for table, kind in KINDS.items():
        op.add_column(
            table,
            sa.Column(
                "unlike_mirrored",
                sa.Boolean(),
                sa.Computed(UNLIKE_MIRRORED, persisted=True),
                nullable=False,
            ),
        )
        op.create_index(
            f"ix_{table}_unlike_mirrored",
            table,
            ["organization_id"],
            postgresql_where=sa.text("unlike_mirrored"),
        )
        op.execute(f"""
            CREATE FUNCTION install_deleted_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO mirrored_deletions (template_agent_id, organization_id, kind, slug)
                SELECT DISTINCT g.managed_by_template_agent_id, g.organization_id, '{kind}',
                       g.slug
                FROM gone g WHERE g.managed_by_template_agent_id IS NOT NULL
                ON CONFLICT DO NOTHING;
                RETURN NULL;
            END
            $$""")
        op.execute(
            f"CREATE TRIGGER {table}_deleted AFTER DELETE ON {table} "
            "REFERENCING OLD TABLE AS gone "
            f"FOR EACH STATEMENT EXECUTE FUNCTION install_deleted_{table}()"
        )


def downgrade() -> None:
    for table in KINDS:
        op.execute(f"DROP TRIGGER {table}_deleted ON {table}")
        op.execute(f"DROP FUNCTION install_deleted_{table}()")
        op.drop_index(f"ix_{table}_unlike_mirrored", table_name=table)
        op.drop_column(table, "unlike_mirrored")
    op.drop_table("mirrored_deletions")
