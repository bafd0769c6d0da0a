"""What workers do to a run: start it, claim and process its items, close each wave.

**Items.** Each item is processed in its own transaction that first claims the item row
(`FOR UPDATE SKIP LOCKED`, only in the run's `current_wave` and only while the run is
`running`) and locks its install in the same statement, then checks it (uninstalled since the
run began, or pinned: `skipped`), then runs the install engine in a savepoint, then records
the outcome. A worker that dies mid-item takes its transaction with it: the org is
untouched, the item is still `pending` and unlocked, and the next worker to look claims it.
Two workers never process one item, because the claim is a row lock held until the outcome
is committed. The item transaction never locks the run's row, so control calls never wait
for an install.

**Waves.** A wave is closed by `close_wave`, in a transaction that locks the run's row and
only then counts the wave's items: when none is pending (none unclaimed, and none claimed by
a worker that has not committed, since a claimed item stays `pending` until its outcome
commits), the wave is finished; its rates are checked, and in the same transaction the run
moves `current_wave` on (running or baking), halts, or finishes. Claims read `current_wave`
and the status together, so no item of the next wave can be claimed before that transaction
commits, however many workers there are. Every worker that runs out of items calls it, so
the last one closes the wave; a worker that died before doing so is replaced by the next job
(at each worker start, and every minute).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service import metrics
from install_service.db.session import statement
from install_service.errors import InstallConflict, InstallServiceError
from install_service.installs import service as installs
from install_service.installs.pins import PINNED
from install_service.orgs.actor import Actor
from install_service.resync.states import ATTEMPTED, WAITING, WORKING, sql_list


@dataclass(frozen=True)
class Next:
    """What a run needs after a job: `work` (jobs to claim items now), `later` (a job at
    `at`), or `none` (no worker: stopped or finished)."""

    kind: Literal["work", "later", "none"]
    at: datetime | None = None


async def start(session: AsyncSession, run_id: uuid.UUID) -> Next:
    """Make the run `running` if it may run now: queued, or scheduled or baking and due."""
    moved = await session.scalar(
        text(f"""
            UPDATE resync_runs SET status = 'running', started_at = coalesce(started_at, now()),
                                   next_step_at = NULL
            WHERE id = :run AND (status = 'queued'
                                 OR (status IN {sql_list(WAITING)} AND next_step_at <= now()))
            RETURNING id"""),  # noqa: S608 (constants only)
        {"run": run_id},
    )
    if moved is not None:
        return Next("work")
    row = (
        await session.execute(
            text("SELECT status, next_step_at FROM resync_runs WHERE id = :run"), {"run": run_id}
        )
    ).first()
    return _next(row)


def next_for(status: str, next_step_at: datetime | None) -> Next:
    """What a run in `status` needs from workers."""
    if status in WORKING:
        return Next("work")
    if status in WAITING and next_step_at is not None:
        return Next("later", next_step_at)
    return Next("none")


def _next(row: Any) -> Next:
    return Next("none") if row is None else next_for(row.status, row.next_step_at)


# The next pending item of the run's current wave, if the run is running (claimed on its own,
# through the index of pending items, so a claim costs the same at the first item and the
# last), with what deciding it needs: its install, locked (an uninstall or a pin either
# committed before, and is seen here, or waits until the item is done), and the run's
# release. One round trip.
CLAIM_SQL = f"""
    WITH claimed AS MATERIALIZED (
        SELECT i.id, i.install_id, i.organization_id, clock_timestamp() AS claimed_at
        FROM resync_items i
        WHERE i.run_id = :run AND i.status = 'pending'
          AND i.wave = (SELECT x.current_wave FROM resync_runs x
                        WHERE x.id = :run AND x.status = 'running')
        ORDER BY i.wave, i.id LIMIT 1
        FOR UPDATE SKIP LOCKED)
    SELECT c.id, c.install_id, c.organization_id, c.claimed_at,
           a.status AS install_status, {PINNED} AS pinned, r.include_pinned,
           o.slug AS template, rel.version, r.force, r.requested_by_user_id
    FROM claimed c
    JOIN agents a ON a.id = c.install_id
    JOIN resync_runs r ON r.id = :run
    JOIN template_releases rel ON rel.id = r.release_id
    JOIN agents t ON t.id = r.template_agent_id
    JOIN organizations o ON o.id = t.organization_id
    FOR UPDATE OF a"""  # noqa: S608 (constants only)


async def claim(session: AsyncSession, run_id: uuid.UUID) -> Any:
    """Lock the next item of the run's current wave, and its install, until the transaction
    ends (None when there is none to claim: the wave is done or in other workers' hands, or
    the run is not running)."""
    return (await session.execute(statement(CLAIM_SQL), {"run": run_id})).first()


async def process_next_item(session: AsyncSession, run_id: uuid.UUID, *, worker: str) -> bool:
    """Claim one item of the run and process it; False when no item is left to claim."""
    item = await claim(session, run_id)
    if item is None:
        return False
    await process(session, item, worker=worker)
    return True


async def process(session: AsyncSession, item: Any, *, worker: str) -> None:
    """Move a claimed item's org to the run's release, or skip it, and record the outcome.

    The claim locked the install row before it is checked here, so an uninstall or a pin
    either committed before (the item is skipped) or waits until the item is done. The
    install runs in a savepoint so a conflict or failure rolls back the org's changes while
    the claim and its outcome are kept."""
    outcome: dict[str, Any] = {"status": "succeeded", "reason": None, "conflicts": None}
    outcome["error"] = None
    attempted = 0
    if item.install_status != "active":
        outcome.update(status="skipped", reason="uninstalled")
    elif item.pinned and not item.include_pinned:
        outcome.update(status="skipped", reason="pinned")
    else:
        attempted = 1
        actor = Actor(user_id=item.requested_by_user_id, is_platform_admin=True)
        savepoint = await session.begin_nested()
        try:
            result = await installs.install(
                session,
                actor,
                template=item.template,
                organization=str(item.organization_id),
                version=item.version,
                force=item.force,
            )
        except Exception as exc:  # one org's failure must not stop the run
            await savepoint.rollback()
            if isinstance(exc, InstallConflict):
                outcome.update(status="conflict", conflicts=exc.conflicts, error=exc.detail)
            elif isinstance(exc, InstallServiceError):
                outcome.update(status="failed", error=f"{exc.code}: {exc.detail}")
            else:
                outcome.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        else:
            # Not inside the `try`: should releasing the savepoint fail, the whole item
            # transaction rolls back and the item stays pending, rather than an org written
            # under an item that says it failed.
            await savepoint.commit()
            if result.action == "none":
                outcome["reason"] = "unchanged"
    await session.execute(
        statement("""
            UPDATE resync_items SET status = :status, reason = :reason,
                   conflicts = CAST(:conflicts AS jsonb), error = :error,
                   attempts = attempts + :attempted, worker = :worker,
                   claimed_at = :claimed_at, finished_at = clock_timestamp()
            WHERE id = :id"""),
        {
            **outcome,
            "conflicts": msgspec.json.encode(outcome["conflicts"]).decode()
            if outcome["conflicts"] is not None
            else None,
            "attempted": attempted,
            "id": item.id,
            "worker": worker,
            "claimed_at": item.claimed_at,
        },
    )
    metrics.RESYNC_ITEMS.labels(outcome["status"]).inc()


def _above(bad: int, attempted: int, threshold: Decimal | None) -> bool:
    """`bad / attempted > threshold`, exactly (no attempted item: never above)."""
    return threshold is not None and attempted > 0 and bad > threshold * attempted


async def close_wave(session: AsyncSession, run_id: uuid.UUID) -> Next:
    """If the run's current wave is finished, check it and move the run on: to the next wave
    (running, or baking first), halted before it, or finished. Otherwise change nothing.
    Returns what the run needs next: `work` only when a new wave is ready for workers."""
    run = (
        await session.execute(
            text("""SELECT status, current_wave, max_conflict_rate, max_failure_rate,
                           bake_seconds, next_step_at
                    FROM resync_runs WHERE id = :run FOR UPDATE"""),
            {"run": run_id},
        )
    ).first()
    if run is None or run.status != "running":
        return _next(run)
    # Counted after the run's lock is held: every outcome committed before is seen.
    wave = (
        await session.execute(
            text(f"""
                SELECT count(*) AS total,
                       count(*) FILTER (WHERE status = 'pending') AS pending,
                       count(*) FILTER (WHERE status IN {sql_list(ATTEMPTED)}) AS attempted,
                       count(*) FILTER (WHERE status = 'conflict') AS conflict,
                       count(*) FILTER (WHERE status = 'failed') AS failed,
                       (SELECT min(wave) FROM resync_items
                        WHERE run_id = :run AND status = 'pending') AS next_wave
                FROM resync_items WHERE run_id = :run AND wave = :wave"""),  # noqa: S608
            {"run": run_id, "wave": run.current_wave},
        )
    ).one()
    if wave.pending:
        # In other workers' hands: the last of them closes the wave (or, should it die, the
        # next job after the periodic resume).
        return Next("none")
    if wave.next_wave is None:
        await session.execute(
            text("""
                WITH c AS (
                    SELECT count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                           count(*) FILTER (WHERE status IN ('conflict', 'failed')) AS bad
                    FROM resync_items WHERE run_id = :run)
                UPDATE resync_runs SET finished_at = now(), status = CASE
                        WHEN c.bad = 0 THEN 'succeeded'
                        WHEN c.succeeded = 0 THEN 'failed'
                        ELSE 'partial' END
                FROM c WHERE id = :run"""),
            {"run": run_id},
        )
        return Next("none")
    halt = [
        f"{name} rate {bad}/{wave.attempted} is above {threshold}"
        for name, bad, threshold in (
            ("conflict", wave.conflict, run.max_conflict_rate),
            ("failure", wave.failed, run.max_failure_rate),
        )
        if _above(bad, wave.attempted, threshold)
    ]
    bake = run.bake_seconds if wave.attempted else 0
    row = (
        await session.execute(
            text("""
                UPDATE resync_runs SET current_wave = :next_wave,
                       status = CASE WHEN CAST(:halt AS text) IS NOT NULL THEN 'halted'
                                     WHEN CAST(:bake AS int) > 0 THEN 'baking'
                                     ELSE 'running' END,
                       halt_reason = CAST(:halt AS text),
                       next_step_at = CASE WHEN CAST(:halt AS text) IS NULL AND :bake > 0
                                           THEN now() + make_interval(secs => :bake) END
                WHERE id = :run
                RETURNING status, next_step_at"""),
            {
                "run": run_id,
                "next_wave": wave.next_wave,
                "halt": f"wave {run.current_wave}: " + "; ".join(halt) if halt else None,
                "bake": bake,
            },
        )
    ).one()
    return _next(row)


async def runs_to_resume(session: AsyncSession) -> list[tuple[uuid.UUID, Next]]:
    """Runs that need a worker now or at a time: resumed when a worker starts and every
    minute (lost defers, crashed workers, missed times)."""
    rows = await session.execute(
        text(f"""
            SELECT id, status, next_step_at FROM resync_runs
            WHERE status IN {sql_list(WORKING + WAITING)}
            ORDER BY created_at"""),  # noqa: S608 (constants only)
    )
    return [(row.id, _next(row)) for row in rows]
