"""An organization's own schema over HTTP: reading items with their provenance and ETag,
creating, editing (JSON merge patch, If-Match) and archiving them, each write with its
version, schedule, change-feed event and audit row, and every refusal writing nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.db.engine import create_engine
from install_service.db.session import transaction
from install_service.orgs.service import actor_for_email, add_member, ensure_admin
from install_service.schema import service as schema
from install_service.testing import (
    Seeded,
    bearer,
    make_org,
    make_user,
    publish_template,
    seeded_database,
)
from tests.conftest import dump, execute, rows, scalar, small_doc

Client = AsyncTestClient[Litestar]
ADMIN = "schema-admin-token"
PROMPT = "Find people.\nFind companies.\nLink each person to the company they work for.\n"


def story_doc() -> dict[str, Any]:
    """`starter`, its watcher's prompt spanning lines."""
    doc = small_doc()
    doc["watchers"][0]["prompt"] = PROMPT
    return doc


@dataclass
class World:
    tokens: dict[str, str]
    org: str
    org_id: uuid.UUID
    install_id: uuid.UUID


async def build_world(engine: AsyncEngine) -> World:
    """`starter` installed in `acme`; one user per role there, and a stranger."""
    async with transaction(engine) as session:
        await ensure_admin(session, ADMIN)
    await publish_template(engine, story_doc())
    owner, _, owner_token = await make_user(engine, "owner@example.com")
    admin, _, admin_token = await make_user(engine, "admin@example.com")
    member, _, member_token = await make_user(engine, "member@example.com")
    _, _, stranger_token = await make_user(engine, "stranger@example.com")
    org = await make_org(engine, owner=owner, slug="acme")
    async with transaction(engine) as session:
        await add_member(session, organization_id=org.id, user_id=admin.user_id, role="admin")
        await add_member(session, organization_id=org.id, user_id=member.user_id, role="member")
        from install_service.installs.service import install

        installed = await install(session, owner, template="starter", organization="acme")
    assert installed.id is not None
    return World(
        tokens={
            "owner": owner_token,
            "admin": admin_token,
            "member": member_token,
            "stranger": stranger_token,
            "platform_admin": ADMIN,
        },
        org="acme",
        org_id=org.id,
        install_id=installed.id,
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


def url(kind: str, slug: str | None = None, org: str = "acme") -> str:
    base = f"/api/v1/organizations/{org}/schema/{kind}"
    return base if slug is None else f"{base}/{slug}"


async def read(client: Client, world: World, kind: str, slug: str) -> httpx.Response:
    response = await client.get(url(kind, slug), headers=bearer(world.tokens["owner"]))
    assert response.status_code == 200, response.text
    return response


async def edit(
    client: Client,
    world: World,
    kind: str,
    slug: str,
    patch: dict[str, Any],
    *,
    role: str = "owner",
    if_match: str | None = None,
) -> httpx.Response:
    headers = {**bearer(world.tokens[role]), "Content-Type": "application/merge-patch+json"}
    if if_match is not None:
        headers["If-Match"] = if_match
    return await client.patch(url(kind, slug), json=patch, headers=headers)


async def create(
    client: Client, world: World, kind: str, document: dict[str, Any], *, role: str = "owner"
) -> httpx.Response:
    return await client.post(url(kind), json=document, headers=bearer(world.tokens[role]))


async def events(engine: AsyncEngine, kind: str = "schema.%") -> list[Any]:
    return await rows(
        engine, "SELECT type, install_id, data FROM events WHERE type LIKE :k ORDER BY seq", k=kind
    )


async def audits(engine: AsyncEngine) -> list[Any]:
    return await rows(
        engine,
        "SELECT action, actor_user_id, target_id, organization_id, details FROM audit_log "
        "WHERE action LIKE 'schema.%' ORDER BY occurred_at, id",
    )


async def warm(client: Client, world: World) -> None:
    """Use every token once: a token's first use is noted (`last_used_at`), later ones within
    a minute are not, so what a test compares afterwards is only what it did."""
    for token in world.tokens.values():
        assert (await client.get("/api/v1/me", headers=bearer(token))).status_code == 200


class TestRead:
    async def test_a_managed_item_in_its_release_shape_with_provenance_and_etag(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        response = await read(client, world, "watchers", "inbox")
        item = response.json()
        assert item["kind"] == "watchers"
        assert item["status"] == "active"
        assert item["provenance"] == {
            "type": "managed",
            "template": "starter",
            "release": 1,
            "install_id": str(world.install_id),
        }
        assert item["edited"] is False
        assert item["version"] == 1
        released = await scalar(
            engine,
            "SELECT item FROM template_release_items WHERE kind = 'watchers' AND slug = 'inbox'",
        )
        assert item["document"] == released
        # The ETag is the content hash: for an unedited managed row, the hash it mirrored.
        mirrored = await scalar(
            engine, "SELECT mirrored_hash FROM watchers WHERE organization_id = :o", o=world.org_id
        )
        assert item["etag"] == mirrored
        assert response.headers["etag"] == f'"{mirrored}"'

    async def test_lists_every_kind_by_slug_filtered_and_paged(
        self, client: Client, world: World
    ) -> None:
        headers = bearer(world.tokens["member"])
        listed = await client.get(url("relationship-types"), headers=headers)
        assert [i["slug"] for i in listed.json()["items"]] == ["employed_by", "employs", "knows"]
        for n in range(3):
            made = await create(client, world, "entity-types", {"slug": f"own-{n}", "name": "Own"})
            assert made.status_code == 201, made.text
        archived = await client.delete(
            url("entity-types", "own-1"), headers=bearer(world.tokens["owner"])
        )
        assert archived.status_code == 200, archived.text

        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
            page = (await client.get(url("entity-types"), params=params, headers=headers)).json()
            seen += [i["slug"] for i in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ["company", "own-0", "own-1", "own-2", "person"]

        def slugs(response: httpx.Response) -> list[str]:
            return [i["slug"] for i in response.json()["items"]]

        only = await client.get(url("entity-types"), params={"status": "archived"}, headers=headers)
        assert slugs(only) == ["own-1"]
        managed = await client.get(
            url("entity-types"), params={"template": "starter"}, headers=headers
        )
        assert slugs(managed) == ["company", "person"]
        own = (await client.get(url("entity-types", "own-0"), headers=headers)).json()
        assert own["provenance"] == {"type": "own"}
        assert own["edited"] is False
        assert own["version"] is None

    async def test_a_row_detached_from_two_templates_names_the_last_and_lists_under_each(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        """`person` is detached from the starter install, adopted by another template's and
        detached from that one too: it reads as detached from the last, and each template's
        filter still finds it (both installs leave it alone)."""
        headers = bearer(world.tokens["owner"])
        await publish_template(
            engine,
            {"slug": "other", "name": "Other", "entity_types": [{"slug": "person", "name": "P"}]},
        )
        person = {"kind": "entity_types", "slug": "person"}
        detached = await client.post(
            f"/api/v1/installs/{world.install_id}/detach", json=person, headers=headers
        )
        assert detached.status_code == 200, detached.text
        item = (await read(client, world, "entity-types", "person")).json()
        assert item["provenance"] == {"type": "detached", "template": "starter"}
        adopted = await client.post(
            "/api/v1/installs",
            json={"template": "other", "organization": "acme", "adopt": [person]},
            headers=headers,
        )
        assert adopted.status_code == 201, adopted.text
        item = (await read(client, world, "entity-types", "person")).json()
        assert item["provenance"]["type"] == "managed"
        assert item["provenance"]["template"] == "other"
        detached = await client.post(
            f"/api/v1/installs/{adopted.json()['id']}/detach", json=person, headers=headers
        )
        assert detached.status_code == 200, detached.text
        item = (await read(client, world, "entity-types", "person")).json()
        assert item["provenance"] == {"type": "detached", "template": "other"}
        for template, found in (("starter", ["company", "person"]), ("other", ["person"])):
            listed = await client.get(
                url("entity-types"), params={"template": template}, headers=headers
            )
            assert [i["slug"] for i in listed.json()["items"]] == found, template

    @pytest.mark.parametrize(
        ("role", "status"),
        [
            ("member", 200),
            ("admin", 200),
            ("owner", 200),
            ("platform_admin", 200),
            ("stranger", 404),
        ],
    )
    async def test_members_read_and_strangers_find_nothing(
        self, client: Client, world: World, role: str, status: int
    ) -> None:
        headers = bearer(world.tokens[role])
        assert (await client.get(url("watchers"), headers=headers)).status_code == status
        assert (await client.get(url("watchers", "inbox"), headers=headers)).status_code == status

    async def test_system_rows_are_no_items(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await execute(
            engine,
            "INSERT INTO entity_types (organization_id, slug, name) VALUES (:o, '$member', 'M')",
            o=world.org_id,
        )
        headers = bearer(world.tokens["owner"])
        listed = await client.get(url("entity-types"), headers=headers)
        assert [i["slug"] for i in listed.json()["items"]] == ["company", "person"]
        assert (
            await client.get(url("entity-types", "$member"), headers=headers)
        ).status_code == 404

    async def test_unknown_items_and_kinds(self, client: Client, world: World) -> None:
        headers = bearer(world.tokens["owner"])
        missing = await client.get(url("watchers", "nope"), headers=headers)
        assert (missing.status_code, missing.json()["code"]) == (404, "item_not_found")
        # A watcher's slug names no entity type; no slug holds NUL.
        assert (await client.get(url("entity-types", "inbox"), headers=headers)).status_code == 404
        assert (await client.get(url("watchers", "in%00box"), headers=headers)).status_code == 404
        nul = await client.get(url("watchers"), params={"template": "st\x00"}, headers=headers)
        assert (nul.status_code, nul.json()["items"]) == (200, [])
        assert (await client.get(url("gadgets"), headers=headers)).status_code == 400
        unknown_org = await client.get(url("watchers", org="nowhere"), headers=headers)
        assert unknown_org.status_code == 404


class TestEdit:
    async def test_a_watcher_prompt_edit_appends_a_version_and_is_recorded(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        before = await read(client, world, "watchers", "inbox")
        v1 = await rows(
            engine,
            "SELECT xmin::text, * FROM watcher_versions WHERE organization_id = :o",
            o=world.org_id,
        )
        new_prompt = PROMPT.replace("Find companies.", "Find companies and charities.")
        response = await edit(
            client,
            world,
            "watchers",
            "inbox",
            {"prompt": new_prompt},
            if_match=before.headers["etag"],
        )
        assert response.status_code == 200, response.text
        item = response.json()
        assert item["document"]["prompt"] == new_prompt
        assert item["edited"] is True
        assert item["version"] == 2
        assert response.headers["etag"] == f'"{item["etag"]}"' != before.headers["etag"]

        # Version 1 is exactly as it was; version 2 holds the edit and is current.
        versions = await rows(
            engine,
            "SELECT xmin::text, * FROM watcher_versions WHERE organization_id = :o "
            "ORDER BY version",
            o=world.org_id,
        )
        assert versions[0] == v1[0]
        assert (versions[1].version, versions[1].prompt) == (2, new_prompt)
        current = await scalar(
            engine,
            "SELECT current_version_id FROM watchers WHERE organization_id = :o",
            o=world.org_id,
        )
        assert current == versions[1].id

        # One event, as a runner reads an upgrade's: the item, its version, its provenance.
        (event,) = await events(engine)
        assert event.type == "schema.item_updated"
        assert event.install_id == world.install_id
        assert event.data["items"] == [
            {
                "kind": "watchers",
                "slug": "inbox",
                "action": "updated",
                "version": 2,
                "version_id": str(versions[1].id),
            }
        ]
        assert event.data["provenance"]["type"] == "managed"
        assert event.data["template"] == "starter"
        # One audit row, with the path changed and both values.
        (audit,) = await audits(engine)
        assert audit.action == "schema.item_updated"
        assert audit.target_id == "watchers:inbox"
        assert audit.organization_id == world.org_id
        assert audit.details["paths"] == [{"path": "/prompt", "old": PROMPT, "new": new_prompt}]

        # The edit is drift, with a line diff.
        drift = await client.get(
            f"/api/v1/installs/{world.install_id}/drift", headers=bearer(world.tokens["member"])
        )
        (drifted,) = drift.json()["drift"]
        (field,) = drifted["fields"]
        assert field["path"] == "/prompt"
        assert "-Find companies.\n+Find companies and charities." in field["diff"]

    async def test_a_name_edit_writes_the_row_and_no_version(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        response = await edit(
            client, world, "entity-types", "person", {"name": "Human"}, role="admin"
        )
        assert response.status_code == 200, response.text
        assert (
            await scalar(
                engine,
                "SELECT name FROM entity_types WHERE slug = 'person' AND organization_id = :o",
                o=world.org_id,
            )
            == "Human"
        )
        watcher_edit = await edit(client, world, "watchers", "inbox", {"name": "Mailbox"})
        assert watcher_edit.json()["version"] == 1
        assert (
            await scalar(
                engine,
                "SELECT count(*) FROM watcher_versions WHERE organization_id = :o",
                o=world.org_id,
            )
            == 1
        )
        assert [e.type for e in await events(engine)] == ["schema.item_updated"] * 2

    async def test_a_schedule_edit_sets_the_next_run_again(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        response = await edit(client, world, "watchers", "inbox", {"schedule": "15 6 * * *"})
        assert response.status_code == 200, response.text
        next_run = await scalar(
            engine, "SELECT next_run_at FROM watchers WHERE organization_id = :o", o=world.org_id
        )
        now = datetime.now(UTC)
        assert (next_run.hour, next_run.minute) == (6, 15)
        assert now < next_run <= now + timedelta(days=1)

    async def test_a_classifier_edit_appends_a_version(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        response = await edit(
            client,
            world,
            "classifiers",
            "seniority",
            {"attribute_values": {"lead": "Leads others"}, "fallback_value": "junior"},
        )
        assert response.status_code == 200, response.text
        versions = await rows(
            engine,
            "SELECT version, attribute_values FROM event_classifier_versions "
            "WHERE organization_id = :o ORDER BY 1",
            o=world.org_id,
        )
        assert [v.version for v in versions] == [1, 2]
        assert versions[1].attribute_values == {
            "junior": "Early career",
            "senior": "Experienced",
            "lead": "Leads others",
        }

    async def test_null_removes_a_field_and_its_default_applies(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        response = await edit(
            client, world, "entity-types", "person", {"metadata_schema": None, "icon": "user"}
        )
        assert response.json()["document"]["metadata_schema"] == {}
        assert response.json()["document"]["icon"] == "user"
        found = await rows(
            engine,
            "SELECT metadata_schema, icon FROM entity_types WHERE slug = 'person' "
            "AND organization_id = :o",
            o=world.org_id,
        )
        assert tuple(found[0]) == ({}, "user")

    async def test_an_edit_back_to_the_release_is_not_edited(
        self, client: Client, world: World
    ) -> None:
        await edit(client, world, "entity-types", "person", {"name": "Human"})
        back = await edit(client, world, "entity-types", "person", {"name": "Person"})
        assert back.json()["edited"] is False

    async def test_an_edit_that_changes_nothing_writes_nothing(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        await warm(client, world)
        before = await dump(engine)
        current = (await read(client, world, "relationship-types", "employed_by")).json()
        rules = list(reversed(current["document"]["rules"]))  # the same set of rules
        for patch in ({}, {"name": current["document"]["name"]}, {"rules": rules}):
            response = await edit(client, world, "relationship-types", "employed_by", patch)
            assert response.status_code == 200, response.text
            assert response.json()["etag"] == current["etag"]
        assert await dump(engine) == before

    async def test_the_inverse_is_a_pair(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        made = await create(
            client,
            world,
            "relationship-types",
            {
                "slug": "mentors",
                "name": "Mentors",
                "rules": [{"source": "person", "target": "person"}],
            },
        )
        assert made.status_code == 201, made.text
        paired = await create(
            client,
            world,
            "relationship-types",
            {
                "slug": "mentored_by",
                "name": "Mentored by",
                "inverse": "mentors",
                "rules": [{"source": "person", "target": "person"}],
            },
        )
        assert paired.status_code == 201, paired.text
        mentors = (await read(client, world, "relationship-types", "mentors")).json()
        assert mentors["document"]["inverse"] == "mentored_by"
        (_, created) = await events(engine)
        assert [(i["slug"], i["action"]) for i in created.data["items"]] == [
            ("mentored_by", "created"),
            ("mentors", "updated"),
        ]
        # Unpairing one side unpairs the other.
        cleared = await edit(client, world, "relationship-types", "mentors", {"inverse": None})
        assert cleared.status_code == 200, cleared.text
        inverses = await rows(
            engine,
            "SELECT slug, inverse_type_id FROM entity_relationship_types "
            "WHERE slug LIKE 'mentor%' ORDER BY slug",
        )
        assert [i.inverse_type_id for i in inverses] == [None, None]


class TestCreate:
    async def test_an_own_watcher_gets_version_one_and_a_next_run(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        response = await create(
            client,
            world,
            "watchers",
            {
                "slug": "calendar",
                "name": "Calendar",
                "schedule": "0 * * * *",
                "prompt": "Meetings.",
            },
        )
        assert response.status_code == 201, response.text
        item = response.json()
        assert item["provenance"] == {"type": "own"}
        assert item["version"] == 1
        assert response.headers["etag"] == f'"{item["etag"]}"'
        (row,) = await rows(
            engine,
            "SELECT w.managed_by_template_agent_id, w.agent_id, w.next_run_at, v.version, "
            "v.prompt FROM watchers w JOIN watcher_versions v ON v.id = w.current_version_id "
            "WHERE w.slug = 'calendar'",
        )
        assert row.managed_by_template_agent_id is None
        assert row.agent_id is None
        assert row.next_run_at is not None
        assert (row.version, row.prompt) == (1, "Meetings.")
        (event,) = await events(engine)
        assert event.type == "schema.item_created"
        assert event.install_id is None
        assert event.data["items"][0]["version"] == 1
        (audit,) = await audits(engine)
        assert audit.action == "schema.item_created"
        assert audit.details["paths"][0]["new"]["prompt"] == "Meetings."

    async def test_an_own_classifier_refers_to_the_orgs_rows(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        response = await create(
            client,
            world,
            "classifiers",
            {
                "slug": "mood",
                "name": "Mood",
                "attribute_key": "mood",
                "entity_type": "person",
                "watcher": "inbox",
                "attribute_values": {"calm": "Calm", "busy": {"description": "Busy"}},
            },
        )
        assert response.status_code == 201, response.text
        (row,) = await rows(
            engine,
            "SELECT e.organization_id AS e_org, w.organization_id AS w_org, v.version "
            "FROM event_classifiers c JOIN entity_types e ON e.id = c.entity_type_id "
            "JOIN watchers w ON w.id = c.watcher_id "
            "JOIN event_classifier_versions v ON v.id = c.current_version_id "
            "WHERE c.slug = 'mood'",
        )
        assert (row.e_org, row.w_org, row.version) == (world.org_id, world.org_id, 1)


class TestArchive:
    async def test_archiving_a_watcher_clears_its_next_run_once(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        made = await create(
            client,
            world,
            "watchers",
            {"slug": "cal", "name": "Cal", "schedule": "0 * * * *", "prompt": "p"},
        )
        assert made.status_code == 201
        headers = bearer(world.tokens["owner"])
        response = await client.delete(url("watchers", "cal"), headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "archived"
        (row,) = await rows(engine, "SELECT status, next_run_at FROM watchers WHERE slug = 'cal'")
        assert tuple(row) == ("archived", None)
        before = await dump(engine)
        again = await client.delete(url("watchers", "cal"), headers=headers)
        assert again.status_code == 200
        assert await dump(engine) == before
        assert [e.type for e in await events(engine)] == [
            "schema.item_created",
            "schema.item_archived",
        ]


class TestRefusals:
    """Each refusal is a clear 4xx, and the database is exactly as it was."""

    @pytest.fixture
    async def unchanged(self, engine: AsyncEngine, client: Client, world: World) -> Any:
        await warm(client, world)
        before = await dump(engine)
        yield
        assert await dump(engine) == before

    async def test_a_stale_etag(self, client: Client, world: World, unchanged: None) -> None:
        stale = '"' + "0" * 64 + '"'
        patched = await edit(client, world, "watchers", "inbox", {"prompt": "x"}, if_match=stale)
        assert (patched.status_code, patched.json()["code"]) == (412, "etag_mismatch")
        archived = await client.delete(
            url("watchers", "inbox"), headers={**bearer(world.tokens["owner"]), "If-Match": stale}
        )
        assert archived.status_code == 412
        weak = (await read(client, world, "watchers", "inbox")).headers["etag"]
        patched = await edit(
            client, world, "watchers", "inbox", {"prompt": "x"}, if_match=f"W/{weak}"
        )
        assert patched.status_code == 412

    @pytest.mark.parametrize("role", ["member", "stranger"])
    async def test_members_and_strangers_write_nothing(
        self, client: Client, world: World, unchanged: None, role: str
    ) -> None:
        expected = 403 if role == "member" else 404
        patched = await edit(client, world, "watchers", "inbox", {"prompt": "x"}, role=role)
        assert patched.status_code == expected, patched.text
        made = await create(client, world, "entity-types", {"slug": "x", "name": "X"}, role=role)
        assert made.status_code == expected
        archived = await client.delete(
            url("entity-types", "company"), headers=bearer(world.tokens[role])
        )
        assert archived.status_code == expected

    async def test_an_invalid_document_lists_every_problem(
        self, client: Client, world: World, unchanged: None
    ) -> None:
        response = await create(
            client,
            world,
            "relationship-types",
            {
                "slug": "likes",
                "name": "Likes",
                "inverse": "liked_by",
                "rules": [
                    {"source": "person", "target": "ghost"},
                    {"source": "person", "target": "ghost"},
                ],
                "policies": {"name": "tenant"},
            },
        )
        assert (response.status_code, response.json()["code"]) == (422, "invalid_schema_item")
        assert sorted(p["path"] for p in response.json()["problems"]) == [
            "$.inverse",
            "$.policies",
            "$.rules[0].target",
            "$.rules[1]",
            "$.rules[1].target",
        ]
        structural = await edit(client, world, "watchers", "inbox", {"schedule": "every day"})
        assert structural.status_code == 422
        assert structural.json()["problems"][0]["path"] == "$.schedule"
        unknown = await edit(client, world, "watchers", "inbox", {"colour": "red"})
        assert unknown.status_code == 422
        renamed = await edit(client, world, "watchers", "inbox", {"slug": "outbox", "name": ""})
        assert {p["path"] for p in renamed.json()["problems"]} == {"$.slug", "$"}

    async def test_an_unresolved_reference(
        self, client: Client, world: World, unchanged: None
    ) -> None:
        response = await edit(
            client,
            world,
            "classifiers",
            "seniority",
            {"watcher": "nowhere", "entity_type": "company"},
        )
        assert response.status_code == 422
        assert response.json()["problems"] == [
            {"path": "$.watcher", "message": "unknown watcher 'nowhere'"}
        ]

    async def test_a_reference_to_another_orgs_item(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        stranger = bearer(world.tokens["stranger"])
        theirs = (await client.get("/api/v1/me", headers=stranger)).json()
        made = await client.post(
            url("watchers", org=theirs["personal_organization"]["slug"]),
            json={"slug": "calendar", "name": "Calendar", "prompt": "Meetings."},
            headers=stranger,
        )
        assert made.status_code == 201, made.text
        await warm(client, world)
        before = await dump(engine)
        response = await edit(client, world, "classifiers", "seniority", {"watcher": "calendar"})
        assert response.status_code == 422
        assert response.json()["problems"] == [
            {"path": "$.watcher", "message": "unknown watcher 'calendar'"}
        ]
        assert await dump(engine) == before

    async def test_a_reference_to_an_archived_item(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        made = await create(client, world, "entity-types", {"slug": "pet", "name": "Pet"})
        assert made.status_code == 201
        headers = bearer(world.tokens["owner"])
        assert (await client.delete(url("entity-types", "pet"), headers=headers)).status_code == 200
        before = await dump(engine)
        response = await edit(
            client,
            world,
            "relationship-types",
            "knows",
            {"rules": [{"source": "pet", "target": "pet"}]},
        )
        assert response.status_code == 422
        assert await dump(engine) == before

    @pytest.mark.parametrize(("kind", "slug"), [("entity-types", "person"), ("watchers", "inbox")])
    async def test_a_slug_the_org_has_is_a_conflict(
        self, client: Client, world: World, unchanged: None, kind: str, slug: str
    ) -> None:
        document = (
            {"slug": slug, "name": "Mine", "prompt": "p"}
            if kind == "watchers"
            else {
                "slug": slug,
                "name": "Mine",
            }
        )
        response = await create(client, world, kind, document)
        assert (response.status_code, response.json()["code"]) == (409, "item_exists")

    async def test_an_archived_slug_is_a_conflict_too(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        assert (
            await create(client, world, "entity-types", {"slug": "pet", "name": "Pet"})
        ).status_code == 201
        headers = bearer(world.tokens["owner"])
        await client.delete(url("entity-types", "pet"), headers=headers)
        before = await dump(engine)
        again = await create(client, world, "entity-types", {"slug": "pet", "name": "Pet"})
        assert again.status_code == 409
        archived_edit = await edit(client, world, "entity-types", "pet", {"name": "Cat"})
        assert (archived_edit.status_code, archived_edit.json()["code"]) == (409, "item_archived")
        assert await dump(engine) == before

    async def test_a_managed_item_is_detached_before_it_is_archived(
        self, client: Client, world: World, unchanged: None
    ) -> None:
        response = await client.delete(
            url("entity-types", "company"), headers=bearer(world.tokens["owner"])
        )
        assert (response.status_code, response.json()["code"]) == (409, "item_managed")
        assert response.json()["install_id"] == str(world.install_id)

    async def test_an_item_in_use_is_not_archived(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        made = await create(client, world, "entity-types", {"slug": "pet", "name": "Pet"})
        assert made.status_code == 201
        uses = await create(
            client,
            world,
            "relationship-types",
            {"slug": "owns", "name": "Owns", "rules": [{"source": "person", "target": "pet"}]},
        )
        assert uses.status_code == 201, uses.text
        await warm(client, world)
        before = await dump(engine)
        response = await client.delete(
            url("entity-types", "pet"), headers=bearer(world.tokens["owner"])
        )
        assert (response.status_code, response.json()["code"]) == (409, "item_in_use")
        assert response.json()["items"] == [{"kind": "relationship_types", "slug": "owns"}]
        assert await dump(engine) == before

    async def test_reserved_slugs_and_malformed_bodies(
        self, client: Client, world: World, unchanged: None
    ) -> None:
        reserved = await create(client, world, "entity-types", {"slug": "$member", "name": "M"})
        assert reserved.status_code == 422
        not_an_object = await client.post(
            url("entity-types"), content=b"[1, 2]", headers=bearer(world.tokens["owner"])
        )
        assert not_an_object.status_code == 400

    async def test_a_templates_own_org_changes_by_publishing_only(
        self, client: Client, world: World, unchanged: None
    ) -> None:
        response = await client.patch(
            url("watchers", "inbox", org="starter"),
            json={"prompt": "x"},
            headers=bearer(ADMIN),
        )
        assert (response.status_code, response.json()["code"]) == (422, "template_org_read_only")


class TestCustomizeUpgradeResolve:
    """The whole story over HTTP: an owner edits a watcher's prompt and an entity type's name,
    sees the edits as drift, and a release changes the same prompt: the dry run says it would
    conflict and shows both prompts line by line, the org keeps its prompt, and the feed and
    the audit log have every step."""

    async def test_keep_our_prompt_through_an_upgrade_that_changed_it(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        owner = bearer(world.tokens["owner"])
        ours = PROMPT.replace("Find people.", "Find people and their roles.")
        assert (await edit(client, world, "watchers", "inbox", {"prompt": ours})).status_code == 200
        renamed = await edit(client, world, "entity-types", "person", {"name": "Contact"})
        assert renamed.status_code == 200

        drift = (
            await client.get(f"/api/v1/installs/{world.install_id}/drift", headers=owner)
        ).json()
        assert [
            (d["kind"], d["slug"], [f["path"] for f in d["fields"]]) for d in drift["drift"]
        ] == [
            ("entity_types", "person", ["/name"]),
            ("watchers", "inbox", ["/prompt"]),
        ]
        assert "+Find people and their roles." in drift["drift"][1]["fields"][0]["diff"]

        theirs = PROMPT.replace("Link each person", "Link every person")
        release = story_doc()
        release["watchers"][0]["prompt"] = theirs
        release["entity_types"][1]["name"] = "Organisation"
        await publish_template(engine, release)
        diff = (
            await client.get("/api/v1/templates/starter/releases/1/diff/2", headers=owner)
        ).json()
        prompt_path = next(p for i in diff["items"] for p in i["paths"] if p["path"] == "/prompt")
        assert prompt_path["diff"].splitlines()[:2] == ["--- release 1", "+++ release 2"]

        await warm(client, world)
        before = await dump(engine)
        upgrade = f"/api/v1/installs/{world.install_id}/upgrade"
        plan = await client.post(upgrade, json={"dry_run": True}, headers=owner)
        assert plan.status_code == 200, plan.text
        found = plan.json()
        assert (found["would_conflict"], found["conflicts"]) == (True, 1)
        assert found["changes"]["watchers"]["conflict"] == 1
        assert found["changes"]["entity_types"] == {
            "created": 0,
            "updated": 1,
            "unchanged": 1,
            "archived": 0,
            "adopted": 0,
            "detached": 0,
            "conflict": 0,
        }
        (inbox,) = [i for i in found["items"] if i["slug"] == "inbox"]
        assert inbox["action"] == "conflict"
        (field,) = inbox["fields"]
        assert (field["path"], field["outcome"]) == ("/prompt", "conflict")
        assert field["diff"].splitlines()[:2] == ["--- organization", "+++ release 2"]
        assert "-Find people and their roles.\n+Find people." in field["diff"]
        assert "+Link every person" in field["diff"]

        refused = await client.post(upgrade, json={}, headers=owner)
        assert refused.status_code == 409
        (conflict,) = refused.json()["conflicts"]
        assert conflict["fields"] == ["/prompt"]
        assert conflict["diffs"] == [{"path": "/prompt", "diff": field["diff"]}]
        assert await dump(engine) == before

        kept = await client.post(
            upgrade,
            json={
                "resolutions": [
                    {"kind": "watchers", "slug": "inbox", "path": "/prompt", "take": "local"}
                ]
            },
            headers=owner,
        )
        assert kept.status_code == 200, kept.text
        assert kept.json()["action"] == "upgrade"
        (row,) = await rows(
            engine,
            "SELECT v.prompt, r.version FROM watchers w "
            "JOIN watcher_versions v ON v.id = w.current_version_id "
            "JOIN template_releases r ON r.id = w.mirrored_release_id "
            "WHERE w.organization_id = :o",
            o=world.org_id,
        )
        assert tuple(row) == (ours, 2)
        names = await rows(
            engine,
            "SELECT slug, name FROM entity_types WHERE organization_id = :o ORDER BY slug",
            o=world.org_id,
        )
        assert [tuple(n) for n in names] == [("company", "Organisation"), ("person", "Contact")]
        inbox_now = (await read(client, world, "watchers", "inbox")).json()
        assert inbox_now["provenance"]["release"] == 2
        assert inbox_now["edited"] is True

        feed = await rows(
            engine,
            "SELECT type FROM events WHERE organization_id = :o ORDER BY seq",
            o=world.org_id,
        )
        assert [e.type for e in feed] == [
            "install.created",
            "schema.item_updated",
            "schema.item_updated",
            "install.upgraded",
        ]
        audit = await rows(
            engine,
            "SELECT action FROM audit_log WHERE organization_id = :o ORDER BY occurred_at, id",
            o=world.org_id,
        )
        assert [a.action for a in audit][-3:] == [
            "schema.item_updated",
            "schema.item_updated",
            "install.upgraded",
        ]

    async def test_a_reconcile_dry_run_shows_what_it_would_overwrite(
        self, engine: AsyncEngine, client: Client, world: World
    ) -> None:
        owner = bearer(world.tokens["owner"])
        ours = PROMPT + "Skip newsletters.\n"
        assert (await edit(client, world, "watchers", "inbox", {"prompt": ours})).status_code == 200
        await warm(client, world)
        before = await dump(engine)
        plan = await client.post(
            f"/api/v1/installs/{world.install_id}/reconcile", json={"dry_run": True}, headers=owner
        )
        assert plan.status_code == 200, plan.text
        found = plan.json()
        assert (found["dry_run"], found["action"], found["would_conflict"]) == (
            True,
            "reconcile",
            False,
        )
        (inbox,) = [i for i in found["items"] if i["slug"] == "inbox"]
        (field,) = inbox["fields"]
        assert field["outcome"] == "overwritten"
        assert "-Skip newsletters." in field["diff"]
        assert found["overwritten"] == [
            {"kind": "watchers", "slug": "inbox", "path": "/prompt", "local": ours}
        ]
        assert await dump(engine) == before


def rfc7396(target: Any, patch: Any) -> Any:
    """RFC 7396's own algorithm, as section 2 writes it, for the law below."""
    if isinstance(patch, dict):
        if not isinstance(target, dict):
            target = {}
        target = dict(target)
        for name, value in patch.items():
            if value is None:
                target.pop(name, None)
            else:
                target[name] = rfc7396(target.get(name), value)
        return target
    return patch


WORDS = st.text(alphabet="abc xyz\n", min_size=0, max_size=12)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["", "a", "b\nc"]),
    lambda inner: st.dictionaries(st.sampled_from(["a", "b", "type", "x/y"]), inner, max_size=3),
    max_leaves=6,
)
# Merge patches of an entity type: every field, set or removed (`null`; `name` is required).
PATCHES = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(alphabet="Abc d", min_size=1, max_size=12),
        "description": st.none() | WORDS,
        "icon": st.none() | st.sampled_from(["star", "user"]),
        "color": st.none() | st.sampled_from(["#fff", "red"]),
        "metadata_schema": st.none()
        | st.dictionaries(st.sampled_from(["type", "a", "b"]), JSON, max_size=3),
        "event_kinds": st.none() | st.lists(st.sampled_from(["met", "called", "left"]), max_size=3),
    },
)
DEFAULTS = {
    "description": None,
    "icon": None,
    "color": None,
    "metadata_schema": {},
    "event_kinds": [],
}
LAWS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _service(database: URL, work: Any) -> Any:
    """Run `work(session, owner)` in one committed transaction, as the owner of `acme`."""

    async def run() -> Any:
        engine = create_engine(database)
        try:
            async with transaction(engine) as session:
                owner = await actor_for_email(session, "owner@example.com")
                return await work(session, owner)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _state(database: URL) -> tuple[dict[str, list[str]], int]:
    async def run() -> tuple[dict[str, list[str]], int]:
        engine = create_engine(database)
        try:
            return await dump(engine), await scalar(engine, "SELECT count(*) FROM events")
        finally:
            await engine.dispose()

    return asyncio.run(run())


class TestLaws:
    @LAWS
    @given(patch=PATCHES)
    def test_a_merge_patch_then_a_read_gives_the_patched_document(
        self, install_service_database_url: URL, patch: dict[str, Any]
    ) -> None:
        def item(session: Any, owner: Any) -> Any:
            return schema.get_item(session, owner, "acme", "entity_types", "person")

        before = _service(install_service_database_url, item).document
        written = _service(
            install_service_database_url,
            lambda session, owner: schema.update_item(
                session, owner, "acme", "entity_types", "person", patch
            ),
        )
        expected = {**DEFAULTS, **rfc7396(before, patch)}
        assert written.item.document == expected
        assert _service(install_service_database_url, item).document == expected
        assert written.changed == (expected != before)

    @LAWS
    @given(
        kind=st.sampled_from(["entity_types", "relationship_types", "classifiers", "watchers"]),
        data=st.data(),
    )
    def test_a_patch_that_changes_nothing_writes_nothing(
        self, install_service_database_url: URL, kind: str, data: st.DataObject
    ) -> None:
        slug = {
            "entity_types": "person",
            "relationship_types": "employs",
            "classifiers": "seniority",
            "watchers": "inbox",
        }[kind]
        current = _service(
            install_service_database_url,
            lambda session, owner: schema.get_item(session, owner, "acme", kind, slug),
        )
        # The empty patch, or any of the item's own values set again.
        fields = data.draw(st.lists(st.sampled_from(sorted(current.document)), unique=True))
        patch = {
            field: current.document[field]
            for field in fields
            if current.document[field] is not None
        }
        before = _state(install_service_database_url)
        written = _service(
            install_service_database_url,
            lambda session, owner: schema.update_item(
                session, owner, "acme", kind, slug, patch, if_match=f'"{current.etag}"'
            ),
        )
        assert written.changed is False
        assert written.item.etag == current.etag
        assert _state(install_service_database_url) == before
