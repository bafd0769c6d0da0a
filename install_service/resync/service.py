"""Resync runs in the database: start, claim-and-process one org, finish, retry, report.

A run has one item per active install. Each item is processed in its own transaction that
first claims the item row (`FOR UPDATE SKIP LOCKED`), then runs the install engine, then records
the outcome. A worker that dies mid-item takes its transaction with it: the org is untouched,
the item is still `pending` and unlocked, and the next worker to look claims it. Two workers
never process one item, because the claim is a row lock held until the outcome is committed.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service import metrics
from install_service.audit import service as audit
from install_service.errors import Conflict, InstallConflict, InstallServiceError, NotFound
from install_service.installs import service as installs
from install_service.orgs.actor import SYSTEM, Actor
from install_service.orgs.schemas import OrgRef
from install_service.pagination import Keyset, PageRequest
from install_service.releases import get_release
from install_service.resync.schemas import (
    ResyncItem,
    ResyncRun,
    RunCounts,
    RunPage,
    RunSummary,
    RunTimeline,
    TimelinePoint,
)

FINISHED = ("succeeded", "partial", "failed")


async def start_run(
    session: AsyncSession,
    actor: Actor,
    template: str,
    *,
    version: int | None = None,
    force: bool = False,
) -> ResyncRun:
    """Create a run with one pending item per active install, or join the run in progress.

    A template has at most one unfinished run (a partial unique index); a second request
    while one is queued or running gets that run back with `created: false`.
    """
    release = await get_release(session, actor, template, version)
    run_id: uuid.UUID | None = await session.scalar(
        text("""
            INSERT INTO resync_runs (template_agent_id, release_id, force, requested_by_user_id)
            VALUES (:agent, :release, :force, :actor)
            ON CONFLICT (template_agent_id) WHERE status IN ('queued', 'running') DO NOTHING
            RETURNING id"""),
        {
            "agent": release["template_agent_id"],
            "release": release["id"],
            "force": force,
            "actor": actor.user_id,
        },
    )
    if run_id is None:
        existing = await session.scalar(
            text("""SELECT id FROM resync_runs
                    WHERE template_agent_id = :agent AND status IN ('queued', 'running')"""),
            {"agent": release["template_agent_id"]},
        )
        return await get_run(session, existing, created=False)
    await audit.record(
        session,
        actor=actor.user_id,
        action="resync.started",
        target_type="resync_run",
        target_id=run_id,
        details={"template": template, "version": release["version"], "force": force},
    )
    await session.execute(
        text("""
            WITH items AS (
                INSERT INTO resync_items (run_id, install_id, organization_id)
                SELECT :run, a.id, a.organization_id FROM agents a
                WHERE a.template_agent_id = :agent AND a.status = 'active'
                RETURNING 1)
            -- nothing to do is already done
            UPDATE resync_runs SET status = 'succeeded', started_at = now(), finished_at = now()
            WHERE id = :run AND NOT EXISTS (SELECT 1 FROM items)"""),
        {"run": run_id, "agent": release["template_agent_id"]},
    )
    return await get_run(session, run_id, created=True)


async def get_run(session: AsyncSession, run_id: uuid.UUID, *, created: bool = False) -> ResyncRun:
    """A run with its counts and every item that has not succeeded."""
    row = (
        await session.execute(
            text("""
                SELECT r.id, o.slug AS template, rel.version, r.force, r.status, r.created_at,
                       r.started_at, r.finished_at,
                       (SELECT jsonb_object_agg(status, n) FROM (
                            SELECT status, count(*) AS n FROM resync_items
                            WHERE run_id = r.id GROUP BY status) c) AS counts
                FROM resync_runs r
                JOIN template_releases rel ON rel.id = r.release_id
                JOIN agents t ON t.id = r.template_agent_id
                JOIN organizations o ON o.id = t.organization_id
                WHERE r.id = :run"""),
            {"run": run_id},
        )
    ).first()
    if row is None:
        raise NotFound(f"resync run {run_id} not found", code="resync_run_not_found")
    counts = {s: 0 for s in ("pending", "succeeded", "conflict", "failed")} | (row.counts or {})
    items = await session.execute(
        text("""
            SELECT i.organization_id, o.slug, i.install_id, i.status, i.attempts, i.conflicts,
                   i.error, i.finished_at
            FROM resync_items i JOIN organizations o ON o.id = i.organization_id
            WHERE i.run_id = :run AND i.status <> 'succeeded'
            ORDER BY o.slug"""),
        {"run": run_id},
    )
    return ResyncRun(
        id=row.id,
        template=row.template,
        version=row.version,
        force=row.force,
        status=row.status,
        created=created,
        counts=RunCounts(total=sum(counts.values()), **counts),
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        items=[
            ResyncItem(
                organization=OrgRef(id=i.organization_id, slug=i.slug),
                install_id=i.install_id,
                status=i.status,
                attempts=i.attempts,
                conflicts=i.conflicts,
                error=i.error,
                finished_at=i.finished_at,
            )
            for i in items
        ],
    )


async def mark_running(session: AsyncSession, run_id: uuid.UUID) -> bool:
    """Move a queued run to running; False when it has nothing left to do."""
    status = await session.scalar(
        text("""
            UPDATE resync_runs SET status = 'running', started_at = coalesce(started_at, now())
            WHERE id = :run AND status IN ('queued', 'running')
            RETURNING status"""),
        {"run": run_id},
    )
    return status is not None


async def process_next_item(session: AsyncSession, run_id: uuid.UUID, *, worker: str) -> bool:
    """Claim one pending item of the run and move its org to the run's release.

    Returns False when no item is left to claim. The install runs in a savepoint so a conflict
    or failure rolls back the org's changes while the claim and its outcome are kept.
    """
    item = (
        await session.execute(
            text("""
                SELECT i.id, i.organization_id, o.slug AS template, rel.version, r.force,
                       r.requested_by_user_id
                FROM resync_items i
                JOIN resync_runs r ON r.id = i.run_id
                JOIN template_releases rel ON rel.id = r.release_id
                JOIN agents t ON t.id = r.template_agent_id
                JOIN organizations o ON o.id = t.organization_id
                WHERE i.run_id = :run AND i.status = 'pending'
                ORDER BY i.id LIMIT 1
                FOR UPDATE OF i SKIP LOCKED"""),
            {"run": run_id},
        )
    ).first()
    if item is None:
        return False
    actor = Actor(user_id=item.requested_by_user_id, is_platform_admin=True)
    outcome: dict[str, Any] = {"status": "succeeded", "conflicts": None, "error": None}
    try:
        async with session.begin_nested():
            await installs.install(
                session,
                actor,
                template=item.template,
                organization=str(item.organization_id),
                version=item.version,
                force=item.force,
            )
    except InstallConflict as exc:
        outcome = {"status": "conflict", "conflicts": exc.conflicts, "error": exc.detail}
    except InstallServiceError as exc:
        outcome = {"status": "failed", "conflicts": None, "error": f"{exc.code}: {exc.detail}"}
    except Exception as exc:  # one org's failure must not stop the run
        outcome = {"status": "failed", "conflicts": None, "error": f"{type(exc).__name__}: {exc}"}
    await session.execute(
        text("""
            UPDATE resync_items SET status = :status, conflicts = CAST(:conflicts AS jsonb),
                   error = :error, attempts = attempts + 1, worker = :worker, finished_at = now()
            WHERE id = :id"""),
        {
            **outcome,
            "conflicts": msgspec.json.encode(outcome["conflicts"]).decode()
            if outcome["conflicts"] is not None
            else None,
            "id": item.id,
            "worker": worker,
        },
    )
    metrics.RESYNC_ITEMS.labels(outcome["status"]).inc()
    return True


async def finish_if_done(session: AsyncSession, run_id: uuid.UUID) -> str | None:
    """Close the run once no item is pending: succeeded, partial, or failed (none succeeded).

    Each worker calls this after committing its last item, so the last one to finish sees
    every other item's outcome and closes the run."""
    status: str | None = await session.scalar(
        text("""
            WITH counts AS (
                SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                       count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                       count(*) AS total
                FROM resync_items WHERE run_id = :run)
            UPDATE resync_runs r SET finished_at = now(), status = CASE
                    WHEN c.succeeded = c.total THEN 'succeeded'
                    WHEN c.succeeded = 0 THEN 'failed'
                    ELSE 'partial' END
            FROM counts c
            WHERE r.id = :run AND r.status IN ('queued', 'running') AND c.pending = 0
            RETURNING r.status"""),
        {"run": run_id},
    )
    return status


async def retry_run(
    session: AsyncSession, run_id: uuid.UUID, *, actor: Actor = SYSTEM
) -> ResyncRun:
    """Queue a finished run's conflicted and failed items again; succeeded ones stay done."""
    status = await session.scalar(
        text("SELECT status FROM resync_runs WHERE id = :run FOR UPDATE"), {"run": run_id}
    )
    if status is None:
        raise NotFound(f"resync run {run_id} not found", code="resync_run_not_found")
    if status not in FINISHED:
        raise Conflict(f"resync run {run_id} is still {status}", code="resync_run_in_progress")
    template_busy = await session.scalar(
        text("""SELECT EXISTS (SELECT 1 FROM resync_runs o JOIN resync_runs r
                                ON r.template_agent_id = o.template_agent_id
                WHERE r.id = :run AND o.id <> r.id AND o.status IN ('queued', 'running'))"""),
        {"run": run_id},
    )
    if template_busy:
        raise Conflict(
            "another resync of this template is in progress", code="resync_run_in_progress"
        )
    requeued = await session.scalar(
        text("""
            WITH requeued AS (
                UPDATE resync_items SET status = 'pending', finished_at = NULL
                WHERE run_id = :run AND status IN ('conflict', 'failed') RETURNING 1),
            run AS (
                UPDATE resync_runs SET status = 'queued', finished_at = NULL
                WHERE id = :run AND EXISTS (SELECT 1 FROM requeued))
            SELECT count(*) FROM requeued"""),
        {"run": run_id},
    )
    if requeued:
        await audit.record(
            session,
            actor=actor.user_id,
            action="resync.retried",
            target_type="resync_run",
            target_id=run_id,
            details={"items": requeued},
        )
    return await get_run(session, run_id)


async def unfinished_runs(session: AsyncSession) -> list[uuid.UUID]:
    """Runs that still have work: resumed when a worker starts and every minute."""
    rows = await session.execute(
        text("SELECT id FROM resync_runs WHERE status IN ('queued', 'running') ORDER BY created_at")
    )
    return list(rows.scalars())


_RUNS = Keyset("resync_runs", (datetime, uuid.UUID))


async def list_runs(
    session: AsyncSession, page: PageRequest, *, template: str | None = None
) -> RunPage:
    """Runs, newest first (optionally of one template), each with its counts."""
    rows = await session.execute(
        text("""
            SELECT r.id, o.slug AS template, rel.version, r.force, r.status, r.created_at,
                   r.started_at, r.finished_at,
                   (SELECT jsonb_object_agg(status, n) FROM (
                        SELECT status, count(*) AS n FROM resync_items
                        WHERE run_id = r.id GROUP BY status) c) AS counts
            FROM resync_runs r
            JOIN template_releases rel ON rel.id = r.release_id
            JOIN agents t ON t.id = r.template_agent_id
            JOIN organizations o ON o.id = t.organization_id
            WHERE (CAST(:template AS text) IS NULL OR o.slug = :template)
              AND (CAST(:after_0 AS timestamptz) IS NULL
                   OR (r.created_at, r.id) < (:after_0, CAST(:after_1 AS uuid)))
            ORDER BY r.created_at DESC, r.id DESC LIMIT :limit_plus_one"""),
        {"template": template, **_RUNS.params(page)},
    )
    runs = [
        RunSummary(
            id=r.id,
            template=r.template,
            version=r.version,
            force=r.force,
            status=r.status,
            counts=_counts(r.counts),
            created_at=r.created_at,
            started_at=r.started_at,
            finished_at=r.finished_at,
        )
        for r in rows
    ]
    return _RUNS.page(RunPage, runs, page, lambda r: (r.created_at, r.id))


def _counts(by_status: dict[str, int] | None) -> RunCounts:
    counts = {s: 0 for s in ("pending", "succeeded", "conflict", "failed")} | (by_status or {})
    return RunCounts(total=sum(counts.values()), **counts)


async def timeline(session: AsyncSession, run_id: uuid.UUID, *, points: int = 24) -> RunTimeline:
    """How many items had succeeded, conflicted or failed at `points` evenly spaced moments
    from the run's start to its end (now, while it runs): the run's outcomes over time."""
    rows = (
        await session.execute(
            text("""
                WITH run AS (
                    SELECT id, coalesce(started_at, created_at) AS start,
                           greatest(coalesce(finished_at, now()),
                                    coalesce(started_at, created_at)) AS stop
                    FROM resync_runs WHERE id = :run),
                moments AS (
                    SELECT run.id, run.start + (run.stop - run.start) * n / :last AS at
                    FROM run, generate_series(0, :last) AS n)
                SELECT m.at,
                       count(i.id) FILTER (WHERE i.status = 'succeeded') AS succeeded,
                       count(i.id) FILTER (WHERE i.status = 'conflict') AS conflict,
                       count(i.id) FILTER (WHERE i.status = 'failed') AS failed,
                       (SELECT count(*) FROM resync_items WHERE run_id = m.id) AS total
                FROM moments m
                LEFT JOIN resync_items i ON i.run_id = m.id AND i.finished_at <= m.at
                GROUP BY m.id, m.at ORDER BY m.at"""),
            {"run": run_id, "last": max(points - 1, 1)},
        )
    ).all()
    if not rows:
        raise NotFound(f"resync run {run_id} not found", code="resync_run_not_found")
    return RunTimeline(
        run_id=run_id,
        total=rows[0].total,
        points=[
            TimelinePoint(at=r.at, succeeded=r.succeeded, conflict=r.conflict, failed=r.failed)
            for r in rows
        ],
    )
