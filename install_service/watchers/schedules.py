"""Cron schedules and `next_run_at`.

A watcher's `schedule` is a 5-field cron expression in UTC (minute, hour, day of month,
month, day of week), evaluated by croniter, the cron library the job queue already schedules
its periodic tasks with. Documents are validated with `problem` at publish.

`next_run_at` is kept by the database and this module together: a trigger clears it whenever a
watcher stops being scheduled, starts being scheduled or has its schedule changed (by an
install, an upgrade, or the organization editing the row outside this service); `schedule`
then sets it, set-based, for every watcher left without one. An operation that wrote watchers
calls it for its organization before it commits; edits made outside the service are picked up
by the worker (`schedule` for every organization, every minute) and, until then, reads
compute the time themselves (`next_run`).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from croniter import croniter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.vocabulary import WATCHER_UNSCHEDULED

FIELDS = ("minute", "hour", "day of month", "month", "day of week")


def problem(expression: str) -> str | None:
    """Why `expression` is not a usable schedule, or None when it is one."""
    fields = expression.split()
    if len(fields) != len(FIELDS):
        return f"expected 5 cron fields ({', '.join(FIELDS)}), got {len(fields)}: {expression!r}"
    try:
        croniter(expression, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except (ValueError, KeyError, TypeError) as exc:  # croniter's errors derive from ValueError
        return f"not a valid cron schedule: {expression!r} ({exc})"
    return None


def next_run(expression: str, after: datetime) -> datetime | None:
    """The first time strictly after `after` (UTC) that `expression` fires; None when it is
    not a valid schedule."""
    if problem(expression) is not None:
        return None
    found: datetime = croniter(expression, after.astimezone(UTC)).get_next(datetime)
    return found.astimezone(UTC)


async def schedule(session: AsyncSession, organization_id: uuid.UUID | None = None) -> int:
    """Set `next_run_at` of every scheduled watcher that has none, in one organization (or in
    all); returns how many were set. One read of the distinct schedules, one update.

    Rows another transaction holds are skipped (never waited for): their writer schedules
    them, or the next run of this does."""
    found = await session.execute(
        text(f"""
            SELECT DISTINCT schedule, now() AS now FROM watchers
            WHERE {WATCHER_UNSCHEDULED}
              AND (CAST(:org AS uuid) IS NULL OR organization_id = :org)"""),  # noqa: S608
        {"org": organization_id},
    )
    times = {
        schedule: when for schedule, now in found if (when := next_run(schedule, now)) is not None
    }
    if not times:
        return 0
    result = await session.execute(
        text(f"""
            UPDATE watchers w SET next_run_at = x.next_run_at
            FROM unnest(CAST(:schedules AS text[]), CAST(:times AS timestamptz[]))
                AS x(schedule, next_run_at)
            WHERE w.schedule = x.schedule
              AND w.id IN (SELECT id FROM watchers
                           WHERE {WATCHER_UNSCHEDULED}
                             AND (CAST(:org AS uuid) IS NULL OR organization_id = :org)
                           FOR UPDATE SKIP LOCKED)"""),  # noqa: S608
        {"org": organization_id, "schedules": list(times), "times": list(times.values())},
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
