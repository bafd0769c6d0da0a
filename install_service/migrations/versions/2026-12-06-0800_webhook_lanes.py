"""Webhook deliveries leave the job queue: each worker process works many lanes at once.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 08:00

Reviewed by hand. An event's transaction still records a delivery for every enabled endpoint
that wants the event, in that transaction; instead of queueing a `webhooks:deliver` job per
lane on procrastinate's queue (an insert, and procrastinate's own triggers, per lane and
event), it notifies `install_service_webhooks` with each lane (`<endpoint id> <organization
id>`). PostgreSQL delivers the notification at commit, never for a rollback. Every worker
process's dispatcher listens, leases the next delivery of many lanes in one statement and
records many attempts in one (see `install_service/events/dispatcher.py`); at its start, when
its listening connection comes back and every minute, it looks for every lane with a delivery
waiting, so a lane whose notification no worker heard is still sent.

Upgrading deletes the lane jobs still waiting in the queue (the dispatcher finds their lanes
by itself) and the periodic job that looked for lost lanes. Downgrading restores the trigger
and queues a lane job for every lane with a delivery waiting, so the older workers carry on
where the dispatcher stopped. Deliveries, their attempts and leases are untouched either way.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOTIFYING = """
    CREATE OR REPLACE FUNCTION events_publish() RETURNS trigger
    LANGUAGE plpgsql AS $$
    DECLARE
        lane record;
    BEGIN
        PERFORM pg_notify('install_service_events', NEW.organization_id::text);
        -- A delivery per endpoint that wants the event; the workers hear of its lane
        -- (endpoint, organization) when the event commits.
        FOR lane IN
            INSERT INTO webhook_deliveries (endpoint_id, event_id, organization_id,
                                            event_txid, event_seq)
            SELECT w.id, NEW.id, NEW.organization_id, NEW.txid, NEW.seq
            FROM webhook_endpoints w
            WHERE w.enabled
              AND (w.event_types IS NULL OR NEW.type = ANY (w.event_types))
              AND (w.organization_ids IS NULL OR NEW.organization_id = ANY (w.organization_ids))
            RETURNING endpoint_id
        LOOP
            PERFORM pg_notify('install_service_webhooks',
                              lane.endpoint_id || ' ' || NEW.organization_id);
        END LOOP;
        RETURN NULL;
    END
    $$"""

QUEUEING = """
    CREATE OR REPLACE FUNCTION events_publish() RETURNS trigger
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
    $$"""


def upgrade() -> None:
    op.execute(NOTIFYING)
    op.execute("""
        DELETE FROM procrastinate_jobs
        WHERE task_name IN ('webhooks:deliver', 'webhooks:resume') AND status = 'todo'""")


def downgrade() -> None:
    op.execute(QUEUEING)
    op.execute("""
        INSERT INTO procrastinate_jobs (queue_name, task_name, queueing_lock, args)
        SELECT DISTINCT 'webhooks', 'webhooks:deliver',
               'webhooks:' || d.endpoint_id || ':' || d.organization_id,
               jsonb_build_object('endpoint_id', d.endpoint_id,
                                  'organization_id', d.organization_id)
        FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id
        WHERE d.status = 'pending' AND w.enabled
        ON CONFLICT (queueing_lock) WHERE status = 'todo' DO NOTHING""")
