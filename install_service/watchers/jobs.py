"""Background upkeep of watcher schedules, on the service's job queue."""

from __future__ import annotations

import logging

import procrastinate
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.db.session import transaction
from install_service.watchers import schedules

log = logging.getLogger("install_service.watchers")

QUEUE = "watchers"
blueprint = procrastinate.Blueprint()


async def schedule_everywhere(engine: AsyncEngine) -> int:
    """Store `next_run_at` for every scheduled watcher lacking one, in every organization
    (schedules edited outside the service, rows from before this existed)."""
    async with transaction(engine) as session:
        count = await schedules.schedule(session)
    if count:
        log.info("scheduled %d watcher(s)", count)
    return count


@blueprint.periodic(cron="* * * * *")
@blueprint.task(name="schedule", queue=QUEUE, queueing_lock="watchers-schedule", pass_context=True)
async def schedule_task(context: procrastinate.JobContext, timestamp: int) -> None:
    await schedule_everywhere(context.additional_context["engine"])
