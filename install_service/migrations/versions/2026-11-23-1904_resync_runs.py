"""Resync runs and items, and the procrastinate job queue they run on.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 19:04

Reviewed by hand. The job queue's schema is procrastinate's own `schema.sql` for the locked
procrastinate version (3.10); a later procrastinate upgrade adds a migration applying its
files from `procrastinate/sql/migrations`. The script runs through the driver connection
because it holds many statements and no bind parameters.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from procrastinate.schema import SchemaManager
from sqlalchemy.dialects import postgresql
from sqlalchemy.util import await_only

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DROP_PROCRASTINATE = """
DO $$
DECLARE item record;
BEGIN
    FOR item IN SELECT tablename FROM pg_tables
                WHERE schemaname = 'public' AND tablename LIKE 'procrastinate\\_%' LOOP
        EXECUTE format('DROP TABLE %I CASCADE', item.tablename);
    END LOOP;
    FOR item IN SELECT p.oid::regprocedure AS signature FROM pg_proc p
                JOIN pg_namespace n ON n.oid = p.pronamespace
                WHERE n.nspname = 'public' AND p.proname LIKE 'procrastinate\\_%' LOOP
        EXECUTE format('DROP FUNCTION %s CASCADE', item.signature);
    END LOOP;
    FOR item IN SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                WHERE n.nspname = 'public' AND t.typname LIKE 'procrastinate\\_%'
                  AND t.typtype IN ('e', 'c') LOOP
        EXECUTE format('DROP TYPE %I CASCADE', item.typname);
    END LOOP;
END
$$
"""


def _run_script(sql: str) -> None:
    driver_connection = op.get_bind().connection.driver_connection
    if driver_connection is None:  # a closed connection: nothing could have run
        raise RuntimeError("the migration's connection is closed")
    await_only(driver_connection.execute(sql))


def upgrade() -> None:
    op.create_table(
        "resync_runs",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("template_agent_id", sa.UUID(), nullable=False),
        sa.Column("release_id", sa.UUID(), nullable=False),
        sa.Column("force", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("status", sa.String(length=20), server_default="queued", nullable=False),
        sa.Column("requested_by_user_id", sa.UUID(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'partial', 'failed')",
            name=op.f("ck_resync_runs_status"),
        ),
        sa.ForeignKeyConstraint(
            ["release_id"], ["template_releases.id"], name=op.f("fk_resync_runs_release_id")
        ),
        sa.ForeignKeyConstraint(
            ["requested_by_user_id"], ["users.id"], name=op.f("fk_resync_runs_requested_by_user_id")
        ),
        sa.ForeignKeyConstraint(
            ["template_agent_id"], ["agents.id"], name=op.f("fk_resync_runs_template_agent_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_resync_runs")),
    )
    op.create_index(
        op.f("ix_resync_runs_template_agent_id"), "resync_runs", ["template_agent_id"], unique=False
    )
    op.create_index(
        "uq_resync_runs_in_progress",
        "resync_runs",
        ["template_agent_id"],
        unique=True,
        postgresql_where=sa.text("status IN ('queued', 'running')"),
    )
    op.create_table(
        "resync_items",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("run_id", sa.UUID(), nullable=False),
        sa.Column("organization_id", sa.UUID(), nullable=False),
        sa.Column("install_id", sa.UUID(), nullable=False),
        sa.Column("status", sa.String(length=20), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("conflicts", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'succeeded', 'conflict', 'failed')",
            name=op.f("ck_resync_items_status"),
        ),
        sa.ForeignKeyConstraint(
            ["install_id"], ["agents.id"], name=op.f("fk_resync_items_install_id")
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organizations.id"], name=op.f("fk_resync_items_organization_id")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["resync_runs.id"], name=op.f("fk_resync_items_run_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_resync_items")),
        sa.UniqueConstraint("run_id", "install_id", name=op.f("uq_resync_items_run_id_install_id")),
    )
    op.create_index(
        op.f("ix_resync_items_install_id"), "resync_items", ["install_id"], unique=False
    )
    op.create_index(
        op.f("ix_resync_items_organization_id"), "resync_items", ["organization_id"], unique=False
    )
    op.create_index(
        "ix_resync_items_run_status", "resync_items", ["run_id", "status"], unique=False
    )
    _run_script(SchemaManager.get_schema())


def downgrade() -> None:
    _run_script(DROP_PROCRASTINATE)
    op.drop_index("ix_resync_items_run_status", table_name="resync_items")
    op.drop_index(op.f("ix_resync_items_organization_id"), table_name="resync_items")
    op.drop_index(op.f("ix_resync_items_install_id"), table_name="resync_items")
    op.drop_table("resync_items")
    op.drop_index(
        "uq_resync_runs_in_progress",
        table_name="resync_runs",
        postgresql_where=sa.text("status IN ('queued', 'running')"),
    )
    op.drop_index(op.f("ix_resync_runs_template_agent_id"), table_name="resync_runs")
    op.drop_table("resync_runs")
