"""Resync runs in the database: create, read, list.

A run has one item per selected install, each in a wave, all fixed when the run is created
(`fleet.select`). Workers process items (`execution`); admins pause, resume, cancel and retry
runs (`control`).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.actor import Actor
from install_service.audit import service as audit
from install_service.errors import Conflict, NotFound
from install_service.orgs.schemas import OrgRef
from install_service.pagination import Int4, Keyset, PageRequest
from install_service.releases import TEMPLATES
from install_service.resync import fleet
from install_service.resync.schemas import (
    ResyncItem,
    ResyncItemPage,
    ResyncRequest,
    ResyncRun,
    ResyncRunPage,
    RunCounts,
    RunTimeline,
    TimelinePoint,
    WaveCounts,
)
from install_service.states import FINISHED, ITEM_STATUSES, UNFINISHED, sql_list

__all__ = ["FINISHED", "UNFINISHED"]


def _decimal(rate: float | None) -> Decimal | None:
    return None if rate is None else Decimal(repr(rate))


async def start_run(
    session: AsyncSession, actor: Actor, template: str, request: ResyncRequest | None = None
) -> ResyncRun:
    """Create a run of `request`, or join the identical run in progress.

    A template has at most one unfinished run (a partial unique index). A request identical
    to it (same release once `version` is resolved, same `force`, `include_pinned`,
    thresholds, `bake_seconds` and `start_at`, and the same `orgs`, `exclude` and `waves` once
    every organization is resolved to its id) gets that run back with `created: false`; any
    other request is a 409 naming it.
    """
    request = request or ResyncRequest()
    selection = await fleet.select(session, actor, template, request)
    release = selection.release
    params: dict[str, Any] = {
        "agent": release["template_agent_id"],
        "release": release["id"],
        "force": request.force,
        "actor": actor.user_id,
        "selection": msgspec.json.encode(selection.normalized).decode(),
        "include_pinned": request.include_pinned,
        "max_conflict_rate": _decimal(request.max_conflict_rate),
        "max_failure_rate": _decimal(request.max_failure_rate),
        "bake_seconds": request.bake_seconds,
        "start_at": request.start_at,
        "wave_count": selection.wave_count,
        "first_wave": min((s.wave for s in selection.installs), default=1),
    }
    for _ in range(3):
        run_id: uuid.UUID | None = await session.scalar(
            text(f"""
                INSERT INTO resync_runs (
                    template_agent_id, release_id, force, requested_by_user_id, selection,
                    include_pinned, max_conflict_rate, max_failure_rate, bake_seconds, start_at,
                    wave_count, current_wave, status, next_step_at)
                SELECT :agent, :release, :force, :actor, CAST(:selection AS jsonb),
                       :include_pinned, :max_conflict_rate, :max_failure_rate, :bake_seconds,
                       CAST(:start_at AS timestamptz), :wave_count, :first_wave,
                       CASE WHEN later THEN 'scheduled' ELSE 'queued' END,
                       CASE WHEN later THEN CAST(:start_at AS timestamptz) END
                FROM (SELECT coalesce(CAST(:start_at AS timestamptz) > now(), false) AS later) s
                ON CONFLICT (template_agent_id) WHERE status IN {sql_list(UNFINISHED)}
                DO NOTHING
                RETURNING id"""),  # noqa: S608 (constants only)
            params,
        )
        if run_id is not None:
            break
        existing = (
            await session.execute(
                text(f"""
                    SELECT id, status,
                           release_id = :release AND force = :force
                           AND include_pinned = :include_pinned
                           AND max_conflict_rate IS NOT DISTINCT FROM
                               CAST(:max_conflict_rate AS numeric)
                           AND max_failure_rate IS NOT DISTINCT FROM
                               CAST(:max_failure_rate AS numeric)
                           AND bake_seconds = :bake_seconds
                           AND start_at IS NOT DISTINCT FROM CAST(:start_at AS timestamptz)
                           AND selection = CAST(:selection AS jsonb) AS identical
                    FROM resync_runs
                    WHERE template_agent_id = :agent AND status IN {sql_list(UNFINISHED)}"""),  # noqa: S608
                params,
            )
        ).first()
        if existing is None:
            continue  # it finished in the meantime: try again
        if existing.identical:
            return await get_run(session, existing.id, created=False)
        raise Conflict(
            f"resync run {existing.id} of {template!r} is {existing.status} with a different "
            "request; pause or cancel it, or send the same request to follow it",
            code="resync_run_in_progress",
            run_id=str(existing.id),
        )
    else:
        raise Conflict(
            f"runs of {template!r} keep starting and finishing; retry",
            code="resync_run_in_progress",
        )
    installs = selection.installs
    await _hold_installs(session, installs)
    await session.execute(
        text("""
            WITH items AS (
                INSERT INTO resync_items (run_id, install_id, organization_id, wave, installs)
                SELECT :run, i, o, w, n
                FROM unnest(CAST(:installs AS uuid[]), CAST(:orgs AS uuid[]),
                            CAST(:waves AS int[]), CAST(:new AS boolean[])) AS s(i, o, w, n)
                RETURNING 1)
            -- nothing to do is already done
            UPDATE resync_runs SET status = 'succeeded', started_at = now(), finished_at = now(),
                                   next_step_at = NULL
            WHERE id = :run AND NOT EXISTS (SELECT 1 FROM items)"""),
        {
            "run": run_id,
            "installs": [s.install_id for s in installs],
            "orgs": [s.organization_id for s in installs],
            "waves": [s.wave for s in installs],
            "new": [s.installs for s in installs],
        },
    )
    await audit.record(
        session,
        actor=actor.user_id,
        action="resync.started",
        target_type="resync_run",
        target_id=run_id,
        details={
            "template": template,
            "version": release["version"],
            "force": request.force,
            "items": len(installs),
            "selection": selection.normalized,
            "include_pinned": request.include_pinned,
            "max_conflict_rate": request.max_conflict_rate,
            "max_failure_rate": request.max_failure_rate,
            "bake_seconds": request.bake_seconds,
            "start_at": request.start_at.isoformat() if request.start_at else None,
        },
    )
    return await get_run(session, run_id, created=True)


_RUNS = """
    SELECT r.id, o.slug AS template, rel.version, r.force, r.status, r.current_wave,
           r.halt_reason, r.include_pinned, r.max_conflict_rate, r.max_failure_rate,
           r.bake_seconds, r.start_at, r.next_step_at, r.selection, r.requested_by_user_id,
           r.created_at, r.started_at, r.finished_at, r.wave_count
    FROM resync_runs r
    JOIN template_releases rel ON rel.id = r.release_id
    JOIN agents t ON t.id = r.template_agent_id
    JOIN organizations o ON o.id = t.organization_id"""


LOCK_NOT_AVAILABLE = "55P03"
# How long a start waits for installs that are being changed right now (an install, upgrade or
# uninstall holds its install's row until it commits, normally milliseconds) before it says
# which ones are busy.
BUSY_WAIT_SECONDS = 5


async def _hold_installs(session: AsyncSession, installs: list[fleet.Selected]) -> None:
    """Share-lock the selected installs' rows, which the run's items reference, so that
    writing the items never waits. Installs being changed right now (their row locked) are
    waited for at most `BUSY_WAIT_SECONDS`, then the start is a 409 naming their
    organizations: never a wait for the whole statement timeout and a 503."""
    ids = [s.install_id for s in installs]
    held = set(
        (
            await session.scalars(
                text("SELECT id FROM agents WHERE id = ANY(:ids) FOR KEY SHARE SKIP LOCKED"),
                {"ids": ids},
            )
        ).all()
    )
    busy = [s for s in installs if s.install_id not in held]
    if not busy:
        return
    previous = await session.scalar(text("SELECT current_setting('lock_timeout')"))
    await session.execute(
        text("SELECT set_config('lock_timeout', :wait, true)"),
        {"wait": f"{BUSY_WAIT_SECONDS}s"},
    )
    try:
        await session.execute(
            text("SELECT 1 FROM agents WHERE id = ANY(:ids) FOR KEY SHARE"),
            {"ids": [s.install_id for s in busy]},
        )
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
            raise
        slugs = sorted(s.slug for s in busy)
        raise Conflict(
            f"the installs in {', '.join(slugs)} are being changed right now (waited "
            f"{BUSY_WAIT_SECONDS} s); nothing was started, retry in a moment",
            code="installs_busy",
            organizations=slugs,
        ) from exc
    await session.execute(
        text("SELECT set_config('lock_timeout', :previous, true)"), {"previous": previous}
    )


def _counts(found: dict[str, int], into: type[RunCounts], **extra: Any) -> Any:
    by_status = {status: found.get(status, 0) for status in ITEM_STATUSES}
    return into(total=sum(by_status.values()), **by_status, **extra)


async def _describe(
    session: AsyncSession, rows: list[Any], *, created: bool = False
) -> list[ResyncRun]:
    """Runs with their counts, overall and per wave (one statement for all of them)."""
    per_wave: dict[uuid.UUID, dict[int, dict[str, int]]] = defaultdict(lambda: defaultdict(dict))
    if rows:
        counted = await session.execute(
            text("""
                SELECT run_id, wave, status, count(*) AS n FROM resync_items
                WHERE run_id = ANY(CAST(:runs AS uuid[])) GROUP BY run_id, wave, status"""),
            {"runs": [row.id for row in rows]},
        )
        for c in counted:
            per_wave[c.run_id][c.wave][c.status] = c.n
    runs = []
    for row in rows:
        waves = per_wave[row.id]
        overall: dict[str, int] = defaultdict(int)
        for statuses in waves.values():
            for status, n in statuses.items():
                overall[status] += n
        runs.append(
            ResyncRun(
                id=row.id,
                template=row.template,
                version=row.version,
                force=row.force,
                status=row.status,
                created=created,
                current_wave=row.current_wave,
                halt_reason=row.halt_reason,
                counts=_counts(overall, RunCounts),
                waves=[
                    _counts(waves.get(n, {}), WaveCounts, wave=n)
                    for n in range(1, row.wave_count + 1)
                ],
                include_pinned=row.include_pinned,
                with_requirements=bool((row.selection or {}).get("with_requirements")),
                max_conflict_rate=_float(row.max_conflict_rate),
                max_failure_rate=_float(row.max_failure_rate),
                bake_seconds=row.bake_seconds,
                start_at=row.start_at,
                next_step_at=row.next_step_at,
                selection=row.selection,
                requested_by_user_id=row.requested_by_user_id,
                created_at=row.created_at,
                started_at=row.started_at,
                finished_at=row.finished_at,
            )
        )
    return runs


def _float(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


async def get_run(session: AsyncSession, run_id: uuid.UUID, *, created: bool = False) -> ResyncRun:
    """A run with its counts, overall and per wave (its items: `list_items`)."""
    rows = (await session.execute(text(_RUNS + " WHERE r.id = :run"), {"run": run_id})).all()
    if not rows:
        raise NotFound(f"resync run {run_id} not found", code="resync_run_not_found")
    return (await _describe(session, list(rows), created=created))[0]


_RUN_KEYSET = Keyset("resync_runs", (datetime, uuid.UUID))


async def list_runs(
    session: AsyncSession,
    page: PageRequest,
    *,
    template: str | None = None,
    status: str | None = None,
) -> ResyncRunPage:
    """Runs, newest first, optionally of one template (404 if there is no such template) or
    in one status."""
    agent = None
    if template is not None:
        agent = await session.scalar(
            text(f"SELECT a.id FROM {TEMPLATES} WHERE o.slug = :slug"),  # noqa: S608
            {"slug": template},
        )
        if agent is None:
            raise NotFound(f"template {template!r} not found", code="template_not_found")
    rows = await session.execute(
        text(
            _RUNS
            + """
            WHERE (CAST(:agent AS uuid) IS NULL OR r.template_agent_id = :agent)
              AND (CAST(:status AS text) IS NULL OR r.status = :status)
              AND (CAST(:after_0 AS timestamptz) IS NULL
                   OR (r.created_at, r.id) < (:after_0, CAST(:after_1 AS uuid)))
            ORDER BY r.created_at DESC, r.id DESC LIMIT :limit_plus_one"""
        ),
        {"agent": agent, "status": status, **_RUN_KEYSET.params(page)},
    )
    runs = await _describe(session, list(rows))
    return _RUN_KEYSET.page(ResyncRunPage, runs, page, lambda r: (r.created_at, r.id))


_ITEM_KEYSET = Keyset("resync_items", (Int4, uuid.UUID))


async def list_items(
    session: AsyncSession,
    run_id: uuid.UUID,
    page: PageRequest,
    *,
    status: str | None = None,
    wave: int | None = None,
) -> ResyncItemPage:
    """A run's items in (wave, organization id) order, optionally in one status or wave."""
    if not await session.scalar(
        text("SELECT EXISTS (SELECT 1 FROM resync_runs WHERE id = :run)"), {"run": run_id}
    ):
        raise NotFound(f"resync run {run_id} not found", code="resync_run_not_found")
    rows = await session.execute(
        text("""
            SELECT i.organization_id, o.slug, i.install_id, i.installs, i.wave, i.status,
                   i.reason, i.attempts, i.conflicts, i.error, i.claimed_at, i.finished_at
            FROM resync_items i JOIN organizations o ON o.id = i.organization_id
            WHERE i.run_id = :run
              AND (CAST(:status AS text) IS NULL OR i.status = :status)
              AND (CAST(:wave AS int) IS NULL OR i.wave = :wave)
              AND (CAST(:after_0 AS int) IS NULL
                   OR (i.wave, i.organization_id) > (:after_0, CAST(:after_1 AS uuid)))
            ORDER BY i.wave, i.organization_id LIMIT :limit_plus_one"""),
        {"run": run_id, "status": status, "wave": wave, **_ITEM_KEYSET.params(page)},
    )
    items = [_item(row) for row in rows]
    return _ITEM_KEYSET.page(ResyncItemPage, items, page, lambda i: (i.wave, i.organization.id))


def _item(row: Any) -> ResyncItem:
    return ResyncItem(
        organization=OrgRef(id=row.organization_id, slug=row.slug),
        install_id=row.install_id,
        installs=row.installs,
        wave=row.wave,
        status=row.status,
        reason=row.reason,
        attempts=row.attempts,
        conflicts=row.conflicts,
        error=row.error,
        claimed_at=row.claimed_at,
        finished_at=row.finished_at,
    )


async def timeline(session: AsyncSession, run_id: uuid.UUID, *, points: int = 24) -> RunTimeline:
    """How many items had finished, by outcome, at `points` evenly spaced moments from the
    run's start to its end (now, while it runs): the run's outcomes over time."""
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
                       count(i.id) FILTER (WHERE i.status = 'skipped') AS skipped,
                       count(i.id) FILTER (WHERE i.status = 'cancelled') AS cancelled,
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
            TimelinePoint(
                at=r.at,
                succeeded=r.succeeded,
                conflict=r.conflict,
                failed=r.failed,
                skipped=r.skipped,
                cancelled=r.cancelled,
            )
            for r in rows
        ],
    )
