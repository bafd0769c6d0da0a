"""What workers do to a run: start it, claim and process its items, close each wave.

**Items.** Items are processed in batches (`INSTALL_SERVICE_RESYNC_BATCH` at a time), each
batch in its own transaction that first claims its item rows (`FOR UPDATE SKIP LOCKED`, only
in the run's `current_wave` and only while the run is `running`) and locks their installs in
the same statement, then checks each (uninstalled since the run began, or pinned: `skipped`),
then brings the rest to the run's release with one engine sync of the whole batch (each org's
outcome its own: see `engine.sync`), then records every item's outcome with one statement. A
worker that dies mid-batch takes its transaction with it: every org of the batch is
untouched, its items still `pending` and unlocked, and the next worker to look claims them.
Two workers never process one item, because the claim is a row lock held until the outcome
is committed. The batch transaction never locks the run's row, so control calls never wait
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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service import engine, metrics
from install_service.actor import Actor
from install_service.config import Settings
from install_service.db.session import statement
from install_service.errors import InstallServiceError
from install_service.installs.pins import PINNED
from install_service.states import ATTEMPTED, WAITING, WORKING, sql_list


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


def _claim_sql(busy: str) -> str:
    """The next pending items of the run's current wave, at most `:batch`, if the run is
    running (claimed on their own, through the index of pending items, so a claim costs the
    same at the first item and the last), with what deciding them needs: their installs,
    locked (an uninstall or a pin either committed before, and is seen here, or waits until
    the batch is done), and the run's release. One round trip. `busy` says what becomes of
    an item whose install another transaction holds: `SKIP LOCKED` leaves it out (it stays
    pending, for a later claim), `''` waits for it."""
    return f"""
    WITH claimed AS MATERIALIZED (
        SELECT i.id, i.install_id, i.installs, i.organization_id,
               clock_timestamp() AS claimed_at
        FROM resync_items i
        WHERE i.run_id = :run AND i.status = 'pending'
          AND i.wave = (SELECT x.current_wave FROM resync_runs x
                        WHERE x.id = :run AND x.status = 'running')
        ORDER BY i.wave, i.id LIMIT :batch
        FOR UPDATE SKIP LOCKED),
    -- The installs the items upgrade (an item that installs the template has none yet: the
    -- engine creates it, or locks one made meanwhile).
    locked AS MATERIALIZED (
        SELECT a.id, a.status, a.installed_release_id, a.pinned_at, a.pinned_until
        FROM agents a WHERE a.id IN (SELECT install_id FROM claimed WHERE NOT installs)
        FOR UPDATE {busy}),
    totals AS (
        SELECT jsonb_object_agg(kind, n) AS totals FROM (
            SELECT kind, count(*) AS n FROM template_release_items
            WHERE release_id = (SELECT release_id FROM resync_runs WHERE id = :run)
            GROUP BY kind) k)
    SELECT c.id, c.install_id, c.installs, c.organization_id, c.claimed_at,
           a.status AS install_status, a.installed_release_id,
           ir.version AS installed_version, coalesce({PINNED}, false) AS pinned,
           r.include_pinned, o.slug AS template, rel.id AS release_id, rel.version, r.force,
           coalesce((r.selection ->> 'with_requirements')::boolean, false)
               AS with_requirements,
           EXISTS (SELECT 1 FROM template_release_requirements rr
                   WHERE rr.release_id = rel.id) AS has_requirements,
           r.requested_by_user_id, t.id AS owner, t.organization_id AS source_org,
           (SELECT totals FROM totals) AS totals
    FROM claimed c
    LEFT JOIN locked a ON a.id = c.install_id
    LEFT JOIN template_releases ir ON ir.id = a.installed_release_id
    JOIN resync_runs r ON r.id = :run
    JOIN template_releases rel ON rel.id = r.release_id
    JOIN agents t ON t.id = r.template_agent_id
    JOIN organizations o ON o.id = t.organization_id
    WHERE c.installs OR a.id IS NOT NULL
    ORDER BY c.id"""  # noqa: S608 (constants only)


# A batch passes over the items whose installs are busy (an org's own upgrade in progress): one
# org held up must not hold up the batch. Once only such items are left, they are claimed one
# at a time, each waiting for its install.
CLAIM_SQL = _claim_sql("SKIP LOCKED")
CLAIM_WAITING_SQL = _claim_sql("")


def batch_size() -> int:
    """Items a worker claims and moves at once (`INSTALL_SERVICE_RESYNC_BATCH`)."""
    return Settings.from_env().resync_batch


async def claim_batch(session: AsyncSession, run_id: uuid.UUID, batch: int) -> list[Any]:
    """Lock up to `batch` pending items of the run's current wave whose installs are free,
    and those installs, until the transaction ends; when no such item is left, one whose
    install is busy, waiting for it. None when there is none to claim: the wave is done or in
    other workers' hands, or the run is not running."""
    claimed = list(
        (await session.execute(statement(CLAIM_SQL), {"run": run_id, "batch": batch})).all()
    )
    if claimed:
        return claimed
    return list(
        (await session.execute(statement(CLAIM_WAITING_SQL), {"run": run_id, "batch": 1})).all()
    )


async def claim(session: AsyncSession, run_id: uuid.UUID) -> Any:
    """Lock the next item of the run's current wave, and its install (None: none to claim)."""
    claimed = await claim_batch(session, run_id, 1)
    return claimed[0] if claimed else None


async def process_next_batch(
    session: AsyncSession, run_id: uuid.UUID, *, worker: str, batch: int
) -> int:
    """Claim up to `batch` items of the run and process them; how many were claimed."""
    items = await claim_batch(session, run_id, batch)
    if items:
        await process_batch(session, items, worker=worker)
    return len(items)


async def process_next_item(session: AsyncSession, run_id: uuid.UUID, *, worker: str) -> bool:
    """Claim one item of the run and process it; False when no item is left to claim."""
    return bool(await process_next_batch(session, run_id, worker=worker, batch=1))


async def process(session: AsyncSession, item: Any, *, worker: str) -> None:
    """Process one claimed item (see `process_batch`)."""
    await process_batch(session, [item], worker=worker)


def _error(exc: BaseException) -> str:
    if isinstance(exc, InstallServiceError):
        return f"{exc.code}: {exc.detail}"
    return f"{type(exc).__name__}: {exc}"


async def process_batch(session: AsyncSession, items: Sequence[Any], *, worker: str) -> None:
    """Move the claimed items' orgs to the run's release, or skip them, and record every
    outcome with one statement.

    The claim locked the installs before they are checked here, so an uninstall or a pin
    either committed before (the item is skipped) or waits until the batch is done. The orgs
    are moved by one engine sync: each org's outcome is its own (a conflict or a failure
    writes nothing of that org and holds no other back), while the claims and the outcomes
    are kept."""
    first = items[0]
    release = engine.Release(
        id=first.release_id,
        version=first.version,
        template=first.template,
        owner=first.owner,
        source_org_id=first.source_org,
        totals=first.totals or {},
        # Without requirements there is nothing to look up per batch.
        requires=None if first.has_requirements else (),
    )
    outcomes: dict[uuid.UUID, dict[str, Any]] = {}
    moving: list[engine.Install] = []
    for item in items:
        if item.installs:  # the engine creates the install, or locks one made meanwhile
            moving.append(engine.Install(organization_id=item.organization_id, key=item.id))
        elif item.install_status != "active":
            outcomes[item.id] = {"status": "skipped", "reason": "uninstalled"}
        elif item.pinned and not item.include_pinned:
            outcomes[item.id] = {"status": "skipped", "reason": "pinned"}
        else:
            moving.append(
                engine.Install(
                    organization_id=item.organization_id,
                    id=item.install_id,
                    status=item.install_status,
                    installed_release_id=item.installed_release_id,
                    installed_version=item.installed_version,
                    key=item.id,
                )
            )
    if moving:
        synced = await engine.sync(
            session,
            release,
            moving,
            actor=Actor(user_id=first.requested_by_user_id, is_platform_admin=True),
            options=engine.Options(force=first.force),
            batch=True,
            locked=True,
            with_requirements=first.with_requirements,
        )
        for done in synced:
            outcome: dict[str, Any] = {"status": "succeeded", "attempted": 1}
            if done.status in ("written", "unchanged"):
                outcome["install_id"] = done.install.id
            if done.status == "unchanged":
                outcome["reason"] = "unchanged"
            elif done.status == "conflict":
                conflict = done.plan.conflict()
                outcome.update(
                    status="conflict",
                    conflicts=conflict.conflicts if conflict else [],
                    error=conflict.detail if conflict else None,
                )
                if conflict and all(
                    c["reason"] == "missing_requirement" for c in conflict.conflicts
                ):
                    outcome["reason"] = "missing_requirement"
            elif done.status == "failed":
                outcome.update(status="failed", error=_error(done.error or RuntimeError()))
            outcomes[done.install.key] = outcome
    claimed_at = {item.id: item.claimed_at for item in items}
    ids = list(outcomes)
    await session.execute(
        statement("""
            UPDATE resync_items i SET status = o.status, reason = o.reason,
                   conflicts = o.conflicts, error = o.error,
                   attempts = i.attempts + o.attempted, worker = :worker,
                   claimed_at = o.claimed_at, finished_at = clock_timestamp(),
                   install_id = coalesce(o.install_id, i.install_id)
            FROM unnest(CAST(:ids AS uuid[]), CAST(:statuses AS text[]),
                        CAST(:reasons AS text[]), CAST(:conflicts AS jsonb[]),
                        CAST(:errors AS text[]), CAST(:attempted AS int[]),
                        CAST(:claimed_at AS timestamptz[]), CAST(:installs AS uuid[]))
                AS o(id, status, reason, conflicts, error, attempted, claimed_at, install_id)
            WHERE i.id = o.id"""),
        {
            "ids": ids,
            "statuses": [outcomes[i]["status"] for i in ids],
            "reasons": [outcomes[i].get("reason") for i in ids],
            "conflicts": [
                msgspec.json.encode(outcomes[i]["conflicts"]).decode()
                if "conflicts" in outcomes[i]
                else None
                for i in ids
            ],
            "errors": [outcomes[i].get("error") for i in ids],
            "attempted": [outcomes[i].get("attempted", 0) for i in ids],
            "claimed_at": [claimed_at[i] for i in ids],
            "installs": [outcomes[i].get("install_id") for i in ids],
            "worker": worker,
        },
    )
    for outcome in outcomes.values():
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
