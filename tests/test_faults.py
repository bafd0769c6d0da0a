"""Faults at every statement boundary: an org is fully installed or untouched, never between."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service import engine as install_engine
from install_service.actor import Actor
from install_service.db.session import transaction
from install_service.installs import repair
from install_service.installs import service as installs
from install_service.installs.schemas import InstallResult
from install_service.pagination import PageRequest
from install_service.resync import control, jobs
from install_service.resync import service as resync
from install_service.resync.schemas import ResyncRequest, Wave
from install_service.testing import install_template, make_user, publish_template
from tests.conftest import execute, rows, small_doc

TENANT_TABLES = (
    "agents",
    "install_events",
    "events",
    "entity_types",
    "entity_relationship_types",
    "entity_relationship_type_rules",
    "watchers",
    "watcher_versions",
    "event_classifiers",
    "event_classifier_versions",
)


class InjectedFault(Exception):
    pass


@contextmanager
def fail_at(engine: AsyncEngine, n: int) -> Iterator[dict[str, int]]:
    """Raise before the `n`th statement sent to the database inside the block."""
    seen = {"count": 0, "fired": 0}

    def before(*_: Any) -> None:
        seen["count"] += 1
        if seen["count"] == n:
            seen["fired"] = 1
            raise InjectedFault(f"fault before statement {n}")

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", before)


async def org_state(engine: AsyncEngine, org: uuid.UUID) -> list[str]:
    """Every row of the org's tenant tables, with xmin: equal means not even rewritten."""
    out: list[str] = []
    for table in TENANT_TABLES:
        found = await rows(
            engine,
            f"""SELECT '{table} ' || t.xmin::text || ' ' || to_jsonb(t)::text FROM {table} t
                WHERE organization_id = :o ORDER BY 1""",
            o=org,
        )
        out += [r[0] for r in found]
    return out


async def event_types(engine: AsyncEngine, org: uuid.UUID) -> list[str]:
    """The org's change feed: one event per committed change, none for a rolled-back one."""
    found = await rows(
        engine, "SELECT type FROM events WHERE organization_id = :o ORDER BY txid, seq", o=org
    )
    return [r.type for r in found]


async def fully_upgraded(engine: AsyncEngine, org: uuid.UUID) -> bool:
    """The org's install is at release 2 and every managed row equals release 2."""
    install = (
        await rows(
            engine,
            """SELECT a.id, a.organization_id, a.template_agent_id, a.installed_release_id,
                      r.version FROM agents a JOIN template_releases r
                      ON r.id = a.installed_release_id WHERE a.organization_id = :o""",
            o=org,
        )
    )[0]
    target = install_engine.Target(
        organization_id=org,
        release_id=install.installed_release_id,
        owner=install.template_agent_id,
        agent_id=install.id,
    )
    async with transaction(engine) as session:
        drift = await install_engine.drift(session, target)
    return install.version == 2 and drift == []


def v2() -> dict[str, Any]:
    doc = small_doc()
    doc["watchers"][0]["prompt"] = "v2 prompt"
    doc["entity_types"].append({"slug": "project", "name": "Project"})
    doc["relationship_types"][2]["rules"].append({"source": "project", "target": "person"})
    return doc


class TestInstallFaults:
    async def test_first_install_at_every_boundary(self, engine: AsyncEngine) -> None:
        await publish_template(engine, small_doc())
        boundary = 1
        while True:
            actor, user, _ = await make_user(engine)
            org = user.personal_organization.id
            before = await org_state(engine, org)
            with fail_at(engine, boundary) as fault, suppress(InjectedFault):
                await install_template(engine, actor, "starter")
            if not fault["fired"]:
                break  # every boundary of a whole install has been interrupted once
            assert await org_state(engine, org) == before, f"boundary {boundary}"
            retried = await install_template(engine, actor, "starter")
            assert retried.created
            assert await event_types(engine, org) == ["install.created"]
            boundary += 1
        # every statement of an install was interrupted once (6 in all)
        assert boundary > 6

    async def test_upgrade_at_every_boundary(self, engine: AsyncEngine, owner: Actor) -> None:
        await publish_template(engine, small_doc())
        first = await install_template(engine, owner, "starter")
        await publish_template(engine, v2())
        before = await org_state(engine, first.organization.id)
        boundary = 1
        while True:
            with fail_at(engine, boundary) as fault, suppress(InjectedFault):
                result = await install_template(engine, owner, "starter")
            if not fault["fired"]:
                break
            assert await org_state(engine, first.organization.id) == before, boundary
            boundary += 1
        assert (result.action, result.version) == ("upgrade", 2)
        # every statement of an upgrade was interrupted once (7 in all)
        assert boundary > 7
        assert await event_types(engine, first.organization.id) == [
            "install.created",
            "install.upgraded",
        ]


async def _reconcile(session: Any, actor: Actor, install_id: uuid.UUID) -> InstallResult:
    return await repair.reconcile(session, actor, install_id)


async def _detach(session: Any, actor: Actor, install_id: uuid.UUID) -> InstallResult:
    return await repair.detach(session, actor, install_id, kind="watchers", slug="inbox")


class TestRepairFaults:
    @pytest.mark.parametrize(
        ("operation", "event_type"),
        [
            (_reconcile, "install.reconciled"),
            (_detach, "install.item_detached"),
            (installs.uninstall, "install.uninstalled"),
        ],
    )
    async def test_at_every_boundary(
        self, engine: AsyncEngine, owner: Actor, operation: Any, event_type: str
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install_template(engine, owner, "starter")
        assert first.id is not None
        org = first.organization.id
        # Something for reconcile to repair: an edit and an archived watcher.
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Mine' WHERE organization_id = :o AND slug = 'person'",
            o=org,
        )
        await execute(
            engine, "UPDATE watchers SET status = 'archived' WHERE organization_id = :o", o=org
        )
        before = await org_state(engine, org)
        boundary = 1
        while True:
            with fail_at(engine, boundary) as fault, suppress(InjectedFault):
                async with transaction(engine) as session:
                    result = await operation(session, owner, first.id)
            if not fault["fired"]:
                break
            assert await org_state(engine, org) == before, f"boundary {boundary}"
            boundary += 1
        assert result.action != "none"
        assert boundary > 3
        assert await event_types(engine, org) == ["install.created", event_type]


class TestResyncItemFaults:
    async def test_item_at_every_boundary_then_retry(
        self, engine: AsyncEngine, install_service_database_url: Any
    ) -> None:
        await publish_template(engine, small_doc())
        actor, user, _ = await make_user(engine)
        await install_template(engine, actor, "starter")
        org = user.personal_organization.id
        await publish_template(engine, v2())
        async with transaction(engine) as session:
            run = await resync.start_run(session, Actor.system(), "starter")
        before = await org_state(engine, org)

        boundary = 1
        while True:
            with fail_at(engine, boundary) as fault, suppress(InjectedFault):
                await jobs.work_on_run(engine, run.id, worker="faulty")
            if not fault["fired"]:
                break
            if await org_state(engine, org) != before:  # the fault came after the item's commit
                assert await fully_upgraded(engine, org), boundary
            async with transaction(engine) as session:
                state = await resync.get_run(session, run.id)
                if state.status in resync.FINISHED:  # the fault hit inside the savepoint
                    [item] = (await resync.list_items(session, run.id, PageRequest())).items
                    assert item.status == "failed"
                    assert "InjectedFault" in (item.error or "")
                    await control.retry_run(session, run.id)
                else:  # the item is still to do, or done with the run still to close
                    assert state.status in ("queued", "running")
                    assert (state.counts.pending, state.counts.succeeded) in ((1, 0), (0, 1))
            boundary += 1

        async with transaction(engine) as session:
            done = await resync.get_run(session, run.id)
        assert (done.status, done.counts.succeeded) == ("succeeded", 1)
        assert boundary > 8
        assert await event_types(engine, org) == ["install.created", "install.upgraded"]
        prompts = await rows(
            engine,
            """SELECT v.version, v.prompt FROM watcher_versions v JOIN watchers w
               ON w.current_version_id = v.id WHERE w.organization_id = :o""",
            o=org,
        )
        assert [tuple(p) for p in prompts] == [(2, "v2 prompt")]


async def run_state(engine: AsyncEngine, run_id: uuid.UUID) -> list[Any]:
    """The run's row and its items, and its audit rows: equal means nothing was written."""
    return [
        *(
            tuple(r)
            for r in await rows(engine, "SELECT * FROM resync_runs WHERE id = :r", r=run_id)
        ),
        *(
            tuple(r)
            for r in await rows(
                engine, "SELECT * FROM resync_items WHERE run_id = :r ORDER BY id", r=run_id
            )
        ),
        *(
            tuple(r)
            for r in await rows(
                engine,
                "SELECT action FROM audit_log WHERE target_id = :r ORDER BY id",
                r=str(run_id),
            )
        ),
    ]


class TestStagedRunFaults:
    async def test_two_waves_at_every_boundary_never_start_the_second_early(
        self, engine: AsyncEngine
    ) -> None:
        await publish_template(engine, small_doc())
        orgs = []
        for _ in range(2):
            actor, user, _ = await make_user(engine)
            await install_template(engine, actor, "starter")
            orgs.append(user.personal_organization.id)
        await publish_template(engine, v2())
        async with transaction(engine) as session:
            run = await resync.start_run(
                session, Actor.system(), "starter", ResyncRequest(waves=[Wave(count=1)])
            )
        before = {org: await org_state(engine, org) for org in orgs}

        async def drive() -> None:
            """What workers do: jobs until the run needs none."""
            for _ in range(4):
                if (await jobs.work_on_run(engine, run.id, worker="faulty")).kind != "work":
                    return

        boundary = 1
        # Set while a retry has put wave 1's item back after wave 2's finished.
        first_retried = False
        while True:
            with fail_at(engine, boundary) as fault, suppress(InjectedFault):
                await drive()
            if not fault["fired"]:
                break
            async with transaction(engine) as session:
                found = (await resync.list_items(session, run.id, PageRequest())).items
                state = await resync.get_run(session, run.id)
                by_wave = {i.wave: i for i in found}
                first_retried = first_retried and by_wave[1].status == "pending"
                if by_wave[2].status != "pending" and not first_retried:
                    assert by_wave[1].status != "pending", boundary
                for item in found:
                    org = item.organization.id
                    if await org_state(engine, org) != before[org]:
                        assert await fully_upgraded(engine, org), boundary
                        assert item.status == "succeeded", boundary
                if state.status in resync.FINISHED and state.counts.failed:
                    # The fault hit inside a savepoint: the org is untouched, the item failed.
                    first_retried = by_wave[2].status != "failed"
                    await control.retry_run(session, run.id)
            boundary += 1

        async with transaction(engine) as session:
            done = await resync.get_run(session, run.id)
        assert (done.status, done.counts.succeeded) == ("succeeded", 2)
        # every statement of the run was interrupted once (12 in all)
        assert boundary > 11
        assert all([await fully_upgraded(engine, org) for org in orgs])

    async def test_control_calls_at_every_boundary_apply_whole_or_not_at_all(
        self, engine: AsyncEngine
    ) -> None:
        await publish_template(engine, small_doc())
        actor, _, _ = await make_user(engine)
        await install_template(engine, actor, "starter")
        await publish_template(engine, v2())
        async with transaction(engine) as session:
            run = await resync.start_run(session, Actor.system(), "starter")
        for action, status in (("pause", "paused"), ("resume", "queued"), ("cancel", "cancelled")):
            boundary = 1
            while True:
                before = await run_state(engine, run.id)
                with fail_at(engine, boundary) as fault, suppress(InjectedFault):
                    async with transaction(engine) as session:
                        await getattr(control, action)(session, run.id)
                if not fault["fired"]:
                    break
                assert await run_state(engine, run.id) == before, (action, boundary)
                boundary += 1
            async with transaction(engine) as session:
                assert (await resync.get_run(session, run.id)).status == status
            assert boundary > 2
