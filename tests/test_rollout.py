"""Staged resync: waves fixed at creation, thresholds that halt, bake and start times, skips,
the state machine under control calls, and the fleet dry run against the real run."""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from subprocess import Popen
from typing import Any

import msgspec
import pytest
from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.actor import Actor
from install_service.db.session import transaction
from install_service.errors import Conflict, Invalid
from install_service.installs import service as installs
from install_service.resync import control as runs
from install_service.resync import execution, fleet
from install_service.resync import service as resync
from install_service.resync.schemas import ResyncItem, ResyncRequest, ResyncRun
from install_service.states import FINISHED
from install_service.testing import install_template, make_user, publish_template
from tests.conftest import dump, execute, rows, scalar, small_doc
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


def md5_order(orgs: list[uuid.UUID]) -> list[uuid.UUID]:
    """The documented stable order, computed here independently of the database."""
    return sorted(orgs, key=lambda org: (hashlib.md5(str(org).encode()).hexdigest(), org))  # noqa: S324


async def edit_locally(engine: AsyncEngine, orgs: list[uuid.UUID]) -> None:
    """Make `fleet` v2 conflict in these orgs: they renamed the thing the release renames."""
    await execute(
        engine,
        """UPDATE entity_types SET name = 'Local' WHERE slug = 'thing'
           AND organization_id = ANY(CAST(:orgs AS uuid[]))""",
        orgs=orgs,
    )


async def untouched(engine: AsyncEngine, orgs: list[uuid.UUID]) -> bool:
    """These orgs' installs are still at v1 with nothing but their install in the history."""
    found = await rows(
        engine,
        """SELECT r.version, (SELECT count(*) FROM install_events e WHERE e.install_id = a.id)
           FROM agents a JOIN template_releases r ON r.id = a.installed_release_id
           WHERE a.template_agent_id IS NOT NULL AND a.organization_id = ANY(CAST(:orgs AS uuid[]))""",
        orgs=orgs,
    )
    return len(found) == len(orgs) and all(tuple(f) == (1, 1) for f in found)


async def versions(engine: AsyncEngine, orgs: list[uuid.UUID]) -> dict[uuid.UUID, int]:
    found = await rows(
        engine,
        """SELECT a.organization_id, r.version FROM agents a
           JOIN template_releases r ON r.id = a.installed_release_id
           WHERE a.template_agent_id IS NOT NULL AND a.organization_id = ANY(CAST(:orgs AS uuid[]))""",
        orgs=orgs,
    )
    return dict(found)  # type: ignore[arg-type]


def rate_above(wave: Any, threshold: float) -> bool:
    attempted = wave.succeeded + wave.conflict + wave.failed
    return attempted > 0 and wave.conflict / attempted > threshold


class TestWavesAreFixedAtCreation:
    async def test_count_percent_named_and_leftover_waves_follow_the_stable_order(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        orgs = await fleet_of(engine, 40)
        await publish_template(engine, FLEET_V2)
        slugs = {org: f"f-{i + 1:05d}" for i, org in enumerate(orgs)}
        named = [orgs[3], orgs[17]]
        run = await start(
            engine,
            url,
            "fleet",
            exclude=[slugs[orgs[0]]],
            waves=[
                {"count": 5},
                {"orgs": [slugs[named[0]], str(named[1])]},
                {"percent": 50},
                {"orgs": [slugs[named[0]]]},
                {"count": 3},
            ],
        )
        selected = md5_order([o for o in orgs if o != orgs[0]])
        pool = [o for o in selected if o not in named]
        expected = {org: 1 for org in pool[:5]} | dict.fromkeys(named, 2)
        # Half of 39 is 20 (ceil): the five, the two named, and 13 more.
        expected |= {org: 3 for org in pool[5:18]}
        expected |= {org: 5 for org in pool[18:21]}
        expected |= {org: 6 for org in pool[21:]}
        found = {i.organization.id: i.wave for i in await items(engine, run.id)}
        assert found == expected
        assert [(w.wave, w.total) for w in run.waves] == [
            (1, 5),
            (2, 2),
            (3, 13),
            (4, 0),
            (5, 3),
            (6, 16),
        ]
        assert run.selection["exclude"] == [str(orgs[0])]
        # A retry, a resumption or a dry run never reshuffles: the dry run's waves are these.
        async with transaction(engine) as session:
            plan = await fleet.dry_run(
                session,
                Actor.system(),
                "fleet",
                msgspec.convert(
                    {
                        "exclude": [str(orgs[0])],
                        "waves": [
                            {"count": 5},
                            {"orgs": [str(named[0]), slugs[named[1]]]},
                            {"percent": 50},
                            {"orgs": [str(named[0])]},
                            {"count": 3},
                        ],
                    },
                    ResyncRequest,
                ),
            )
        assert {i.organization.id: i.wave for i in plan.items} == expected

    async def test_unknown_or_unselectable_orgs_are_refused_listing_them(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        orgs = await fleet_of(engine, 3)
        await publish_template(engine, FLEET_V2)
        await execute(engine, "INSERT INTO organizations (slug, name) VALUES ('bare', 'Bare')")
        before = await dump(engine)
        async with transaction(engine) as session:
            with pytest.raises(Invalid) as unknown:
                await resync.start_run(
                    session,
                    Actor.system(),
                    "fleet",
                    msgspec.convert(
                        {
                            "orgs": ["f-00001", "nope"],
                            "exclude": [str(uuid.UUID(int=7))],
                            "waves": [{"orgs": ["ghost"]}],
                        },
                        ResyncRequest,
                    ),
                )
        assert unknown.value.code == "unknown_organizations"
        assert unknown.value.extra["organizations"] == sorted(
            ["nope", str(uuid.UUID(int=7)), "ghost"]
        )
        async with transaction(engine) as session:
            with pytest.raises(Invalid) as outside:
                await resync.start_run(
                    session,
                    Actor.system(),
                    "fleet",
                    msgspec.convert(
                        {
                            "exclude": ["f-00002"],
                            "waves": [{"orgs": ["f-00002", "bare", str(orgs[0])]}],
                        },
                        ResyncRequest,
                    ),
                )
        assert outside.value.code == "organizations_not_selected"
        assert outside.value.extra["organizations"] == ["bare", "f-00002"]
        assert await dump(engine) == before


class TestHaltingAtAThreshold:
    async def test_a_thousand_orgs_halt_after_the_first_wave_above_the_rate_then_resume_and_cancel(
        self,
        engine: AsyncEngine,
        url: URL,
        tmp_path: Path,
        processes: list[Popen[bytes]],
    ) -> None:
        await fleet_of(engine, 1000)
        await publish_template(engine, FLEET_V2)
        run = await start(
            engine,
            url,
            "fleet",
            waves=[{"count": 10}, {"percent": 50}, {"percent": 100}],
            max_conflict_rate=0.2,
        )
        assert [(w.wave, w.total) for w in run.waves] == [(1, 10), (2, 490), (3, 500)]
        # The release conflicts where orgs renamed the thing: three of the ten canaries, and
        # every third org after them.
        by_wave: dict[int, list[uuid.UUID]] = {1: [], 2: [], 3: []}
        for item in await items(engine, run.id):
            by_wave[item.wave].append(item.organization.id)
        conflicting = by_wave[1][:3] + by_wave[2][::3] + by_wave[3][::3]
        await edit_locally(engine, conflicting)

        processes.append(worker_process(url, tmp_path / "a.log", "--concurrency", "2"))
        processes.append(worker_process(url, tmp_path / "b.log", "--concurrency", "2"))
        halted = await wait_for(engine, run.id, lambda r: r.status in ("halted", *FINISHED))

        # The first wave whose measured conflict rate is above 0.2 halted it.
        finished = [w for w in halted.waves if w.pending == 0 and w.total]
        first_above = next(w.wave for w in finished if rate_above(w, 0.2))
        assert halted.status == "halted"
        assert halted.halt_reason is not None
        assert halted.halt_reason.startswith(f"wave {first_above}: conflict rate")
        assert halted.current_wave == first_above + 1
        later = [org for n, group in by_wave.items() if n > first_above for org in group]
        assert all(w.pending == w.total for w in halted.waves if w.wave > first_above)
        assert await untouched(engine, later)

        async with transaction(engine) as session:
            resumed = await runs.resume(session, run.id)
        assert (resumed.status, resumed.halt_reason) == ("running", None)
        from install_service.resync import jobs

        async with jobs.opened(url) as queue:
            await jobs.wake(queue, resumed)
        again = await wait_for(
            engine,
            run.id,
            lambda r: r.status in ("halted", *FINISHED) and r.current_wave > first_above + 1,
        )
        # Wave 2 conflicts in a third of its orgs: halted again before wave 3.
        assert (again.status, again.current_wave) == ("halted", 3)
        assert again.waves[1].pending == 0
        assert rate_above(again.waves[1], 0.2)

        async with transaction(engine) as session:
            cancelled = await runs.cancel(session, run.id)
        assert cancelled.status == "cancelled"
        assert (cancelled.waves[2].cancelled, cancelled.waves[2].pending) == (500, 0)
        assert await untouched(engine, by_wave[3])
        moved = await versions(engine, by_wave[1] + by_wave[2])
        assert {org for org, v in moved.items() if v == 1} == set(conflicting) - set(by_wave[3])
        assert sum(1 for v in moved.values() if v == 2) == cancelled.counts.succeeded
        await assert_waves_in_order(engine, run.id)

    async def test_a_rate_equal_to_the_threshold_does_not_halt(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        await fleet_of(engine, 12)
        await publish_template(engine, FLEET_V2)
        run = await start(engine, url, "fleet", waves=[{"count": 10}], max_conflict_rate=0.2)
        first = [i.organization.id for i in await items(engine, run.id, wave=1)]
        await edit_locally(engine, first[:2])
        await work_until_idle(engine, url)
        done = await get(engine, run.id)
        assert (done.status, done.counts.conflict, done.counts.succeeded) == ("partial", 2, 10)

    async def test_a_failure_rate_halts_too(self, engine: AsyncEngine, url: URL) -> None:
        orgs = await fleet_of(engine, 6)
        await publish_template(engine, FLEET_V2)
        run = await start(engine, url, "fleet", waves=[{"count": 2}], max_failure_rate=0.4)
        wave_one = [i.organization.id for i in await items(engine, run.id, wave=1)]
        # One of the two canaries fails for a reason that is not a conflict.
        await execute(
            engine,
            f"""CREATE FUNCTION fail_here() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.organization_id = '{wave_one[0]}' THEN
                        RAISE EXCEPTION 'disk full';
                    END IF;
                    RETURN NEW;
                END $$""",
        )
        await execute(
            engine,
            """CREATE TRIGGER fail_here BEFORE UPDATE ON entity_types
               FOR EACH ROW EXECUTE FUNCTION fail_here()""",
        )
        await work_until_idle(engine, url)
        halted = await get(engine, run.id)
        assert halted.status == "halted"
        assert halted.halt_reason == "wave 1: failure rate 1/2 is above 0.4"
        [failed] = await items(engine, run.id, status="failed")
        assert "disk full" in (failed.error or "")
        assert await untouched(engine, [o for o in orgs if o not in wave_one])

    async def test_skipped_items_do_not_dilute_a_wave_s_rate(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        orgs = await fleet_of(engine, 6)
        await publish_template(engine, FLEET_V2)
        run = await start(engine, url, "fleet", waves=[{"count": 4}], max_conflict_rate=0.4)
        wave_one = [i.organization.id for i in await items(engine, run.id, wave=1)]
        # Of the four canaries two are pinned (skipped) and one conflicts: 1 of 2 attempted.
        async with transaction(engine) as session:
            for install in await installs_of(engine, wave_one[:2]):
                await installs.pin(session, Actor.system(), install)
        await edit_locally(engine, wave_one[2:3])
        await work_until_idle(engine, url)
        halted = await get(engine, run.id)
        assert (halted.status, halted.halt_reason) == (
            "halted",
            "wave 1: conflict rate 1/2 is above 0.4",
        )
        first = halted.waves[0]
        assert (first.skipped, first.conflict, first.succeeded) == (2, 1, 1)
        assert await untouched(engine, [o for o in orgs if o not in wave_one])


class TestWaiting:
    async def test_a_scheduled_run_holds_no_worker_until_its_time(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        await fleet_of(engine, 3)
        await publish_template(engine, FLEET_V2)
        # Far enough ahead for the first worker to come and go on a busy machine.
        at = datetime.now(UTC) + timedelta(seconds=8)
        run = await start(engine, url, "fleet", start_at=at.isoformat())
        assert (run.status, run.next_step_at) == ("scheduled", at)
        await work_until_idle(engine, url)  # nothing due: the worker does not wait with it
        assert (await get(engine, run.id)).status == "scheduled"
        jobs_at = await rows(
            engine,
            "SELECT status::text, scheduled_at FROM procrastinate_jobs WHERE task_name = 'process_run'",
        )
        assert [tuple(j) for j in jobs_at] == [("todo", at)]
        await asyncio.sleep((at - datetime.now(UTC)).total_seconds() + 0.2)
        await work_until_idle(engine, url)
        done = await get(engine, run.id)
        assert (done.status, done.counts.succeeded) == ("succeeded", 3)
        assert done.started_at is not None
        assert done.started_at >= at

    async def test_a_run_bakes_between_waves_without_a_worker(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        await fleet_of(engine, 4)
        await publish_template(engine, FLEET_V2)
        run = await start(engine, url, "fleet", waves=[{"count": 1}], bake_seconds=8)
        await work_until_idle(engine, url)
        baking = await get(engine, run.id)
        assert (baking.status, baking.current_wave) == ("baking", 2)
        assert [(w.succeeded, w.pending) for w in baking.waves] == [(1, 0), (0, 3)]
        assert baking.next_step_at is not None
        doing = await scalar(
            engine, "SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'"
        )
        assert doing == 0
        await asyncio.sleep((baking.next_step_at - datetime.now(UTC)).total_seconds() + 0.2)
        await work_until_idle(engine, url)
        done = await get(engine, run.id)
        assert (done.status, done.counts.succeeded) == ("succeeded", 4)
        await assert_waves_in_order(engine, run.id)


class TestSkippedItems:
    async def test_pinned_and_uninstalled_installs_are_skipped_and_do_not_make_it_partial(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        await publish_template(engine, small_doc())
        people = [await make_user(engine) for _ in range(3)]
        results = [await install_template(engine, actor, "starter") for actor, _, _ in people]
        v2 = small_doc()
        v2["entity_types"][0]["name"] = "Human"
        await publish_template(engine, v2)
        run = await start(engine, url)
        async with transaction(engine) as session:
            await installs.pin(session, people[0][0], results[0].id, reason="audit season")
            await installs.uninstall(session, people[1][0], results[1].id)
        await work_until_idle(engine, url)
        done = await get(engine, run.id)
        assert done.status == "succeeded"
        assert (done.counts.skipped, done.counts.succeeded) == (2, 1)
        skipped = {i.install_id: i.reason for i in await items(engine, run.id, status="skipped")}
        assert skipped == {results[0].id: "pinned", results[1].id: "uninstalled"}
        # The uninstalled install was not brought back.
        status = await scalar(engine, "SELECT status FROM agents WHERE id = :i", i=results[1].id)
        assert status == "uninstalled"

    async def test_include_pinned_moves_pinned_installs_and_keeps_their_pins(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        orgs = await fleet_of(engine, 2)
        [install, _] = await installs_of(engine, orgs)
        async with transaction(engine) as session:
            await installs.pin(session, Actor.system(), install, reason="hold")
        await publish_template(engine, FLEET_V2)
        run = await start(engine, url, "fleet", include_pinned=True)
        await work_until_idle(engine, url)
        done = await get(engine, run.id)
        assert (done.status, done.counts.succeeded) == ("succeeded", 2)
        async with transaction(engine) as session:
            shown = await installs.get_install(session, Actor.system(), install)
        assert (shown.version, shown.pinned, shown.pin_reason) == (2, True, "hold")

    async def test_a_run_whose_attempted_items_all_conflict_failed(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        orgs = await fleet_of(engine, 3)
        await publish_template(engine, FLEET_V2)
        await edit_locally(engine, orgs[:2])
        async with transaction(engine) as session:
            await installs.pin(session, Actor.system(), (await installs_of(engine, orgs[2:]))[0])
        run = await start(engine, url, "fleet")
        await work_until_idle(engine, url)
        done = await get(engine, run.id)
        assert (done.status, done.counts.conflict, done.counts.skipped) == ("failed", 2, 1)


async def installs_of(engine: AsyncEngine, orgs: list[uuid.UUID]) -> list[uuid.UUID]:
    found = await rows(
        engine,
        """SELECT a.id FROM agents a WHERE a.template_agent_id IS NOT NULL
           AND a.organization_id = ANY(CAST(:orgs AS uuid[])) ORDER BY a.organization_id""",
        orgs=orgs,
    )
    return [r.id for r in found]


async def audit_actions(engine: AsyncEngine, run_id: uuid.UUID) -> list[str]:
    found = await rows(
        engine,
        "SELECT action FROM audit_log WHERE target_id = :run ORDER BY occurred_at, id",
        run=str(run_id),
    )
    return [r.action for r in found]


async def audit_changes(engine: AsyncEngine, run_id: uuid.UUID) -> list[tuple[str, str | None]]:
    """Each audited change of the run with the status it found (`was`)."""
    found = await rows(
        engine,
        "SELECT action, details ->> 'was' AS was FROM audit_log WHERE target_id = :run",
        run=str(run_id),
    )
    return [(r.action, r.was) for r in found]


async def control(engine: AsyncEngine, action: str, run_id: uuid.UUID) -> ResyncRun:
    async with transaction(engine) as session:
        result: ResyncRun = await getattr(runs, action)(session, run_id)
        return result


class TestStateMachine:
    async def test_pause_resume_cancel_repeat_and_refuse_as_the_table_says(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        await fleet_of(engine, 3)
        await publish_template(engine, FLEET_V2)
        run = await start(engine, url, "fleet")
        assert (await control(engine, "pause", run.id)).status == "paused"
        assert (await control(engine, "pause", run.id)).status == "paused"
        await work_until_idle(engine, url)  # paused: nothing is claimed
        assert (await get(engine, run.id)).counts.pending == 3
        assert (await control(engine, "resume", run.id)).status == "queued"  # never started
        assert (await control(engine, "resume", run.id)).status == "queued"
        assert (await control(engine, "cancel", run.id)).status == "cancelled"
        assert (await control(engine, "cancel", run.id)).status == "cancelled"
        for action in ("pause", "resume"):
            with pytest.raises(Conflict) as refused:
                await control(engine, action, run.id)
            assert refused.value.code == "resync_run_finished"
        cancelled = await get(engine, run.id)
        assert (cancelled.counts.cancelled, cancelled.counts.pending) == (3, 0)
        assert {i.reason for i in await items(engine, run.id)} == {"cancelled"}
        # Only the changes were recorded.
        assert await audit_actions(engine, run.id) == [
            "resync.started",
            "resync.paused",
            "resync.resumed",
            "resync.cancelled",
        ]

    async def test_no_item_is_claimed_while_paused_or_once_cancelled(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        await fleet_of(engine, 3)
        await publish_template(engine, FLEET_V2)
        run = await start(engine, url, "fleet")
        async with transaction(engine) as session:
            assert (await execution.start(session, run.id)).kind == "work"

        # A worker already at work on the run, as when a control call lands mid-wave.
        async def take_one() -> bool:
            async with transaction(engine) as session:
                return await execution.process_next_item(session, run.id, worker="test")

        assert await take_one()
        await control(engine, "pause", run.id)
        assert not await take_one()
        assert (await control(engine, "resume", run.id)).status == "running"
        assert await take_one()
        await control(engine, "cancel", run.id)
        assert not await take_one()
        final = await get(engine, run.id)
        assert (final.status, final.counts.succeeded, final.counts.cancelled) == (
            "cancelled",
            2,
            1,
        )

    async def test_a_finished_run_refuses_control_but_retries_its_failures(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        orgs = await fleet_of(engine, 4)
        await publish_template(engine, FLEET_V2)
        await edit_locally(engine, orgs[:1])
        run = await start(engine, url, "fleet", waves=[{"count": 2}])
        await work_until_idle(engine, url)
        assert (await get(engine, run.id)).status == "partial"
        for action in ("pause", "resume", "cancel"):
            with pytest.raises(Conflict) as refused:
                await control(engine, action, run.id)
            assert refused.value.code == "resync_run_finished"
        [conflicted] = await items(engine, run.id, status="conflict")
        await execute(
            engine, "UPDATE entity_types SET name = 'Thing' WHERE organization_id = :o", o=orgs[0]
        )
        retried = await control(engine, "retry_run", run.id)
        assert (retried.status, retried.current_wave, retried.counts.pending) == (
            "queued",
            conflicted.wave,
            1,
        )
        with pytest.raises(Conflict):
            await control(engine, "retry_run", run.id)  # not finished any more
        from install_service.resync import jobs

        async with jobs.opened(url) as queue:
            await jobs.wake(queue, retried)
        await work_until_idle(engine, url)
        final = await get(engine, run.id)
        assert (final.status, final.counts.succeeded) == ("succeeded", 4)
        assert await control(engine, "retry_run", run.id) == final  # nothing to retry
        assert (await audit_actions(engine, run.id)).count("resync.retried") == 1

    async def test_one_unfinished_run_per_template_joins_the_identical_request(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        await fleet_of(engine, 3)
        await publish_template(engine, FLEET_V2)
        run = await start(engine, url, "fleet", orgs=["f-00001", "f-00002"], max_conflict_rate=0.5)
        await control(engine, "pause", run.id)
        org = await scalar(engine, "SELECT id FROM organizations WHERE slug = 'f-00002'")
        same = await start(engine, url, "fleet", orgs=[str(org), "f-00001"], max_conflict_rate=0.5)
        assert (same.id, same.created, same.status) == (run.id, False, "paused")
        for different in ({"orgs": ["f-00001"]}, {"orgs": ["f-00001", "f-00002"]}, {"version": 1}):
            with pytest.raises(Conflict) as refused:
                await start(engine, url, "fleet", **different)
            assert refused.value.extra["run_id"] == str(run.id)
        await control(engine, "cancel", run.id)
        fresh = await start(engine, url, "fleet")
        assert (fresh.created, fresh.id != run.id) == (True, True)

    async def test_concurrent_control_calls_apply_one_after_the_other(
        self,
        engine: AsyncEngine,
        url: URL,
        tmp_path: Path,
        processes: list[Popen[bytes]],
    ) -> None:
        await fleet_of(engine, 200)
        await publish_template(engine, FLEET_V2)
        run = await start(engine, url, "fleet", waves=[{"count": 50}, {"percent": 60}])
        processes.append(worker_process(url, tmp_path / "worker.log", "--concurrency", "4"))
        await wait_for(engine, run.id, lambda r: r.counts.succeeded >= 20)
        rng = random.Random(15)  # noqa: S311 (an order of calls, not a secret)
        calls = [rng.choice(["pause", "resume", "pause", "resume", "cancel"]) for _ in range(40)]

        async def call(action: str) -> str:
            try:
                return (await control(engine, action, run.id)).status
            except Conflict as exc:
                return exc.code

        answers = await asyncio.gather(*(call(a) for a in calls))
        assert "cancelled" in answers
        assert set(answers) <= {"paused", "running", "halted", "cancelled", "resync_run_finished"}
        # Each recorded change names the status it found under the run's lock. The audit
        # times are those of the transactions' starts, not of their turns at the lock, so
        # the order is checked through what each change found: once a cancel went through,
        # no call changed anything; a pause only ever found the run going and a resume
        # only found it paused, so they alternated.
        changes = [c for c in await audit_changes(engine, run.id) if c[0] != "resync.started"]
        actions = [action for action, _ in changes]
        assert actions.count("resync.cancelled") == 1
        assert all(was != "cancelled" for _, was in changes), changes
        assert all(was != "paused" for a, was in changes if a == "resync.paused"), changes
        assert all(was == "paused" for a, was in changes if a == "resync.resumed"), changes
        [found_by_cancel] = [was for a, was in changes if a == "resync.cancelled"]
        assert actions.count("resync.paused") - actions.count("resync.resumed") == (
            1 if found_by_cancel == "paused" else 0
        ), changes
        processes[0].terminate()
        processes[0].wait(timeout=20)
        async with transaction(engine) as session:
            await runs.cancel_pending(session)
        final = await get(engine, run.id)
        assert (final.status, final.counts.pending) == ("cancelled", 0)
        assert final.counts.succeeded + final.counts.cancelled == 200
        await assert_waves_in_order(engine, run.id)


class TestFleetDryRun:
    async def test_predicts_what_the_run_then_does_for_every_org_and_writes_nothing(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        await publish_template(engine, small_doc())
        people = [await make_user(engine) for _ in range(30)]
        results = [await install_template(engine, actor, "starter") for actor, _, _ in people]
        org = [user.personal_organization.id for _, user, _ in people]
        v2 = small_doc()
        v2["entity_types"][0]["name"] = "Human"
        v2["entity_types"].append({"slug": "project", "name": "Project"})
        await publish_template(engine, v2)
        # A local edit the merge keeps, one it cannot, a row in the way, a pin, an org that
        # moved on its own, an uninstall.
        await execute(
            engine,
            "UPDATE entity_types SET description = 'ours' WHERE slug = 'person' AND organization_id = :o",
            o=org[1],
        )
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Ours' WHERE slug = 'person' AND organization_id = :o",
            o=org[2],
        )
        await execute(
            engine,
            "INSERT INTO entity_types (organization_id, slug, name) VALUES (:o, 'project', 'Mine')",
            o=org[3],
        )
        async with transaction(engine) as session:
            await installs.pin(session, people[4][0], results[4].id)
            await installs.upgrade(session, people[5][0], results[5].id)
            await installs.uninstall(session, people[6][0], results[6].id)
        request = {"waves": [{"count": 5}, {"percent": 50}]}

        before = await dump(engine)
        async with transaction(engine) as session:
            plan = await fleet.dry_run(
                session, Actor.system(), "starter", msgspec.convert(request, ResyncRequest)
            )
        assert await dump(engine) == before
        predicted = {i.organization.id: i for i in plan.items}
        assert org[6] not in predicted
        assert predicted[org[1]].outcome == "upgrade"
        assert predicted[org[2]].conflicts == [
            {
                "kind": "entity_types",
                "slug": "person",
                "reason": "locally_modified",
                "fields": ["/name"],
            }
        ]
        assert predicted[org[3]].outcome == "conflict"
        assert (predicted[org[4]].outcome, predicted[org[4]].reason) == ("skipped", "pinned")
        assert predicted[org[5]].outcome == "unchanged"
        assert msgspec.to_builtins(plan.totals) == {
            "upgrade": 25,
            "unchanged": 1,
            "conflict": 2,
            "skipped": 1,
        }

        run = await start(engine, url, **request)
        await work_until_idle(engine, url)
        done = {i.organization.id: i for i in await items(engine, run.id)}
        assert set(done) == set(predicted)

        def outcome(item: ResyncItem) -> tuple[str, int, Any]:
            if item.status == "succeeded":
                return ("unchanged" if item.reason == "unchanged" else "upgrade", item.wave, None)
            return (item.status, item.wave, item.conflicts or item.reason)

        assert {o: outcome(i) for o, i in done.items()} == {
            o: (i.outcome, i.wave, i.conflicts or i.reason) for o, i in predicted.items()
        }
        history = dict(
            await rows(
                engine,
                """SELECT a.organization_id, count(e.*) FROM agents a
                   JOIN install_events e ON e.install_id = a.id GROUP BY 1""",
            )
        )
        for o, item in predicted.items():
            expected_events = {"upgrade": 2, "unchanged": 2 if o == org[5] else 1}
            assert history[o] == expected_events.get(item.outcome, 1), item

    async def test_plans_every_install_in_one_statement(self, engine: AsyncEngine) -> None:
        await fleet_of(engine, 3)
        await publish_template(engine, FLEET_V2)

        async def statements() -> tuple[int, int]:
            seen = 0

            def count(*_: Any) -> None:
                nonlocal seen
                seen += 1

            event.listen(engine.sync_engine, "before_cursor_execute", count)
            try:
                async with transaction(engine) as session:
                    plan = await fleet.dry_run(session, Actor.system(), "fleet", ResyncRequest())
            finally:
                event.remove(engine.sync_engine, "before_cursor_execute", count)
            return plan.totals.upgrade, seen

        upgrades, few = await statements()
        assert upgrades == 3
        await execute(
            engine,
            """INSERT INTO organizations (slug, name)
               SELECT 'more-' || g, 'More' FROM generate_series(1, 60) g""",
        )
        async with transaction(engine) as session:
            for n in range(1, 61):
                await installs.install(
                    session, Actor.system(), template="fleet", organization=f"more-{n}", version=1
                )
        assert await statements() == (63, few)


class TestRulesEachRunKeeps:
    async def test_a_wave_whose_items_were_all_skipped_does_not_bake(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        """Bake time lets an attempted wave show its effects; a wave that attempted nothing
        has none to show, so the next wave starts at once."""
        await fleet_of(engine, 4)
        await publish_template(engine, FLEET_V2)
        run = await start(engine, url, "fleet", waves=[{"count": 2}], bake_seconds=600)
        wave_one = [i.organization.id for i in await items(engine, run.id, wave=1)]
        async with transaction(engine) as session:
            for install in await installs_of(engine, wave_one):
                await installs.pin(session, Actor.system(), install)
        await work_until_idle(engine, url)
        done = await get(engine, run.id)
        assert (done.status, done.next_step_at) == ("succeeded", None)
        assert [(w.skipped, w.succeeded) for w in done.waves] == [(2, 0), (0, 2)]

    async def test_pausing_a_halted_run_keeps_its_halt_and_reason(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        await fleet_of(engine, 4)
        await publish_template(engine, FLEET_V2)
        run = await start(engine, url, "fleet", waves=[{"count": 2}], max_conflict_rate=0.4)
        await edit_locally(engine, [i.organization.id for i in await items(engine, run.id, wave=1)])
        await work_until_idle(engine, url)
        halted = await get(engine, run.id)
        assert (halted.status, halted.halt_reason) == (
            "halted",
            "wave 1: conflict rate 2/2 is above 0.4",
        )
        before = await dump(engine)
        async with transaction(engine) as session:
            paused = await runs.pause(session, run.id)
        assert (paused.status, paused.halt_reason) == (halted.status, halted.halt_reason)
        assert await dump(engine) == before  # no change, no audit row
        async with transaction(engine) as session:
            resumed = await runs.resume(session, run.id)
        assert (resumed.status, resumed.current_wave, resumed.halt_reason) == ("running", 2, None)
        resumed_from = await rows(
            engine, "SELECT details FROM audit_log WHERE action = 'resync.resumed'"
        )
        assert [(r.details["was"], r.details["halt_reason"]) for r in resumed_from] == [
            ("halted", halted.halt_reason)
        ]

    async def test_the_fleet_dry_run_honours_force(self, engine: AsyncEngine, url: URL) -> None:
        """With `force` the release wins every conflicting path: the dry run must predict
        upgrades there, as the forced run then does."""
        orgs = await fleet_of(engine, 3)
        await publish_template(engine, FLEET_V2)
        await edit_locally(engine, orgs[:2])

        async def predicted(**request: Any) -> dict[uuid.UUID, str]:
            async with transaction(engine) as session:
                plan = await fleet.dry_run(
                    session, Actor.system(), "fleet", msgspec.convert(request, ResyncRequest)
                )
            return {i.organization.id: i.outcome for i in plan.items}

        assert await predicted() == {orgs[0]: "conflict", orgs[1]: "conflict", orgs[2]: "upgrade"}
        forced = await predicted(force=True)
        assert forced == dict.fromkeys(orgs, "upgrade")
        run = await start(engine, url, "fleet", force=True)
        await work_until_idle(engine, url)
        assert {i.organization.id: i.status for i in await items(engine, run.id)} == dict.fromkeys(
            orgs, "succeeded"
        )
