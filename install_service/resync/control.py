"""What admins do to runs: pause, resume, cancel, retry.

Every call locks the run's row first (`FOR UPDATE`) and then changes it or changes nothing,
so concurrent calls, and the workers' own transitions (which take the same lock), apply one
after the other, never on a state read before another changed it; a call that would change
nothing writes nothing (no audit row either). Workers never lock the run's row while they
upgrade an org, so these calls never wait for an install.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.actor import SYSTEM, Actor
from install_service.audit import service as audit
from install_service.errors import Conflict, NotFound
from install_service.resync.schemas import ResyncRun
from install_service.resync.service import get_run
from install_service.states import FINISHED, UNFINISHED, sql_list


async def _lock(session: AsyncSession, run_id: uuid.UUID) -> Any:
    """The run's row, locked until the transaction ends (404 when there is none)."""
    row = (
        await session.execute(
            text("""SELECT id, template_agent_id, status, halt_reason FROM resync_runs
                    WHERE id = :run FOR UPDATE"""),
            {"run": run_id},
        )
    ).first()
    if row is None:
        raise NotFound(f"resync run {run_id} not found", code="resync_run_not_found")
    return row


def _finished(run_id: uuid.UUID, status: str, action: str) -> Conflict:
    return Conflict(
        f"resync run {run_id} is {status}: a finished run cannot be {action}",
        code="resync_run_finished",
    )


async def _audit(
    session: AsyncSession, actor: Actor, action: str, run_id: uuid.UUID, **details: Any
) -> None:
    await audit.record(
        session,
        actor=actor.user_id,
        action=f"resync.{action}",
        target_type="resync_run",
        target_id=run_id,
        details=details,
    )


async def pause(session: AsyncSession, run_id: uuid.UUID, *, actor: Actor = SYSTEM) -> ResyncRun:
    """Claim no new item (items already claimed finish). A paused or halted run stays as it
    is; a finished run is a 409."""
    run = await _lock(session, run_id)
    if run.status in FINISHED:
        raise _finished(run_id, run.status, "paused")
    if run.status not in ("paused", "halted"):
        await session.execute(
            text("UPDATE resync_runs SET status = 'paused' WHERE id = :run"), {"run": run_id}
        )
        await _audit(session, actor, "paused", run_id, was=run.status)
    return await get_run(session, run_id)


async def resume(session: AsyncSession, run_id: uuid.UUID, *, actor: Actor = SYSTEM) -> ResyncRun:
    """Continue a paused or halted run where it was: scheduled or baking again if its time has
    not come, else queued (never started) or running. A halted run goes on with the wave
    after the one that halted it, without checking that wave again. A run that is not
    stopped stays as it is; a finished run is a 409."""
    run = await _lock(session, run_id)
    if run.status in FINISHED:
        raise _finished(run_id, run.status, "resumed")
    if run.status in ("paused", "halted"):
        await session.execute(
            text("""
                UPDATE resync_runs SET
                    status = CASE WHEN next_step_at > now() THEN
                                      CASE WHEN started_at IS NULL THEN 'scheduled'
                                           ELSE 'baking' END
                                  WHEN started_at IS NULL THEN 'queued'
                                  ELSE 'running' END,
                    next_step_at = CASE WHEN next_step_at > now() THEN next_step_at END,
                    halt_reason = NULL
                WHERE id = :run"""),
            {"run": run_id},
        )
        await _audit(session, actor, "resumed", run_id, was=run.status, halt_reason=run.halt_reason)
    return await get_run(session, run_id)


async def cancel(session: AsyncSession, run_id: uuid.UUID, *, actor: Actor = SYSTEM) -> ResyncRun:
    """Stop for good: pending items become `cancelled` (items already claimed finish, and
    orgs already moved stay as they are). Cancelling again is a no-op; a run that succeeded,
    is partial or failed is a 409."""
    run = await _lock(session, run_id)
    if run.status == "cancelled":
        return await get_run(session, run_id)
    if run.status in FINISHED:
        raise _finished(run_id, run.status, "cancelled")
    await session.execute(
        text("""
            UPDATE resync_runs SET status = 'cancelled', finished_at = now(), next_step_at = NULL
            WHERE id = :run"""),
        {"run": run_id},
    )
    cancelled = await cancel_pending(session, run_id)
    await _audit(session, actor, "cancelled", run_id, was=run.status, items=cancelled)
    return await get_run(session, run_id)


async def cancel_pending(session: AsyncSession, run_id: uuid.UUID | None = None) -> int:
    """Mark the pending items of a cancelled run (`None`: of every cancelled run) cancelled.
    Items a worker holds are left to it; once it is done (or dead) the next call gets them."""
    return (
        await session.scalar(
            text("""
                WITH cancelled AS (
                    UPDATE resync_items SET status = 'cancelled', reason = 'cancelled',
                                            finished_at = clock_timestamp()
                    WHERE id IN (
                        SELECT i.id FROM resync_items i
                        WHERE i.status = 'pending'
                          AND i.run_id IN (SELECT id FROM resync_runs WHERE status = 'cancelled'
                                           AND (CAST(:run AS uuid) IS NULL OR id = :run))
                        FOR UPDATE SKIP LOCKED)
                    RETURNING 1)
                SELECT count(*) FROM cancelled"""),
            {"run": run_id},
        )
        or 0
    )


async def retry_run(
    session: AsyncSession, run_id: uuid.UUID, *, actor: Actor = SYSTEM
) -> ResyncRun:
    """Queue a finished run's conflicted and failed items again, from the first wave that has
    one; its other items stay as they are. A 409 while the run, or another run of its
    template, is unfinished. Nothing to retry changes nothing."""
    run = await _lock(session, run_id)
    if run.status not in FINISHED:
        raise Conflict(f"resync run {run_id} is still {run.status}", code="resync_run_in_progress")
    other = await session.scalar(
        text(f"""SELECT id FROM resync_runs WHERE template_agent_id = :agent AND id <> :run
                 AND status IN {sql_list(UNFINISHED)}"""),  # noqa: S608
        {"agent": run.template_agent_id, "run": run_id},
    )
    if other is not None:
        raise _busy(other)
    try:
        async with session.begin_nested():
            requeued = (
                await session.execute(
                    text("""
                        WITH requeued AS (
                            UPDATE resync_items SET status = 'pending', reason = NULL,
                                                    claimed_at = NULL, finished_at = NULL
                            WHERE run_id = :run AND status IN ('conflict', 'failed')
                            RETURNING wave),
                        run AS (
                            UPDATE resync_runs SET status = 'queued', finished_at = NULL,
                                                   halt_reason = NULL, next_step_at = NULL,
                                                   current_wave = (SELECT min(wave) FROM requeued)
                            WHERE id = :run AND EXISTS (SELECT 1 FROM requeued))
                        SELECT count(*) AS n FROM requeued"""),
                    {"run": run_id},
                )
            ).scalar_one()
    except IntegrityError as exc:  # another run of the template started meanwhile
        other = await session.scalar(
            text(f"""SELECT id FROM resync_runs WHERE template_agent_id = :agent
                     AND status IN {sql_list(UNFINISHED)}"""),  # noqa: S608
            {"agent": run.template_agent_id},
        )
        raise _busy(other) from exc
    if requeued:
        await _audit(session, actor, "retried", run_id, items=requeued)
    return await get_run(session, run_id)


def _busy(other: uuid.UUID | None) -> Conflict:
    return Conflict(
        f"another resync of this template is in progress: run {other}",
        code="resync_run_in_progress",
        run_id=str(other) if other else None,
    )
