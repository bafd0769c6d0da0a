"""Bulk install: a resync with `install: true` installs the template into the named orgs that
lack it, as items of the same staged run, with the same engine and each org's outcome its own."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.actor import Actor
from install_service.db.session import transaction
from install_service.installs import service as installs
from install_service.orgs.service import ensure_admin
from install_service.resync import service as resync
from install_service.resync.schemas import ResyncRequest, Wave
from install_service.testing import bearer, publish_template
from tests.conftest import dump, execute, rows, scalar
from tests.runs import FLEET, FLEET_V2, fleet_of, items, work_until_idle

Client = AsyncTestClient[Litestar]
ADMIN_TOKEN = "bulk-admin-token"  # noqa: S105
RESYNC = "/api/v1/admin/templates/fleet/resync"


async def bare_orgs(engine: AsyncEngine, n: int, prefix: str = "new") -> list[uuid.UUID]:
    """`n` team orgs without the template (`new-00001`, ...); their ids in slug order."""
    await execute(
        engine,
        """INSERT INTO organizations (slug, name)
           SELECT :p || '-' || lpad(g::text, 5, '0'), 'New ' || g FROM generate_series(1, :n) g""",
        n=n,
        p=prefix,
    )
    found = await rows(
        engine,
        "SELECT id FROM organizations WHERE slug LIKE :p || '-%' ORDER BY slug",
        p=prefix,
    )
    return [r.id for r in found]


async def installed_at(engine: AsyncEngine, orgs: list[uuid.UUID]) -> dict[uuid.UUID, Any]:
    """Each org's install of `fleet`: (status, version), or None."""
    found = await rows(
        engine,
        """SELECT a.organization_id, a.status, r.version FROM agents a
           JOIN template_releases r ON r.id = a.installed_release_id
           WHERE a.template_agent_id IS NOT NULL
             AND a.organization_id = ANY(CAST(:orgs AS uuid[]))""",
        orgs=orgs,
    )
    by_org = {r.organization_id: (r.status, r.version) for r in found}
    return {org: by_org.get(org) for org in orgs}


async def run(engine: AsyncEngine, url: URL, request: ResyncRequest) -> Any:
    async with transaction(engine) as session:
        started = await resync.start_run(session, Actor.system(), "fleet", request)
    await work_until_idle(engine, url)
    async with transaction(engine) as session:
        return await resync.get_run(session, started.id)


class TestBulkInstall:
    async def test_installs_where_missing_and_upgrades_the_rest_in_one_run(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        upgraded = await fleet_of(engine, 3)
        await publish_template(engine, FLEET_V2)
        new = await bare_orgs(engine, 5)
        request = ResyncRequest(
            orgs=[str(o) for o in upgraded + new], install=True, waves=[Wave(count=2)]
        )
        finished = await run(engine, url, request)
        assert (finished.status, finished.counts.succeeded, finished.counts.total) == (
            "succeeded",
            8,
            8,
        )
        assert set((await installed_at(engine, upgraded + new)).values()) == {("active", 2)}
        done = await items(engine, finished.id)
        assert (
            sorted((i.installs, i.install_id is not None) for i in done)
            == [(False, True)] * 3 + [(True, True)] * 5
        )
        created = await rows(
            engine,
            """SELECT e.organization_id, e.action FROM install_events e
               WHERE e.organization_id = ANY(CAST(:orgs AS uuid[])) ORDER BY 1""",
            orgs=new,
        )
        assert [r.action for r in created] == ["install"] * 5
        feed = await rows(
            engine,
            "SELECT type FROM events WHERE organization_id = ANY(CAST(:orgs AS uuid[]))",
            orgs=new,
        )
        assert [r.type for r in feed] == ["install.created"] * 5

    async def test_a_conflicting_org_is_left_without_an_install_and_the_rest_go_ahead(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        await publish_template(engine, FLEET)
        new = await bare_orgs(engine, 3)
        await execute(
            engine,
            "INSERT INTO entity_types (organization_id, slug, name) VALUES (:o, 'thing', 'Ours')",
            o=new[1],
        )
        finished = await run(engine, url, ResyncRequest(orgs=[str(o) for o in new], install=True))
        assert (finished.status, finished.counts.succeeded, finished.counts.conflict) == (
            "partial",
            2,
            1,
        )
        states = await installed_at(engine, new)
        assert states == {new[0]: ("active", 1), new[1]: None, new[2]: ("active", 1)}
        (conflicted,) = await items(engine, finished.id, status="conflict")
        assert (conflicted.install_id, conflicted.conflicts) == (
            None,
            [{"kind": "entity_types", "slug": "thing", "reason": "user_authored", "fields": []}],
        )

    async def test_an_uninstalled_install_is_installed_again(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        (org,) = await fleet_of(engine, 1)
        install_id = await scalar(engine, "SELECT id FROM agents WHERE organization_id = :o", o=org)
        async with transaction(engine) as session:
            await installs.uninstall(session, Actor.system(), install_id)
        finished = await run(engine, url, ResyncRequest(orgs=[str(org)], install=True))
        assert finished.status == "succeeded"
        assert await installed_at(engine, [org]) == {org: ("active", 1)}
        actions = await rows(
            engine,
            "SELECT action FROM install_events WHERE install_id = :i ORDER BY 1",
            i=install_id,
        )
        assert sorted(r.action for r in actions) == ["install", "reinstall", "uninstall"]

    async def test_the_dry_run_says_install_or_conflict_and_equals_the_run(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        upgraded = await fleet_of(engine, 2)
        await publish_template(engine, FLEET_V2)
        new = await bare_orgs(engine, 3)
        await execute(
            engine,
            "INSERT INTO entity_types (organization_id, slug, name) VALUES (:o, 'thing', 'Ours')",
            o=new[2],
        )
        request = ResyncRequest(orgs=[str(o) for o in upgraded + new], install=True)
        before = await dump(engine)
        async with transaction(engine) as session:
            from install_service.resync import fleet

            planned = await fleet.dry_run(session, Actor.system(), "fleet", request)
        assert await dump(engine) == before
        outcomes = {i.organization.id: i.outcome for i in planned.items}
        assert outcomes == {
            upgraded[0]: "upgrade",
            upgraded[1]: "upgrade",
            new[0]: "install",
            new[1]: "install",
            new[2]: "conflict",
        }
        assert (planned.totals.install, planned.totals.upgrade, planned.totals.conflict) == (
            2,
            2,
            1,
        )
        finished = await run(engine, url, request)
        by_org = {i.organization.id: i.status for i in await items(engine, finished.id)}
        assert by_org == {
            org: "conflict" if outcome == "conflict" else "succeeded"
            for org, outcome in outcomes.items()
        }


class TestOverHttp:
    @pytest.fixture
    async def client(self, engine: AsyncEngine, install_service_client: Client) -> Client:
        async with transaction(engine) as session:
            await ensure_admin(session, ADMIN_TOKEN)
        return install_service_client

    async def test_starts_a_run_that_installs(
        self, engine: AsyncEngine, url: URL, client: Client
    ) -> None:
        await publish_template(engine, FLEET)
        new = await bare_orgs(engine, 2)
        response = await client.post(
            RESYNC,
            json={"orgs": ["new-00001", "new-00002"], "install": True},
            headers=bearer(ADMIN_TOKEN),
        )
        assert response.status_code == 202, response.text
        await work_until_idle(engine, url)
        assert set((await installed_at(engine, new)).values()) == {("active", 1)}

    @pytest.mark.parametrize(
        ("body", "status", "code"),
        [
            ({"orgs": ["new-00001"]}, 422, "organizations_not_selected"),
            ({"install": True}, 400, "invalid_request"),
            ({"orgs": ["fleet"], "install": True}, 422, "install_into_template_org"),
            ({"orgs": ["nobody"], "install": True}, 422, "unknown_organizations"),
        ],
    )
    async def test_refusals_are_specific_and_write_nothing(
        self,
        engine: AsyncEngine,
        client: Client,
        body: dict[str, Any],
        status: int,
        code: str,
    ) -> None:
        await publish_template(engine, FLEET)
        await bare_orgs(engine, 1)
        before = await dump(engine)
        for dry_run in (False, True):
            response = await client.post(
                RESYNC, json={**body, "dry_run": dry_run}, headers=bearer(ADMIN_TOKEN)
            )
            assert (response.status_code, response.json()["code"]) == (status, code), response.text
        assert await dump(engine) == before
