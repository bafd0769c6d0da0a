"""Watchers at run time: cron schedules checked at publish, `next_run_at` kept in step with
every install, upgrade, uninstall and edit, and the desired state a runner reads."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from croniter import croniter
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.actor import Actor
from install_service.db.session import transaction
from install_service.installs import service as installs
from install_service.orgs.service import ensure_admin
from install_service.testing import (
    add_membership,
    bearer,
    install_template,
    make_org,
    make_user,
    publish_template,
)
from install_service.watchers import jobs as watcher_jobs
from install_service.watchers import schedules
from tests.conftest import execute, rows, small_doc

Client = AsyncTestClient[Litestar]


def with_schedule(schedule: str | None, prompt: str = "Find people and companies.") -> Any:
    doc = small_doc()
    doc["watchers"][0]["schedule"] = schedule
    doc["watchers"][0]["prompt"] = prompt
    return doc


async def watcher(engine: AsyncEngine, org: Any) -> Any:
    return (
        await rows(
            engine,
            "SELECT status, schedule, next_run_at, now() AS now FROM watchers "
            "WHERE organization_id = :o",
            o=org,
        )
    )[0]


def next_of(schedule: str, after: datetime) -> datetime:
    found: datetime = croniter(schedule, after).get_next(datetime)
    return found


class TestSchedules:
    @pytest.mark.parametrize(
        ("expression", "fine"),
        [
            ("*/30 * * * *", True),
            ("0 9 * * 1-5", True),
            ("15,45 */2 1 * *", True),
            ("* * * * * *", False),  # six fields
            ("@hourly", False),
            ("61 * * * *", False),
            ("* * 31 2 *", False),  # never fires
            ("every day", False),
            ("", False),
        ],
    )
    def test_five_field_cron_only(self, expression: str, fine: bool) -> None:
        assert (schedules.problem(expression) is None) is fine

    def test_next_run_is_utc_and_strictly_after(self) -> None:
        at = datetime(2026, 1, 1, 9, 30, tzinfo=UTC)
        assert schedules.next_run("*/30 * * * *", at) == datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
        assert schedules.next_run("bad", at) is None

    async def test_bad_schedules_are_refused_at_publish_every_one_listed(
        self, engine: AsyncEngine
    ) -> None:
        doc = small_doc()
        doc["watchers"].append(copy.deepcopy(doc["watchers"][0]) | {"slug": "other"})
        doc["watchers"][0]["schedule"] = "*/30 * * *"
        doc["watchers"][1]["schedule"] = "0 25 * * *"
        from install_service.errors import TemplateDocumentInvalid

        with pytest.raises(TemplateDocumentInvalid) as refused:
            await publish_template(engine, doc)
        assert [p["path"] for p in refused.value.problems] == [
            "$.watchers[0].schedule",
            "$.watchers[1].schedule",
        ]
        assert "expected 5 cron fields" in refused.value.problems[0]["message"]
        assert await rows(engine, "SELECT 1 FROM template_releases") == []


class TestNextRun:
    async def test_follows_install_upgrade_uninstall_and_reinstall(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, with_schedule("*/30 * * * *"))
        result = await install_template(engine, owner, "starter")
        org = result.organization.id
        row = await watcher(engine, org)
        assert row.next_run_at == next_of("*/30 * * * *", row.now)

        # The runner moves its next run; an upgrade that keeps the schedule keeps it.
        await execute(
            engine,
            "UPDATE watchers SET next_run_at = '2030-01-01T00:00:00Z' WHERE organization_id = :o",
            o=org,
        )
        await publish_template(engine, with_schedule("*/30 * * * *", prompt="v2"))
        await install_template(engine, owner, "starter")
        assert (await watcher(engine, org)).next_run_at.year == 2030

        # An upgrade that changes the schedule computes it afresh.
        await publish_template(engine, with_schedule("0 6 * * *", prompt="v2"))
        await install_template(engine, owner, "starter")
        row = await watcher(engine, org)
        assert row.next_run_at == next_of("0 6 * * *", row.now)

        # A release without a schedule: nothing to run.
        await publish_template(engine, with_schedule(None, prompt="v2"))
        await install_template(engine, owner, "starter")
        assert (await watcher(engine, org)).next_run_at is None
        await install_template(engine, owner, "starter", version=3)

        async with transaction(engine) as session:
            await installs.uninstall(session, owner, result.id)
        row = await watcher(engine, org)
        assert (row.status, row.next_run_at) == ("archived", None)

        await install_template(engine, owner, "starter", version=3)  # reactivated
        row = await watcher(engine, org)
        assert row.status == "active"
        assert row.next_run_at == next_of("0 6 * * *", row.now)

    async def test_an_edit_made_outside_the_service_is_recomputed(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, with_schedule("*/30 * * * *"))
        org = (await install_template(engine, owner, "starter")).organization.id
        await execute(
            engine, "UPDATE watchers SET schedule = '0 12 * * *' WHERE organization_id = :o", o=org
        )
        assert (await watcher(engine, org)).next_run_at is None  # stale, not wrong
        assert await watcher_jobs.schedule_everywhere(engine) == 1
        row = await watcher(engine, org)
        assert row.next_run_at == next_of("0 12 * * *", row.now)
        # Turning the schedule off clears it; on again, it comes back.
        await execute(
            engine, "UPDATE watchers SET schedule_enabled = false WHERE organization_id = :o", o=org
        )
        assert (await watcher(engine, org)).next_run_at is None
        assert await watcher_jobs.schedule_everywhere(engine) == 0
        await execute(
            engine, "UPDATE watchers SET schedule_enabled = true WHERE organization_id = :o", o=org
        )
        assert await watcher_jobs.schedule_everywhere(engine) == 1
        # A watcher the org wrote itself is scheduled too.
        await execute(
            engine,
            """INSERT INTO watchers (organization_id, slug, name, schedule, next_run_at)
               VALUES (:o, 'mine', 'Mine', '5 * * * *', '1999-01-01T00:00:00Z')""",
            o=org,
        )
        mine = await rows(engine, "SELECT next_run_at FROM watchers WHERE slug = 'mine'")
        assert mine[0].next_run_at is None  # the trigger does not trust a hand-written time
        assert await watcher_jobs.schedule_everywhere(engine) == 1


class TestDesiredState:
    @pytest.fixture
    def client(self, install_service_client: Client) -> Client:
        return install_service_client

    async def test_members_read_every_active_watcher(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        doc = with_schedule("*/30 * * * *")
        for n in range(3):
            doc["watchers"].append(copy.deepcopy(doc["watchers"][0]) | {"slug": f"w{n}"})
        await publish_template(engine, doc)
        owner, _, _ = await make_user(engine)
        member, _, member_token = await make_user(engine)
        _, _, stranger_token = await make_user(engine)
        org = await make_org(engine, owner=owner, slug="acme")
        await add_membership(engine, org, member)
        install = await install_template(engine, owner, "starter", "acme")
        # One edited outside the service, not yet stored: computed on read.
        await execute(
            engine,
            "UPDATE watchers SET schedule = '0 12 * * *' WHERE organization_id = :o "
            "AND slug = 'w1'",
            o=org.id,
        )
        async with transaction(engine) as session:
            await ensure_admin(session, "watch-admin")

        first = await client.get(
            "/api/v1/organizations/acme/watchers", params={"limit": 3}, headers=bearer(member_token)
        )
        assert first.status_code == 200, first.text
        rest = await client.get(
            "/api/v1/organizations/acme/watchers",
            params={"cursor": first.json()["next_cursor"]},
            headers=bearer(member_token),
        )
        found = first.json()["items"] + rest.json()["items"]
        assert [w["slug"] for w in found] == ["inbox", "w0", "w1", "w2"]
        assert rest.json()["next_cursor"] is None
        inbox = found[0]
        assert inbox["install_id"] == str(install.id)
        assert inbox["current_version"]["prompt"] == "Find people and companies."
        assert inbox["current_version"]["version"] == 1
        now = datetime.now(UTC)
        for w in found:
            next_run = datetime.fromisoformat(w["next_run_at"])
            assert now - timedelta(minutes=1) < next_run <= now + timedelta(days=1)
        assert datetime.fromisoformat(found[2]["next_run_at"]).strftime("%H:%M") == "12:00"

        # Archived watchers are not part of it.
        async with transaction(engine) as session:
            await installs.uninstall(session, owner, install.id)
        empty = await client.get(
            "/api/v1/organizations/acme/watchers", headers=bearer(member_token)
        )
        assert empty.json() == {"items": [], "next_cursor": None}

        for token, status in ((stranger_token, 404), (None, 401)):
            headers = bearer(token) if token else {}
            response = await client.get("/api/v1/organizations/acme/watchers", headers=headers)
            assert response.status_code == status
        bad = await client.get(
            "/api/v1/organizations/acme/watchers",
            params={"cursor": "x"},
            headers=bearer("watch-admin"),
        )
        assert bad.status_code == 400


class TestCheck:
    @pytest.mark.allow_violations
    async def test_db_check_finds_a_next_run_on_an_unscheduled_watcher(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        from install_service.installs import invariants

        await publish_template(engine, with_schedule("*/30 * * * *"))
        await install_template(engine, owner, "starter")
        await execute(engine, "ALTER TABLE watchers DISABLE TRIGGER watchers_next_run")
        await execute(
            engine,
            "UPDATE watchers SET schedule_enabled = false, next_run_at = now() "
            "WHERE organization_id <> (SELECT organization_id FROM agents WHERE is_template)",
        )
        async with transaction(engine) as session:
            found = await invariants.check(session)
        assert [(v.check, v.detail) for v in found] == [
            ("unscheduled_next_run", "watcher inbox is not scheduled but has next_run_at")
        ]
