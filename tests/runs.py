"""Helpers for tests of resync runs: start one, read it, run workers in-process or as real
processes, wait for a state."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.actor import Actor
from install_service.db.engine import asyncpg_dsn
from install_service.db.session import transaction
from install_service.installs import service as installs
from install_service.pagination import walk
from install_service.resync import jobs
from install_service.resync import service as resync
from install_service.resync.schemas import ResyncItem, ResyncRequest, ResyncRun
from install_service.testing import publish_template
from tests.conftest import execute, rows

FLEET = {
    "slug": "fleet",
    "name": "Fleet",
    "entity_types": [{"slug": "thing", "name": "Thing"}],
}
FLEET_V2 = {**FLEET, "entity_types": [{"slug": "thing", "name": "Thing, v2"}]}


async def fleet_of(engine: AsyncEngine, n: int) -> list[uuid.UUID]:
    """`n` team orgs (`f-00001`, ...) with `fleet` v1 installed; their ids in slug order."""
    await publish_template(engine, FLEET)
    await execute(
        engine,
        """INSERT INTO organizations (slug, name)
           SELECT 'f-' || lpad(g::text, 5, '0'), 'Fleet ' || g FROM generate_series(1, :n) g""",
        n=n,
    )
    orgs = [
        r.id
        for r in await rows(
            engine, "SELECT id FROM organizations WHERE slug LIKE 'f-%' ORDER BY slug"
        )
    ]

    async def install_some(chunk: list[uuid.UUID]) -> None:
        async with transaction(engine) as session:
            for org in chunk:
                await installs.install(
                    session, Actor.system(), template="fleet", organization=str(org)
                )

    await asyncio.gather(*(install_some(orgs[i::4]) for i in range(4)))
    return orgs


async def start(
    engine: AsyncEngine, url: URL, template: str = "starter", **request: Any
) -> ResyncRun:
    """Start a run of `request` (the API's fields) and queue its jobs, as the API does."""
    async with transaction(engine) as session:
        run = await resync.start_run(
            session, Actor.system(), template, msgspec.convert(request, ResyncRequest)
        )
    async with jobs.opened(url) as queue:
        await jobs.wake(queue, run)
    return run


async def items(engine: AsyncEngine, run_id: uuid.UUID, **filters: Any) -> list[ResyncItem]:
    """Every item of the run (in one status or wave, with `status=` or `wave=`)."""
    async with transaction(engine) as session:
        return await walk(lambda page: resync.list_items(session, run_id, page, **filters))


async def work_until_idle(engine: AsyncEngine, url: URL) -> None:
    """An in-process worker that stops once no job is due (a worker told not to wait stops
    at its first empty fetch, before the jobs its own jobs defer: so again until none is)."""
    async with jobs.opened(url) as queue:
        while True:
            await jobs.run_worker(engine, queue, wait=False, install_signal_handlers=False)
            async with engine.connect() as conn:
                due = await conn.scalar(
                    text("""SELECT count(*) FROM procrastinate_jobs WHERE status = 'todo'
                            AND (scheduled_at IS NULL OR scheduled_at <= now())""")
                )
            if not due:
                return


async def get(engine: AsyncEngine, run_id: uuid.UUID) -> ResyncRun:
    async with transaction(engine) as session:
        return await resync.get_run(session, run_id)


# Resync items a test worker moves at once, and how long it takes at least to record a batch
# (a trigger makes it wait): a run of a few hundred orgs is then many batches over a few
# seconds, for a test to stop, kill or control a worker between them (and in one), however
# fast the engine.
WORKER_BATCH = "4"
BATCH_SECONDS = 0.04


def pace_batches(url: URL) -> None:
    """Make every recorded batch of items on the test's database take BATCH_SECONDS."""
    with psycopg.connect(asyncpg_dsn(url), autocommit=True) as conn:
        conn.execute(
            f"""CREATE OR REPLACE FUNCTION test_pace_batches() RETURNS trigger
                LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep({BATCH_SECONDS}); RETURN NULL; END $$"""
        )
        conn.execute(
            """CREATE OR REPLACE TRIGGER test_pace_batches AFTER UPDATE ON resync_items
               FOR EACH STATEMENT EXECUTE FUNCTION test_pace_batches()"""
        )


def worker_process(url: URL, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A real `install-service worker` process on the test's database, its batches paced."""
    pace_batches(url)
    env = {
        **os.environ,
        "INSTALL_SERVICE_DATABASE_URL": url.render_as_string(hide_password=False),
        "INSTALL_SERVICE_RESYNC_BATCH": WORKER_BATCH,
    }
    return subprocess.Popen(  # noqa: S603 (our own entry point)
        [sys.executable, "-m", "install_service", "worker", *extra],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


async def wait_for(
    engine: AsyncEngine, run_id: uuid.UUID, done: Any, seconds: float = 120
) -> ResyncRun:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        run = await get(engine, run_id)
        if done(run):
            return run
        await asyncio.sleep(0.2)
    pytest.fail(f"run {run_id} never got there: {await get(engine, run_id)}")


async def assert_waves_in_order(engine: AsyncEngine, run_id: uuid.UUID) -> None:
    """No item of a wave was claimed before every item of the waves before it had finished."""
    async with engine.connect() as conn:
        found = (
            await conn.execute(
                text("""SELECT wave, min(claimed_at), max(finished_at) FROM resync_items
                        WHERE run_id = :run AND claimed_at IS NOT NULL
                        GROUP BY wave ORDER BY wave"""),
                {"run": run_id},
            )
        ).all()
    for (_, _, finished), (wave, claimed, _) in itertools.pairwise(found):
        assert claimed > finished, f"wave {wave} claimed at {claimed}, before {finished}"
