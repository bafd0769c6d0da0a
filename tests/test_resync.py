"""Resync runs: many orgs, isolated conflicts, crash safety, shared workers, retry."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from install_service import engine as install_engine
from install_service.actor import Actor
from install_service.db.session import transaction
from install_service.errors import Conflict
from install_service.installs.service import uninstall
from install_service.resync import control, execution, jobs
from install_service.resync import service as resync
from install_service.resync.schemas import ResyncRun
from install_service.testing import install_template, make_user, publish_template
from tests.conftest import execute, rows, scalar, small_doc
from tests.runs import (
    FLEET_V2,
    assert_waves_in_order,
    fleet_of,
    get,
    items,
    start,
    wait_for,
    work_until_idle,
    worker_process,
)

V2 = small_doc()
V2["watchers"][0]["prompt"] = "Find people and companies, v2."
V2["entity_types"][0]["name"] = "Human"
V2["entity_types"].append({"slug": "project", "name": "Project"})


async def installed_orgs(engine: AsyncEngine, n: int) -> list[Any]:
    """`n` users, each with starter v1 installed in their personal org."""
    await publish_template(engine, small_doc())
    users = []
    for _ in range(n):
        actor, user, _ = await make_user(engine)
        await install_template(engine, actor, "starter")
        users.append(user)
    await publish_template(engine, V2)
    return users


async def started(engine: AsyncEngine, *, running: bool = False) -> ResyncRun:
    """A run of the latest starter release, committed, with no worker on it (`running`: as
    the first job leaves it, before it claims anything)."""
    async with transaction(engine) as session:
        run = await resync.start_run(session, Actor.system(), "starter")
    if running:
        async with transaction(engine) as session:
            await execution.start(session, run.id)
    return run


async def claim(engine: AsyncEngine, run_id: uuid.UUID, worker: str) -> bool:
    """One worker's turn: claim an item of the run, process it and commit."""
    async with transaction(engine) as session:
        return await execution.process_next_item(session, run_id, worker=worker)


async def assert_no_org_half_upgraded(
    engine: AsyncEngine, locally_edited: frozenset[uuid.UUID] = frozenset()
) -> dict[int, int]:
    """Every install's rows equal its installed release exactly (but for orgs the test edited
    by hand); returns the number of installs per installed version."""
    installs = await rows(
        engine,
        """SELECT a.id, a.organization_id, a.template_agent_id, a.installed_release_id,
                  r.version FROM agents a JOIN template_releases r ON r.id = a.installed_release_id
           WHERE a.template_agent_id IS NOT NULL""",
    )
    per_version: dict[int, int] = {}
    async with transaction(engine) as session:
        for install in installs:
            target = install_engine.Target(
                organization_id=install.organization_id,
                release_id=install.installed_release_id,
                owner=install.template_agent_id,
                agent_id=install.id,
            )
            drift = await install_engine.drift(session, target)
            if install.organization_id in locally_edited:
                assert [(d["slug"], d["drift"]) for d in drift] == [("person", "modified")]
            else:
                assert drift == [], install.organization_id
            per_version[install.version] = per_version.get(install.version, 0) + 1
    return per_version


async def hold_an_org_of_wave(conn: AsyncConnection, run_id: uuid.UUID, wave: int) -> None:
    """Lock a mirrored row of one org of the run's `wave` in `conn`'s transaction: a worker's
    apply of that org waits for it, so the wave cannot end until `conn` lets go."""
    held = await conn.execute(
        text("""SELECT 1 FROM entity_types t JOIN resync_items i
                  ON i.organization_id = t.organization_id
                WHERE i.run_id = :r AND i.wave = :w AND t.slug = 'thing'
                ORDER BY i.id LIMIT 1 FOR UPDATE OF t"""),
        {"r": run_id, "w": wave},
    )
    held.one()


class TestResyncRun:
    async def test_two_hundred_orgs_two_conflicts_then_retry(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        users = await installed_orgs(engine, 200)
        collides, edited = users[7], users[42]
        await execute(
            engine,
            "INSERT INTO entity_types (organization_id, slug, name) VALUES (:o, 'project', 'Mine')",
            o=collides.personal_organization.id,
        )
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Local' WHERE organization_id = :o AND slug = 'person'",
            o=edited.personal_organization.id,
        )

        run = await start(engine, url)
        assert (run.status, run.counts.total, run.counts.pending) == ("queued", 200, 200)
        again = await start(engine, url)
        assert (again.id, again.created) == (run.id, False)

        await work_until_idle(engine, url)

        done = await get(engine, run.id)
        assert done.status == "partial"
        assert (done.counts.succeeded, done.counts.conflict, done.counts.failed) == (198, 2, 0)
        conflicted_items = await items(engine, run.id, status="conflict")
        assert {(i.organization.id, i.status) for i in conflicted_items} == {
            (collides.personal_organization.id, "conflict"),
            (edited.personal_organization.id, "conflict"),
        }
        reasons = {i.organization.id: i.conflicts for i in conflicted_items}
        assert reasons[collides.personal_organization.id] == [
            {"kind": "entity_types", "slug": "project", "reason": "user_authored", "fields": []}
        ]
        assert reasons[edited.personal_organization.id] == [
            {
                "kind": "entity_types",
                "slug": "person",
                "reason": "locally_modified",
                "fields": ["/name"],
            }
        ]
        versions = dict(
            await rows(
                engine,
                """SELECT w.organization_id, count(v.*) FROM watchers w
                   JOIN watcher_versions v ON v.watcher_id = w.id
                   WHERE w.managed_by_template_agent_id IS NOT NULL GROUP BY 1""",
            )
        )
        conflicted = {collides.personal_organization.id, edited.personal_organization.id}
        assert sorted(n for org, n in versions.items() if org not in conflicted) == [2] * 198
        assert [versions[org] for org in conflicted] == [1, 1]
        edited_org = frozenset({edited.personal_organization.id})
        assert await assert_no_org_half_upgraded(engine, edited_org) == {2: 198, 1: 2}

        # Resolve both conflicts, retry: only the two items run again.
        await execute(
            engine,
            "UPDATE entity_types SET slug = 'my-project' WHERE organization_id = :o AND slug = 'project'",
            o=collides.personal_organization.id,
        )
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Person' WHERE organization_id = :o AND slug = 'person'",
            o=edited.personal_organization.id,
        )
        async with transaction(engine) as session:
            retried = await control.retry_run(session, run.id)
        assert (retried.status, retried.counts.pending) == ("queued", 2)
        async with jobs.opened(url) as queue:
            await jobs.wake(queue, retried)
        await work_until_idle(engine, url)

        final = await get(engine, run.id)
        assert (final.status, final.counts.succeeded, final.counts.total) == ("succeeded", 200, 200)
        assert await assert_no_org_half_upgraded(engine) == {2: 200}
        attempts = await rows(engine, "SELECT attempts, count(*) FROM resync_items GROUP BY 1")
        assert sorted(tuple(a) for a in attempts) == [(1, 198), (2, 2)]

    async def test_orgs_whose_customizations_do_not_overlap_the_release_all_succeed(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        """Each org edited a different field of the item the release changes (or another
        item); the run merges every one of them and ends `succeeded`, edits kept."""
        users = await installed_orgs(engine, 4)
        edits = [
            "UPDATE entity_types SET icon = 'mine' WHERE slug = 'person'",
            "UPDATE entity_types SET description = 'ours' WHERE slug = 'person'",
            "UPDATE entity_types SET color = '#abcdef' WHERE slug = 'company'",
            "UPDATE watchers SET schedule = '5 * * * *' WHERE true",
        ]
        for user, edit in zip(users, edits, strict=True):
            await execute(
                engine, edit + " AND organization_id = :o", o=user.personal_organization.id
            )
        run = await start(engine, url)
        await work_until_idle(engine, url)
        done = await get(engine, run.id)
        assert (done.status, done.counts.succeeded) == ("succeeded", 4)
        kept = await rows(
            engine,
            """SELECT (SELECT name FROM entity_types e WHERE e.organization_id = o.id
                         AND e.slug = 'person') AS name,
                      (SELECT icon FROM entity_types e WHERE e.organization_id = o.id
                         AND e.slug = 'person') AS icon,
                      (SELECT schedule FROM watchers w WHERE w.organization_id = o.id) AS schedule
               FROM organizations o WHERE o.id = ANY(:orgs) ORDER BY o.created_at""",
            orgs=[u.personal_organization.id for u in users],
        )
        assert {r.name for r in kept} == {"Human"}
        assert [r.icon for r in kept] == ["mine", None, None, None]
        assert [r.schedule for r in kept][3] == "5 * * * *"

    async def test_uninstalled_installs_are_left_out_and_stay_uninstalled(
        self, engine: AsyncEngine
    ) -> None:
        kept, removed = await installed_orgs(engine, 2)
        removed_install = await scalar(
            engine,
            "SELECT id FROM agents WHERE organization_id = :o AND template_agent_id IS NOT NULL",
            o=removed.personal_organization.id,
        )
        async with transaction(engine) as session:
            await uninstall(session, Actor(user_id=removed.id), removed_install)

        run = await started(engine)
        assert run.counts.total == 1
        await jobs.work_on_run(engine, run.id, worker="test")

        assert (await get(engine, run.id)).status == "succeeded"
        states = await rows(
            engine,
            """SELECT a.organization_id, a.status, r.version FROM agents a
               JOIN template_releases r ON r.id = a.installed_release_id
               WHERE a.template_agent_id IS NOT NULL""",
        )
        assert {tuple(s) for s in states} == {
            (kept.personal_organization.id, "active", 2),
            (removed.personal_organization.id, "uninstalled", 1),
        }

    async def test_template_without_installs_finishes_at_once(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        await publish_template(engine, small_doc())
        run = await start(engine, url)
        assert (run.status, run.counts.total) == ("succeeded", 0)

    async def test_retry_of_a_running_run_is_refused(self, engine: AsyncEngine, url: URL) -> None:
        await installed_orgs(engine, 2)
        run = await start(engine, url)
        async with transaction(engine) as session:
            with pytest.raises(Conflict):
                await control.retry_run(session, run.id)


class TestRunOutcome:
    async def test_run_where_no_org_succeeded_ends_failed(self, engine: AsyncEngine) -> None:
        conflicted, broken = await installed_orgs(engine, 2)
        await execute(
            engine,
            "INSERT INTO entity_types (organization_id, slug, name) VALUES (:o, 'project', 'Mine')",
            o=conflicted.personal_organization.id,
        )
        # Any write to the other org's entity types fails, as a broken database would.
        await execute(
            engine,
            """CREATE FUNCTION refuse_writes() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN RAISE EXCEPTION 'refused'; END $$""",
        )
        await execute(
            engine,
            f"""CREATE TRIGGER refuse_writes BEFORE INSERT OR UPDATE ON entity_types FOR EACH ROW
                WHEN (NEW.organization_id = '{broken.personal_organization.id}')
                EXECUTE FUNCTION refuse_writes()""",
        )
        run = await started(engine)

        await jobs.work_on_run(engine, run.id, worker="test")

        done = await get(engine, run.id)
        assert (done.status, done.counts.conflict, done.counts.failed) == ("failed", 1, 1)
        assert {(i.organization.id, i.status) for i in await items(engine, run.id)} == {
            (conflicted.personal_organization.id, "conflict"),
            (broken.personal_organization.id, "failed"),
        }
        assert await scalar(engine, "SELECT status FROM resync_runs WHERE id = :r", r=run.id) == (
            "failed"
        )
        assert await assert_no_org_half_upgraded(engine) == {1: 2}

    async def test_a_late_job_for_a_finished_run_changes_nothing(self, engine: AsyncEngine) -> None:
        await installed_orgs(engine, 1)
        run = await started(engine)
        await jobs.work_on_run(engine, run.id, worker="first")
        runs = "SELECT to_jsonb(r)::text FROM resync_runs r"
        before = await rows(engine, runs)
        assert (await get(engine, run.id)).status == "succeeded"

        await jobs.work_on_run(engine, run.id, worker="late")

        assert await rows(engine, runs) == before


class TestClaiming:
    async def test_an_item_held_by_one_worker_is_passed_over_by_the_next(
        self, engine: AsyncEngine
    ) -> None:
        await installed_orgs(engine, 2)
        run = await started(engine, running=True)

        async with transaction(engine) as holding:
            assert await execution.process_next_item(holding, run.id, worker="first")
            # The first claim is still held (uncommitted): the second must take the other
            # item rather than wait for it. The bound only turns a wait into a failure.
            assert await asyncio.wait_for(claim(engine, run.id, "second"), timeout=15)

        claimed = await rows(
            engine, "SELECT worker, status, attempts FROM resync_items ORDER BY worker"
        )
        assert [tuple(c) for c in claimed] == [
            ("first", "succeeded", 1),
            ("second", "succeeded", 1),
        ]
        assert await assert_no_org_half_upgraded(engine) == {2: 2}

    async def test_a_batch_passes_over_an_item_whose_install_is_busy(
        self, engine: AsyncEngine
    ) -> None:
        """One org's upgrade in progress (its install locked) does not hold up a batch: the
        claim takes the other items and leaves that one pending."""
        users = await installed_orgs(engine, 2)
        run = await started(engine, running=True)
        busy = users[0].personal_organization.id
        async with engine.connect() as holder:
            await holder.execute(
                text(
                    "SELECT 1 FROM agents WHERE organization_id = :o "
                    "AND template_agent_id IS NOT NULL FOR UPDATE"
                ),
                {"o": busy},
            )
            async with transaction(engine) as session:
                # The bound only turns a wait into a failure.
                claimed = await asyncio.wait_for(
                    execution.claim_batch(session, run.id, 10), timeout=15
                )
            await holder.rollback()
        assert [c.organization_id for c in claimed] == [users[1].personal_organization.id]
        pending = await scalar(
            engine,
            "SELECT status FROM resync_items WHERE run_id = :r AND organization_id = :o",
            r=run.id,
            o=busy,
        )
        assert pending == "pending"

    async def test_an_uninstall_racing_a_claimed_item_waits_and_is_never_undone(
        self, engine: AsyncEngine
    ) -> None:
        """The claim locks the item's install: an uninstall that commits after the claim waits
        until the item is done, so the item's upgrade never reinstalls an org that has just
        uninstalled (as it would, had it checked an install it had not locked)."""
        (user,) = await installed_orgs(engine, 1)
        install_id = await scalar(
            engine,
            "SELECT id FROM agents WHERE organization_id = :o",
            o=user.personal_organization.id,
        )
        owner = Actor(user_id=user.id)
        run = await started(engine, running=True)

        async def uninstalling() -> None:
            async with transaction(engine) as session:
                await uninstall(session, owner, install_id)

        async with transaction(engine) as holding:
            item = await execution.claim(holding, run.id)
            assert item is not None
            assert item.install_status == "active"
            racing = asyncio.create_task(uninstalling())
            # The uninstall must wait for the claim; the bound only keeps a test that would
            # otherwise let it through from waiting for nothing.
            done, _ = await asyncio.wait({racing}, timeout=1)
            assert not done
            await execution.process(holding, item, worker="first")
        await asyncio.wait_for(racing, timeout=15)

        status = await scalar(engine, "SELECT status FROM agents WHERE id = :i", i=install_id)
        outcome = await scalar(
            engine, "SELECT status FROM resync_items WHERE run_id = :r", r=run.id
        )
        assert (status, outcome) == ("uninstalled", "succeeded")

    async def test_run_is_not_closed_while_an_item_is_held(self, engine: AsyncEngine) -> None:
        await installed_orgs(engine, 2)
        run = await started(engine, running=True)

        async with transaction(engine) as holding:
            assert await execution.process_next_item(holding, run.id, worker="first")
            assert await asyncio.wait_for(claim(engine, run.id, "second"), timeout=15)
            async with transaction(engine) as session:
                assert (await execution.close_wave(session, run.id)).kind == "none"
            assert (await get(engine, run.id)).status == "running"

        async with transaction(engine) as session:
            assert (await execution.close_wave(session, run.id)).kind == "none"
        done = await get(engine, run.id)
        assert (done.status, done.counts.succeeded) == ("succeeded", 2)


class TestWorkerProcesses:
    async def test_sigkill_mid_run_leaves_no_org_half_upgraded_and_run_resumes(
        self,
        engine: AsyncEngine,
        url: URL,
        tmp_path: Path,
        processes: list[subprocess.Popen[bytes]],
    ) -> None:
        await installed_orgs(engine, 200)
        run = await start(engine, url)
        first = worker_process(url, tmp_path / "first.log", "--concurrency", "1")
        processes.append(first)
        await wait_for(engine, run.id, lambda r: r.counts.succeeded >= 20)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=20)

        midway = await get(engine, run.id)
        assert midway.status == "running"
        assert 20 <= midway.counts.succeeded < 200
        per_version = await assert_no_org_half_upgraded(engine)
        assert per_version[2] == midway.counts.succeeded

        second = worker_process(url, tmp_path / "second.log")
        processes.append(second)
        finished = await wait_for(engine, run.id, lambda r: r.status in resync.FINISHED)
        assert (finished.status, finished.counts.succeeded) == ("succeeded", 200)
        assert await assert_no_org_half_upgraded(engine) == {2: 200}
        upgrades = await scalar(
            engine, "SELECT count(*) FROM install_events WHERE action = 'upgrade'"
        )
        assert upgrades == 200

    async def test_sigkill_mid_batch_leaves_every_org_of_the_batch_untouched_and_pending(
        self,
        engine: AsyncEngine,
        url: URL,
        tmp_path: Path,
        processes: list[subprocess.Popen[bytes]],
    ) -> None:
        """A worker killed while it writes a batch of orgs (held up in its apply by a row
        another session holds) leaves every org of the batch as it was and every item
        pending; the next worker moves them all, each once."""
        orgs = await fleet_of(engine, 12)
        await publish_template(engine, FLEET_V2)
        run = await start(engine, url, "fleet")
        async with engine.connect() as holder:
            await holder.execute(
                text("SELECT 1 FROM entity_types WHERE slug = 'thing' AND organization_id = "
                     "ANY(CAST(:orgs AS uuid[])) FOR UPDATE"),
                {"orgs": orgs},
            )  # fmt: skip
            doomed = worker_process(url, tmp_path / "doomed.log", "--concurrency", "1")
            processes.append(doomed)
            deadline = time.monotonic() + 60
            while not await scalar(
                engine,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'",
            ):
                assert time.monotonic() < deadline, "the worker never got to its apply"
                await asyncio.sleep(0.05)
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(timeout=20)
            await holder.rollback()
        # Its backend notices its client is gone once it has the row; wait until no
        # transaction but this test's is left.
        deadline = time.monotonic() + 30
        while await scalar(
            engine,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND xact_start IS NOT NULL AND pid <> pg_backend_pid()",
        ):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        midway = await get(engine, run.id)
        assert (midway.counts.pending, midway.counts.succeeded) == (12, 0)
        assert await assert_no_org_half_upgraded(engine) == {1: 12}

        processes.append(worker_process(url, tmp_path / "second.log"))
        finished = await wait_for(engine, run.id, lambda r: r.status in resync.FINISHED)
        assert (finished.status, finished.counts.succeeded) == ("succeeded", 12)
        assert await assert_no_org_half_upgraded(engine) == {2: 12}
        assert await scalar(engine, "SELECT max(attempts) FROM resync_items") == 1

    async def test_two_workers_share_a_run_and_process_no_item_twice(
        self,
        engine: AsyncEngine,
        url: URL,
        tmp_path: Path,
        processes: list[subprocess.Popen[bytes]],
    ) -> None:
        await installed_orgs(engine, 200)
        processes.append(worker_process(url, tmp_path / "a.log", "--concurrency", "2"))
        processes.append(worker_process(url, tmp_path / "b.log", "--concurrency", "2"))
        # Both listening for jobs before the run begins, however slowly either started.
        deadline = time.monotonic() + 60
        while (
            await scalar(
                engine,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND query LIKE 'LISTEN %procrastinate%'",
            )
            < 2
        ):
            assert time.monotonic() < deadline, "the workers never listened"
            await asyncio.sleep(0.05)
        run = await start(engine, url)
        finished = await wait_for(engine, run.id, lambda r: r.status in resync.FINISHED)

        assert (finished.status, finished.counts.succeeded) == ("succeeded", 200)
        assert await scalar(engine, "SELECT max(attempts) FROM resync_items") == 1
        by_worker = await rows(engine, "SELECT worker, count(*) FROM resync_items GROUP BY 1")
        assert len(by_worker) == 2, by_worker
        assert sum(n for _, n in by_worker) == 200
        per_install = await rows(
            engine,
            """SELECT install_id, count(*) FROM install_events WHERE action = 'upgrade'
               GROUP BY 1""",
        )
        assert sorted(n for _, n in per_install) == [1] * 200

    async def test_sigkill_mid_wave_never_lets_the_next_wave_start_early(
        self,
        engine: AsyncEngine,
        url: URL,
        tmp_path: Path,
        processes: list[subprocess.Popen[bytes]],
    ) -> None:
        await fleet_of(engine, 200)
        await publish_template(engine, FLEET_V2)
        run = await start(engine, url, "fleet", waves=[{"count": 80}])
        async with engine.connect() as holder:
            # One org of wave 1 held: the worker cannot end wave 1 before it is killed.
            await hold_an_org_of_wave(holder, run.id, 1)
            first = worker_process(url, tmp_path / "first.log", "--concurrency", "2")
            processes.append(first)
            await wait_for(engine, run.id, lambda r: r.waves[0].succeeded >= 20)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=20)

            midway = await get(engine, run.id)
            assert (midway.status, midway.current_wave) == ("running", 1)
            assert midway.waves[1].pending == 120
            assert (await assert_no_org_half_upgraded(engine))[2] == midway.counts.succeeded
            await holder.rollback()

        # Two workers take over: wave 2 waits until every item of wave 1 is done.
        for name in ("second", "third"):
            processes.append(worker_process(url, tmp_path / f"{name}.log", "--concurrency", "2"))
        finished = await wait_for(engine, run.id, lambda r: r.status in resync.FINISHED)
        assert (finished.status, finished.counts.succeeded) == ("succeeded", 200)
        await assert_waves_in_order(engine, run.id)
        assert await assert_no_org_half_upgraded(engine) == {2: 200}
        assert await scalar(engine, "SELECT max(attempts) FROM resync_items") == 1

    async def test_control_calls_around_a_killed_worker(
        self,
        engine: AsyncEngine,
        url: URL,
        tmp_path: Path,
        processes: list[subprocess.Popen[bytes]],
    ) -> None:
        """Paused while its worker is killed, a run resumes with another; cancelled after
        one is killed, its dead worker's item is cancelled too, and every moved org stays."""
        await fleet_of(engine, 200)
        await publish_template(engine, FLEET_V2)
        run = await start(engine, url, "fleet", waves=[{"count": 60}, {"count": 60}])
        async with engine.connect() as holder:
            # One org of wave 2 held: wave 2 cannot end, however fast its workers, so the
            # third wave has not begun when the run is cancelled.
            await hold_an_org_of_wave(holder, run.id, 2)
            doomed = worker_process(url, tmp_path / "doomed.log", "--concurrency", "2")
            processes.append(doomed)
            await wait_for(engine, run.id, lambda r: r.counts.succeeded >= 10)
            async with transaction(engine) as session:
                await control.pause(session, run.id)
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(timeout=20)
            paused = await get(engine, run.id)
            assert paused.status == "paused"
            async with transaction(engine) as session:
                resumed = await control.resume(session, run.id)
            async with jobs.opened(url) as queue:
                await jobs.wake(queue, resumed)
            second = worker_process(url, tmp_path / "second.log", "--concurrency", "2")
            processes.append(second)
            await wait_for(
                engine, run.id, lambda r: r.current_wave == 2 and r.counts.succeeded >= 80
            )
            second.send_signal(signal.SIGKILL)
            second.wait(timeout=20)
            async with transaction(engine) as session:
                cancelled = await control.cancel(session, run.id)
            assert cancelled.waves[2].cancelled == 80
            await holder.rollback()

        # The dead worker's item (if it held one) is cancelled once its lock is gone.
        async def swept() -> int:
            async with jobs.opened(url) as queue:
                await jobs.resume_runs(engine, queue)
            return (await get(engine, run.id)).counts.pending

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not await swept():
                break
            await asyncio.sleep(0.5)
        final = await get(engine, run.id)
        assert (final.status, final.counts.pending) == ("cancelled", 0)
        assert final.counts.succeeded + final.counts.cancelled == 200
        per_version = await assert_no_org_half_upgraded(engine)
        assert per_version[2] == final.counts.succeeded
        cancelled_installs = [i.install_id for i in await items(engine, run.id, status="cancelled")]
        moved = await scalar(
            engine,
            """SELECT count(*) FROM install_events WHERE action = 'upgrade'
               AND install_id = ANY(CAST(:i AS uuid[]))""",
            i=cancelled_installs,
        )
        assert moved == 0
        await assert_waves_in_order(engine, run.id)
