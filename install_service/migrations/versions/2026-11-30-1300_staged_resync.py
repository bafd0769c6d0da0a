"""Staged resync: waves, thresholds, bake and start times, control states; pins on installs.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 13:00

Reviewed by hand. Upgrading keeps every run as it was: each existing run has one wave
(`wave_count` and `current_wave` 1), every existing item is in wave 1, and no run has a
threshold, a bake time or a start time, so unfinished runs carry on exactly as before. Every
new column is nullable or has a constant default, so no table is rewritten.

Downgrading maps what the older schema cannot say onto what it can, losing no row: skipped
and cancelled items become `failed` with the reason in `error`; runs that are scheduled,
baking, halted, paused or cancelled become `failed` (their pending items too), so that
nothing starts by itself on the older code, and a retry there runs them on purpose. Pins
are dropped.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RUN_STATUSES = (
    "status IN ('scheduled', 'queued', 'running', 'baking', 'halted', 'paused', 'cancelled', "
    "'succeeded', 'partial', 'failed')"
)
UNFINISHED = "status IN ('scheduled', 'queued', 'running', 'baking', 'halted', 'paused')"
ITEM_STATUSES = "status IN ('pending', 'succeeded', 'conflict', 'failed', 'skipped', 'cancelled')"
OLD_RUN_STATUSES = "status IN ('queued', 'running', 'succeeded', 'partial', 'failed')"
OLD_UNFINISHED = "status IN ('queued', 'running')"
OLD_ITEM_STATUSES = "status IN ('pending', 'succeeded', 'conflict', 'failed')"


def upgrade() -> None:
    op.add_column("agents", sa.Column("pinned_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("agents", sa.Column("pinned_until", sa.DateTime(timezone=True), nullable=True))
    op.add_column("agents", sa.Column("pin_reason", sa.Text(), nullable=True))
    op.add_column("agents", sa.Column("pinned_by_user_id", sa.UUID(), nullable=True))
    op.create_foreign_key(
        op.f("fk_agents_pinned_by_user_id"), "agents", "users", ["pinned_by_user_id"], ["id"]
    )

    op.drop_index(
        "uq_resync_runs_in_progress",
        table_name="resync_runs",
        postgresql_where=sa.text(OLD_UNFINISHED),
    )
    op.drop_constraint(op.f("ck_resync_runs_status"), "resync_runs", type_="check")
    op.add_column(
        "resync_runs",
        sa.Column(
            "selection",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
    )
    op.add_column(
        "resync_runs",
        sa.Column("include_pinned", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.add_column("resync_runs", sa.Column("max_conflict_rate", sa.Numeric(), nullable=True))
    op.add_column("resync_runs", sa.Column("max_failure_rate", sa.Numeric(), nullable=True))
    op.add_column(
        "resync_runs",
        sa.Column("bake_seconds", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column("resync_runs", sa.Column("start_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "resync_runs",
        sa.Column("wave_count", sa.Integer(), server_default=sa.text("1"), nullable=False),
    )
    op.add_column(
        "resync_runs",
        sa.Column("current_wave", sa.Integer(), server_default=sa.text("1"), nullable=False),
    )
    op.add_column(
        "resync_runs", sa.Column("next_step_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("resync_runs", sa.Column("halt_reason", sa.Text(), nullable=True))
    op.create_check_constraint(op.f("ck_resync_runs_status"), "resync_runs", RUN_STATUSES)
    op.create_check_constraint(
        op.f("ck_resync_runs_max_conflict_rate"),
        "resync_runs",
        "max_conflict_rate BETWEEN 0 AND 1",
    )
    op.create_check_constraint(
        op.f("ck_resync_runs_max_failure_rate"), "resync_runs", "max_failure_rate BETWEEN 0 AND 1"
    )
    op.create_check_constraint(
        op.f("ck_resync_runs_bake_seconds"), "resync_runs", "bake_seconds >= 0"
    )
    op.create_index(
        "uq_resync_runs_in_progress",
        "resync_runs",
        ["template_agent_id"],
        unique=True,
        postgresql_where=sa.text(UNFINISHED),
    )

    op.drop_index("ix_resync_items_run_status", table_name="resync_items")
    op.drop_constraint(op.f("ck_resync_items_status"), "resync_items", type_="check")
    op.add_column(
        "resync_items",
        sa.Column("wave", sa.Integer(), server_default=sa.text("1"), nullable=False),
    )
    op.add_column("resync_items", sa.Column("reason", sa.Text(), nullable=True))
    op.add_column(
        "resync_items", sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_check_constraint(op.f("ck_resync_items_status"), "resync_items", ITEM_STATUSES)
    op.create_index(
        "ix_resync_items_run_wave",
        "resync_items",
        ["run_id", "wave", "install_id"],
        unique=False,
        postgresql_include=["status"],
    )
    op.create_index(
        "ix_resync_items_pending",
        "resync_items",
        ["run_id", "wave", "id"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.execute("""
        WITH stopped AS (
            UPDATE resync_runs r
            SET finished_at = coalesce(r.finished_at, now()), status = 'failed'
            FROM (SELECT id, status AS was FROM resync_runs
                  WHERE status IN ('scheduled', 'baking', 'halted', 'paused', 'cancelled')) old
            WHERE r.id = old.id
            RETURNING r.id, old.was)
        UPDATE resync_items i
        SET status = 'failed', finished_at = coalesce(i.finished_at, now()),
            error = 'not run: the run was ' || (SELECT was FROM stopped WHERE id = i.run_id)
                    || ' when the database was migrated down'
        WHERE i.status = 'pending' AND i.run_id IN (SELECT id FROM stopped)""")
    op.execute("""
        UPDATE resync_items SET status = 'failed',
               error = coalesce(error, status || ': ' || coalesce(reason, status))
        WHERE status IN ('skipped', 'cancelled')""")
    op.drop_index(
        "ix_resync_items_pending",
        table_name="resync_items",
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_index("ix_resync_items_run_wave", table_name="resync_items")
    op.drop_constraint(op.f("ck_resync_items_status"), "resync_items", type_="check")
    op.drop_column("resync_items", "claimed_at")
    op.drop_column("resync_items", "reason")
    op.drop_column("resync_items", "wave")
    op.create_check_constraint(op.f("ck_resync_items_status"), "resync_items", OLD_ITEM_STATUSES)
    op.create_index(
        "ix_resync_items_run_status", "resync_items", ["run_id", "status"], unique=False
    )

    op.drop_index(
        "uq_resync_runs_in_progress",
        table_name="resync_runs",
        postgresql_where=sa.text(UNFINISHED),
    )
    for name in ("status", "max_conflict_rate", "max_failure_rate", "bake_seconds"):
        op.drop_constraint(op.f(f"ck_resync_runs_{name}"), "resync_runs", type_="check")
    for column in (
        "halt_reason",
        "next_step_at",
        "current_wave",
        "wave_count",
        "start_at",
        "bake_seconds",
        "max_failure_rate",
        "max_conflict_rate",
        "include_pinned",
        "selection",
    ):
        op.drop_column("resync_runs", column)
    op.create_check_constraint(op.f("ck_resync_runs_status"), "resync_runs", OLD_RUN_STATUSES)
    op.create_index(
        "uq_resync_runs_in_progress",
        "resync_runs",
        ["template_agent_id"],
        unique=True,
        postgresql_where=sa.text(OLD_UNFINISHED),
    )

    op.drop_constraint(op.f("fk_agents_pinned_by_user_id"), "agents", type_="foreignkey")
    for column in ("pinned_by_user_id", "pin_reason", "pinned_until", "pinned_at"):
        op.drop_column("agents", column)
