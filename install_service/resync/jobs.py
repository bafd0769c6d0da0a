"""Background work on procrastinate, on the service's own PostgreSQL.

One job app serves every domain: resync runs here, webhook redeliveries (`events.delivery`)
and watcher schedules (`watchers.jobs`) added from their blueprints, each on its own queue;
every worker (`install-service worker`, `serve`'s own) runs them all, and beside them the
process's webhook dispatcher (`events.dispatcher`), which sends every lane's deliveries.

`process_run` jobs work through the items of a run's current wave, one transaction per org,
until none is left, then close the wave (see `execution`); several jobs (in one worker or
many, on one machine or many) share a run safely because items are claimed with
`SKIP LOCKED`. When a wave closes and the next one starts, the job that closed it tops the run
up with fresh jobs; when the run must wait (a `start_at`, a bake), the next job is deferred
with `schedule_at` for that time, so no worker waits with it. Jobs are deferred after the
run is committed; should a defer be lost, or a worker die holding a job, `resume_runs` (at
every worker start, then every minute) defers fresh jobs for every run that needs one, and
marks the leftover pending items of cancelled runs cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import procrastinate
import procrastinate.exceptions
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.config import JOBS_PER_RUN, WebhookSettings
from install_service.db.engine import asyncpg_dsn
from install_service.db.session import transaction
from install_service.events import delivery, webhooks
from install_service.events.dispatcher import Dispatcher
from install_service.resync import control, execution
from install_service.resync.execution import Next
from install_service.resync.schemas import ResyncRun
from install_service.watchers import jobs as watcher_jobs

log = logging.getLogger("install_service.resync")

QUEUE = "resync"

# One app per process; `opened` points it at a database for the duration of a block.
queue = procrastinate.App(connector=procrastinate.PsycopgConnector())
queue.add_tasks_from(delivery.blueprint, namespace="webhooks")
queue.add_tasks_from(watcher_jobs.blueprint, namespace="watchers")
QUEUES = [QUEUE, webhooks.QUEUE, watcher_jobs.QUEUE]
# Scheduled jobs (webhook retries) start at most this late.
POLLING_INTERVAL_SECONDS = 1.0


@asynccontextmanager
async def opened(url: URL) -> AsyncIterator[procrastinate.App]:
    """The job queue app, connected to the service's database while the block runs."""
    connector = procrastinate.PsycopgConnector(
        conninfo=asyncpg_dsn(url), min_size=1, max_size=JOBS_PER_RUN + 2
    )
    with queue.replace_connector(connector):
        async with queue.open_async():
            yield queue


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@queue.task(name="process_run", queue=QUEUE, pass_context=True)
async def process_run(context: procrastinate.JobContext, run_id: str) -> None:
    engine: AsyncEngine = context.additional_context["engine"]
    run = uuid.UUID(run_id)
    await follow_up(context.app, run, await work_on_run(engine, run, worker=worker_name()))


@queue.periodic(cron="* * * * *")
@queue.task(name="resume_runs", queue=QUEUE, queueing_lock="resume_runs", pass_context=True)
async def resume_runs_task(context: procrastinate.JobContext, timestamp: int) -> None:
    await resume_runs(context.additional_context["engine"], context.app)


async def work_on_run(engine: AsyncEngine, run_id: uuid.UUID, *, worker: str) -> Next:
    """Start the run if it may run now, process items of its current wave until none is left
    to claim, then close the wave if it is finished. Returns what the run needs next."""
    async with transaction(engine) as session:
        started = await execution.start(session, run_id)
    if started.kind != "work":
        return started
    processed = 0
    batch = execution.batch_size()
    while True:
        async with transaction(engine) as session:
            claimed = await execution.process_next_batch(
                session, run_id, worker=worker, batch=batch
            )
        if not claimed:
            break
        processed += claimed
    async with transaction(engine) as session:
        after = await execution.close_wave(session, run_id)
    log.info("resync run %s: %d item(s) by %s; next: %s", run_id, processed, worker, after.kind)
    return after


async def follow_up(app: procrastinate.App, run_id: uuid.UUID, step: Next) -> None:
    """Queue what the run needs next: jobs now, or one job at its time."""
    if step.kind == "work":
        await defer_run(app, run_id)
    elif step.kind == "later" and step.at is not None:
        await defer_at(app, run_id, step.at)


async def wake(app: procrastinate.App, run: ResyncRun) -> None:
    """Queue what a committed run needs (after creating, resuming or retrying it)."""
    await follow_up(app, run.id, execution.next_for(run.status, run.next_step_at))


async def defer_run(app: procrastinate.App, run_id: uuid.UUID, jobs: int = JOBS_PER_RUN) -> None:
    """Queue up to `jobs` concurrent jobs for a committed run.

    Each slot has a queueing lock, so deferring again (a retry, a resume) tops the run up to
    `jobs` waiting jobs instead of piling more on."""
    task = app.tasks["process_run"]
    for slot in range(jobs):
        with contextlib.suppress(procrastinate.exceptions.AlreadyEnqueued):
            await task.configure(queueing_lock=f"resync-{run_id}-{slot}").defer_async(
                run_id=str(run_id)
            )


async def defer_at(app: procrastinate.App, run_id: uuid.UUID, when: datetime) -> None:
    """Queue one job for the run at `when` (its start time, the end of its bake). While one
    is waiting, deferring again changes nothing; a job that comes early finds the run still
    waiting and defers itself again."""
    task = app.tasks["process_run"]
    with contextlib.suppress(procrastinate.exceptions.AlreadyEnqueued):
        await task.configure(queueing_lock=f"resync-{run_id}-at", schedule_at=when).defer_async(
            run_id=str(run_id)
        )


async def resume_runs(engine: AsyncEngine, app: procrastinate.App) -> list[uuid.UUID]:
    """Defer work for every run that needs some (lost defers, crashed workers, missed times),
    and cancel what cancelled runs' dead workers left pending."""
    async with transaction(engine) as session:
        await control.cancel_pending(session)
        runs = await execution.runs_to_resume(session)
    for run_id, step in runs:
        await follow_up(app, run_id, step)
    return [run_id for run_id, _ in runs]


async def run_worker(
    engine: AsyncEngine, app: procrastinate.App, *, concurrency: int = JOBS_PER_RUN, **kw: Any
) -> None:
    """Run a worker on an opened app: resume unfinished runs and watcher schedules, then
    process jobs and dispatch webhooks. When the worker stops, the webhook requests in flight
    finish and are recorded; when it is cancelled, they are abandoned and sent again."""
    await resume_runs(engine, app)
    await watcher_jobs.schedule_everywhere(engine)
    kw.setdefault("fetch_job_polling_interval", POLLING_INTERVAL_SECONDS)
    dispatcher = Dispatcher(engine.url, WebhookSettings.from_env())
    dispatching = asyncio.create_task(dispatcher.run(), name="webhooks")
    try:
        await app.run_worker_async(
            queues=QUEUES,
            concurrency=concurrency,
            name=worker_name(),
            additional_context={"engine": engine},
            **kw,
        )
        dispatcher.stop()
        await dispatching
    finally:
        if not dispatching.done():
            dispatching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatching


async def keep_working(
    engine: AsyncEngine, app: procrastinate.App, stopping: asyncio.Event, *, pause: float = 5
) -> None:
    """An in-process worker that outlives database outages: it starts again after a pause,
    until `stopping` is set. A worker asked to stop may end with an error rather than its
    cancellation (the database gone as it stops): once stopping, that is the end, never a
    restart that would hold the server's shutdown up for good."""
    while not stopping.is_set():
        try:
            await run_worker(engine, app, install_signal_handlers=False)
        except Exception:
            if stopping.is_set():
                return
            log.exception("resync worker stopped; starting again in %s s", pause)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), pause)
