"""Change feed, webhooks and the watcher runtime state.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 12:00

Reviewed by hand.
- `events`: the outbox every lifecycle operation appends to in its own transaction.
  Append-only in the database (UPDATE, DELETE and TRUNCATE are refused). A BEFORE INSERT
  trigger sets `txid` to the greater of the writing transaction's id and the largest `txid`
  it can see, so a reader that only returns events below the oldest running transaction
  (`pg_snapshot_xmin`) never has an event commit behind its cursor, and an operation that
  waited for another (a row lock) is always ordered after it. An AFTER INSERT trigger
  notifies `install_service_events` (delivered at commit, never for a rollback), records a
  delivery for every enabled webhook endpoint the event matches, and queues a
  `webhooks:deliver` job for its lane on procrastinate's queue unless one is already waiting
  (its `queueing_lock`), in that same transaction.
- `webhook_endpoints`, `webhook_deliveries`, `webhook_attempts`.
- `watchers.next_run_at` follows the schedule: a BEFORE INSERT OR UPDATE trigger clears it
  when the watcher stops being scheduled (archived, disabled, no schedule) and when it starts
  being scheduled or its schedule changes (reactivation, an upgrade, an edit made outside the
  service); the service then computes it from the cron schedule (a partial index finds
  those rows). Existing rows keep their value; unscheduled ones are computed by the worker.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EVENT_TYPES = (
    "install.created",
    "install.upgraded",
    "install.rolled_back",
    "install.reinstalled",
    "install.uninstalled",
    "install.reconciled",
    "install.item_detached",
    "template.published",
)
UNSCHEDULED = (
    "next_run_at IS NULL AND status = 'active' AND schedule_enabled AND schedule IS NOT NULL"
)

# One statement each: the driver runs a statement at a time.
TRIGGERS = (
    """
    CREATE FUNCTION events_order() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        -- Never below the writer's own transaction id (readers stop at the oldest running
        -- one), never below an event the writer can already see (what it waited for).
        NEW.txid := greatest(
            CAST(CAST(pg_current_xact_id() AS text) AS bigint),
            coalesce((SELECT max(txid) FROM events), 0));
        RETURN NEW;
    END
    $$""",
    """
    CREATE TRIGGER events_order BEFORE INSERT ON events
        FOR EACH ROW EXECUTE FUNCTION events_order()""",
    """
    CREATE FUNCTION events_publish() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('install_service_events', NEW.organization_id::text);
        -- A delivery per endpoint that wants the event, and a job for its lane (endpoint,
        -- organization) unless one is already waiting: the job sends the lane in order.
        WITH deliveries AS (
            INSERT INTO webhook_deliveries (endpoint_id, event_id, organization_id,
                                            event_txid, event_seq)
            SELECT w.id, NEW.id, NEW.organization_id, NEW.txid, NEW.seq
            FROM webhook_endpoints w
            WHERE w.enabled
              AND (w.event_types IS NULL OR NEW.type = ANY (w.event_types))
              AND (w.organization_ids IS NULL OR NEW.organization_id = ANY (w.organization_ids))
            RETURNING endpoint_id)
        INSERT INTO procrastinate_jobs (queue_name, task_name, queueing_lock, args)
        SELECT 'webhooks', 'webhooks:deliver',
               'webhooks:' || endpoint_id || ':' || NEW.organization_id,
               jsonb_build_object('endpoint_id', endpoint_id,
                                  'organization_id', NEW.organization_id)
        FROM deliveries
        ON CONFLICT (queueing_lock) WHERE status = 'todo' DO NOTHING;
        RETURN NULL;
    END
    $$""",
    """
    CREATE TRIGGER events_publish AFTER INSERT ON events
        FOR EACH ROW EXECUTE FUNCTION events_publish()""",
    """
    CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
        FOR EACH ROW EXECUTE FUNCTION refuse_append_only_change()""",
    """
    CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
        FOR EACH STATEMENT EXECUTE FUNCTION refuse_append_only_change()""",
    """
    CREATE FUNCTION watchers_next_run() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT'
           OR NEW.status <> 'active' OR NOT NEW.schedule_enabled OR NEW.schedule IS NULL
           OR OLD.status <> 'active' OR NOT OLD.schedule_enabled
           OR OLD.schedule IS DISTINCT FROM NEW.schedule THEN
            NEW.next_run_at := NULL;
        END IF;
        RETURN NEW;
    END
    $$""",
    """
    CREATE TRIGGER watchers_next_run BEFORE INSERT OR UPDATE ON watchers
        FOR EACH ROW EXECUTE FUNCTION watchers_next_run()""",
)


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.Column("secret", sa.String(length=100), nullable=False),
        sa.Column("event_types", postgresql.ARRAY(sa.String(length=60)), nullable=True),
        sa.Column("organization_ids", postgresql.ARRAY(sa.UUID()), nullable=True),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "consecutive_failures", sa.Integer(), server_default=sa.text("0"), nullable=False
        ),
        sa.Column("created_by_user_id", sa.UUID(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["created_by_user_id"],
            ["users.id"],
            name=op.f("fk_webhook_endpoints_created_by_user_id"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_endpoints")),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("txid", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("type", sa.String(length=60), nullable=False),
        sa.Column("organization_id", sa.UUID(), nullable=False),
        sa.Column("install_id", sa.UUID(), nullable=True),
        sa.Column(
            "occurred_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "data",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "type IN (" + ", ".join(f"'{t}'" for t in EVENT_TYPES) + ")",
            name=op.f("ck_events_type"),
        ),
        sa.ForeignKeyConstraint(["install_id"], ["agents.id"], name=op.f("fk_events_install_id")),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organizations.id"], name=op.f("fk_events_organization_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(
        "ix_events_organization_order", "events", ["organization_id", "txid", "seq"], unique=False
    )
    op.create_index("uq_events_order", "events", ["txid", "seq"], unique=True)
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("endpoint_id", sa.UUID(), nullable=False),
        sa.Column("event_id", sa.UUID(), nullable=False),
        sa.Column("organization_id", sa.UUID(), nullable=False),
        sa.Column("event_txid", sa.BigInteger(), nullable=False),
        sa.Column("event_seq", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=20), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'succeeded', 'failed')",
            name=op.f("ck_webhook_deliveries_status"),
        ),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_webhook_deliveries_endpoint_id"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_webhook_deliveries_event_id")
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_webhook_deliveries_organization_id"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint(
            "endpoint_id", "event_id", name=op.f("uq_webhook_deliveries_endpoint_id_event_id")
        ),
    )
    op.create_index(
        "ix_webhook_deliveries_endpoint_created",
        "webhook_deliveries",
        ["endpoint_id", "created_at", "id"],
        unique=False,
    )
    op.create_index(
        "ix_webhook_deliveries_lane",
        "webhook_deliveries",
        ["endpoint_id", "organization_id", "event_txid", "event_seq"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        op.f("ix_webhook_deliveries_organization_id"),
        "webhook_deliveries",
        ["organization_id"],
        unique=False,
    )
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("delivery_id", sa.UUID(), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("succeeded", sa.Boolean(), nullable=False),
        sa.Column("redelivery", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["webhook_deliveries.id"],
            name=op.f("fk_webhook_attempts_delivery_id"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_attempts")),
    )
    op.create_index(
        op.f("ix_webhook_attempts_delivery_id"), "webhook_attempts", ["delivery_id"], unique=False
    )
    op.create_index(
        "ix_watchers_unscheduled",
        "watchers",
        ["organization_id"],
        unique=False,
        postgresql_where=sa.text(UNSCHEDULED),
    )
    for statement in TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TRIGGER watchers_next_run ON watchers")
    op.execute("DROP FUNCTION watchers_next_run()")
    op.drop_index("ix_watchers_unscheduled", table_name="watchers")
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_deliveries")
    op.drop_table("events")  # its triggers go with it
    op.execute("DROP FUNCTION events_publish()")
    op.execute("DROP FUNCTION events_order()")
    op.drop_table("webhook_endpoints")
