"""The console's pages for an organization's own schema, upgrades with their plan first, and
reconcile with a confirmation, over HTTP in process: each checked in the database. The browser
tests (test_console_browser.py) drive the same pages in a real browser."""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.db.session import transaction
from install_service.orgs.service import ensure_admin
from install_service.testing import (
    Seeded,
    add_membership,
    install_template,
    make_org,
    make_user,
    publish_template,
    seeded_database,
)
from tests.conftest import dump, rows, scalar, small_doc
from tests.console import csrf_token, post_form, sign_in

Client = AsyncTestClient[Litestar]
ADMIN = "console-schema-admin"
PROMPT = "Find people.\nFind companies.\nLink each person to the company they work for.\n"


def doc(prompt: str = PROMPT, company: str = "Company") -> dict[str, Any]:
    found = small_doc()
    found["watchers"][0]["prompt"] = prompt
    found["entity_types"][1]["name"] = company
    return found


@dataclass
class World:
    owner_token: str
    member_token: str
    other_token: str
    org_id: uuid.UUID
    install: uuid.UUID
    other_install: uuid.UUID


async def build_world(engine: AsyncEngine) -> World:
    """`starter` installed in `acme` (an owner, a member) and in `elsewhere` (another owner)."""
    async with transaction(engine) as session:
        await ensure_admin(session, ADMIN)
    await publish_template(engine, doc())
    owner, _, owner_token = await make_user(engine, "owner@example.com")
    member, _, member_token = await make_user(engine, "member@example.com")
    other, _, other_token = await make_user(engine, "other@example.com")
    org = await make_org(engine, owner=owner, slug="acme")
    await add_membership(engine, org, member, "member")
    installed = await install_template(engine, owner, "starter", "acme")
    elsewhere = await make_org(engine, owner=other, slug="elsewhere")
    other_installed = await install_template(engine, other, "starter", elsewhere.slug)
    assert installed.id is not None
    assert other_installed.id is not None
    return World(
        owner_token=owner_token,
        member_token=member_token,
        other_token=other_token,
        org_id=org.id,
        install=installed.id,
        other_install=other_installed.id,
    )


@pytest.fixture(scope="module")
def install_service_template_database(
    install_service_server_url: URL, install_service_template_database: str
) -> Iterator[Seeded[World]]:
    server, template = install_service_server_url, install_service_template_database
    with seeded_database(server, template, build_world) as seeded:
        yield seeded


@pytest.fixture
def world(install_service_template_database: Seeded[World]) -> World:
    return install_service_template_database.value


@pytest.fixture
def client(install_service_client: Client) -> Client:
    return install_service_client


ITEM = "/console/orgs/acme/schema/watchers/inbox"


def field(page: str, name: str) -> str:
    """The value a form's field shows (an input's value, or a text area's text)."""
    found = re.search(rf'<textarea id="field-{name}"[^>]*>\n(.*?)</textarea>', page, re.S)
    if found is None:
        found = re.search(rf'<input id="field-{name}" name="{name}" value="([^"]*)"', page)
    assert found, f"no field {name}"
    return html.unescape(found.group(1))


def form_fields(page: str) -> dict[str, str]:
    """Every field of the item form as the browser would post it, untouched."""
    names = re.findall(r'id="field-([a-z_]+)"', page)
    values = {
        n: field(page, n)
        for n in names
        if 'type="checkbox"' not in page.split(f'id="field-{n}"')[0][-60:]
    }
    values["etag"] = re.search(r'name="etag" value="([0-9a-f]+)"', page).group(1)  # type: ignore[union-attr]
    return values


async def current_prompt(engine: AsyncEngine, world: World) -> tuple[str, int]:
    (row,) = await rows(
        engine,
        "SELECT v.prompt, v.version FROM watchers w "
        "JOIN watcher_versions v ON v.id = w.current_version_id WHERE w.organization_id = :o",
        o=world.org_id,
    )
    return row.prompt, row.version


class TestSchemaPages:
    async def test_every_item_with_where_it_comes_from_and_an_edited_mark(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.owner_token)
        page = await client.get(ITEM)
        edited = await client.post(
            ITEM,
            data={
                **form_fields(page.text),
                "name": "Mailbox",
                "_csrf_token": csrf_token(page.text),
            },
            follow_redirects=False,
        )
        assert edited.status_code == 303, edited.text
        await sign_in(client, world.member_token)
        overview = await client.get("/console/orgs/acme/schema")
        assert overview.status_code == 200
        text = overview.text
        for slug in ("person", "company", "employed_by", "employs", "knows", "seniority", "inbox"):
            assert f">{slug}</a>" in text
        assert text.count("managed by") == 7
        row = re.search(r"<tr>\s*<th scope=\"row\"><a [^>]*>inbox</a>.*?</tr>", text, re.S)
        assert row is not None
        assert "edited" in row.group(0)
        assert "Mailbox" in row.group(0)
        # A member reads the item; the form is for owners and admins.
        item = await client.get(ITEM)
        assert item.status_code == 200
        assert '<form class="stacked item-form"' not in item.text
        assert "Only the organization's owners and admins edit its schema." in item.text
        refused = await client.post(
            ITEM,
            data={**form_fields(page.text), "_csrf_token": csrf_token(item.text)},
            follow_redirects=False,
        )
        assert refused.status_code == 403

    async def test_an_owner_edits_a_prompt_in_its_text_area(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.owner_token)
        page = await client.get(ITEM)
        assert field(page.text, "prompt") == PROMPT
        ours = PROMPT.replace("Find people.", "Find people and their roles.")
        fields = form_fields(page.text)
        # A browser sends a text area's lines ended with CR LF.
        fields["prompt"] = ours.replace("\n", "\r\n")
        saved = await client.post(
            ITEM, data={**fields, "_csrf_token": csrf_token(page.text)}, follow_redirects=False
        )
        assert saved.status_code == 303, saved.text
        assert saved.headers["location"] == f"{ITEM}?done=saved"
        assert await current_prompt(engine, world) == (ours, 2)
        assert [
            e.type for e in await rows(engine, "SELECT type FROM events WHERE type LIKE 'schema.%'")
        ] == ["schema.item_updated"]
        (audit,) = await rows(
            engine, "SELECT actor_user_id FROM audit_log WHERE action = 'schema.item_updated'"
        )
        assert audit.actor_user_id is not None

        # The same form sent again unchanged writes nothing.
        again = await client.get(ITEM)
        before = await dump(engine)
        unchanged = await client.post(
            ITEM,
            data={**form_fields(again.text), "_csrf_token": csrf_token(again.text)},
            follow_redirects=False,
        )
        assert unchanged.headers["location"] == f"{ITEM}?done=unchanged"
        after = await dump(engine)
        assert {t: v for t, v in after.items() if t != "console_sessions"} == {
            t: v for t, v in before.items() if t != "console_sessions"
        }

        # The drift of the install shows the edit line by line.
        install = await client.get(f"/console/installs/{world.install}")
        assert "<del>-Find people.</del>" in install.text
        assert "<ins>+Find people and their roles.</ins>" in install.text

    async def test_refused_edits_come_back_on_the_form_and_write_nothing(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.owner_token)
        page = await client.get(ITEM)
        fields = form_fields(page.text)
        await client.get("/console/")
        before = await dump(engine)
        stale = await client.post(
            ITEM,
            data={**fields, "etag": "0" * 64, "prompt": "x", "_csrf_token": csrf_token(page.text)},
        )
        assert stale.status_code == 412
        assert "changed since you read it" in stale.text
        bad = await client.post(
            ITEM,
            data={
                **fields,
                "extraction_schema": "{not json",
                "schedule": "often",
                "_csrf_token": csrf_token(page.text),
            },
        )
        assert bad.status_code == 422
        assert "$.extraction_schema" in bad.text
        assert field(bad.text, "schedule") == "often"  # as typed
        unresolved = await client.post(
            "/console/orgs/acme/schema/classifiers/seniority",
            data={
                **form_fields(
                    (await client.get("/console/orgs/acme/schema/classifiers/seniority")).text
                ),
                "watcher": "nowhere",
                "_csrf_token": csrf_token(page.text),
            },
        )
        assert unresolved.status_code == 422
        assert "unknown watcher &#39;nowhere&#39;" in unresolved.text
        no_csrf = await client.post(ITEM, data=fields, follow_redirects=False)
        assert no_csrf.status_code == 403
        elsewhere = await client.get("/console/orgs/elsewhere/schema/watchers/inbox")
        assert elsewhere.status_code == 404
        after = await dump(engine)
        assert {t: v for t, v in after.items() if t != "console_sessions"} == {
            t: v for t, v in before.items() if t != "console_sessions"
        }

    async def test_archive_from_the_items_page(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.owner_token)
        managed = await client.get(ITEM)
        assert "Archive inbox" not in managed.text
        assert "detach it from" in managed.text
        detached = await post_form(
            client,
            f"/console/installs/{world.install}/detach",
            f"/console/installs/{world.install}",
            kind="classifiers",
            slug="seniority",
        )
        assert detached.status_code == 303
        # A detached watcher another active item refers to stays.
        await post_form(
            client,
            f"/console/installs/{world.install}/detach",
            f"/console/installs/{world.install}",
            kind="watchers",
            slug="inbox",
        )
        page = await client.get(ITEM)
        etag = re.search(r'name="etag" value="([0-9a-f]+)"', page.text)
        assert etag is not None
        used = await post_form(client, f"{ITEM}/archive", ITEM, etag=etag.group(1))
        assert used.status_code == 409
        assert "classifier &#39;seniority&#39;" in used.text
        item = "/console/orgs/acme/schema/classifiers/seniority"
        etag = re.search(r'name="etag" value="([0-9a-f]+)"', (await client.get(item)).text)
        assert etag is not None
        archived = await post_form(client, f"{item}/archive", item, etag=etag.group(1))
        assert archived.headers["location"] == f"{item}?done=archived"
        assert (
            await scalar(
                engine,
                "SELECT status FROM event_classifiers WHERE organization_id = :o",
                o=world.org_id,
            )
            == "archived"
        )


class TestUpgradeAndReconcile:
    async def test_a_newer_release_is_offered_with_its_plan_first(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.owner_token)
        page = await client.get(ITEM)
        ours = PROMPT.replace("Find people.", "Find people and their roles.")
        saved = await client.post(
            ITEM,
            data={**form_fields(page.text), "prompt": ours, "_csrf_token": csrf_token(page.text)},
            follow_redirects=False,
        )
        assert saved.status_code == 303
        install = f"/console/installs/{world.install}"
        assert "is available" not in (await client.get(install)).text
        await publish_template(
            engine, doc(PROMPT.replace("Link each person", "Link every person"), "Organisation")
        )
        offered = await client.get(install)
        assert "Release 2 is available" in offered.text
        assert f'href="{install}/upgrade?version=2"' in offered.text

        before = await dump(engine)
        plan = await client.get(f"{install}/upgrade?version=2")
        assert plan.status_code == 200
        assert "1 item(s) conflict" in plan.text
        assert "<del>-Find people and their roles.</del>" in plan.text
        assert "<ins>+Link every person to the company they work for.</ins>" in plan.text
        assert 'name="resolve:watchers:inbox:/prompt" value="local" required' in plan.text
        # Without a choice the upgrade is refused with the plan shown again.
        refused = await client.post(
            f"{install}/upgrade",
            data={"version": "2", "_csrf_token": csrf_token(plan.text)},
        )
        assert refused.status_code == 409
        assert "Not upgraded" in refused.text
        assert {t: v for t, v in (await dump(engine)).items() if t != "console_sessions"} == {
            t: v for t, v in before.items() if t != "console_sessions"
        }

        kept = await client.post(
            f"{install}/upgrade",
            data={
                "version": "2",
                "resolve:watchers:inbox:/prompt": "local",
                "_csrf_token": csrf_token(plan.text),
            },
            follow_redirects=False,
        )
        assert kept.status_code == 303, kept.text
        assert kept.headers["location"] == f"{install}?done=upgraded"
        assert await current_prompt(engine, world) == (ours, 2)
        assert (
            await scalar(
                engine,
                "SELECT name FROM entity_types WHERE slug = 'company' AND organization_id = :o",
                o=world.org_id,
            )
            == "Organisation"
        )
        history = await rows(
            engine,
            "SELECT action FROM install_events WHERE install_id = :i ORDER BY created_at",
            i=world.install,
        )
        assert [h.action for h in history] == ["install", "upgrade"]

    async def test_reconcile_shows_what_it_overwrites_then_asks(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await sign_in(client, world.owner_token)
        page = await client.get(ITEM)
        ours = PROMPT + "Skip newsletters.\n"
        await client.post(
            ITEM,
            data={**form_fields(page.text), "prompt": ours, "_csrf_token": csrf_token(page.text)},
        )
        install = f"/console/installs/{world.install}"
        assert f'href="{install}/reconcile"' in (await client.get(install)).text
        before = await dump(engine)
        plan = await client.get(f"{install}/reconcile")
        assert plan.status_code == 200
        assert "1 value(s) the organization wrote would be overwritten" in plan.text
        assert "<del>-Skip newsletters.</del>" in plan.text
        assert {t: v for t, v in (await dump(engine)).items() if t != "console_sessions"} == {
            t: v for t, v in before.items() if t != "console_sessions"
        }
        done = await post_form(client, f"{install}/reconcile", f"{install}/reconcile")
        assert done.headers["location"] == f"{install}?done=reconciled"
        assert await current_prompt(engine, world) == (PROMPT, 3)


class TestTemplatePage:
    async def test_what_the_release_contains_and_where_it_is_installed(
        self, client: Client, world: World
    ) -> None:
        await sign_in(client, world.owner_token)
        page = await client.get("/console/templates/starter")
        assert "What release 1 contains" in page.text
        assert "<code>employed_by</code>" in page.text
        assert ">acme</a>" in page.text
        assert ">elsewhere</a>" not in page.text  # not the owner's
        await sign_in(client, ADMIN)
        first = await client.get("/console/templates/starter")
        assert ">acme</a>" in first.text
        assert ">elsewhere</a>" in first.text
