"""Prometheus metrics of the service's own work, and the `/metrics` endpoint.

HTTP request metrics come from Litestar's Prometheus middleware, labelled by route template
(`/api/v1/installs/{install_id}/history`), never by raw path, so ids and slugs cannot grow
the number of series. The gauges below are read when `/metrics` is scraped: the connection
pool from the engine, the job queue and resync progress from the database in one statement.
"""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Controller, Response, get
from litestar.datastructures import State
from litestar.enums import MediaType
from litestar.openapi.datastructures import ResponseSpec
from litestar.plugins.prometheus import PrometheusConfig
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram
from prometheus_client import generate_latest as exposition
from sqlalchemy import text

from install_service.logs import get_logger
from install_service.states import UNFINISHED, sql_list

log = get_logger("install_service.metrics")

INSTALLS = Counter(
    "install_service_installs",
    "Install, upgrade, rollback and uninstall requests by outcome",
    ["action", "outcome"],
)
INSTALL_SECONDS = Histogram(
    "install_service_install_seconds",
    "Time to run one install through the engine, commit included",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RESYNC_ITEMS = Counter(
    "install_service_resync_items",
    "Resync items finished, by status",
    ["status"],
)
WEBHOOK_ATTEMPTS = Counter(
    "install_service_webhook_attempts",
    "Webhook delivery attempts by outcome (succeeded, failed, redelivered)",
    ["outcome"],
)
POOL_CHECKED_OUT = Gauge(
    "install_service_db_pool_checked_out", "Database connections in use by this process"
)
POOL_SIZE = Gauge(
    "install_service_db_pool_size", "Database connections the pool keeps (overflow excluded)"
)
JOBS = Gauge("install_service_jobs", "Background jobs in the queue, by status", ["status"])
RESYNC_RUNS = Gauge(
    "install_service_resync_runs_in_progress", "Resync runs not finished yet, by status", ["status"]
)
RESYNC_PENDING = Gauge(
    "install_service_resync_items_pending", "Items of unfinished resync runs still to do"
)

JOB_STATUSES = ("todo", "doing", "succeeded", "failed", "cancelled", "aborting", "aborted")
_QUEUE_STATE = text(f"""
    SELECT (SELECT coalesce(jsonb_object_agg(status, n), '{{}}') FROM (
                SELECT status::text, count(*) AS n FROM procrastinate_jobs GROUP BY status) j)
               AS jobs,
           (SELECT coalesce(jsonb_object_agg(status, n), '{{}}') FROM (
                SELECT status, count(*) AS n FROM resync_runs
                WHERE status IN {sql_list(UNFINISHED)} GROUP BY status) r) AS runs,
           (SELECT count(*) FROM resync_items i JOIN resync_runs r ON r.id = i.run_id
            WHERE r.status IN {sql_list(UNFINISHED)} AND i.status = 'pending') AS pending""")  # noqa: S608


def http_metrics() -> PrometheusConfig:
    """Litestar's request metrics, one series per route template."""
    return PrometheusConfig(app_name="install_service", prefix="install_service", group_path=True)


async def refresh_gauges(state: State) -> None:
    """Read the pool, queue and resync gauges now. A database that does not answer within
    two seconds leaves the database gauges as they were (the scrape itself still works)."""
    pool: Any = state.engine.sync_engine.pool
    POOL_CHECKED_OUT.set(pool.checkedout())
    POOL_SIZE.set(pool.size())
    try:
        async with state.engine.connect() as conn:
            row = (await asyncio.wait_for(conn.execute(_QUEUE_STATE), timeout=2)).one()
    except Exception as exc:
        log.warning("metrics: database gauges not refreshed", error=repr(exc))
        return
    for status in JOB_STATUSES:
        JOBS.labels(status).set(row.jobs.get(status, 0))
    for status in UNFINISHED:
        RESYNC_RUNS.labels(status).set(row.runs.get(status, 0))
    RESYNC_PENDING.set(row.pending)


class MetricsController(Controller):
    path = "/metrics"
    tags = ("health",)

    @get(
        operation_id="getMetrics",
        summary="Prometheus metrics",
        media_type=MediaType.TEXT,
        security=[],
        responses={
            200: ResponseSpec(
                str,
                description="Prometheus text exposition format",
                media_type=CONTENT_TYPE_LATEST,
                generate_examples=False,
            )
        },
    )
    async def metrics(self, state: State) -> Response[bytes]:
        await refresh_gauges(state)
        return Response(exposition(REGISTRY), media_type=CONTENT_TYPE_LATEST)
