"""The console over HTTP (in process): sessions, CSRF, authorization, actions and bad input,
each checked in the database. The browser tests (test_console_browser.py) drive the same
pages in a real browser against a real server."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.actor import Actor
from install_service.db.session import transaction
from install_service.orgs.service import ensure_admin
from install_service.resync import service as resync
from install_service.resync.schemas import ResyncRequest, Wave
from install_service.testing import (
    Seeded,
    add_membership,
    bearer,
    install_template,
    make_org,
    make_user,
    publish_template,
    seeded_database,
)
from tests import runs
from tests.conftest import dump, execute, rows, scalar, small_doc
from tests.console import budget_doc, core_doc, csrf_token, post_form, sign_in

Client = AsyncTestClient[Litestar]
ADMIN = "console-admin-token"


@dataclass
class World:
    owner: Actor
    owner_token: str
    org: str
    install: uuid.UUID
    other_org: str
    other_org_id: uuid.UUID
    other_install: uuid.UUID
    member_token: str


async def build_world(engine: AsyncEngine) -> World:
    """An owner's org and another org, each with `starter` installed; a member of the first."""
    async with transaction(engine) as session:
        await ensure_admin(session, ADMIN)
    await publish_template(engine, small_doc())
    owner, _, owner_token = await make_user(engine, "owner@example.com")
    org = await make_org(engine, owner=owner, slug="owned")
    installed = await install_template(engine, owner, "starter", org.slug)
    other, _, _ = await make_user(engine, "other@example.com")
    other_org = await make_org(engine, owner=other, slug="elsewhere")
    other_installed = await install_template(engine, other, "starter", other_org.slug)
    member, _, member_token = await make_user(engine, "member@example.com")
    await add_membership(engine, org, member, "member")
    assert installed.id is not None
    assert other_installed.id is not None
    return World(
        owner=owner,
        owner_token=owner_token,
        org=org.slug,
        install=installed.id,
        other_org=other_org.slug,
        other_org_id=other_org.id,
        other_install=other_installed.id,
        member_token=member_token,
    )


@pytest.fixture(scope="module")
def install_service_template_database(
    install_service_server_url: URL, install_service_template_database: str
) -> Iterator[Seeded[World]]:
    """Every test starts from its own copy of the world, built once for the module."""
    server, template = install_service_server_url, install_service_template_database
    with seeded_database(server, template, build_world) as seeded:
        yield seeded


@pytest.fixture
def world(install_service_template_database: Seeded[World]) -> World:
    return install_service_template_database.value


@pytest.fixture
def client(install_service_client: Client) -> Client:
    return install_service_client


async def sessions(engine: AsyncEngine) -> list[Any]:
    return await rows(engine, "SELECT * FROM console_sessions ORDER BY created_at")


class TestSignIn:
    async def test_a_token_opens_a_session_held_in_the_database(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        response = await sign_in(client, world.owner_token)
        assert response.status_code == 303
        assert response.headers["location"] == "/console/"
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        assert "Path=/console" in cookie
        secret = client.cookies["console_session"]
        (row,) = await sessions(engine)
        # Only a hash of the cookie's secret is stored, bound to the token signed in with.
        assert secret not in str(row._mapping)
        assert row.user_id == world.owner.user_id
        token_id = await scalar(
            engine, "SELECT id FROM api_tokens WHERE user_id = :u", u=world.owner.user_id
        )
        assert row.token_id == token_id
        home = await client.get("/console/")
        assert home.status_code == 200
        assert "owner@example.com" in home.text
        audit = await rows(
            engine, "SELECT actor_user_id FROM audit_log WHERE action = 'console.signed_in'"
        )
        assert [a.actor_user_id for a in audit] == [world.owner.user_id]

    @pytest.mark.parametrize("token", ["", "isk_nope", "x" * 1000])
    async def test_a_bad_token_opens_nothing(
        self, engine: AsyncEngine, client: Client, world: World, token: str
    ) -> None:
        before = await dump(engine)
        response = await sign_in(client, token)
        assert response.status_code == 401
        assert "unknown, revoked or expired" in response.text
        assert "console_session" not in client.cookies
        assert await dump(engine) == before

    async def test_pages_send_a_signed_out_browser_to_sign_in(
        self, client: Client, world: World
    ) -> None:
        response = await client.get("/console/orgs/owned?cursor=x", follow_redirects=False)
        assert response.status_code == 303
        assert (
            response.headers["location"] == "/console/sign-in?next=/console/orgs/owned%3Fcursor%3Dx"
        )
        live = await client.get(
            f"/console/runs/{uuid.uuid4()}/live", headers={"HX-Request": "true"}
        )
        assert live.status_code == 401
        assert live.headers["HX-Redirect"].startswith("/console/sign-in")

    @pytest.mark.parametrize(
        "target", ["https://evil.example/", "//evil.example/x", "/console//evil", "/api/v1/me"]
    )
    async def test_sign_in_never_sends_the_browser_elsewhere(
        self, client: Client, world: World, target: str
    ) -> None:
        form = await client.get("/console/sign-in")
        response = await client.post(
            "/console/sign-in",
            data={"_csrf_token": csrf_token(form.text), "token": world.owner_token, "next": target},
            follow_redirects=False,
        )
        assert response.status_code == 303
        assert response.headers["location"] == "/console/"


class TestSessionEnds:
    async def test_sign_out_deletes_the_session(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.owner_token)
        stolen = client.cookies["console_session"]
        response = await post_form(client, "/console/sign-out", "/console/")
        assert response.status_code == 303
        assert response.headers["location"] == "/console/sign-in?signed_out=1"
        assert await sessions(engine) == []
        assert (
            await scalar(
                engine, "SELECT count(*) FROM audit_log WHERE action = 'console.signed_out'"
            )
            == 1
        )
        # The cookie's value is worth nothing now, wherever it was copied to.
        client.cookies.set("console_session", stolen, path="/console")
        again = await client.get("/console/", follow_redirects=False)
        assert again.status_code == 303
        assert again.headers["location"] == "/console/sign-in?ended=1"

    async def test_revoking_the_token_ends_the_session_on_the_next_request(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.owner_token)
        assert (await client.get("/console/orgs")).status_code == 200
        tokens = (await client.get("/api/v1/tokens", headers=bearer(world.owner_token))).json()
        (token,) = tokens["items"]
        revoked = await client.delete(
            f"/api/v1/tokens/{token['id']}", headers=bearer(world.owner_token)
        )
        assert revoked.status_code == 200
        response = await client.get("/console/orgs", follow_redirects=False)
        assert response.status_code == 303
        assert response.headers["location"] == "/console/sign-in?ended=1"
        assert 'console_session=""' in response.headers["set-cookie"]

    async def test_deactivating_the_user_ends_the_session(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.owner_token)
        done = await client.post(
            "/api/v1/admin/users/owner@example.com/deactivate", headers=bearer(ADMIN)
        )
        assert done.status_code == 200
        response = await client.get("/console/", follow_redirects=False)
        assert response.headers["location"] == "/console/sign-in?ended=1"

    @pytest.mark.parametrize(
        "change",
        [
            "expires_at = now() - interval '1 second'",
            "last_seen_at = now() - interval '2 hours 1 minute'",
        ],
    )
    async def test_an_expired_or_idle_session_ends(
        self, engine: AsyncEngine, client: Client, world: World, change: str
    ) -> None:
        await sign_in(client, world.owner_token)
        await execute(engine, f"UPDATE console_sessions SET {change}")
        response = await client.get("/console/", follow_redirects=False)
        assert response.headers["location"] == "/console/sign-in?ended=1"
        # The next sign-in clears sessions that have ended by time.
        await sign_in(client, world.owner_token)
        assert len(await sessions(engine)) == 1

    async def test_requests_note_the_session_at_most_once_a_minute(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.owner_token)
        await execute(
            engine, "UPDATE console_sessions SET last_seen_at = now() - interval '5 minutes'"
        )
        await client.get("/console/")
        first = await scalar(engine, "SELECT xmin::text FROM console_sessions")
        assert await scalar(
            engine, "SELECT last_seen_at > now() - interval '1 minute' FROM console_sessions"
        )
        await client.get("/console/")
        await client.get("/console/orgs")
        assert await scalar(engine, "SELECT xmin::text FROM console_sessions") == first


class TestCsrf:
    async def test_a_form_without_its_token_is_refused_and_changes_nothing(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.owner_token)
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Edited' WHERE slug = 'person' AND "
            "organization_id = (SELECT id FROM organizations WHERE slug = 'owned')",
        )
        before = await dump(engine)
        for data in ({}, {"_csrf_token": "forged"}):
            response = await client.post(
                f"/console/installs/{world.install}/reconcile", data=data, follow_redirects=False
            )
            assert response.status_code == 403
            assert "did not come from this console session" in response.text
        assert await dump(engine) == before

    async def test_a_token_from_another_browser_is_refused(
        self, engine: AsyncEngine, client: Client, world: World, install_service_app: Litestar
    ) -> None:
        """A valid token and cookie pair from another browser (an attacker's own visit)
        does not work with this session: forms are bound to the session's own token."""
        await sign_in(client, world.owner_token)
        async with AsyncTestClient(app=install_service_app) as attacker:
            page = await attacker.get("/console/sign-in")
            forged_token = csrf_token(page.text)
            forged_cookie = attacker.cookies["console_csrf"]
        client.cookies.set("console_csrf", forged_cookie, path="/console")
        before = await dump(engine)
        response = await client.post(
            "/console/sign-out", data={"_csrf_token": forged_token}, follow_redirects=False
        )
        assert response.status_code == 403
        assert await dump(engine) == before


class TestAuthorization:
    async def test_an_owner_sees_only_their_orgs(self, client: Client, world: World) -> None:
        await sign_in(client, world.owner_token)
        listed = await client.get("/console/orgs")
        assert "owned" in listed.text
        assert "elsewhere" not in listed.text
        assert (await client.get("/console/orgs/owned")).status_code == 200
        assert (await client.get(f"/console/installs/{world.install}")).status_code == 200
        for path in (
            f"/console/orgs/{world.other_org}",
            f"/console/orgs/{world.other_org_id}",
            f"/console/installs/{world.other_install}",
            f"/console/installs/{uuid.uuid4()}",
        ):
            response = await client.get(path)
            assert response.status_code == 404, path
            # The same answer as for something that does not exist at all.
            assert "org_not_found" in response.text or "install_not_found" in response.text

    async def test_admin_pages_need_a_platform_admin(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.owner_token)
        for path in ("/console/runs/", "/console/audit/", f"/console/runs/{uuid.uuid4()}"):
            response = await client.get(path)
            assert response.status_code == 403, path
        before = await dump(engine)
        refused = await post_form(client, "/console/templates/starter/resync", "/console/")
        assert refused.status_code == 403
        assert await dump(engine) == before
        assert await scalar(engine, "SELECT count(*) FROM resync_runs") == 0

    async def test_a_member_cannot_change_an_install(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.member_token)
        page = f"/console/installs/{world.install}"
        before = await dump(engine)
        response = await post_form(client, f"{page}/reconcile", page)
        assert response.status_code == 403
        assert "role_too_low" in response.text
        response = await post_form(
            client, f"{page}/detach", page, kind="entity_types", slug="person"
        )
        assert response.status_code == 403
        assert await dump(engine) == before
        # An install of another org is not found, not forbidden: it does not exist for them.
        other = f"/console/installs/{world.other_install}"
        assert (await post_form(client, f"{other}/reconcile", page)).status_code == 404
        assert await dump(engine) == before


class TestActions:
    async def test_reconcile_and_detach_are_the_apis_operations(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.owner_token)
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Edited' WHERE slug IN ('person', 'company') "
            "AND organization_id = (SELECT id FROM organizations WHERE slug = 'owned')",
        )
        page = f"/console/installs/{world.install}"
        shown = await client.get(page)
        assert "/name" in shown.text
        assert "&#34;Edited&#34;" in shown.text

        detached = await post_form(
            client, f"{page}/detach", page, kind="entity_types", slug="company"
        )
        assert detached.status_code == 303
        assert detached.headers["location"] == f"{page}?done=detached"
        reconciled = await post_form(client, f"{page}/reconcile", page)
        assert reconciled.headers["location"] == f"{page}?done=reconciled"

        names = dict(
            (r.slug, (r.name, r.managed_by_template_agent_id is not None))
            for r in await rows(
                engine,
                "SELECT slug, name, managed_by_template_agent_id FROM entity_types "
                "WHERE organization_id = (SELECT id FROM organizations WHERE slug = 'owned')",
            )
        )
        assert names == {"person": ("Person", True), "company": ("Edited", False)}
        audit = await rows(
            engine,
            "SELECT action, actor_user_id, request_id FROM audit_log "
            "WHERE action LIKE 'install.%' ORDER BY occurred_at",
        )
        assert [(a.action, a.actor_user_id) for a in audit][-2:] == [
            ("install.item_detached", world.owner.user_id),
            ("install.reconciled", world.owner.user_id),
        ]
        assert all(a.request_id for a in audit[-2:])
        after = await client.get(f"{page}?done=reconciled")
        assert "Every managed row equals" in after.text
        assert "reconcile" in after.text

    async def test_an_admin_starts_and_follows_a_resync(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await publish_template(engine, small_doc(description="Second release."))
        await sign_in(client, ADMIN)
        response = await post_form(
            client, "/console/templates/starter/resync", "/console/templates/starter", version=""
        )
        assert response.status_code == 303
        run_id = response.headers["location"].rsplit("/", 1)[1]
        run = (await rows(engine, "SELECT * FROM resync_runs"))[0]
        assert str(run.id) == run_id
        assert run.status == "queued"
        assert await scalar(engine, "SELECT count(*) FROM resync_items") == 2
        audit = await rows(
            engine, "SELECT actor_user_id FROM audit_log WHERE action = 'resync.started'"
        )
        assert len(audit) == 1
        assert audit[0].actor_user_id is not None
        shown = await client.get(f"/console/runs/{run_id}")
        assert 'role="progressbar"' in shown.text
        assert 'aria-valuemax="2"' in shown.text
        live = await client.get(f"/console/runs/{run_id}/live")
        assert live.status_code == 200
        assert 'hx-trigger="every 1s"' in live.text
        listed = await client.get("/console/runs/")
        assert run_id in listed.text

    async def test_retry_is_refused_while_a_run_is_unfinished(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await publish_template(engine, small_doc(description="Second release."))
        await sign_in(client, ADMIN)
        started = await post_form(
            client, "/console/templates/starter/resync", "/console/templates/starter", version="2"
        )
        run = started.headers["location"]
        retried = await post_form(client, f"{run}/retry", run)
        assert retried.status_code == 409
        assert "resync_run_in_progress" in retried.text

    async def test_an_admin_pauses_resumes_and_cancels_a_staged_run(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await publish_template(engine, small_doc(description="Second release."))
        async with transaction(engine) as session:
            started = await resync.start_run(
                session,
                Actor.system(),
                "starter",
                ResyncRequest(waves=[Wave(orgs=[world.org])], max_conflict_rate=0.5),
            )
        await sign_in(client, ADMIN)
        page = f"/console/runs/{started.id}"
        shown = await client.get(page)
        assert "Progress per wave" in shown.text
        assert shown.text.count('aria-label="Wave ') == 2

        async def status() -> str:
            found: str = await scalar(
                engine, "SELECT status FROM resync_runs WHERE id = :r", r=started.id
            )
            return found

        for action, after in (("pause", "paused"), ("resume", "queued"), ("cancel", "cancelled")):
            response = await post_form(client, f"{page}/{action}", page)
            assert (response.status_code, response.headers["location"]) == (303, page), action
            assert await status() == after
        items = await rows(engine, "SELECT status, reason FROM resync_items")
        assert {(i.status, i.reason) for i in items} == {("cancelled", "cancelled")}
        audit = await rows(
            engine,
            "SELECT action, actor_user_id FROM audit_log WHERE target_id = :r "
            "AND action <> 'resync.started'",
            r=str(started.id),
        )
        assert sorted(a.action for a in audit) == [
            "resync.cancelled",
            "resync.paused",
            "resync.resumed",
        ]
        assert all(a.actor_user_id is not None for a in audit)
        # A finished run has no control forms; posting one anyway is refused, and changes
        # nothing.
        finished = await client.get(page)
        assert f"{page}/pause" not in finished.text
        before = await dump(engine)
        refused = await client.post(
            f"{page}/pause",
            data={"_csrf_token": csrf_token(finished.text)},
            follow_redirects=False,
        )
        assert refused.status_code == 409
        assert "resync_run_finished" in refused.text
        assert await dump(engine) == before


class TestBadInput:
    @pytest.mark.parametrize(
        ("path", "status"),
        [
            ("/console/templates/starter/diff?from=1&to=x", 400),
            ("/console/templates/starter/diff?from=0&to=1", 400),
            ("/console/templates/starter/diff?from=1&to=9", 404),
            ("/console/templates/?cursor=nonsense", 400),
            ("/console/orgs?cursor=bm9wZQ", 400),
            ("/console/templates/no-such-template", 404),
            ("/console/orgs/%00", 404),
            ("/console/no/such/page", 404),
            ("/console/runs/?template=" + "x" * 200, 400),
        ],
    )
    async def test_bad_addresses_are_clear_4xx_pages(
        self, client: Client, world: World, path: str, status: int
    ) -> None:
        await sign_in(client, ADMIN)
        response = await client.get(path)
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("text/html")
        assert "<h1>" in response.text

    @pytest.mark.parametrize(
        "fields",
        [
            {"kind": "nope", "slug": "person"},
            {"kind": "entity_types", "slug": "Not A Slug"},
            {"kind": "entity_types"},
            {"kind": "entity_types", "slug": "ghost"},
        ],
    )
    async def test_bad_forms_change_nothing(
        self, engine: AsyncEngine, client: Client, world: World, fields: dict[str, str]
    ) -> None:
        await sign_in(client, world.owner_token)
        page = f"/console/installs/{world.install}"
        before = await dump(engine)
        response = await post_form(client, f"{page}/detach", page, **fields)
        assert response.status_code in (400, 404), response.text
        assert response.headers["content-type"].startswith("text/html")
        assert await dump(engine) == before

    @pytest.mark.parametrize("version", ["x", "0", "-1", "99999999999", "9"])
    async def test_a_bad_release_starts_no_run(
        self, engine: AsyncEngine, client: Client, world: World, version: str
    ) -> None:
        await sign_in(client, ADMIN)
        response = await post_form(
            client,
            "/console/templates/starter/resync",
            "/console/templates/starter",
            version=version,
        )
        assert response.status_code in (400, 404)
        assert await scalar(engine, "SELECT count(*) FROM resync_runs") == 0


def hidden_fields(html: str) -> dict[str, str]:
    """The fields a page's confirm form carries through (its hidden inputs, CSRF included)."""
    confirm = html[html.index('<form class="confirm"') :]
    confirm = confirm[: confirm.index("</form>")]
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', confirm))


async def second_release_that_conflicts_in(engine: AsyncEngine, org: str) -> None:
    """Release 2 renames people; `org` renamed them first (a conflict at /name)."""
    await execute(
        engine,
        "UPDATE entity_types SET name = 'Human' WHERE slug = 'person' "
        "AND organization_id = (SELECT id FROM organizations WHERE slug = :org)",
        org=org,
    )
    doc = small_doc()
    doc["entity_types"][0]["name"] = "Individual"
    await publish_template(engine, doc)


class TestStagedResync:
    async def test_the_form_shows_the_dry_run_then_starts_that_run(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await second_release_that_conflicts_in(engine, world.org)
        await sign_in(client, ADMIN)
        template = await client.get("/console/templates/starter")
        # The form's defaults: a canary of ten, half, the rest; halt above one in ten.
        assert 'name="wave-1-size" value="10"' in template.text
        assert 'name="wave-2-size" value="50"' in template.text
        assert 'name="max_conflict_rate" value="0.1"' in template.text

        before = await dump(engine)
        query = {
            "preview": "1",
            "version": "2",
            "wave-1-kind": "orgs",
            "wave-1-size": world.org,
            "wave-2-kind": "percent",
            "wave-2-size": "100",
            "max_conflict_rate": "0.5",
            "bake_seconds": "0",
        }
        preview = await client.get("/console/templates/starter/resync", params=query)
        assert preview.status_code == 200, preview.text
        assert await dump(engine) == before
        assert await scalar(engine, "SELECT count(*) FROM resync_runs") == 0
        assert "1</strong> upgrade" in preview.text
        assert "1</strong> conflict" in preview.text
        conflicts = preview.text[preview.text.index("would conflict or be skipped") :]
        assert world.org in conflicts
        assert "<code>/name</code>" in conflicts
        assert world.other_org not in conflicts
        # The form is there again with what was typed.
        assert f'name="wave-1-size" value="{world.org}"' in preview.text

        carried = hidden_fields(preview.text)
        assert carried["wave-1-size"] == world.org
        assert carried["max_conflict_rate"] == "0.5"
        started = await client.post(
            "/console/templates/starter/resync", data=carried, follow_redirects=False
        )
        assert started.status_code == 303, started.text
        (run,) = await rows(engine, "SELECT * FROM resync_runs")
        assert started.headers["location"] == f"/console/runs/{run.id}"
        assert run.max_conflict_rate == Decimal("0.5")
        assert run.selection["waves"] == [
            {"orgs": [str(await org_id(engine, world.org))]},
            {"percent": 100.0},
        ]
        waves = await rows(
            engine,
            "SELECT o.slug, i.wave FROM resync_items i JOIN organizations o "
            "ON o.id = i.organization_id ORDER BY i.wave",
        )
        assert [(w.slug, w.wave) for w in waves] == [(world.org, 1), (world.other_org, 2)]
        audit = await rows(
            engine, "SELECT actor_user_id FROM audit_log WHERE action = 'resync.started'"
        )
        assert len(audit) == 1
        assert audit[0].actor_user_id is not None

        # The same values again join the run; other values are the API's 409, on the form.
        again = await client.post(
            "/console/templates/starter/resync", data=carried, follow_redirects=False
        )
        assert again.headers["location"] == f"/console/runs/{run.id}?joined=1"
        joined = await client.get(again.headers["location"])
        assert "already in progress" in joined.text
        other = {**carried, "max_conflict_rate": "0.2"}
        refused = await client.post(
            "/console/templates/starter/resync", data=other, follow_redirects=False
        )
        assert refused.status_code == 409
        assert "resync_run_in_progress" in refused.text
        assert f'href="/console/runs/{run.id}"' in refused.text
        assert 'name="max_conflict_rate" value="0.2"' in refused.text
        assert await scalar(engine, "SELECT count(*) FROM resync_runs") == 1

    @pytest.mark.parametrize(
        ("fields", "status", "says"),
        [
            ({"max_conflict_rate": "1.5"}, 400, "Halt above this conflict rate: must be at most 1"),
            ({"max_failure_rate": "-0.1"}, 400, "Halt above this failure rate: must be at least 0"),
            ({"max_conflict_rate": "lots"}, 400, "expected a number"),
            ({"wave-1-kind": "percent", "wave-1-size": "0"}, 400, "Wave 1: must be above 0"),
            (
                {"wave-2-kind": "count", "wave-2-size": "many"},
                400,
                "Wave 2: expected a whole number",
            ),
            ({"wave-1-kind": "percent", "wave-1-size": "101"}, 400, "Wave 1: must be at most 100"),
            ({"bake_seconds": "9999999"}, 400, "Bake: must be at most"),
            ({"version": "9"}, 404, "release_not_found"),
            ({"orgs": "ghost, owned"}, 422, "<code>ghost</code>"),
            ({"exclude": "nobody"}, 422, "unknown_organizations"),
            (
                {"wave-1-kind": "orgs", "wave-1-size": "owned", "exclude": "owned"},
                422,
                "organizations_not_selected",
            ),
        ],
    )
    async def test_bad_input_comes_back_on_the_form(
        self,
        engine: AsyncEngine,
        client: Client,
        world: World,
        fields: dict[str, str],
        status: int,
        says: str,
    ) -> None:
        await sign_in(client, ADMIN)
        before = await dump(engine)
        preview = await client.get(
            "/console/templates/starter/resync", params={"preview": "1", **fields}
        )
        started = await post_form(
            client, "/console/templates/starter/resync", "/console/templates/starter", **fields
        )
        for response in (preview, started):
            assert response.status_code == status, response.text
            assert "Nothing was started" in response.text
            assert says in response.text
            # What was typed is still there (a release the select does not offer aside).
            for name, value in fields.items():
                if name.endswith("-kind"):
                    select = response.text[response.text.index(f'name="{name}"') :]
                    select = select[: select.index("</select>")]
                    assert f'<option value="{value}" selected>' in select
                elif name != "version":
                    assert f'name="{name}" value="{value}"' in response.text
        assert await dump(engine) == before
        assert await scalar(engine, "SELECT count(*) FROM resync_runs") == 0

    async def test_an_owner_cannot_preview_or_start(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.owner_token)
        template = await client.get("/console/templates/starter")
        assert "Preview the dry run" not in template.text
        preview = await client.get("/console/templates/starter/resync?preview=1")
        assert preview.status_code == 403
        assert "admin_required" in preview.text

    async def test_a_halted_run_says_which_wave_and_rate_and_resumes(
        self, engine: AsyncEngine, client: Client, world: World, url: URL
    ) -> None:
        await second_release_that_conflicts_in(engine, world.org)
        run = await runs.start(engine, url, waves=[{"orgs": [world.org]}], max_conflict_rate=0.5)
        await runs.work_until_idle(engine, url)
        assert (await runs.get(engine, run.id)).status == "halted"
        await sign_in(client, ADMIN)
        page = f"/console/runs/{run.id}"
        shown = await client.get(page)
        assert "Halted after wave 1: conflict rate 1/1 is above 0.5" in shown.text
        assert "conflict rate above 0.5" in shown.text
        assert "Resume with wave 2" in shown.text
        # One Resume button: the one that says which wave comes next.
        assert shown.text.count(f'action="{page}/resume"') == 1

        resumed = await post_form(client, f"{page}/resume", page)
        assert (resumed.status_code, resumed.headers["location"]) == (303, page)
        await runs.work_until_idle(engine, url)
        done = await runs.get(engine, run.id)
        assert (done.status, done.halt_reason) == ("partial", None)
        items = await rows(
            engine,
            "SELECT o.slug, i.status FROM resync_items i JOIN organizations o "
            "ON o.id = i.organization_id",
        )
        assert {(i.slug, i.status) for i in items} == {
            (world.org, "conflict"),
            (world.other_org, "succeeded"),
        }
        audit = await rows(engine, "SELECT details FROM audit_log WHERE action = 'resync.resumed'")
        assert [a.details["was"] for a in audit] == ["halted"]
        assert "Halted after" not in (await client.get(page)).text

    async def test_a_halted_run_says_the_wave_that_halted_it_not_the_next(
        self, engine: AsyncEngine, client: Client, world: World, url: URL
    ) -> None:
        """Wave 2 names only an org of wave 1, so it is empty: the halt after wave 1 leaves
        wave 3 next. The status line says that, never that the run halted in wave 3."""
        await second_release_that_conflicts_in(engine, world.org)
        run = await runs.start(
            engine,
            url,
            waves=[{"orgs": [world.org]}, {"orgs": [world.org]}],
            max_conflict_rate=0.5,
        )
        await runs.work_until_idle(engine, url)
        halted = await runs.get(engine, run.id)
        assert (halted.status, halted.current_wave, len(halted.waves)) == ("halted", 3, 3)
        await sign_in(client, ADMIN)
        shown = (await client.get(f"/console/runs/{run.id}")).text
        status_line = shown[shown.index('class="run-status"') :]
        status_line = status_line[: status_line.index("</p>")]
        assert "halted</span> (after wave 1 of 3; wave 3 is next)" in status_line
        assert "Halted after wave 1: conflict rate 1/1 is above 0.5" in shown
        assert "Resume with wave 3" in shown


async def org_id(engine: AsyncEngine, slug: str) -> uuid.UUID:
    found: uuid.UUID = await scalar(engine, "SELECT id FROM organizations WHERE slug = :s", s=slug)
    return found


class TestPins:
    async def test_an_owner_pins_and_unpins(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.owner_token)
        page = f"/console/installs/{world.install}"
        until = (datetime.now(UTC) + timedelta(days=3)).replace(second=0, microsecond=0)
        pinned = await post_form(
            client,
            f"{page}/pin",
            page,
            reason="quarter close",
            until=until.strftime("%Y-%m-%dT%H:%M"),
        )
        assert (pinned.status_code, pinned.headers["location"]) == (303, f"{page}?done=pinned")
        row = (
            await rows(
                engine,
                "SELECT pinned_at, pinned_until, pin_reason, pinned_by_user_id FROM agents "
                "WHERE id = :i",
                i=world.install,
            )
        )[0]
        assert (row.pinned_until, row.pin_reason) == (until, "quarter close")
        assert row.pinned_at is not None
        assert row.pinned_by_user_id == world.owner.user_id
        shown = await client.get(f"{page}?done=pinned")
        assert "Pinned at release 1 by owner@example.com" in shown.text
        assert "quarter close" in shown.text
        assert until.strftime("%Y-%m-%d %H:%M UTC") in shown.text
        listed = await client.get(f"/console/orgs/{world.org}")
        assert "pinned by owner@example.com" in listed.text
        assert "quarter close" in listed.text

        unpinned = await post_form(client, f"{page}/unpin", page)
        assert unpinned.headers["location"] == f"{page}?done=unpinned"
        assert (
            await scalar(engine, "SELECT pinned_at FROM agents WHERE id = :i", i=world.install)
            is None
        )
        assert "Not pinned" in (await client.get(page)).text
        audit = await rows(
            engine,
            "SELECT action, actor_user_id, request_id FROM audit_log "
            "WHERE action LIKE 'install.%pinned' ORDER BY occurred_at",
        )
        assert [(a.action, a.actor_user_id) for a in audit] == [
            ("install.pinned", world.owner.user_id),
            ("install.unpinned", world.owner.user_id),
        ]
        assert all(a.request_id for a in audit)

    @pytest.mark.parametrize(
        ("fields", "status", "says"),
        [
            ({"until": "2001-01-01T00:00"}, 422, "pin_until_in_past"),
            ({"until": "next tuesday"}, 400, "is not a date and time"),
            ({"reason": "x" * 501}, 400, "Reason"),
        ],
    )
    async def test_a_refused_pin_says_why_and_keeps_the_values(
        self,
        engine: AsyncEngine,
        client: Client,
        world: World,
        fields: dict[str, str],
        status: int,
        says: str,
    ) -> None:
        await sign_in(client, world.owner_token)
        page = f"/console/installs/{world.install}"
        before = await dump(engine)
        response = await post_form(client, f"{page}/pin", page, **fields)
        assert response.status_code == status, response.text
        assert "Not pinned:" in response.text
        assert says in response.text
        for value in fields.values():
            assert f'value="{value}"' in response.text
        assert await dump(engine) == before

    async def test_a_member_may_not_pin(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.member_token)
        page = f"/console/installs/{world.install}"
        before = await dump(engine)
        response = await post_form(client, f"{page}/pin", page, reason="mine")
        assert response.status_code == 403
        assert "Not pinned:" in response.text
        assert "role_too_low" in response.text
        assert (await post_form(client, f"{page}/unpin", page)).status_code == 403
        other = f"/console/installs/{world.other_install}"
        assert (await post_form(client, f"{other}/pin", page)).status_code == 404
        assert await dump(engine) == before


def under(html: str, heading_id: str) -> str:
    """What a page shows under the heading with this id, up to the next heading."""
    start = html.index(f'id="{heading_id}"')
    rest = html[html.index(">", start) + 1 :]
    return rest[: rest.index("<h")]


async def installs_of(engine: AsyncEngine, org: str) -> dict[str, tuple[uuid.UUID, str, int]]:
    """The org's installs by template: id, status and release."""
    found = await rows(
        engine,
        """SELECT q.slug, a.id, a.status, r.version FROM agents a
           JOIN agents t ON t.id = a.template_agent_id
           JOIN organizations q ON q.id = t.organization_id
           JOIN template_releases r ON r.id = a.installed_release_id
           WHERE a.organization_id = (SELECT id FROM organizations WHERE slug = :org)""",
        org=org,
    )
    return {r.slug: (r.id, r.status, r.version) for r in found}


class TestRequirements:
    async def test_template_pages_link_their_requirements_and_dependents(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await publish_template(engine, core_doc())
        await publish_template(engine, budget_doc())
        await sign_in(client, world.owner_token)
        budget = (await client.get("/console/templates/household-budget")).text
        assert (
            '<a href="/console/templates/core-people">core-people</a>, release 1 or later'
            in under(budget, "requires")
        )
        assert "<p>None.</p>" in under(budget, "required-by")
        core = (await client.get("/console/templates/core-people")).text
        assert "<p>None.</p>" in under(core, "requires")
        assert '<a href="/console/templates/household-budget">household-budget</a>' in under(
            core, "required-by"
        )
        starter = (await client.get("/console/templates/starter")).text
        for heading in ("requires", "required-by"):
            assert "<p>None.</p>" in under(starter, heading)
            assert "<li>" not in under(starter, heading)

    async def test_install_pages_link_the_installs_they_require_and_that_require_them(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await publish_template(engine, core_doc())
        await publish_template(engine, budget_doc())
        await install_template(
            engine, world.owner, "household-budget", world.org, with_requirements=True
        )
        found = await installs_of(engine, world.org)
        budget, core = found["household-budget"][0], found["core-people"][0]
        await sign_in(client, world.owner_token)
        page = (await client.get(f"/console/installs/{budget}")).text
        requires = under(page, "requires")
        assert f'<a href="/console/installs/{core}">core-people</a>, release 1' in requires
        assert "(release 1 or later required)" in requires
        assert "<p>None.</p>" in under(page, "required-by")
        page = (await client.get(f"/console/installs/{core}")).text
        assert "<p>None.</p>" in under(page, "requires")
        assert f'<a href="/console/installs/{budget}">household-budget</a>, release 1' in under(
            page, "required-by"
        )
        # An install that neither requires nor is required says so.
        page = (await client.get(f"/console/installs/{world.install}")).text
        for heading in ("requires", "required-by"):
            assert "<p>None.</p>" in under(page, heading)

    async def test_a_requirement_the_org_has_no_install_of_says_not_installed(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        """Release 1 of `starter` is made to require `core-people` after the fact (the
        table is append-only, not insert-only): `owned` has no install of it."""
        await publish_template(engine, core_doc())
        await execute(
            engine,
            """INSERT INTO template_release_requirements
                   (release_id, required_template_agent_id, min_version, checked_release_id)
               SELECT s.id, c.template_agent_id, NULL, c.id
               FROM template_releases s, template_releases c
               JOIN agents t ON t.id = c.template_agent_id
               JOIN organizations o ON o.id = t.organization_id
               WHERE o.slug = 'core-people' AND s.template_agent_id = (
                   SELECT a.id FROM agents a JOIN organizations so
                   ON so.id = a.organization_id WHERE so.slug = 'starter'
                   AND a.template_agent_id IS NULL)""",
        )
        await sign_in(client, world.owner_token)
        page = (await client.get(f"/console/installs/{world.install}")).text
        requires = under(page, "requires")
        assert '<a href="/console/templates/core-people">core-people</a>: ' in requires
        assert "not installed" in requires
        assert "/console/installs/" not in requires

    async def test_an_upgrade_names_the_missing_requirements_and_installs_them_if_asked(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await publish_template(engine, core_doc())
        await publish_template(engine, budget_doc(requires=False))
        installed = await install_template(engine, world.owner, "household-budget", world.org)
        await publish_template(engine, budget_doc())
        await sign_in(client, world.owner_token)
        page = f"/console/installs/{installed.id}"
        assert f'href="{page}/upgrade?version=2"' in (await client.get(page)).text

        before = await dump(engine)
        plan = await client.get(f"{page}/upgrade?version=2")
        assert plan.status_code == 200, plan.text
        missing = under(plan.text, "unmet")
        assert "Release 2 requires templates owned does not have" in plan.text
        assert (
            '<a href="/console/templates/core-people">core-people</a> (release 1 or later): '
            "not installed" in missing
        )
        assert 'name="with_requirements"' in plan.text
        assert 'name="with_requirements" checked' not in plan.text
        # The plan is the upgrade's once its requirements are there.
        assert "<code>budget_for</code>" in plan.text

        # Without the box ticked: refused on the plan, naming what is missing.
        refused = await client.post(
            f"{page}/upgrade", data={"version": "2", "_csrf_token": csrf_token(plan.text)}
        )
        assert refused.status_code == 422, refused.text
        assert (
            "Not upgraded: release 2 of household-budget requires <strong>core-people</strong> "
            "(release 1 or later), which owned does not have" in refused.text
        )
        assert "<code>missing_requirement</code>" in refused.text
        assert 'name="with_requirements"' in refused.text
        assert await dump(engine) == before

        done = await client.post(
            f"{page}/upgrade",
            data={"version": "2", "with_requirements": "on", "_csrf_token": csrf_token(plan.text)},
            follow_redirects=False,
        )
        assert done.status_code == 303, done.text
        assert done.headers["location"] == f"{page}?done=upgraded"
        found = await installs_of(engine, world.org)
        assert {slug: i[1:] for slug, i in found.items()} == {
            "starter": ("active", 1),
            "household-budget": ("active", 2),
            "core-people": ("active", 1),
        }
        assert found["household-budget"][0] == installed.id
        shown = await client.get(f"{page}?done=upgraded")
        assert f'href="/console/installs/{found["core-people"][0]}"' in under(
            shown.text, "requires"
        )

    async def test_a_conflict_in_a_requirement_is_named_and_nothing_is_written(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        """`core-people`'s `person` collides with `starter`'s in `owned`: upgrading with
        requirements is refused, and the page says where."""
        await publish_template(engine, core_doc(person="person"))
        await publish_template(engine, budget_doc(requires=False))
        installed = await install_template(engine, world.owner, "household-budget", world.org)
        await publish_template(engine, budget_doc())
        await sign_in(client, world.owner_token)
        page = f"/console/installs/{installed.id}"
        before = await dump(engine)
        refused = await post_form(
            client,
            f"{page}/upgrade",
            f"{page}/upgrade?version=2",
            version="2",
            with_requirements="on",
        )
        assert refused.status_code == 409, refused.text
        assert "Not upgraded:" in refused.text
        assert (
            'In <a href="/console/templates/core-people">core-people</a>: entity_types '
            "<code>person</code> (managed by other template)" in refused.text
        )
        # The box stays ticked, as sent.
        assert 'name="with_requirements" checked' in refused.text
        assert await dump(engine) == before
        assert set(await installs_of(engine, world.org)) == {"starter", "household-budget"}

    async def test_a_resync_form_with_requirements_starts_a_run_that_installs_them(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        """A release that adds a requirement: the dry run without the box shows every org
        as `missing_requirement`; ticked, the run carries it and installs it."""
        await publish_template(engine, core_doc())
        await publish_template(engine, budget_doc(requires=False))
        await install_template(engine, world.owner, "household-budget", world.org)
        await publish_template(engine, budget_doc())
        await sign_in(client, ADMIN)
        query = {"preview": "1", "orgs": world.org}
        preview = await client.get("/console/templates/household-budget/resync", params=query)
        assert preview.status_code == 200, preview.text
        assert "missing_requirement" in preview.text
        ticked = await client.get(
            "/console/templates/household-budget/resync",
            params={**query, "with_requirements": "on"},
        )
        assert "missing_requirement" not in ticked.text
        carried = hidden_fields(ticked.text)
        assert carried["with_requirements"] == "on"
        started = await client.post(
            "/console/templates/household-budget/resync", data=carried, follow_redirects=False
        )
        assert started.status_code == 303, started.text
        (run,) = await rows(engine, "SELECT selection FROM resync_runs")
        assert run.selection["with_requirements"] is True
